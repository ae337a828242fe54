"""A training run that tells the truth and loses nothing (HHCL loop).

The validation split follows the test protocol; a damaged or mismatched checkpoint is refused in
one line naming the file; too few pseudo-identities for a batch, ``resume=False`` and an ``epochs``
below the epochs already done are each handled in the open."""

import warnings

import pytest
from _tiny import QUIET, tiny_dataset, tiny_hhcl_profile

from reidkit.config import get_profile
from reidkit.core.io import CheckpointError, read_train_checkpoint, torch_load
from reidkit.data.datasets import load_dataset
from reidkit.hhcl.method import train_hhcl
from reidkit.train.engine import make_val_split

pytestmark = pytest.mark.usefixtures("one_thread")  # torch at one thread (conftest)

def _tiny_profile(**kw):
    return tiny_hhcl_profile(**{"hhcl__epochs": 1, **kw})


def _copy_run(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "checkpoint.pt").write_bytes((src / "checkpoint.pt").read_bytes())
    return dst


# 1. the validation split ---------------------------------------------------------------------

def test_val_split_queries_every_camera_and_meets_same_camera_images():
    ds = load_dataset("mini-mars")
    train, q, g = make_val_split(ds.train, fraction=0.1, seed=3)
    held = {r.pid for r in q}
    assert not held & {r.pid for r in train} and len(train) + len(q) + len(g) == len(ds.train)
    for pid in held:  # queries from every camera of the identity (unless one would lack a valid match)
        cams = {r.camid for r in ds.train if r.pid == pid}
        assert {r.camid for r in q if r.pid == pid} == cams or len(cams) == 2
        assert len({r.camid for r in q if r.pid == pid}) >= 1
    # every query has a valid (other-camera) match, and the gallery holds same-camera images of it,
    # which evaluation removes as junk exactly as at test time
    assert all(any(gg.pid == qq.pid and gg.camid != qq.camid for gg in g) for qq in q)
    assert any(gg.pid == qq.pid and gg.camid == qq.camid for qq in q for gg in g)
    assert len({r.camid for r in q}) > 1
    again = make_val_split(ds.train, fraction=0.1, seed=3)
    assert [r.path for r in again[1]] == [r.path for r in q] and [r.path for r in again[2]] == [r.path for r in g]


# 2. a damaged checkpoint ---------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_checkpoint_is_refused_naming_the_file(tiny_hhcl_run, tmp_path, damage):
    out = _copy_run(tiny_hhcl_run, tmp_path / damage)
    ck = out / "checkpoint.pt"
    data = ck.read_bytes()
    ck.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        read_train_checkpoint(ck)
    msg = str(exc.value)
    assert str(ck) in msg and "\n" not in msg and "damaged" in msg
    with pytest.raises(CheckpointError, match="damaged"):
        train_hhcl(_tiny_profile(hhcl__epochs=2), tiny_dataset(), out_dir=out, **QUIET)


# 3. a checkpoint records its settings; resuming under others is refused -----------------------

def test_checkpoint_records_the_settings(tiny_hhcl_run):
    ck = torch_load(tiny_hhcl_run / "checkpoint.pt")
    for key in ("model", "profile", "arch", "pooling", "memory", "method", "settings"):
        assert key in ck
    s = ck["settings"]
    assert s["profile"] == "smoke" and s["method"] == "hhcl" and s["memory"] == "CMhybrid"
    assert {"arch", "init", "overrides"} <= set(s) and s["overrides"]["hhcl.iters"] == 1
    assert ck["init_source"]  # what the init resolved to (path, hub cache or random)
    assert "hhcl.epochs" not in s["overrides"]
    best = torch_load(tiny_hhcl_run / "model_best.pt")
    assert {"model", "profile", "arch", "pooling", "settings"} <= set(best)


@pytest.mark.parametrize("change, words", [
    (dict(memory="CM"), ["memory", "'CMhybrid'", "'CM'"]),
    (dict(prof_kw={"model__arch": "resnet50", "model__pretrained": False}), ["arch: checkpoint 'mobilenetv2' vs now 'resnet50'"]),
    (dict(prof_kw={"hhcl__temp": 0.1}), ["hhcl.temp"]),
])
def test_resume_under_other_settings_is_refused_naming_both_sides(tiny_hhcl_run, tmp_path, change, words):
    out = _copy_run(tiny_hhcl_run, tmp_path / "r")
    prof = _tiny_profile(hhcl__epochs=2, **change.get("prof_kw", {}))
    with pytest.raises(CheckpointError) as exc:
        train_hhcl(prof, tiny_dataset(), out_dir=out, memory=change.get("memory"), **QUIET)
    msg = str(exc.value)
    assert str(out / "checkpoint.pt") in msg and "checkpoint" in msg and "now" in msg and "\n" not in msg
    for w in words:
        assert w in msg


def test_resume_under_another_profile_is_refused(tiny_hhcl_run, tmp_path):
    out = _copy_run(tiny_hhcl_run, tmp_path / "p")
    other = _tiny_profile(hhcl__epochs=2)
    other = other.replace(name="workshop")
    with pytest.raises(CheckpointError, match="profile: checkpoint 'smoke' vs now 'workshop'"):
        train_hhcl(other, tiny_dataset(), out_dir=out, **QUIET)


# 4. too few pseudo-identities for a batch ----------------------------------------------------

def test_too_few_clusters_for_a_batch_is_a_clear_error(tmp_path):
    prof = _tiny_profile(hhcl__batch_size=256, hhcl__num_instances=4)
    with pytest.raises(ValueError, match=r"clusters x 4 instances = \d+ .*batch size 256"):
        train_hhcl(prof, tiny_dataset(), out_dir=tmp_path, **QUIET)


# 5. resume=False moves old files aside --------------------------------------------------------

def test_no_resume_moves_old_checkpoints_aside(tiny_hhcl_run, tmp_path):
    out = _copy_run(tiny_hhcl_run, tmp_path / "n")
    (out / "model_best.pt").write_bytes((tiny_hhcl_run / "model_best.pt").read_bytes())
    old = (out / "checkpoint.pt").read_bytes()
    logs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_hhcl(_tiny_profile(hhcl__iters=0), tiny_dataset(), out_dir=out, resume=False,
                   **{**QUIET, "log": logs.append})
    # an epoch without optimiser steps still counts for the schedule, without torch's order warning
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    baks = sorted(p.name for p in out.glob("*.bak"))
    assert len(baks) == 2 and baks[0].startswith("checkpoint.pt.") and baks[1].startswith("model_best.pt.")
    assert (out / baks[0]).read_bytes() == old
    assert sum("moved" in line for line in logs) == 2


# 6. epochs below the epochs already done -----------------------------------------------------

def test_epochs_below_the_epochs_done_is_an_error(tiny_hhcl_run, tmp_path):
    out = _copy_run(tiny_hhcl_run, tmp_path / "e")
    with pytest.raises(ValueError, match=r"1 epochs done.*0 asked"):
        train_hhcl(_tiny_profile(), tiny_dataset(), out_dir=out, epochs=0, **QUIET)


# the DGL loop reads its checkpoint the same way --------------------------------------------------

def test_dgl_refuses_a_damaged_checkpoint_and_records_its_settings(tmp_path):
    """A 0-byte DGL checkpoint is refused naming the file; a finished one records its variant and
    settings, and resuming it under other settings is refused."""
    from reidkit.dgl.method import train_dgl

    sample = load_dataset("mini-mars")
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="damaged"):
        train_dgl("smoke", sample, tmp_path, variant="unary_only", device="cpu", epochs=1, iters=1,
                  evaluate=False, log=lambda s: None)
    (tmp_path / "checkpoint.pt").unlink()
    train_dgl("smoke", sample, tmp_path, variant="unary_only", device="cpu", epochs=1, iters=1,
              evaluate=False, log=lambda s: None)
    ck = torch_load(tmp_path / "checkpoint.pt")
    assert ck["settings"]["variant"] == "unary_only" and ck["settings"]["method"] == "dgl"
    with pytest.raises(CheckpointError, match="dgl.lr: checkpoint"):
        train_dgl(get_profile("smoke").replace(dgl__lr=0.5), sample, tmp_path, variant="unary_only", device="cpu",
                  epochs=2, iters=1, evaluate=False, log=lambda s: None)


def test_resume_ignores_the_other_methods_settings():
    """An HHCL checkpoint records only the sections that shape HHCL's training; a change to
    ``dgl.*`` (notebook 05's overrides in the same run folder) does not block its resume."""
    from reidkit.dgl.method import DGL
    from reidkit.hhcl.method import HHCL
    from reidkit.train.checkpoints import run_settings

    base = _tiny_profile()
    hhcl = run_settings(base.replace(dgl__uo_batch_size=30), "hhcl", HHCL.sections, memory="CMhybrid")
    assert hhcl == run_settings(base, "hhcl", HHCL.sections, memory="CMhybrid")
    assert "hhcl.iters" in hhcl["overrides"]
    dgl = run_settings(base.replace(dgl__lr=0.5), "dgl", DGL.sections, variant="full")
    assert "dgl.lr" in dgl["overrides"] and not any(k.startswith(("hhcl.", "cluster.")) for k in dgl["overrides"])

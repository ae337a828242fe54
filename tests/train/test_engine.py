"""The engine shared by HHCL and DGL. One set of files for both methods, logs that
survive a killed run, a checkpoint before every evaluation, images checked before the first epoch,
and the command line for both methods (``reidkit train --method hhcl|dgl``)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _tiny import QUIET, tiny_dataset, tiny_hhcl_profile

from reidkit.config import get_profile
from reidkit.core.io import torch_load
from reidkit.data.records import BatchFillError, CorruptImageError
from reidkit.dgl.method import train_dgl
from reidkit.hhcl.method import HHCL, train_hhcl

pytestmark = pytest.mark.usefixtures("one_thread")  # torch at one thread (conftest)

ROOT = Path(__file__).resolve().parents[2]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# --------------------------------------------------------------------------------------------
# the same files for both methods, every epoch

@pytest.mark.parametrize("method", ["hhcl", "dgl"])
def test_both_methods_write_the_same_files_and_history_every_epoch(tmp_path, method):
    if method == "hhcl":
        res = train_hhcl(tiny_hhcl_profile(), tiny_dataset(), out_dir=tmp_path, stop_after=1, **QUIET)
    else:
        res = train_dgl("smoke", tiny_dataset(), tmp_path, variant="full", epochs=2, iters=1, stop_after=1,
                        **QUIET)
    assert not res.finished and res.method == method
    for name in ("checkpoint.pt", "model_best.pt", "history.json", "train.log"):
        assert (tmp_path / name).is_file(), name
    # history.json is written every epoch, not only at the end of the run
    assert [h["epoch"] for h in json.loads((tmp_path / "history.json").read_text())] == [0]
    ck = torch_load(tmp_path / "checkpoint.pt")
    assert ck["method"] == method and ck["epoch"] == 1 and ck["settings"]["method"] == method
    assert ck["init_source"] and ck["profile"] == "smoke"
    log = (tmp_path / "train.log").read_text()
    assert "epoch   0" in log and "init " in log  # the start line names the init source


def test_periodic_progress_lines_reach_the_log_file(tmp_path, monkeypatch):
    monkeypatch.setenv("REIDKIT_LOG_EVERY", "0")
    train_dgl("smoke", tiny_dataset(), tmp_path, variant="unary_only", epochs=1, iters=2, evaluate=False,
              **QUIET)
    lines = [ln for ln in (tmp_path / "train.log").read_text().splitlines() if "iteration" in ln]
    assert len(lines) == 2 and "iteration 2/2" in lines[-1] and "img/s" in lines[-1]


# --------------------------------------------------------------------------------------------
# order of work: images checked first, the checkpoint before the evaluation

def test_a_corrupt_gallery_image_stops_the_run_before_training(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        train_hhcl(tiny_hhcl_profile(), tiny_dataset([bad]), out_dir=tmp_path / "run", **QUIET)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # no epoch was trained


def test_the_epoch_is_checkpointed_before_it_is_evaluated(tmp_path, monkeypatch):
    """An evaluation that crashes loses no training: the checkpoint holds the epoch, marked as not
    yet evaluated, and the resumed run evaluates it first, then goes on."""
    real = HHCL.evaluate

    def crash(self, *a, **k):
        raise RuntimeError("evaluation died")

    monkeypatch.setattr(HHCL, "evaluate", crash)
    with pytest.raises(RuntimeError, match="evaluation died"):
        train_hhcl(tiny_hhcl_profile(), tiny_dataset(), out_dir=tmp_path, **QUIET)
    ck = torch_load(tmp_path / "checkpoint.pt")
    assert ck["epoch"] == 1 and ck["eval_pending"] is True
    monkeypatch.setattr(HHCL, "evaluate", real)
    logs = []
    res = train_hhcl(tiny_hhcl_profile(), tiny_dataset(), out_dir=tmp_path, **(QUIET | {"log": logs.append}))
    assert res.finished and [("test" in h) for h in res.history] == [True, True]
    assert any("resumed" in line and "epoch 1" in line for line in logs)
    assert torch_load(tmp_path / "checkpoint.pt")["eval_pending"] is False


# --------------------------------------------------------------------------------------------
# DGL: the checks HHCL already had

def test_dgl_no_resume_moves_old_files_aside(tmp_path):
    kw = dict(variant="unary_only", epochs=1, iters=1, evaluate=False, **QUIET)
    train_dgl("smoke", tiny_dataset(), tmp_path, **kw)
    before = (tmp_path / "model_best.pt").read_bytes()
    train_dgl("smoke", tiny_dataset(), tmp_path, resume=False, **kw)
    backups = sorted(p.name for p in tmp_path.glob("*.bak"))
    assert any(n.startswith("checkpoint.pt.") for n in backups)
    assert any(n.startswith("model_best.pt.") for n in backups)
    old = next(p for p in tmp_path.glob("model_best.pt.*.bak"))
    assert old.read_bytes() == before


def test_dgl_batch_that_cannot_be_filled_is_refused_at_start(tmp_path):
    prof = get_profile("smoke").replace(dgl__ids_per_batch=64)
    with pytest.raises(BatchFillError, match=r"training split cannot fill a batch: 8 identities, and a batch "
                                             r"takes 64 \(64 x 4 = 256 images\).*Lower dgl.ids_per_batch"):
        train_dgl(prof, tiny_dataset(), tmp_path, variant="full", epochs=1, iters=1, **QUIET)
    assert not (tmp_path / "checkpoint.pt").exists()


# --------------------------------------------------------------------------------------------
# the command line, as a user runs it

def _train_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "reidkit", "train", *args], capture_output=True, text=True,
                          env=_env(), timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("where", ["sample", "market-tree"])
def test_train_method_dgl_on_the_sample_and_a_market_tree(tmp_path, where):
    args = ["--method", "dgl", "--variant", "unary_only", "--profile", "smoke", "--epochs", "1", "--iters", "1",
            "--device", "cpu", "--out", str(tmp_path / "out"), "--set", "data.workers=0"]
    if where == "market-tree":
        from market_trees import sample_as_market

        root = sample_as_market(tmp_path / "Market-1501-v15.09.15")
        args += ["--dataset", "market1501", "--data-root", str(root)]
    run = _train_cli(*args)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["method"] == "dgl" and 0.0 <= result["mAP"] <= 1.0 and result["selection"] == "last"
    assert torch_load(tmp_path / "out" / "model_best.pt")["variant"] == "unary_only"


@pytest.mark.parametrize("args, words", [
    (["--set", "dgl.variant=bogus"], "dgl.variant: 'bogus' is not one of full, unary_only, supervised"),
    (["--method", "hhcl", "--variant", "full"], "--variant is DGL's"),
    (["--method", "dgl", "--memory", "CM"], "--memory is HHCL's"),
    (["--method", "fancy"], "invalid choice"),
])
def test_train_cli_argument_errors_exit_2_in_one_line(tmp_path, args, words):
    run = _train_cli("--profile", "smoke", "--out", str(tmp_path), *args, timeout=120)
    assert run.returncode == 2, run.stderr
    assert words in run.stderr and not (tmp_path / "checkpoint.pt").exists()


def test_killed_run_under_a_non_tty_stdout_keeps_its_log(tmp_path):
    """stdout to a file (SLURM), the run killed with SIGKILL after its first checkpointed epoch: the
    output file, train.log and history.json hold what the run said up to then."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "reidkit", "train", "--method", "dgl", "--variant", "unary_only", "--profile",
           "smoke", "--epochs", "50", "--iters", "1", "--device", "cpu", "--selection", "last", "--out", str(out),
           "--set", "data.workers=0"]
    with open(tmp_path / "slurm.out", "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "history.json").is_file():
            time.sleep(0.5)
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    said = (tmp_path / "slurm.out").read_text()
    assert "unary_only epoch   0" in said, said[-2000:]
    assert "unary_only epoch   0" in (out / "train.log").read_text()
    assert len(json.loads((out / "history.json").read_text())) >= 1
    shutil.rmtree(out)

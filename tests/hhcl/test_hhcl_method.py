"""The HHCL loop: ghost BN, the validation split, checkpoints, and bit-exact resume on CPU."""

import json

import pytest
import torch
from _tiny import tiny_dataset, tiny_hhcl_profile
from torch import nn

from reidkit.core.io import torch_load
from reidkit.data.datasets import load_dataset
from reidkit.hhcl.method import train_hhcl
from reidkit.nets.ghost_bn import GhostBatchNorm2d, apply_ghost_bn
from reidkit.train.engine import make_val_split

pytestmark = pytest.mark.usefixtures("one_thread")  # torch at one thread (conftest)


def test_ghost_bn_matches_per_chunk_batch_norm_and_first_chunk_running_stats():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(3)
    ghost = nn.Sequential(nn.BatchNorm2d(3))
    assert apply_ghost_bn(ghost, 4) == 1 and isinstance(ghost[0], GhostBatchNorm2d)
    x = torch.randn(12, 3, 5, 5)
    out = ghost(x)
    ref = torch.cat([nn.functional.batch_norm(c, None, None, training=True, eps=plain.eps) for c in x.split(4)])
    assert torch.allclose(out, ref, atol=1e-6)
    plain(x[:4])  # running statistics come from the first chunk only, as DataParallel's replica 0
    assert torch.allclose(ghost[0].running_mean, plain.running_mean)
    assert torch.allclose(ghost[0].running_var, plain.running_var)
    assert set(ghost.state_dict()) == {"0." + k for k in plain.state_dict()}
    ghost.eval()
    assert torch.allclose(ghost(x), nn.functional.batch_norm(x, ghost[0].running_mean, ghost[0].running_var,
                                                             eps=plain.eps), atol=1e-6)


def test_val_split_holds_out_multi_camera_identities():
    ds = load_dataset("mini-mars")
    train, q, g = make_val_split(ds.train, fraction=0.1, seed=3)
    held = {r.pid for r in q}
    assert held == {r.pid for r in g} and len(held) == 2
    assert not held & {r.pid for r in train}
    assert len(train) + len(q) + len(g) == len(ds.train)
    assert all(any(qq.pid == gg.pid and qq.camid != gg.camid for gg in g) for qq in q)


def _tiny_profile():
    return tiny_hhcl_profile(hhcl__iters=2, hhcl__eval_step=2)


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    ds, prof = tiny_dataset(), _tiny_profile()
    full = train_hhcl(prof, ds, out_dir=tmp_path / "full", selection="last", log=lambda *_: None)
    assert [h["epoch"] for h in full.history] == [0, 1]
    part = train_hhcl(prof, ds, out_dir=tmp_path / "part", selection="last", stop_after=1, log=lambda *_: None)
    assert len(part.history) == 1 and part.test is None
    logs = []
    resumed = train_hhcl(prof, ds, out_dir=tmp_path / "part", selection="last", log=logs.append)
    assert any("resumed" in line for line in logs)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    assert full.test == resumed.test
    ck = torch_load(tmp_path / "full" / "checkpoint.pt")
    assert ck["epoch"] == 2 and ck["memory"] == "CMhybrid"
    assert (tmp_path / "full" / "model_best.pt").is_file()
    hist = json.loads((tmp_path / "full" / "history.json").read_text())
    assert {"clusters", "outliers", "loss", "t_jaccard", "t_dbscan", "t_train", "test"} <= set(hist[-1])

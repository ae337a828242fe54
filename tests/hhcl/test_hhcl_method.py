"""The HHCL loop: ghost BN, the validation split, checkpoints, and bit-exact resume on CPU."""

import json

import numpy as np
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


def _folder_tree(root, ds):
    """The tiny dataset in the plain folder layout (camera as a _c<k> token), linked to the sample."""
    for split in ("train", "query", "gallery"):
        for i, r in enumerate(getattr(ds, split)):
            d = root / split / f"{r.pid:04d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{r.pid:04d}_c{r.camid + 1}_{i:04d}.jpg").symlink_to(r.path)
    return root


def _torchrun_and_one_process(tmp_path, common, sets_ddp, sets_one, port):
    """``reidkit train`` twice: under torchrun with 2 gloo processes into ``tmp_path/ddp``, and as one
    process into ``tmp_path/one``."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, launcher, sets in (("ddp", ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                                         str(port)], sets_ddp), ("one", [], sets_one)):
        run = subprocess.run([sys.executable, *launcher, "-m", "reidkit", "train", *common, "--out",
                              str(tmp_path / out), *sum((["--set", s] for s in sets), [])],
                             capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    runs = [(json.loads((tmp_path / o / "history.json").read_text()),
             torch_load(tmp_path / o / "checkpoint.pt")["model"]) for o in ("ddp", "one")]
    (h_ddp, a), (h_one, b) = runs
    # iteration 1: same weights, so the global-batch loss matches; iteration 2: after one Adam step
    # (whose first update is ~lr*sign(g): summation-order noise on near-zero gradients shows up at
    # the 1e-4 level)
    assert np.isclose(h_ddp[0]["losses"][0], h_one[0]["losses"][0], rtol=1e-5)
    assert np.isclose(h_ddp[0]["losses"][1], h_one[0]["losses"][1], rtol=1e-3)
    moved = sum(float((b[k].float() - a[k].float()).norm()) for k in b if b[k].is_floating_point())
    assert moved < 1e-2 * sum(float(b[k].float().norm()) for k in b if b[k].is_floating_point())
    return h_ddp, h_one, a, b


def test_ddp_two_cpu_processes_match_one_process_with_ghost_bn(tmp_path):
    """torchrun with 2 gloo processes (each a contiguous half of every global batch, the memory
    updated with the gathered batch) trains like one process whose BN normalises the same halves."""
    root = _folder_tree(tmp_path / "data", tiny_dataset())
    sets = ["data.flip=false", "data.pad=0", "data.erasing_p=0", "data.workers=0", "hhcl.amp=false", "hhcl.iters=2",
            "hhcl.batch_size=16", "hhcl.num_instances=4", "hhcl.epochs=1", "hhcl.eval_step=1",
            "cluster.k1=10", "cluster.k2=3", "cluster.eps=0.6"]
    common = ["--profile", "smoke", "--dataset", "folder", "--data-root", str(root), "--selection", "last",
              "--device", "cpu"]
    h_ddp, h_one, a, b = _torchrun_and_one_process(tmp_path, common, sets + ["hhcl.ghost_bn=null"],
                                                   sets + ["hhcl.ghost_bn=8"], 29517)
    assert h_ddp[0]["clusters"] == h_one[0]["clusters"]  # the memory updated from the gathered batch
    for k in ("neck.running_mean", "neck.running_var"):
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5), k


def test_dgl_ddp_two_cpu_processes_match_one_process(tmp_path):
    """DGL under torchrun with 2 gloo processes: each rank forwards half of every global batch, the
    outputs are gathered with their gradients, and every rank computes the bag loss over the whole
    batch, so training follows one process whose BN normalises the same halves (ghost BN)."""
    root = _folder_tree(tmp_path / "data", tiny_dataset())
    sets = ["data.flip=false", "data.erasing_p=0", "data.workers=0", "dgl.amp=false", "dgl.epochs=1",
            "dgl.ids_per_batch=4", "dgl.images_per_id=4", "dgl.ids_per_bag=2"]
    common = ["--method", "dgl", "--variant", "full", "--profile", "smoke", "--dataset", "folder", "--data-root",
              str(root), "--selection", "last", "--device", "cpu", "--iters", "2"]
    h_ddp, h_one, _, _ = _torchrun_and_one_process(tmp_path, common, sets, sets + ["dgl.ghost_bn=8"], 29527)
    assert h_ddp[0]["images"] == h_one[0]["images"] == 32  # the global batch, counted once
    for name in ("checkpoint.pt", "model_best.pt", "history.json", "train.log"):
        assert (tmp_path / "ddp" / name).is_file(), name

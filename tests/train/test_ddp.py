"""DDP on the CPU: ``reidkit train`` under torchrun with two gloo processes against one process
whose ghost BN normalises the same halves of every batch, for both methods."""

import json
import os
import subprocess
import sys

import numpy as np
import torch
from _tiny import tiny_dataset
from trees import folder_tree

from reidkit.core.io import torch_load


def _torchrun_and_one_process(tmp_path, common, sets_ddp, sets_one, port):
    """``reidkit train`` twice: under torchrun with 2 gloo processes into ``tmp_path/ddp``, and as one
    process into ``tmp_path/one``."""
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
    root = folder_tree(tmp_path / "data", tiny_dataset())
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
    root = folder_tree(tmp_path / "data", tiny_dataset())
    sets = ["data.flip=false", "data.erasing_p=0", "data.workers=0", "dgl.amp=false", "dgl.epochs=1",
            "dgl.ids_per_batch=4", "dgl.images_per_id=4", "dgl.ids_per_bag=2"]
    common = ["--method", "dgl", "--variant", "full", "--profile", "smoke", "--dataset", "folder", "--data-root",
              str(root), "--selection", "last", "--device", "cpu", "--iters", "2"]
    h_ddp, h_one, _, _ = _torchrun_and_one_process(tmp_path, common, sets, sets + ["dgl.ghost_bn=8"], 29527)
    assert h_ddp[0]["images"] == h_one[0]["images"] == 32  # the global batch, counted once
    for name in ("checkpoint.pt", "model_best.pt", "history.json", "train.log"):
        assert (tmp_path / "ddp" / name).is_file(), name

"""Multi-node launch, as far as one machine allows: two gloo processes that rendezvous through the
c10d backend on 127.0.0.1 (what ``torchrun --nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT``
does across nodes) train the smoke profile for one epoch; both ranks finish and rank 0 writes the
checkpoint (docs/distributed.md)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trees import market1501_tree

SETS = ["data.flip=false", "data.pad=0", "data.erasing_p=0", "data.workers=0", "hhcl.amp=false", "hhcl.iters=2",
        "hhcl.batch_size=16", "hhcl.num_instances=4", "hhcl.eval_step=1", "cluster.k1=10", "cluster.k2=3",
        "cluster.eps=0.6"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, train_args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "REIDKIT_OFFLINE": "1",
           "REIDKIT_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "c10d-test",
           "--log-dir", str(tmp_path / "logs"), "--redirects", "3",
           "-m", "reidkit", "train", *train_args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)


def _rank_logs(log_dir: Path) -> dict[int, str]:
    """stdout + stderr of each local rank, from torchrun's ``--log-dir`` (``<run>/attempt_0/<rank>/``)."""
    out: dict[int, str] = {}
    for f in sorted(log_dir.rglob("std*.log")):
        rank = int(f.parent.name)
        out[rank] = out.get(rank, "") + f.read_text()
    return out


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_gloo_processes_rendezvous_through_c10d_and_train_the_smoke_profile(tmp_path):
    root = market1501_tree(tmp_path / "data")
    out = tmp_path / "run"
    proc = _torchrun(tmp_path, ["--profile", "smoke", "--dataset", "market1501", "--data-root", str(root),
                                "--selection", "last", "--device", "cpu", "--epochs", "1", "--out", str(out),
                                *sum((["--set", s] for s in SETS), [])])
    logs = _rank_logs(tmp_path / "logs")
    assert proc.returncode == 0, proc.stderr[-3000:] + "\n".join(v[-2000:] for v in logs.values())
    # both ranks ran to the end (torchrun returns 0 only when every worker exited 0) and logged
    assert sorted(logs) == [0, 1]
    assert "Traceback" not in "".join(logs.values())
    # rank 0 wrote the checkpoint and the history of the one epoch; the world size was 2
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 1 and state["profile"] == "smoke"
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and "test" in history[0]
    assert "x 2" in logs[0]                                   # "device cpu x 2": two processes


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_dgl_through_c10d_too(tmp_path):
    """The other method under the same launcher: DGL's full model on the smoke profile, bags of the
    Market tree split over the two ranks."""
    root = market1501_tree(tmp_path / "data")
    out = tmp_path / "run"
    proc = _torchrun(tmp_path, ["--method", "dgl", "--variant", "full", "--profile", "smoke", "--dataset",
                                "market1501", "--data-root", str(root), "--device", "cpu", "--epochs", "1",
                                "--iters", "2", "--out", str(out), "--set", "data.workers=0",
                                "--set", "dgl.ids_per_batch=4", "--set", "dgl.images_per_id=2"])
    logs = _rank_logs(tmp_path / "logs")
    assert proc.returncode == 0, proc.stderr[-3000:] + "\n".join(v[-2000:] for v in logs.values())
    assert sorted(logs) == [0, 1] and "x 2" in logs[0]
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 1 and state["method"] == "dgl"
    assert json.loads((out / "history.json").read_text())[0]["iters"] == 2

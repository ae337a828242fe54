"""One run per folder: a second ``reidkit train`` on a held ``--out`` or ``reidkit reproduce`` on a held
``--run-dir`` stops at once (exit 2, one line naming the folder and the holder); the lock goes with
a normal exit, an exception or a killed holder; the notebooks' training inside a locked run folder
is not blocked by it; under DDP every rank stops when rank 0 is refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
from _cli import one_line_error

from reidkit import cli
from reidkit.train.engine import fit
from reidkit.train.run_lock import LOCK_NAME, RunLock, RunLockedError, read_holder

ROOT = Path(__file__).resolve().parents[2]
HOST = socket.gethostname()


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "REIDKIT_OFFLINE": "1", "REIDKIT_PROGRESS": "0"}


class _Stop(Exception):
    """Raised by the stub method once it has seen what the test wants."""


class _StubMethod:
    """The least a method needs for ``fit`` to reach ``prepare``, which calls ``on_prepare(out)``."""

    def __init__(self, on_prepare):
        self.prof = types.SimpleNamespace(seed=0)
        self.batch_size = 1
        self.on_prepare = on_prepare

    def prepare(self, dev, selection, seed, log):
        self.on_prepare()
        raise _Stop


def _holds(folder: Path) -> bool:
    """Whether ``folder`` is locked by someone (tries to take the lock and gives it back)."""
    try:
        RunLock(folder).acquire().release()
    except RunLockedError:
        return True
    return False


# -- the lock itself ----------------------------------------------------------------------------

def test_lock_records_the_holder_and_refuses_a_second_taker(tmp_path):
    with RunLock(tmp_path / "out", command="reidkit train --out x") as lock:
        info = read_holder(lock.path)
        assert (info["pid"], info["host"], info["command"]) == (os.getpid(), HOST, "reidkit train --out x")
        assert info["started"][:4].isdigit()
        with pytest.raises(RunLockedError) as err:
            RunLock(tmp_path / "out").acquire()
    msg = str(err.value)
    assert str(tmp_path / "out") in msg and f"pid {os.getpid()} on host {HOST}" in msg and "\n" not in msg
    assert not (tmp_path / "out" / LOCK_NAME).exists()


@pytest.mark.parametrize("use_flock", [True, False])
@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt])
def test_lock_is_released_after_an_exception(tmp_path, use_flock, exc):
    with pytest.raises(exc):
        with RunLock(tmp_path, use_flock=use_flock):
            assert _holds(tmp_path) if use_flock else (tmp_path / LOCK_NAME).is_file()
            raise exc("stop")
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path, use_flock=use_flock):  # taken again at once
        pass


def test_exclusive_file_fallback_refuses_a_live_holder_and_another_host(tmp_path):
    with RunLock(tmp_path, use_flock=False):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on host"):
            RunLock(tmp_path, use_flock=False).acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": HOST + "-elsewhere"}))
    with pytest.raises(RunLockedError, match=f"pid 1 on host {HOST}-elsewhere"):
        RunLock(tmp_path, use_flock=False).acquire()


_HOLDER = """
import sys, time
from reidkit.train.run_lock import RunLock
lock = RunLock(sys.argv[1], use_flock=sys.argv[2] == "flock").acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("mode", ["flock", "exclusive"])
def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path, mode):
    folder = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), mode], stdout=subprocess.PIPE,
                             text=True, env=_env())
    try:
        assert child.stdout.readline().strip() == "held"
        assert read_holder(folder / LOCK_NAME)["pid"] == child.pid
        with pytest.raises(RunLockedError, match=f"pid {child.pid} "):
            RunLock(folder, use_flock=mode == "flock").acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert read_holder(folder / LOCK_NAME)["pid"] == child.pid  # the file outlived its holder
    with RunLock(folder, use_flock=mode == "flock") as lock:
        assert read_holder(lock.path)["pid"] == os.getpid()


# -- the training engine --------------------------------------------------------------------------

def test_fit_holds_the_out_folder_and_releases_it_after_an_exception(tmp_path):
    seen = []
    with pytest.raises(_Stop):
        fit(_StubMethod(lambda: seen.append(_holds(tmp_path))), tmp_path, device="cpu", log=lambda *_: None)
    assert seen == [True]
    assert not (tmp_path / LOCK_NAME).exists() and not _holds(tmp_path)


def test_fit_on_a_held_folder_touches_nothing(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"old run")
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()} "):
            fit(_StubMethod(lambda: None), tmp_path, device="cpu", resume=False, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # not moved aside, no train.log
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"old run"


def test_training_inside_a_locked_run_folder_is_not_blocked(tmp_path):
    """reproduce locks RUN_DIR; notebook 04 trains into RUN_DIR/04_hybrid_contrast/<memory>."""
    sub = tmp_path / "04_hybrid_contrast" / "CM"
    seen = []
    with RunLock(tmp_path):
        with pytest.raises(_Stop):
            fit(_StubMethod(lambda: seen.append((_holds(sub), _holds(tmp_path)))), sub, device="cpu",
                log=lambda *_: None)
        assert _holds(tmp_path)
    assert seen == [(True, True)]
    assert not (sub / LOCK_NAME).exists()


def test_second_reidkit_train_on_a_held_out_folder_exits_2(tmp_path):
    out = tmp_path / "out"
    with RunLock(out):
        res = subprocess.run([sys.executable, "-m", "reidkit", "train", "--profile", "smoke", "--out", str(out),
                              "--device", "cpu"], capture_output=True, text=True, env=_env(), timeout=300)
        assert (out / LOCK_NAME).is_file()
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert f"{out} is in use by another run: pid {os.getpid()} on host {HOST}" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == []  # no train.log, no checkpoint


_RANK = """
import os, sys
import torch.distributed as dist
from pathlib import Path
from reidkit.train.engine import out_folder_lock
from reidkit.train.run_lock import LOCK_NAME, RunLockedError, read_holder
dist.init_process_group("gloo")
rank = dist.get_rank()
try:
    with out_folder_lock(Path(sys.argv[1]), rank, 2):
        print("entered held folder", flush=True)
except RunLockedError as exc:
    print("refused:", exc, flush=True)
with out_folder_lock(Path(sys.argv[2]), rank, 2):
    dist.barrier()
    print("free folder lock pid", read_holder(Path(sys.argv[2]) / LOCK_NAME).get("pid"), "me", os.getpid(), flush=True)
    dist.barrier()
dist.destroy_process_group()
"""


def test_every_rank_stops_when_rank_0_is_refused(tmp_path):
    held, free = tmp_path / "held", tmp_path / "free"
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29_500 + os.getpid() % 1000),
           "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    with RunLock(held):
        procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(held), str(free)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r)}) for r in (0, 1)]
        outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    (out0, _), (out1, _) = outs
    assert f"refused: {held} is in use by another run: pid {os.getpid()}" in out0
    assert "refused: rank 0 could not lock" in out1 and f"pid {os.getpid()}" in out1
    assert "entered" not in out0 + out1
    pid0 = procs[0].pid
    assert f"free folder lock pid {pid0} me {pid0}" in out0  # rank 0 holds it, rank 1 took none
    assert f"free folder lock pid {pid0} me {procs[1].pid}" in out1
    assert not (free / LOCK_NAME).exists()


# -- reproduce ------------------------------------------------------------------------------------

def test_reproduce_on_a_held_run_dir_exits_2(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with RunLock(run_dir):
        rc = cli.main(["reproduce", "--profile", "smoke", "--run-dir", str(run_dir), "--notebooks", "01"])
    line = one_line_error(capsys, rc)
    assert f"{run_dir.resolve()} is in use by another run: pid {os.getpid()} on host {HOST}" in line
    assert sorted(p.name for p in run_dir.iterdir()) == []  # no run.json, no notebook ran

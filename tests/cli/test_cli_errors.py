"""The command line's side of a run that tells the truth: user errors exit 2 in one line before any work,
written files follow the umask, reproduce's completion digest ignores the run folder's path,
``report`` on a folder that is no run folder, and line-flushed stdout. No training here."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest
from _cli import one_line_error

from reidkit import cli, commands
from reidkit.config import OverrideError, parse_set, validate_overrides

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_training(monkeypatch):
    """The training loop replaced by one that fails the test: an error must come before any work."""

    def fit(*a, **k):
        raise AssertionError("the training loop was reached: the user error was not caught before the work")

    monkeypatch.setattr("reidkit.hhcl.method.fit", fit)
    monkeypatch.setattr("reidkit.dgl.method.fit", fit)
    monkeypatch.setattr("reidkit.hhcl.supervised.fit", fit)
    monkeypatch.setattr("reidkit.commands.fit", fit)


@pytest.mark.parametrize("extra, expect", [
    (["--profile", "nope"], "unknown profile 'nope'"),
    (["--set", "foo.bar=1"], "--set foo.bar"),
    (["--set", "hhcl.nofield=1"], "no field 'nofield'"),
    (["--set", "hhcl.iters=abc"], "expected an integer, got 'abc'"),
    (["--set", "hhcl.memory=CMX"], "'CMX' is not one of CM, CMhybrid, CMhybrid_v2"),
    (["--set", "model.arch=vgg16"], "'vgg16' is not one of"),
    (["--set", "camera.jaccard=xx"], "'xx' is not one of plain, ca"),
    (["--method", "dgl", "--camera-aware"], "camera.* are HHCL's"),
    (["--method", "dgl", "--memory", "CM"], "--memory is HHCL's"),
    (["--method", "softmax", "--memory", "CM"], "--memory is HHCL's"),
    (["--method", "softmax", "--camera-aware"], "camera.* are HHCL's"),
    (["--set", "hhcl.iters"], "SECTION.FIELD=VALUE"),
    (["--device", "gpu"], "bad --device 'gpu'"),
    (["--dataset", "nosuchset"], "unknown dataset 'nosuchset'"),
])
def test_train_user_errors_exit_2_in_one_line(extra, expect, tmp_path, capsys, no_training):
    rc = cli.main(["train", "--profile", "smoke", "--out", str(tmp_path / "out"), *extra])
    assert expect in one_line_error(capsys, rc)
    assert not (tmp_path / "out").exists()


def test_train_bad_data_root_exits_2(tmp_path, capsys, no_training):
    missing = tmp_path / "missing"
    rc = cli.main(["train", "--profile", "smoke", "--out", str(tmp_path / "o"), "--data-root", str(missing)])
    assert str(missing) in one_line_error(capsys, rc)
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = cli.main(["train", "--profile", "smoke", "--out", str(tmp_path / "o"), "--data-root", str(empty)])
    assert str(empty) in one_line_error(capsys, rc)


def test_train_cuda_without_cuda_exits_2(tmp_path, capsys, no_training, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = cli.main(["train", "--profile", "smoke", "--out", str(tmp_path / "o"), "--device", "cuda"])
    assert "CUDA is not available" in one_line_error(capsys, rc)


def test_enumerated_fields_are_checked_in_config():
    assert parse_set(["hhcl.memory=CM", "model.arch=mobilenetv2"]) == {"hhcl.memory": "CM",
                                                                       "model.arch": "mobilenetv2"}
    with pytest.raises(OverrideError, match="CMX"):
        parse_set(["hhcl.memory=CMX"])
    with pytest.raises(OverrideError, match="vgg"):   # run.json read back goes through the same check
        validate_overrides({"model.arch": "vgg"})


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, want", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(mask, want, tmp_path):
    from reidkit.core.io import atomic_torch_save, atomic_write_bytes, atomic_write_json, current_umask

    old = os.umask(mask)
    try:
        assert current_umask() == mask
        paths = [atomic_write_json(tmp_path / "a.json", {"x": 1}), atomic_write_bytes(tmp_path / "b.md", b"x"),
                 atomic_torch_save({"w": 1}, tmp_path / "c.pt")]
        commands._save_npz(tmp_path / "d.npz", [[1.0]], [types.SimpleNamespace(pid=1, camid=0, path="x.jpg")])
        paths.append(tmp_path / "d.npz")
    finally:
        os.umask(old)
    assert {p.name: oct(_mode(p)) for p in paths} == {p.name: oct(want) for p in paths}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary file left


def test_reproduce_digest_ignores_the_run_folder(tmp_path):
    from reidkit.course.reproduce import params_digest

    nb = tmp_path / "01_x.ipynb"
    nb.write_text('{"cells": []}')
    params = {"PROFILE": "smoke", "DATA_ROOT": "", "DEVICE": "auto", "SEED": 1, "INTERACTIVE": False}
    here = params_digest({**params, "RUN_DIR": "/scratch/a/run1"}, nb, {"hhcl.epochs": 2})
    moved = params_digest({**params, "RUN_DIR": "/home/b/moved/run1"}, nb, {"hhcl.epochs": 2})
    assert here == moved
    assert here != params_digest({**params, "RUN_DIR": "/scratch/a/run1"}, nb, {"hhcl.epochs": 3})
    assert here != params_digest({**params, "RUN_DIR": "/scratch/a/run1", "SEED": 2}, nb, {"hhcl.epochs": 2})
    nb.write_text('{"cells": [1]}')
    assert here != params_digest({**params, "RUN_DIR": "/scratch/a/run1"}, nb, {"hhcl.epochs": 2})


def test_report_on_a_typo_exits_2_and_creates_nothing(tmp_path, capsys):
    typo = tmp_path / "typo"
    rc = cli.main(["report", str(typo)])
    assert str(typo) in one_line_error(capsys, rc)
    assert not typo.exists()
    plain = tmp_path / "plain"      # an existing folder that holds no run
    plain.mkdir()
    assert cli.main(["report", str(plain)]) == 2
    assert not (plain / "report.md").exists()
    capsys.readouterr()
    run = tmp_path / "run"
    (run / "01_x").mkdir(parents=True)
    (run / "01_x" / "metrics.json").write_text(json.dumps({"mAP": 0.5}))
    assert cli.main(["report", str(run)]) == 0
    assert (run / "report.md").is_file()


def test_stdout_is_line_flushed_when_not_a_terminal(tmp_path):
    """stdout to a file, as under SLURM: every printed line is in the file even when the process
    dies without flushing (``os._exit`` skips the flush at exit)."""
    log = tmp_path / "out.log"
    code = ("import os, sys\nfrom reidkit.cli import main\nmain(['profiles'])\n"
            "print(f'line_buffering={sys.stdout.line_buffering}', file=sys.stderr, flush=True)\nos._exit(0)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("PYTHONUNBUFFERED", None)
    with open(log, "w") as fh:
        res = subprocess.run([sys.executable, "-c", code], stdout=fh, stderr=subprocess.PIPE, text=True,
                             cwd=tmp_path, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "line_buffering=True" in res.stderr
    text = log.read_text()
    assert "smoke" in text and "workshop" in text


def test_python_m_reidkit_profiles_to_a_file(tmp_path):
    log = tmp_path / "profiles.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "w") as fh:
        res = subprocess.run([sys.executable, "-m", "reidkit", "profiles"], stdout=fh, stderr=subprocess.PIPE,
                             text=True, cwd=tmp_path, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "smoke" in log.read_text()


@pytest.mark.parametrize("command", ["evaluate", "extract"])
def test_text_file_as_weights_exits_2_in_one_line(command, tmp_path, capsys):
    weights = tmp_path / "notes.txt"
    weights.write_text("epoch 12: mAP 81.3\nthis is a log, not a checkpoint\n")
    extra = ["--split", "query", "--out", str(tmp_path / "q.npz")] if command == "extract" else []
    rc = cli.main([command, "--weights", str(weights), "--dataset", "mini-mars", "--device", "cpu", *extra])
    line = one_line_error(capsys, rc)
    assert line.startswith(f"error: {weights}: a text file (starting 'epoch 12: mAP 81.3'), not a torch checkpoint")
    assert "expected a file written by torch.save" in line and "[kit]" in line
    assert not (tmp_path / "q.npz").exists()

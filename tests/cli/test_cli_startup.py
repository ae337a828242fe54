"""The command line parses before it loads PyTorch (about 5 s of imports on a laptop): ``--help``,
``profiles`` and a mistyped argument answer from the standard library and reidkit.config alone;
``reidkit.commands`` loads only when a command that needs it runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _gpu_image import LACKS, gpu_image_env

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import contextlib, io, json, sys
from reidkit.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:   # --help
        code = exc.code
heavy = sorted(m for m in ("torch", "torchvision", "sklearn", "papermill") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy, "out": out.getvalue()}))
"""


@pytest.mark.parametrize("argv, expect", [
    (["--help"], "reidkit train --profile market1501"),
    (["train", "--help"], "--method {hhcl,dgl,supervised,softmax}"),
    (["profiles"], "workshop"),
    (["train", "--method", "nope", "--out", "x"], "invalid choice: 'nope'"),
])
def test_cheap_commands_do_not_import_torch(argv, expect):
    res = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert expect in got["out"] + res.stderr
    assert got["code"] == (2 if "nope" in argv else 0)
    assert got["heavy"] == [], f"reidkit {' '.join(argv)} imported {got['heavy']}"


def test_a_command_that_runs_loads_the_commands():
    """The other side: ``datasets`` runs through reidkit.commands (and its imports) and prints the
    embedded sample's table."""
    res = subprocess.run([sys.executable, "-c", PROBE, "datasets", "--dataset", "mini-mars", "--no-verify"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["code"] == 0 and "mini-mars" in got["out"] and "torch" in got["heavy"]


def test_the_commands_load_without_the_notebook_stack(tmp_path):
    """A GPU machine's image has PyTorch but no papermill, nbconvert or faiss (tests/_gpu_image.py):
    training and evaluation must still load there; only ``reproduce`` needs the notebooks."""
    probe = ("import importlib.util, json, reidkit.commands\n"
             f"print(json.dumps([m for m in {list(LACKS)!r} if importlib.util.find_spec(m) is not None]))")
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=gpu_image_env(tmp_path / "image"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []   # none of them could be found

"""A dry run of every paper profile on a small tree in its dataset's real layout.

Each run keeps the profile's own network (ResNet-50 with ghost BN for HHCL, MGN for DGL on
SYSU-30k), input size, sampler, memory, loss and evaluation protocol. Only what a two-core machine
cannot afford is cut, and every cut is a ``--set`` override recorded in run.json: iterations and
epochs, the images (the tree), the batch (to what the tree holds), and the weights (random, asked
for explicitly: no ImageNet file can be downloaded here).

Per tree: ``reidkit train`` for one epoch, then resumed to a second (checkpoint, resume, the
evaluation protocol, SYSU-30k's streamed); ``reidkit evaluate`` of the selected model; and
``reidkit reproduce`` up to report.md. Every notebook runs under a paper profile at least once:
market1501 runs 01-04 and 06; sysu30k runs its method's notebook (05, with MGN on the streamed
bags and the SYSU-30k protocol; the others are skipped, each with its reason in the report); dukemtmcreid and msmt17 (both
layouts) take market1501's code path through notebooks 02-05, so their reproduction runs 01 (their
data) and 06."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from trees import PAPER_TREES, build_tree

from reidkit.core.device import cpu_name
from reidkit.core.io import torch_load

ROOT = Path(__file__).resolve().parents[2]

#: tree -> the paper profile that runs on it
PROFILE_OF = {"market1501": "market1501", "dukemtmcreid": "dukemtmcreid", "msmt17": "msmt17",
              "msmt17-converted": "msmt17", "sysu30k": "sysu30k"}

#: the cuts of a dry run, each recorded in run.json (everything else is the profile's)
CUTS = ["model.pretrained=false", "data.workers=0", "data.test_batch_size=16",
        "hhcl.iters=1", "hhcl.batch_size=8", "hhcl.num_instances=4", "hhcl.eval_step=1",
        "dgl.ids_per_batch=4", "dgl.images_per_id=2", "dgl.epochs=1", "dgl.iters=2", "dgl.uo_epochs=1",
        "dgl.uo_batch_size=30", "dgl.uo_bags_per_batch=2", "hhcl.epochs=1"]


def _sets(extra=()):
    return sum((["--set", s] for s in [*CUTS, *extra]), [])


def _reidkit(*args, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "REIDKIT_PROGRESS": "0"}
    run = subprocess.run([sys.executable, "-m", "reidkit", *args], capture_output=True, text=True, env=env,
                         timeout=timeout, cwd=ROOT)
    assert run.returncode == 0, f"reidkit {' '.join(args[:3])}: {run.stderr[-3000:]}"
    return run


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("paper-trees")
    return {key: build_tree(key, base / key) for key in PAPER_TREES}


@pytest.mark.parametrize("key", list(PAPER_TREES))
def test_train_resume_and_evaluate(tmp_path, trees, key):
    profile, data = PROFILE_OF[key], trees[key]
    out = tmp_path / "out"
    train = ["train", "--profile", profile, "--data-root", str(data), "--out", str(out), "--device", "cpu"]
    first = _reidkit(*train, "--epochs", "1", *_sets())
    assert json.loads(first.stdout.strip().splitlines()[-1])["selected_epoch"] == 0
    ck = torch_load(out / "checkpoint.pt")
    method = "dgl" if profile == "sysu30k" else "hhcl"
    assert ck["epoch"] == 1 and ck["method"] == method and ck["init_source"] == "random"
    assert ck["arch"] == "resnet50"
    if method == "hhcl":
        assert ck["memory"] == "CMhybrid" and ck["ghost_bn_layers"] > 50  # ResNet-50's BN layers, ghost
    else:
        assert ck["network"] == "mgn" and ck["variant"] == "full"
    second = _reidkit(*train, "--epochs", "2", *_sets())
    result = json.loads(second.stdout.strip().splitlines()[-1])
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]
    assert "resumed from" in (out / "train.log").read_text()
    if method == "dgl":  # the SYSU-30k protocol, the gallery streamed with its distractors
        assert result["protocol"] == "sysu30k" and 0.0 <= result["rank1"] <= 1.0
    else:
        assert "val" in history[-1] and 0.0 <= result["mAP"] <= 1.0
    dataset = PAPER_TREES[key][0]
    ev = _reidkit("evaluate", "--weights", str(out / "model_best.pt"), "--dataset", dataset, "--data-root",
                  str(data), "--device", "cpu", "--json")
    scored = json.loads(ev.stdout)
    assert ("rank1" in scored) and scored.get("environment")
    assert scored["environment"]["cpu"] == cpu_name()  # the host CPU, on every device


@pytest.mark.parametrize("key", list(PAPER_TREES))
def test_reproduce_up_to_the_report(tmp_path, trees, key):
    profile, data = PROFILE_OF[key], trees[key]
    run_dir = tmp_path / "run"
    only = {"market1501": ["--notebooks", "01", "02", "03", "04", "06"], "sysu30k": []}.get(
        key, ["--notebooks", "01", "06"])
    _reidkit("reproduce", "--profile", profile, "--data-root", str(data), "--run-dir", str(run_dir), "--device",
             "cpu", *only, *_sets(), timeout=1500)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["overrides"]["model.pretrained"] is False and run["overrides"]["hhcl.iters"] == 1
    report = (run_dir / "report.md").read_text()
    assert "model.pretrained" in report and profile in report
    assert "## Environment" in report and "Beside the paper" in report
    if key == "sysu30k":
        assert set(run["skipped"]) == {"01_data_prep", "02_backbone", "03_clustering", "04_hybrid_contrast",
                                       "06_evaluation", "07_cameras"}
        assert "skipped for profile sysu30k (method dgl)" in report.lower()  # a sentence's start is capitalised
        assert (run_dir / "05_weak_graphical" / "metrics.json").is_file()

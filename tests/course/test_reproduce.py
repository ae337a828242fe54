"""The papermill driver: failure naming, report.md, the checks before any notebook runs (the workshop
chain itself, and its rerun, are the first half of the dress rehearsal in test_browser.py)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from reidkit.course.reproduce import NotebookFailed, run_notebooks

ROOT = Path(__file__).resolve().parents[2]
#: what ipykernel logs when the SIGINT jupyter_client sends at shutdown lands inside a message handler
SHUTDOWN_RACE = "[IPKernelApp] ERROR | KeyboardInterrupt caught in kernel."


def _notebook(path: Path, *sources: str) -> None:
    """A notebook of the driver's shape: a ``parameters`` cell, then one code cell per source."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('PROFILE = "smoke"\nRUN_DIR = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(src) for src in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_failure_names_notebook_and_cell(tmp_path, monkeypatch):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    for name in ("01_broken", "02_never"):
        _notebook(nbdir / f"{name}.ipynb", "x = 1", "raise ValueError('boom here')")
    monkeypatch.setenv("REIDKIT_NOTEBOOKS", str(nbdir))
    with pytest.raises(NotebookFailed) as info:
        run_notebooks("smoke", run_dir=tmp_path / "run", log=lambda *_: None)
    err = info.value
    assert err.notebook == "01_broken" and err.ename == "ValueError" and "boom here" in err.evalue
    assert "raise ValueError" in err.cell
    assert not (tmp_path / "run" / "02_never").exists(), "stops at the first failure"


def test_a_dead_kernel_is_named_with_its_cell_and_log(tmp_path, monkeypatch):
    """A kernel that dies (on a laptop, most often stopped for want of memory) stops the run with
    the notebook, the cell it was running and its own log, not nbclient's traceback."""
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _notebook(nbdir / "01_dies.ipynb", "x = 1",
              'import os, sys\nprint("last words", file=sys.__stderr__, flush=True)\nos._exit(9)', "y = 2")
    monkeypatch.setenv("REIDKIT_NOTEBOOKS", str(nbdir))
    with pytest.raises(NotebookFailed) as info:
        run_notebooks("smoke", run_dir=tmp_path / "run", log=lambda *_: None)
    err = info.value
    assert err.notebook == "01_dies" and err.ename == "DeadKernelError"
    assert err.cell is not None and "import os, sys" in err.cell
    log = tmp_path / "run" / "01_dies" / "kernel.log"
    assert str(log) in err.evalue and "last words" in log.read_text()


def test_kernel_logs_go_to_the_run_folder_not_the_terminal(tmp_path, monkeypatch, capfd):
    """ipykernel's own log (here an error it logs, as it does when jupyter_client's interrupt at
    shutdown lands during its last reply) goes to RUN_DIR/<name>/kernel.log, and the cells' output
    still reaches the saved notebook."""
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    for name, body in (("01_noisy", 'get_ipython().kernel.log.error("kernel-side noise")\n'
                                    'import sys\nprint("raw stderr noise", file=sys.__stderr__, flush=True)\n'
                                    'print("cell output")'),
                       ("02_quiet", "x = 1")):
        _notebook(nbdir / f"{name}.ipynb", body)
    monkeypatch.setenv("REIDKIT_NOTEBOOKS", str(nbdir))
    run_dir, results = run_notebooks("smoke", run_dir=tmp_path / "run", log=lambda *_: None)
    assert [r.status for r in results] == ["ran", "ran"]
    out, err = capfd.readouterr()
    assert "noise" not in out + err
    log = (run_dir / "01_noisy" / "kernel.log").read_text()
    assert "kernel-side noise" in log and "raw stderr noise" in log
    # a quiet kernel leaves no log, unless jupyter_client's interrupt at shutdown caught it finishing
    # its last reply (seen in CI): then that one line, the reason the log is not the terminal
    quiet = run_dir / "02_quiet" / "kernel.log"
    assert not quiet.exists() or quiet.read_text().splitlines() == [SHUTDOWN_RACE]
    saved = nbformat.read(run_dir / "notebooks" / "01_noisy.ipynb", as_version=4)
    assert "cell output" in json.dumps(saved.cells[-1].outputs)


def test_cli_reports_failure_with_nonzero_exit(tmp_path):
    out = subprocess.run([sys.executable, "-m", "reidkit", "reproduce", "--profile", "nope",
                          "--run-dir", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode != 0 and "unknown profile" in out.stderr


def _png(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [0, 1])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def test_report_embeds_key_figures_overrides_subset_and_device(tmp_path):
    """A run folder written by hand: report.md shows each notebook's key figures (relative links
    beside its tables), the overrides, the identity subset and the device actually used."""
    from reidkit.course.report import write_report
    from reidkit.course.runctx import RunContext

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({
        "parameters": {"PROFILE": "laptop", "DATA_ROOT": "/data", "RUN_DIR": str(run), "DEVICE": "auto",
                       "SEED": 1, "INTERACTIVE": False},
        "overrides": {"data.subset_ids": 100, "hhcl.epochs": 2},
        "device": "cpu",
        "profile": {"name": "laptop", "data": {"dataset": "market1501", "subset_ids": 100, "subset_seed": 0}},
    }))
    # a notebook that records its key figures through RunContext.savefig(..., key=True)
    ctx = RunContext.open("smoke", None, str(run), "cpu", 1, name="02_backbone")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, key in (("ranked", True), ("cmc", True), ("scratch", False)):
        fig, ax = plt.subplots(figsize=(1, 1))
        ctx.savefig(fig, name, key=key)
        plt.close(fig)
    ctx.write_metrics({"tables": {"direct transfer": {"columns": ["model", "mAP"], "rows": [["m", 1.0]]}}})
    # another notebook lists a figure that is not there: no broken link
    (run / "03_clustering").mkdir()
    _png(run / "03_clustering" / "figures" / "eps_sweep.png")
    (run / "03_clustering" / "metrics.json").write_text(json.dumps(
        {"figures": ["03_clustering/figures/eps_sweep.png", "03_clustering/figures/gone.png"], "eps": 0.6}))

    text = write_report(run).read_text()
    assert "![ranked](02_backbone/figures/ranked.png)" in text
    assert "![cmc](02_backbone/figures/cmc.png)" in text
    assert "scratch.png" not in text                      # not a key figure
    assert "![eps_sweep](03_clustering/figures/eps_sweep.png)" in text and "gone.png" not in text
    # figures sit beside their notebook's tables, after them and before the next notebook
    sec02 = text[text.index("## 02_backbone"):text.index("## 03_clustering")]
    assert sec02.index("**direct transfer**") < sec02.index("![ranked]")
    for line in text.splitlines():
        if line.startswith("!["):
            rel = line[line.index("(") + 1:-1]
            assert not rel.startswith("/") and (run / rel).is_file()
    assert "device: `cpu`" in text and "`auto`" not in text
    assert "identity subset: at most 100 training and 100 test identities" in text
    # what the run really kept, as reproduce records it in run.json: no "100 test identities" on a set of 60
    doc = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**doc, "identities": {"train": 100, "test": 60}}))
    text = write_report(run).read_text()
    assert "identity subset: 100 training and 60 test identities (`data.subset_ids=100`" in text
    assert "`data.subset_ids=100`" in text and "`hhcl.epochs=2`" in text
    assert "dataset: `market1501`" in text


def test_report_resolves_auto_device_of_older_runs(tmp_path):
    from reidkit.course.report import write_report

    (tmp_path / "run.json").write_text(json.dumps({"parameters": {"PROFILE": "smoke", "DEVICE": "auto", "SEED": 1},
                                                   "profile": {"data": {"dataset": "mini-mars"}}}))
    text = write_report(tmp_path).read_text()
    assert "`auto`" not in text and ("device: `cpu`" in text or "device: `cuda`" in text)
    assert "identity subset: none" in text and "overrides: none" in text
    assert "camera-aware HHCL: off" in text


def test_report_names_the_camera_aware_parts(tmp_path):
    from reidkit.config import CAMERA_AWARE_RECIPE
    from reidkit.course.report import write_report

    overrides = {**CAMERA_AWARE_RECIPE, "camera.balanced": False, "camera.crosscam_epoch": 2}
    (tmp_path / "run.json").write_text(json.dumps({"parameters": {"PROFILE": "smoke", "DEVICE": "cpu", "SEED": 1},
                                                   "overrides": overrides,
                                                   "profile": {"data": {"dataset": "mini-mars"}}}))
    text = write_report(tmp_path).read_text()
    assert "camera-aware HHCL: `centre`, `ca-jaccard`, `proxies x1` (docs/cameras.md)" in text


def test_report_cells_hold_no_python_reprs(tmp_path):
    """What a teacher reads: a missing value is "-", not "None"; a short list is a line, not a
    Python list; a list of records (one dict per row) is a table of its own, not one cell."""
    from reidkit.course.report import write_report

    (tmp_path / "run.json").write_text(json.dumps({"parameters": {"PROFILE": "smoke", "DEVICE": "cpu", "SEED": 1},
                                                   "profile": {"data": {"dataset": "mini-mars"}}}))
    nb = tmp_path / "05_weak_graphical"
    nb.mkdir()
    (nb / "metrics.json").write_text(json.dumps({
        "models": ["DGL full", "DGL unary-only"],
        "sweep": [{"temp": 0.05, "loss": 1.5}, {"temp": 1.0, "loss": 2.75}],
        "tables": {"per epoch": {"columns": ["variant", "pairwise"],
                                 "rows": [["full", -0.03], ["unary_only", None], ["|dL/df|", 1]]}},
    }))
    text = write_report(tmp_path).read_text()
    assert "None" not in text and "[" not in text.split("## 05_weak_graphical")[1]
    assert "| unary_only | - |" in text
    assert "| \\|dL/df\\| | 1 |" in text                          # a "|" in a cell does not end it
    assert "| models | DGL full, DGL unary-only |" in text
    assert "**sweep**\n\n| temp | loss |\n|---|---|\n| 0.05 | 1.5 |\n| 1 | 2.75 |" in text
    assert "| sweep |" not in text


# ---------------------------------------------------------------------------------------------
# report.md beside the paper, the environment, epoch times; checks before any notebook

def _paper_run(tmp_path, profile, overrides=None, env=True, histories=None):
    from reidkit.config import apply_overrides
    from reidkit.course.report import environment

    run = tmp_path / "run"
    run.mkdir()
    prof = apply_overrides(profile, overrides or {})
    doc = {"parameters": {"PROFILE": profile, "DATA_ROOT": "/data", "RUN_DIR": str(run), "DEVICE": "cpu",
                          "SEED": 1, "INTERACTIVE": False},
           "overrides": overrides or {}, "device": "cpu", "profile": prof.to_dict()}
    if env:
        doc["environment"] = environment(prof, "cpu")
    (run / "run.json").write_text(json.dumps(doc, default=list))
    for rel, history in (histories or {}).items():
        (run / rel).mkdir(parents=True)
        (run / rel / "history.json").write_text(json.dumps(history))
    return run


def test_report_sets_the_measured_row_beside_hhcls_table(tmp_path):
    import torch

    from reidkit.course.report import write_report
    from reidkit.methods import gpu_cost

    hist = [{"epoch": 0, "t_epoch": 3.0},
            {"epoch": 1, "t_epoch": 5.0, "test": {"mAP": 0.5, "rank1": 0.7, "rank5": 0.8, "rank10": 0.9}}]
    run = _paper_run(tmp_path, "market1501", {"hhcl.iters": 2}, histories={"04_hybrid_contrast/CMhybrid": hist})
    text = write_report(run).read_text()
    assert "## Beside the paper (market1501)" in text
    assert "| HHCL, ResNet-50 (paper) | 84.2 | 93.4 | 97.7 | 98.5 |" in text
    assert "| Cluster-Contrast v1, ResNet-50 (baseline) | 82.6 | 93.0 | 97.0 | 98.1 |" in text
    assert ("| **measured: 04_hybrid_contrast/CMhybrid (epoch 1, counted from 0)** | 50.0 | 70.0 | 80.0 | 90.0 "
            "| -34.2 | -23.4 | -17.7 | -8.5 |") in text
    assert "a dry run's figures are not comparable" in text
    # the environment
    assert f"- torch: `{torch.__version__}`" in text and "- kit version: `0.1.0`" in text
    assert re.search(r"- git commit: `[0-9a-f]{12}", text)
    assert "- kNN backend (clustering): `torch-cpu`" in text and "- AMP dtype: `fp32 (no autocast)`" in text
    assert "- profile overrides: `hhcl.iters=2`" in text
    cost = gpu_cost("market1501")
    assert f"~{cost['memory_gb']:g} GB peak" in text and "derived from FLOPs" in text
    assert "without this run's overrides" in text
    # wall time per training epoch, and the init source read from the run's checkpoint
    assert "| 04_hybrid_contrast/CMhybrid | 2 | 4 | 3 | 5 | 8 | `?` |" in text
    torch.save({"model": {"w": torch.zeros(3)}, "init_source": "hub-cache:/x/resnet50-0676ba61.pth"},
               run / "04_hybrid_contrast" / "CMhybrid" / "checkpoint.pt")
    text = write_report(run).read_text()
    assert "| 04_hybrid_contrast/CMhybrid | 2 | 4 | 3 | 5 | 8 | `hub-cache:/x/resnet50-0676ba61.pth` |" in text


def test_report_of_sysu30k_shows_the_leaderboard_and_dgls_difference(tmp_path):
    from reidkit.course.report import write_report

    hist = [{"epoch": 0, "t_epoch": 60.0, "test": {"rank1": 0.1, "rank5": 0.2, "rank10": 0.3, "mAP": 0.05}}]
    run = _paper_run(tmp_path, "sysu30k", histories={"05_weak_graphical/full": hist})
    text = write_report(run).read_text()
    assert "| DGL, weakly supervised (paper) | 26.9 |  |" in text
    for row in ("generalisation: IICS (Market-trained) | 36.0", "generalisation: MGN | 23.6",
                "self-supervised: Triplet (ICCV'21) | 14.8", "self-supervised: SimCLR | 10.9"):
        assert row in text
    assert "| **measured: 05_weak_graphical/full (epoch 0, counted from 0)** | 10.0 | -16.9 |" in text
    assert "not comparable" not in text                                   # no overrides
    assert "GPU cost of sysu30k" in text


def test_report_without_recorded_environment_or_runs_says_so(tmp_path):
    from reidkit.course.report import write_report

    run = _paper_run(tmp_path, "dukemtmcreid", env=False)
    text = write_report(run).read_text()
    assert "## Environment (not recorded by the run: the present one)" in text
    assert "| HHCL, ResNet-50 (paper) | 73.3 | 85.1 | 92.4 | 94.6 |" in text
    assert "No training run of this folder evaluated on the test split" in text
    assert "## Training epochs" not in text


def test_reproduce_stops_before_any_notebook_on_an_incomplete_sysu_tree(tmp_path, capsys):
    import argparse

    from trees import sysu30k_tree

    from reidkit.course.reproduce import RunSetupError, check_run, main_reproduce

    base = sysu30k_tree(tmp_path / "data", others=False)
    with pytest.raises(RunSetupError) as info:
        check_run("sysu30k", str(tmp_path / "data"), {"model.pretrained": False})
    assert f"distractor folder {base}/sysu_test_set_all/gallery/0000others/ is missing" in str(info.value)
    args = argparse.Namespace(profile="sysu30k", data_root=str(tmp_path / "data"), run_dir=str(tmp_path / "run"),
                              device="cpu", seed=1, notebooks=None, timeout=None, force=False,
                              set=["model.pretrained=false"], subset_ids=None)
    assert main_reproduce(args) == 2
    assert "0000others/ is missing" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_reproduce_stops_when_required_weights_are_missing(tmp_path, monkeypatch):
    from trees import market1501_tree

    from reidkit.course.reproduce import RunSetupError, check_run

    monkeypatch.setenv("REIDKIT_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    market1501_tree(tmp_path / "data")
    with pytest.raises(RunSetupError) as info:
        check_run("market1501", str(tmp_path / "data"), {"model.pretrained": "required"})
    msg = str(info.value)
    assert "Looked in:" in msg and str(tmp_path / "empty_torch_home") in msg
    assert "--set model.pretrained=false" in msg
    assert check_run("market1501", str(tmp_path / "data"), {"model.pretrained": False}).model.pretrained is False

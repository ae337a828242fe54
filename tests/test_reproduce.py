"""The papermill driver: the smoke chain over every notebook, skipping on rerun, failure naming."""

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from reidkit import reproduce
from reidkit.reproduce import NotebookFailed, list_notebooks, run_notebooks

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_chain_runs_every_notebook(smoke_run):
    run_dir, results, logs = smoke_run
    names = [p.stem for p in list_notebooks()]
    assert [r.name for r in results] == names
    assert all(r.status == "ran" for r in results)
    for name in names:
        assert (run_dir / name / "metrics.json").is_file(), name
        executed = nbformat.read(run_dir / "notebooks" / f"{name}.ipynb", as_version=4)
        injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and "INTERACTIVE = False" in injected[0].source
    report = (run_dir / "report.md").read_text()
    assert "01_data_prep" in report and "| train | 16 | 256 | 6 |" in report
    assert "Slowest cells of each notebook" in report
    assert re.search(r"^\| 04_hybrid_contrast \| \d+ \| [\d.]+ \| `.+` \|$", report, re.M)
    assert any("done in" in line for line in logs)


def test_rerun_skips_completed_notebooks(smoke_run):
    run_dir, _, _ = smoke_run
    logs = []
    _, again = run_notebooks("smoke", run_dir=run_dir, log=logs.append)
    assert all(r.status == "skipped" for r in again)
    assert all("skipped" in line for line in logs if line.startswith("["))


def test_failure_names_notebook_and_cell(tmp_path, monkeypatch):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('PROFILE = "smoke"\nRUN_DIR = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("raise ValueError('boom here')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, nbdir / "01_broken.ipynb")
    nbformat.write(nb, nbdir / "02_never.ipynb")
    monkeypatch.setenv("REIDKIT_NOTEBOOKS", str(nbdir))
    with pytest.raises(NotebookFailed) as info:
        run_notebooks("smoke", run_dir=tmp_path / "run", log=lambda *_: None)
    err = info.value
    assert err.notebook == "01_broken" and err.ename == "ValueError" and "boom here" in err.evalue
    assert "raise ValueError" in err.cell
    assert not (tmp_path / "run" / "02_never").exists(), "stops at the first failure"


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
    from reidkit.reproduce import write_report
    from reidkit.runctx import RunContext

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
    assert "identity subset: 100 training and 100 test identities" in text
    assert "`data.subset_ids=100`" in text and "`hhcl.epochs=2`" in text
    assert "dataset: `market1501`" in text


def test_report_resolves_auto_device_of_older_runs(tmp_path):
    from reidkit.reproduce import write_report

    (tmp_path / "run.json").write_text(json.dumps({"parameters": {"PROFILE": "smoke", "DEVICE": "auto", "SEED": 1},
                                                   "profile": {"data": {"dataset": "mini-mars"}}}))
    text = write_report(tmp_path).read_text()
    assert "`auto`" not in text and ("device: `cpu`" in text or "device: `cuda`" in text)
    assert "identity subset: none" in text and "overrides: none" in text

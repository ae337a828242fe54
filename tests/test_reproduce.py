"""The papermill driver: the smoke chain over every notebook, skipping on rerun, failure naming."""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from reidkit import reproduce
from reidkit.reproduce import NotebookFailed, list_notebooks, run_notebooks

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke-run")
    logs = []
    run_dir, results = run_notebooks("smoke", run_dir=run_dir, log=logs.append)
    return run_dir, results, logs


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

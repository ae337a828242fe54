"""The reproduction driver: run the notebooks in order with papermill, headless.

``python -m reidkit reproduce --profile P [--data-root D] [--run-dir R]``:
- injects PROFILE, DATA_ROOT, RUN_DIR, DEVICE, SEED, INTERACTIVE=False into each notebook's
  ``parameters`` cell and saves the executed notebook as ``RUN_DIR/notebooks/<name>.ipynb``;
- stops at the first failing cell and names it (notebook, cell number, error);
- on a rerun with the same RUN_DIR skips the notebooks already completed with the same parameters
  (``RUN_DIR/<name>/done.json``);
- writes ``RUN_DIR/report.md`` gathering every ``metrics.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from reidkit.runctx import project_root
from reidkit.utils import atomic_write_bytes, atomic_write_json


class NotebookFailed(RuntimeError):
    def __init__(self, notebook: str, cell: str | None, ename: str, evalue: str, executed: Path):
        self.notebook, self.cell, self.ename, self.evalue, self.executed = notebook, cell, ename, evalue, executed
        where = f"cell {cell}" if cell is not None else "an unknown cell"
        super().__init__(f"{notebook} failed at {where}: {ename}: {evalue}\n  executed notebook: {executed}")


def notebooks_dir() -> Path:
    return Path(os.environ.get("REIDKIT_NOTEBOOKS", project_root() / "notebooks"))


def list_notebooks(folder: Path | None = None) -> list[Path]:
    folder = folder or notebooks_dir()
    nbs = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not nbs:
        raise FileNotFoundError(f"no notebooks NN_name.ipynb in {folder}")
    return nbs


def params_digest(params: dict, notebook: Path) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    h.update(notebook.read_bytes())
    return h.hexdigest()[:16]


def _done_file(run_dir: Path, stem: str) -> Path:
    return run_dir / stem / "done.json"


def is_complete(run_dir: Path, notebook: Path, digest: str) -> bool:
    done = _done_file(run_dir, notebook.stem)
    if not done.is_file() or not (run_dir / notebook.stem / "metrics.json").is_file():
        return False
    try:
        return json.loads(done.read_text()).get("digest") == digest
    except json.JSONDecodeError:
        return False


def _failing_cell(executed: Path) -> str | None:
    """Describe the cell that raised (its execution count and first source line), read from the
    executed notebook."""
    import nbformat

    try:
        nb = nbformat.read(executed, as_version=4)
    except Exception:
        return None
    for cell in nb.cells:
        if any(out.get("output_type") == "error" for out in cell.get("outputs", [])):
            first = next((ln for ln in cell.source.splitlines() if ln.strip()), "")
            return f"In [{cell.get('execution_count')}] `{first.strip()[:80]}`"
    return None


@dataclass
class NotebookResult:
    name: str
    status: str          # ran | skipped
    seconds: float


def run_notebooks(profile: str = "workshop", data_root: str | None = None, run_dir: str | Path | None = None,
                  device: str = "auto", seed: int = 1, notebooks: Sequence[str] | None = None,
                  timeout: int | None = None, force: bool = False, log=print) -> tuple[Path, list[NotebookResult]]:
    """Run the notebooks in order; returns the run folder and what happened to each notebook."""
    import papermill as pm

    from reidkit.config import get_profile

    prof = get_profile(profile)
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = project_root() / "runs" / f"{prof.name}-{stamp}"
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    nbs = list_notebooks()
    if notebooks:
        wanted = set(notebooks)
        nbs = [p for p in nbs if p.stem in wanted or p.stem[:2] in wanted]
    params = {"PROFILE": prof.name, "DATA_ROOT": str(data_root) if data_root else "",
              "RUN_DIR": str(run_dir), "DEVICE": device, "SEED": int(seed), "INTERACTIVE": False}
    atomic_write_json(run_dir / "run.json", {"parameters": params, "profile": prof.to_dict(),
                                             "notebooks": [p.name for p in nbs]})
    log(f"reidkit reproduce: profile {prof.name}, run folder {run_dir}")
    results: list[NotebookResult] = []
    env_progress = os.environ.get("REIDKIT_PROGRESS")
    os.environ["REIDKIT_PROGRESS"] = "0"   # kernels inherit: no widget progress bars in saved notebooks
    try:
        for k, nb in enumerate(nbs, 1):
            digest = params_digest(params, nb)
            tag = f"[{k}/{len(nbs)}] {nb.stem}"
            if not force and is_complete(run_dir, nb, digest):
                log(f"{tag}: already complete with these parameters, skipped")
                results.append(NotebookResult(nb.stem, "skipped", 0.0))
                continue
            executed = run_dir / "notebooks" / nb.name
            executed.parent.mkdir(parents=True, exist_ok=True)
            log(f"{tag}: running ...")
            t0 = time.time()
            try:
                pm.execute_notebook(str(nb), str(executed), parameters=params, kernel_name="python3",
                                    cwd=str(nb.parent), progress_bar=False, execution_timeout=timeout,
                                    log_output=False)
            except pm.PapermillExecutionError as exc:
                cell = _failing_cell(executed)
                raise NotebookFailed(nb.stem, cell, exc.ename, exc.evalue, executed) from None
            seconds = time.time() - t0
            atomic_write_json(_done_file(run_dir, nb.stem), {"digest": digest, "seconds": round(seconds, 2),
                                                             "finished": datetime.now().isoformat()})
            log(f"{tag}: done in {seconds:.1f} s")
            results.append(NotebookResult(nb.stem, "ran", seconds))
    finally:
        if env_progress is None:
            os.environ.pop("REIDKIT_PROGRESS", None)
        else:
            os.environ["REIDKIT_PROGRESS"] = env_progress
    write_report(run_dir)
    return run_dir, results


# --------------------------------------------------------------------------------------------
# report.md

def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, (list, tuple)) and len(v) > 8:
        return f"[{len(v)} values]"
    return str(v)


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(str(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def write_report(run_dir: str | Path) -> Path:
    """Gather ``RUN_DIR/*/metrics.json`` into ``RUN_DIR/report.md``.

    A metrics file may hold ``tables`` ({title: {"columns": [...], "rows": [[...]]}}) which are
    rendered as they are; every other scalar is listed under its notebook."""
    run_dir = Path(run_dir)
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    params = run.get("parameters", {})
    lines = [f"# reidkit report: {run_dir.name}", ""]
    if params:
        lines += [f"- profile: `{params.get('PROFILE')}`, device: `{params.get('DEVICE')}`, seed: {params.get('SEED')}",
                  f"- data root: `{params.get('DATA_ROOT') or 'embedded sample'}`", ""]
    paper = run.get("profile", {}).get("paper") or {}
    if paper:
        lines += ["Paper figures for this profile: " + ", ".join(f"{k} {v}" for k, v in paper.items()), ""]
    timing_rows = []
    for mfile in sorted(run_dir.glob("*/metrics.json")):
        stem = mfile.parent.name
        try:
            metrics = json.loads(mfile.read_text())
        except json.JSONDecodeError:
            continue
        done = mfile.parent / "done.json"
        secs = json.loads(done.read_text()).get("seconds") if done.is_file() else metrics.get("seconds")
        timing_rows.append((stem, secs))
        lines += [f"## {stem}", ""]
        for title, tab in (metrics.get("tables") or {}).items():
            lines += [f"**{title}**", ""] + _table(tab["columns"], tab["rows"]) + [""]
        scalars = [(k, v) for k, v in metrics.items()
                   if k not in ("tables", "notebook") and not isinstance(v, dict)]
        if scalars:
            lines += _table(["metric", "value"], scalars) + [""]
    if timing_rows:
        lines += ["## Timings", ""] + _table(["notebook", "seconds"], timing_rows) + [""]
    out = run_dir / "report.md"
    atomic_write_bytes(out, "\n".join(lines).encode())
    return out


def main_reproduce(args) -> int:
    try:
        run_dir, results = run_notebooks(args.profile, args.data_root, args.run_dir, args.device, args.seed,
                                         args.notebooks, args.timeout, args.force)
    except NotebookFailed as exc:
        print(f"reproduction stopped: {exc}", file=sys.stderr)
        return 1
    except (KeyError, FileNotFoundError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    total = sum(r.seconds for r in results)
    print(f"report: {run_dir / 'report.md'}  ({total:.1f} s of notebooks)")
    return 0

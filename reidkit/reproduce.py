"""The reproduction driver: run the notebooks in order with papermill, headless.

``python -m reidkit reproduce --profile P [--data-root D] [--run-dir R] [--subset-ids N] [--set S.F=V]``:
- applies the overrides (``--subset-ids N`` is ``--set data.subset_ids=N``), checked against the
  profile's field types before any work, and records them in ``RUN_DIR/run.json`` ("overrides"),
  where ``RunContext.open`` finds them, so every notebook (and one opened by hand on the run
  folder) sees the same profile;
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


def params_digest(params: dict, notebook: Path, overrides: dict | None = None) -> str:
    """Digest of a notebook's inputs: the injected parameters, the profile overrides and the
    notebook's content. Not the run folder's path (``RUN_DIR``): a moved run folder is not redone."""
    payload = {k: v for k, v in params.items() if k != "RUN_DIR"}
    if overrides:
        payload["__overrides__"] = overrides
    h = hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode())
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


class RunSetupError(ValueError):
    """The run cannot start: an override or the data root does not fit the profile."""


def check_run(profile: str = "workshop", data_root: str | None = None, overrides: dict | None = None):
    """The profile with ``overrides`` applied, after the checks that need no work: every override
    names a field and fits its type, the dataset is known, and a real dataset has a data root.
    Raises ``RunSetupError`` (or ``KeyError`` for an unknown profile) with a one-line message."""
    from reidkit.config import OverrideError, apply_overrides, get_profile
    from reidkit.data.datasets import ALIASES, PARSERS

    base = get_profile(profile)
    try:
        prof = apply_overrides(base, overrides)
    except (OverrideError, KeyError, TypeError) as exc:
        raise RunSetupError(str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)) from None
    key = ALIASES.get(prof.data.dataset.lower(), prof.data.dataset.lower())
    if key not in PARSERS:
        raise RunSetupError(f"data.dataset={prof.data.dataset!r} is not a known dataset; known: "
                            f"{', '.join(sorted(PARSERS))}")
    if key != "mini-mars" and not data_root:
        raise RunSetupError(f"profile {prof.name} reads {prof.data.dataset} from disk: give --data-root "
                            f"(the folder holding the dataset)")
    if data_root and not Path(data_root).expanduser().exists():
        raise RunSetupError(f"--data-root {data_root} does not exist")
    n = prof.data.subset_ids
    if n is not None and n < 1:
        raise RunSetupError(f"data.subset_ids must be a positive number of identities, got {n}")
    _check_inputs(prof, key, data_root)
    return prof


def _check_inputs(prof, dataset: str, data_root: str | None) -> None:
    """The checks that read a little from disk, before any notebook: a SYSU-30k tree complete
    (``check_sysu_tree``), and ImageNet weights present where the profile requires them."""
    from reidkit.data.datasets import LayoutError, check_sysu_tree
    from reidkit.models import REQUIRED, MissingWeightsError, resolve_weights

    if dataset == "sysu30k" and data_root:
        try:
            check_sysu_tree(data_root)
        except LayoutError as exc:
            raise RunSetupError(str(exc)) from None
    if isinstance(prof.model.pretrained, str) and prof.model.pretrained.strip().lower() == REQUIRED:
        try:
            resolve_weights(prof.model.arch, REQUIRED)
        except MissingWeightsError as exc:
            raise RunSetupError(str(exc)) from None


#: the notebooks a weakly supervised profile (SYSU-30k: bag labels, no cameras) does not run, and why
WEAK_SKIPS = {
    "01_data_prep": "the data lesson's statistics, junk rule and PK batches need camera-labelled training "
                    "identities; SYSU-30k's training images carry bag labels only (its bags are shown in "
                    "05_weak_graphical)",
    "02_backbone": "its dense query x gallery matrices, feature plots and training-set features are sized for "
                   "Market-scale data; SYSU-30k's 479k-image gallery is scored by the streamed protocol in "
                   "05_weak_graphical",
    "03_clustering": "HHCL's clustering is judged by cameras and identities that SYSU-30k's training set "
                     "does not have",
    "04_hybrid_contrast": "HHCL's camera-aware memory needs camera-labelled training images, which SYSU-30k's "
                          "training set does not have",
    "06_evaluation": "it compares the features of notebooks 02, 04 and 05 under the Market protocol, with the "
                     "training images as SYSU-style distractors; SYSU-30k's own protocol over its real "
                     "gallery runs, streamed, in 05_weak_graphical and in `reidkit evaluate`",
}


def skipped_notebooks(prof, notebooks: Sequence[Path]) -> dict[str, str]:
    """``{stem: reason}`` of the notebooks a profile's method does not run."""
    if prof.method != "dgl":
        return {}
    return {nb.stem: f"skipped for profile {prof.name} (method DGL): {WEAK_SKIPS[nb.stem]}; run it with an "
                     f"HHCL profile, e.g. --profile workshop" for nb in notebooks if nb.stem in WEAK_SKIPS}


def run_notebooks(profile: str = "workshop", data_root: str | None = None, run_dir: str | Path | None = None,
                  device: str = "auto", seed: int = 1, notebooks: Sequence[str] | None = None,
                  timeout: int | None = None, force: bool = False, log=print,
                  overrides: dict | None = None) -> tuple[Path, list[NotebookResult]]:
    """Run the notebooks in order; returns the run folder and what happened to each notebook.
    ``overrides``: ``{"section.field": value}`` applied to the profile in every notebook."""
    import papermill as pm

    from reidkit.config import validate_overrides
    from reidkit.utils import resolve_device

    prof = check_run(profile, data_root, overrides)
    overrides = validate_overrides(overrides or {})
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
    skip = skipped_notebooks(prof, nbs)
    atomic_write_json(run_dir / "run.json", {"parameters": params, "overrides": overrides, "skipped": skip,
                                             "device": str(resolve_device(device)),
                                             "profile": prof.to_dict(),
                                             "environment": environment(prof, device),
                                             "notebooks": [p.name for p in nbs]})
    log(f"reidkit reproduce: profile {prof.name}, run folder {run_dir}"
        + (", overrides " + " ".join(f"{k}={v}" for k, v in overrides.items()) if overrides else ""))
    results: list[NotebookResult] = []
    env_progress = os.environ.get("REIDKIT_PROGRESS")
    os.environ["REIDKIT_PROGRESS"] = "0"   # kernels inherit: no widget progress bars in saved notebooks
    try:
        for k, nb in enumerate(nbs, 1):
            digest = params_digest(params, nb, overrides)
            tag = f"[{k}/{len(nbs)}] {nb.stem}"
            if nb.stem in skip:
                log(f"{tag}: {skip[nb.stem]}")
                results.append(NotebookResult(nb.stem, "skipped", 0.0))
                continue
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


def _run_header(run: dict) -> list[str]:
    """The run's setup: profile, dataset and subset, overrides, device actually used, seed."""
    params = run.get("parameters", {})
    if not params:
        return []
    prof = run.get("profile") or {}
    data = prof.get("data") or {}
    device = run.get("device") or params.get("DEVICE")
    if device in (None, "auto"):  # runs recorded before the device was: resolve it here
        from reidkit.utils import resolve_device

        device = str(resolve_device(params.get("DEVICE") or "auto"))
    lines = [f"- profile: `{params.get('PROFILE')}`, device: `{device}`, seed: {params.get('SEED')}",
             f"- dataset: `{data.get('dataset', '?')}`, data root: `{params.get('DATA_ROOT') or 'embedded sample'}`"]
    n = data.get("subset_ids")
    if n:
        lines.append(f"- identity subset: {n} training and {n} test identities (subset seed "
                     f"{data.get('subset_seed', 0)}; distractors kept in proportion; reidkit.data.subset)")
    else:
        lines.append("- identity subset: none (every identity of the dataset)")
    overrides = run.get("overrides") or {}
    if overrides:
        lines.append("- overrides: " + ", ".join(f"`{k}={json.dumps(v, default=list)}`"
                                                 for k, v in overrides.items()))
    else:
        lines.append("- overrides: none (the profile as defined in reidkit/config.py)")
    return lines + [""]


def _figure_lines(run_dir: Path, figures) -> list[str]:
    """Markdown images, with links relative to the run folder, for the figures that exist."""
    out = []
    for rel in figures or []:
        rel = str(rel)
        if (run_dir / rel).is_file():
            out += [f"![{Path(rel).stem}]({rel})", ""]
    return out


def cell_timings(executed: str | Path) -> list[tuple[int, float, str]]:
    """``(cell index, seconds, first code line)`` of every code cell of a notebook executed by
    papermill (read from the cells' ``papermill.duration`` metadata), slowest first."""
    import nbformat

    try:
        nb = nbformat.read(str(executed), as_version=4)
    except Exception:
        return []
    rows = []
    for k, cell in enumerate(nb.cells):
        secs = (cell.metadata.get("papermill") or {}).get("duration")
        if cell.cell_type == "code" and isinstance(secs, (int, float)):
            first = next((ln.strip() for ln in cell.source.splitlines()
                          if ln.strip() and not ln.strip().startswith("#")), "")
            rows.append((k, float(secs), first[:70]))
    return sorted(rows, key=lambda r: -r[1])


def write_report(run_dir: str | Path) -> Path:
    """Gather ``RUN_DIR/*/metrics.json`` into ``RUN_DIR/report.md``. A folder with neither
    ``run.json`` nor any ``metrics.json`` is no run folder: ``FileNotFoundError``, nothing created.

    A metrics file may hold ``tables`` ({title: {"columns": [...], "rows": [[...]]}}) which are
    rendered as they are, and ``figures`` (paths relative to RUN_DIR, the key figures that
    ``RunContext.savefig(..., key=True)`` recorded), shown as images beside the tables; every other
    scalar is listed under its notebook. The header names the dataset, the identity subset, the
    profile overrides and the device the run used."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file() and not any(run_dir.glob("*/metrics.json")):
        raise FileNotFoundError(f"{run_dir}: not a run folder (no run.json and no */metrics.json)")
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    lines = [f"# reidkit report: {run_dir.name}", ""] + _run_header(run)
    paper = run.get("profile", {}).get("paper") or {}
    if paper:
        lines += ["Paper figures for this profile: " + ", ".join(f"{k} {v}" for k, v in paper.items()), ""]
    lines += paper_section(run, run_dir) + environment_section(run)
    for stem, reason in (run.get("skipped") or {}).items():
        lines += [f"## {stem}", "", reason[:1].upper() + reason[1:] + ".", ""]
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
        lines += _figure_lines(run_dir, metrics.get("figures"))
        scalars = [(k, v) for k, v in metrics.items()
                   if k not in ("tables", "notebook", "figures") and not isinstance(v, dict)]
        if scalars:
            lines += _table(["metric", "value"], scalars) + [""]
    if timing_rows:
        lines += ["## Timings", ""] + _table(["notebook", "seconds"], timing_rows) + [""]
        slow = [(stem, k, round(secs, 1), "`" + first.replace("|", "\\|") + "`") for stem, _ in timing_rows
                for k, secs, first in cell_timings(run_dir / "notebooks" / f"{stem}.ipynb")[:3]]
        if slow:
            lines += ["Slowest cells of each notebook:", ""]
            lines += _table(["notebook", "cell", "seconds", "first line"], slow) + [""]
    lines += epoch_timing_section(run_dir)
    out = run_dir / "report.md"
    atomic_write_bytes(out, "\n".join(lines).encode())
    return out


# --------------------------------------------------------------------------------------------
# report.md beside the paper: the paper's table, the measured rows, the environment, epoch times

#: the papers' tables (spec hhcl §7, spec dgl-sysu30k §5), in percent; the first row of each
#: dataset is the row the profile reproduces (the measured row's difference is taken to it)
PAPER_TABLES: dict[str, dict] = {
    "market1501": {"metrics": ("mAP", "rank1", "rank5", "rank10"), "rows": [
        ("HHCL, ResNet-50 (paper)", (84.2, 93.4, 97.7, 98.5)),
        ("HHCL supervised (upper bound)", (87.2, 94.6, 98.5, 99.1)),
        ("Cluster-Contrast v1, ResNet-50 (baseline)", (82.6, 93.0, 97.0, 98.1)),
        ("Cluster-Contrast v2, ResNet-50 (baseline)", (82.1, 92.3, 96.7, 97.9))]},
    "dukemtmcreid": {"metrics": ("mAP", "rank1", "rank5", "rank10"), "rows": [
        ("HHCL, ResNet-50 (paper)", (73.3, 85.1, 92.4, 94.6)),
        ("HHCL supervised (upper bound)", (80.0, 89.8, 95.2, 96.7)),
        ("Cluster-Contrast v1, ResNet-50 (baseline)", (72.8, 85.7, 92.0, 93.5)),
        ("Cluster-Contrast v2, ResNet-50 (baseline)", (72.6, 84.9, 91.9, 93.9))]},
    "msmt17": {"metrics": ("mAP", "rank1", "rank5", "rank10"), "rows": [
        ("HHCL, ResNet-50, 300 it, eps 0.7 (author, HHCL issue #7; not in the paper)", (31.8, 58.9, 71.3, 75.8)),
        ("Cluster-Contrast v1, ResNet-50 (baseline)", (33.3, 63.3, 73.7, 77.8)),
        ("Cluster-Contrast v2, ResNet-50 (baseline)", (27.6, 56.0, 66.8, 71.5))]},
    "sysu30k": {"metrics": ("rank1",), "rows": [
        ("DGL, weakly supervised (paper)", (26.9,)),
        ("generalisation: DARI", (11.2,)), ("generalisation: DF", (10.3,)),
        ("generalisation: ResNet-50", (20.1,)), ("generalisation: Local-CNN", (23.0,)),
        ("generalisation: MGN", (23.6,)), ("generalisation: IICS (Market-trained)", (36.0,)),
        ("self-supervised: SimCLR", (10.9,)), ("self-supervised: MoCo v2", (11.6,)),
        ("self-supervised: BYOL", (12.7,)), ("self-supervised: Triplet (ICCV'21)", (14.8,))]},
}


def training_runs(run_dir: Path) -> list[tuple[str, list[dict]]]:
    """``(folder relative to the run folder, history)`` of every training run under ``run_dir``
    (its ``history.json``), in path order."""
    out = []
    for path in sorted(Path(run_dir).rglob("history.json")):
        try:
            history = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if isinstance(history, list) and history:
            out.append((str(path.parent.relative_to(run_dir)), history))
    return out


def measured_rows(run_dir: Path, metrics: Sequence[str]) -> list[tuple[str, list]]:
    """One row per training run that evaluated on the test split: its last evaluation, in percent."""
    rows = []
    for rel, history in training_runs(run_dir):
        tested = [e for e in history if isinstance(e.get("test"), dict)]
        if tested:
            last = tested[-1]
            rows.append((f"measured: {rel} (epoch {last.get('epoch', len(history) - 1) + 1})",
                         [100 * float(last["test"][m]) if m in last["test"] else None for m in metrics]))
    return rows


def paper_section(run: dict, run_dir: Path) -> list[str]:
    """The paper's table for the run's dataset with the measured rows under it and their
    difference to the paper's own row."""
    dataset = (run.get("profile") or {}).get("data", {}).get("dataset")
    table = PAPER_TABLES.get(dataset)
    if table is None:
        return []
    metrics, (ref_name, ref) = table["metrics"], table["rows"][0]
    cols = ["row"] + [f"{m} %" for m in metrics] + [f"diff {m}" for m in metrics]
    rows = [[name] + [f"{v:.1f}" for v in vals] + [""] * len(metrics) for name, vals in table["rows"]]
    measured = measured_rows(run_dir, metrics)
    for name, vals in measured:
        diffs = [f"{v - r:+.1f}" if v is not None else "" for v, r in zip(vals, ref)]
        rows.append([f"**{name}**"] + [f"{v:.1f}" if v is not None else "" for v in vals] + diffs)
    lines = [f"## Beside the paper ({dataset})", ""] + _table(cols, rows) + [""]
    note = f"Differences are to the row \"{ref_name}\"."
    if not measured:
        note += " No training run of this folder evaluated on the test split (no history.json with a test entry)."
    scale = (run.get("overrides") or {})
    if scale:
        note += " The run used overrides (see above): a dry run's figures are not comparable to the paper's."
    return lines + [note, ""]


def _git_commit() -> str:
    import subprocess

    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=project_root(), capture_output=True,
                             text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_root(),
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


def _version(module: str) -> str:
    import importlib

    try:
        return str(getattr(importlib.import_module(module), "__version__", "installed"))
    except Exception:  # noqa: BLE001 - not installed, or a broken wheel
        return "not installed"


def _backends(prof, dev) -> dict[str, str]:
    """The kNN backend the clustering's self-search takes on ``dev`` (neighbors.knn's auto rule)
    and the autocast dtype of the profile's method on it."""
    import torch

    from reidkit.neighbors import faiss_gpu_available

    knn = ("faiss-gpu" if faiss_gpu_available() else "torch-cuda") if dev.type == "cuda" else f"torch-{dev.type}"
    try:
        if getattr(prof, "method", "hhcl") == "dgl":
            from reidkit.weak_eval import dgl_amp_dtype as amp_of
        else:
            from reidkit.hhcl import amp_dtype as amp_of
        amp = amp_of(prof, dev)
    except Exception as exc:  # noqa: BLE001 - report what is known rather than fail the run
        return {"knn": knn, "amp": f"unknown ({type(exc).__name__})"}
    return {"knn": knn, "amp": "fp32 (no autocast)" if amp is None else str(amp).replace("torch.", "")
            + (" autocast" if amp != torch.float32 else "")}


def environment(prof, device: str = "auto") -> dict[str, str]:
    """What ran: kit version and commit, library versions, device name, backends."""
    import platform

    import torch

    import reidkit
    from reidkit.utils import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads " \
               f"{torch.get_num_threads()})"
    return {"reidkit": reidkit.__version__, "commit": _git_commit(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": _version("torchvision"), "faiss": _version("faiss"),
            "device": f"{dev}: {name}", **_backends(prof, dev)}


def environment_section(run: dict) -> list[str]:
    """The environment recorded in run.json (or, for an older run, the present one, marked so),
    and the profile's GPU cost line (derived) for a paper dataset."""
    env = run.get("environment")
    note = ""
    prof = _run_profile(run)
    if not env:
        if prof is None:
            return []
        env, note = environment(prof, (run.get("parameters") or {}).get("DEVICE") or "auto"), \
            " (not recorded by the run: the present one)"
    labels = {"reidkit": "kit version", "commit": "git commit", "knn": "kNN backend (clustering)",
              "amp": "AMP dtype"}
    lines = [f"## Environment{note}", ""] + [f"- {labels.get(k, k)}: `{v}`" for k, v in env.items()]
    overrides = run.get("overrides") or {}
    lines.append("- profile overrides: " + (", ".join(f"`{k}={json.dumps(v, default=list)}`" for k, v in
                                                      overrides.items()) or "none"))
    if prof is not None:
        from reidkit.config import get_profile
        from reidkit.gpu_cost import format_cost

        cost = format_cost(get_profile(prof.name))       # at paper scale: the profile as defined
        if cost:
            lines.append(f"- {cost}" + (" (the profile as defined, without this run's overrides)"
                                        if overrides else ""))
    return lines + [""]


def _run_profile(run: dict):
    """The run's profile with its overrides applied, or None when it cannot be rebuilt."""
    from reidkit.config import apply_overrides

    name = (run.get("parameters") or {}).get("PROFILE") or (run.get("profile") or {}).get("name")
    try:
        return apply_overrides(name, run.get("overrides") or {})
    except Exception:  # noqa: BLE001 - an unknown or renamed profile: no cost line
        return None


def init_source_of(folder: Path) -> str:
    """Where a training run's backbone weights came from (``init_source`` of its checkpoint,
    memory-mapped: the tensors are not read); ``"?"`` when no checkpoint says."""
    import torch

    for name in ("checkpoint.pt", "model_best.pt", "model_final.pt"):
        path = Path(folder) / name
        if path.is_file():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # noqa: BLE001 - a damaged file: the report still gets written
                continue
            if isinstance(state, dict) and state.get("init_source"):
                return str(state["init_source"])
    return "?"


def epoch_timing_section(run_dir: Path) -> list[str]:
    """Wall time per training epoch of every training run (``t_epoch`` of its history.json) and
    the run's weight initialisation (``random:fallback`` stands out here)."""
    rows = []
    for rel, history in training_runs(run_dir):
        secs = [float(e["t_epoch"]) for e in history if isinstance(e.get("t_epoch"), (int, float))]
        if secs:
            rows.append((rel, len(secs), round(sum(secs) / len(secs), 2), round(min(secs), 2),
                         round(max(secs), 2), round(sum(secs), 1), f"`{init_source_of(run_dir / rel)}`"))
    if not rows:
        return []
    cols = ["run", "epochs", "mean s/epoch", "min s", "max s", "total s", "init"]
    return ["## Training epochs", ""] + _table(cols, rows) + [""]


def overrides_from_args(args) -> dict:
    """``--set`` pairs and ``--subset-ids`` of a command line as ``{"section.field": value}``
    (validated; raises ``OverrideError``)."""
    from reidkit.config import parse_set

    overrides = parse_set(getattr(args, "set", None))
    if getattr(args, "subset_ids", None) is not None:
        overrides.update(parse_set([f"data.subset_ids={int(args.subset_ids)}"]))
    return overrides


def main_reproduce(args) -> int:
    from reidkit.config import OverrideError

    try:
        overrides = overrides_from_args(args)
        check_run(args.profile, args.data_root, overrides)
        run_dir, results = run_notebooks(args.profile, args.data_root, args.run_dir, args.device, args.seed,
                                         args.notebooks, args.timeout, args.force, overrides=overrides)
    except NotebookFailed as exc:
        print(f"reproduction stopped: {exc}", file=sys.stderr)
        return 1
    except (OverrideError, RunSetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyError, FileNotFoundError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    total = sum(r.seconds for r in results)
    print(f"report: {run_dir / 'report.md'}  ({total:.1f} s of notebooks)")
    return 0

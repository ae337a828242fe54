"""report.md of a run folder: the measured tables beside the paper, the environment, the timings."""

from __future__ import annotations

import importlib
import json
import platform
import subprocess
from pathlib import Path
from typing import Any, Sequence

import torch

import reidkit
from reidkit.config import apply_overrides, camera_parts, get_profile
from reidkit.core.device import cpu_name, resolve_device
from reidkit.core.io import atomic_write_bytes, nbformat_read
from reidkit.course.runctx import project_root
from reidkit.methods import format_cost, method_class
from reidkit.retrieval.knn import faiss_gpu_available

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


def _fmt(v: Any) -> str:
    if v is None:  # a value a row does not have (no test on that epoch, a loss term a variant lacks)
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, (list, tuple)) and len(v) > 8:
        return f"[{len(v)} values]"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _records(v: Any) -> bool:
    """A list of dicts with the same keys (one row each): shown as its own table, not in a cell."""
    return (isinstance(v, list) and len(v) > 0 and all(isinstance(r, dict) for r in v)
            and all(r.keys() == v[0].keys() for r in v))


def _record_table(rows: list[dict]) -> list[str]:
    columns = list(rows[0])
    return _table([c.replace("_", " ") for c in columns], [[r[c] for c in columns] for r in rows])


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(str(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    # a "|" in a cell would end it
    lines += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in rows]
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

        device = str(resolve_device(params.get("DEVICE") or "auto"))
    lines = [f"- profile: `{params.get('PROFILE')}`, device: `{device}`, seed: {params.get('SEED')}",
             f"- dataset: `{data.get('dataset', '?')}`, data root: `{params.get('DATA_ROOT') or 'embedded sample'}`"]
    n, counts = data.get("subset_ids"), run.get("identities") or {}
    if n:
        kept = (f"{counts['train']} training and {counts['test']} test identities" if counts
                else f"at most {n} training and {n} test identities")
        lines.append(f"- identity subset: {kept} (`data.subset_ids={n}`, subset seed "
                     f"{data.get('subset_seed', 0)}; distractors kept in proportion; reidkit.data.subset)")
    else:
        lines.append("- identity subset: none (every identity of the dataset"
                     + (f": {counts['train']} training, {counts['test']} test)" if counts else ")"))
    overrides = run.get("overrides") or {}
    if overrides:
        lines.append("- overrides: " + ", ".join(f"`{k}={json.dumps(v, default=list)}`"
                                                 for k, v in overrides.items()))
    else:
        lines.append("- overrides: none (the profile as defined in reidkit/config.py)")
    try:  # the parts as the run's profile names them (an option such as camera.bg_knn is no part)
        cam = camera_parts(apply_overrides(params.get("PROFILE"), overrides))
    except (KeyError, ValueError):  # a profile or override this version does not know
        cam = []
    lines.append("- camera-aware HHCL: " + (", ".join(f"`{c}`" for c in cam) + " (docs/cameras.md)" if cam
                                            else "off (HHCL as released)"))
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

    try:
        nb = nbformat_read(executed)
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
    if (run_dir / "notebooks").is_dir():
        lines += ["The executed notebooks as web pages, readable with no install: "
                  "[html/index.html](html/index.html)", ""]
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
        rest = {k: v for k, v in metrics.items()
                if k not in ("tables", "notebook", "figures") and not isinstance(v, dict)}
        scalars = []
        for key, v in rest.items():
            if _records(v):
                lines += [f"**{key.replace('_', ' ')}**", ""] + _record_table(v) + [""]
            else:
                scalars.append((key, v))
        if scalars:
            lines += _table(["metric", "value"], scalars) + [""]
    if timing_rows:
        lines += ["## Timings", ""] + _table(["notebook", "seconds"], timing_rows) + [""]
        slow = [(stem, k, round(secs, 1), f"`{first}`") for stem, _ in timing_rows
                for k, secs, first in cell_timings(run_dir / "notebooks" / f"{stem}.ipynb")[:3]]
        if slow:
            lines += ["Slowest cells of each notebook:", ""]
            lines += _table(["notebook", "cell", "seconds", "first line"], slow) + [""]
    lines += epoch_timing_section(run_dir)
    out = run_dir / "report.md"
    atomic_write_bytes(out, "\n".join(lines).encode())
    return out


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
            rows.append((f"measured: {rel} (epoch {last.get('epoch', len(history) - 1)}, counted from 0)",
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

    try:
        return str(getattr(importlib.import_module(module), "__version__", "installed"))
    except Exception:  # noqa: BLE001 - not installed, or a broken wheel
        return "not installed"


def _backends(prof, dev) -> dict[str, str]:
    """The kNN backend the clustering's self-search takes on ``dev`` (neighbors.knn's auto rule)
    and the autocast dtype of the profile's method on it."""

    knn = ("faiss-gpu" if faiss_gpu_available() else "torch-cuda") if dev.type == "cuda" else f"torch-{dev.type}"
    try:
        amp = method_class(prof.method).amp_policy(prof, dev)
    except Exception as exc:  # noqa: BLE001 - report what is known rather than fail the run
        return {"knn": knn, "amp": f"unknown ({type(exc).__name__})"}
    return {"knn": knn, "amp": "fp32 (no autocast)" if amp is None else str(amp).replace("torch.", "")
            + (" autocast" if amp != torch.float32 else "")}


def environment(prof, device: str = "auto") -> dict[str, str]:
    """What ran: kit version and commit, library versions, device name, backends."""

    dev = resolve_device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"CPU ({cpu_name()}, torch threads {torch.get_num_threads()})"
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

        cost = format_cost(get_profile(prof.name))       # at paper scale: the profile as defined
        if cost:
            lines.append(f"- {cost}" + (" (the profile as defined, without this run's overrides)"
                                        if overrides else ""))
    return lines + [""]


def _run_profile(run: dict):
    """The run's profile with its overrides applied, or None when it cannot be rebuilt."""

    name = (run.get("parameters") or {}).get("PROFILE") or (run.get("profile") or {}).get("name")
    try:
        return apply_overrides(name, run.get("overrides") or {})
    except Exception:  # noqa: BLE001 - an unknown or renamed profile: no cost line
        return None


def init_source_of(folder: Path) -> str:
    """Where a training run's backbone weights came from (``init_source`` of its checkpoint,
    memory-mapped: the tensors are not read); ``"?"`` when no checkpoint says."""

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

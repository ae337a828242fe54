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
- writes ``RUN_DIR/report.md`` gathering every ``metrics.json``;
- keeps each kernel's own log (ipykernel's messages, not the cells' output) in
  ``RUN_DIR/<name>/kernel.log`` rather than in the terminal, and removes it when empty;
- holds ``RUN_DIR``'s run lock (``reidkit.train.run_lock``) throughout, so a second reproduction on
  the same folder stops at once; the notebooks' training runs lock their own subfolders
  (``RUN_DIR/04_hybrid_contrast/<memory>``, ``RUN_DIR/05_weak_graphical/<variant>``), not ``RUN_DIR``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

from reidkit.config import (
    CAMERA_AWARE_RECIPE,
    OverrideError,
    apply_overrides,
    get_profile,
    parse_set,
    validate_overrides,
)
from reidkit.core.io import atomic_write_json, nbformat_read
from reidkit.course.html_copy import export_html
from reidkit.course.report import environment, write_report
from reidkit.course.runctx import project_root, runs_dir
from reidkit.data.datasets import ALIASES, PARSERS
from reidkit.data.records import LayoutError
from reidkit.data.sysu30k import check_sysu_tree
from reidkit.methods import resolve_run
from reidkit.nets.imagenet import REQUIRED, MissingWeightsError, resolve_weights
from reidkit.train.run_lock import RunLock, RunLockedError


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


def _failing_cell(executed: Path, died: bool = False) -> str | None:
    """Describe the cell that raised (its execution count and first source line), read from the
    executed notebook; with ``died``, the cell a dead kernel was running: the last one papermill
    started (a kernel can die before it numbers the cell)."""

    try:
        nb = nbformat_read(executed)
    except Exception:
        return None
    if died:
        cells = [c for c in nb.cells if (c.metadata.get("papermill") or {}).get("start_time")][-1:]
    else:
        cells = [c for c in nb.cells if any(out.get("output_type") == "error" for out in c.get("outputs", []))]
    for cell in cells:
        first = next((ln for ln in cell.source.splitlines() if ln.strip()), "")
        count = cell.get("execution_count")
        return f"In [{count if count is not None else ' '}] `{first.strip()[:80]}`"
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
    "07_cameras": "its camera-bias measures and camera-aware clustering need camera-labelled training images, "
                  "which SYSU-30k's training set does not have",
    "06_evaluation": "it compares the features of notebooks 02, 04 and 05 under the Market protocol, with the "
                     "training images as SYSU-style distractors; SYSU-30k's own protocol over its real "
                     "gallery runs, streamed, in 05_weak_graphical and in `reidkit evaluate`",
}


def identity_counts(spec) -> dict[str, int]:
    """The identities the run really has, subset applied: ``{"train": n, "test": m}`` (test = the
    query identities, those scored), for report.md. Empty for SYSU-30k, whose training set is
    streamed and never listed."""
    if spec.streamed:
        return {}
    ds = spec.dataset()
    return {"train": len({r.pid for r in ds.train}), "test": len({r.pid for r in ds.query})}


def skipped_notebooks(spec, notebooks: Sequence[Path]) -> dict[str, str]:
    """``{stem: reason}`` of the notebooks a run skips: those that need camera-labelled training
    identities, when its training set is SYSU-30k's bags (``spec.streamed``)."""
    if not spec.streamed:
        return {}
    prof = spec.profile
    return {nb.stem: f"skipped for profile {prof.name} (method {spec.method}): "
                     f"{WEAK_SKIPS[nb.stem]}; run it with an HHCL profile, e.g. --profile workshop"
            for nb in notebooks if nb.stem in WEAK_SKIPS}


def run_notebooks(profile: str = "workshop", data_root: str | None = None, run_dir: str | Path | None = None,
                  device: str = "auto", seed: int = 1, notebooks: Sequence[str] | None = None,
                  timeout: int | None = None, force: bool = False, log=print,
                  overrides: dict | None = None) -> tuple[Path, list[NotebookResult]]:
    """Run the notebooks in order; returns the run folder and what happened to each notebook.
    ``overrides``: ``{"section.field": value}`` applied to the profile in every notebook."""
    import papermill as pm  # run time only: the library imports without papermill (the GPU machine has none)

    prof = check_run(profile, data_root, overrides)
    overrides = validate_overrides(overrides or {})
    spec = resolve_run(prof, data_root, device)       # the run resolved once: device, AMP, dataset
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = runs_dir() / f"{prof.name}-{stamp}"
    run_dir = Path(run_dir).resolve()
    with RunLock(run_dir), _kernel_options() as kernel:
        results = _run_locked(pm, spec, run_dir, device, seed, notebooks, timeout, force, log, overrides,
                              kernel)
    return run_dir, results


@contextmanager
def _kernel_options():
    """A function of a notebook's kernel log path giving papermill's keyword arguments for that
    notebook's kernel:

    - on unix sockets in a private temporary folder: no TCP port on 127.0.0.1 that another user of a
      shared workshop machine could reach, and no warning from ipykernel about one after every
      notebook (Windows keeps TCP);
    - with the kernel process's stdout and stderr in the log file. These carry ipykernel's own log,
      not the cells' output (which the kernel sends to the notebook). jupyter_client interrupts
      every kernel as it shuts it down; a kernel still finishing its last reply then logs
      "KeyboardInterrupt caught in kernel", a harmless line a teacher should not have to read."""
    # run time only, as papermill, which brings both
    from jupyter_client import AsyncKernelManager
    from traitlets.config import Config

    def options(folder: str | None, log_path: Path) -> dict:
        class LoggedKernelManager(AsyncKernelManager):
            async def start_kernel(self, **kw):
                with open(log_path, "ab") as f:   # the kernel holds its own copy of the descriptor
                    return await super().start_kernel(**{"stdout": f, "stderr": f, **kw})

        opts: dict = {"kernel_manager_class": LoggedKernelManager}
        if folder is not None:
            opts["config"] = Config({"KernelManager": {"transport": "ipc", "ip": os.path.join(folder, "k")}})
        return opts

    if os.name == "nt":
        yield partial(options, None)
        return
    with tempfile.TemporaryDirectory(prefix="reidkit-kernel-") as folder:
        yield partial(options, folder)


def _said_something(log: Path) -> bool:
    return log.is_file() and log.stat().st_size > 0


def _run_locked(pm, spec, run_dir: Path, device, seed, notebooks, timeout, force, log,
                overrides: dict, kernel: Callable[[Path], dict]) -> list[NotebookResult]:
    """The body of :func:`run_notebooks`, run while ``run_dir`` is locked. ``device`` is what the
    notebooks are given (``auto`` stays ``auto``: each kernel resolves it as ``spec`` did)."""
    from nbclient.exceptions import DeadKernelError  # run time only, as papermill, which brings it

    prof, data_root = spec.profile, spec.data_root

    nbs = list_notebooks()
    if notebooks:
        wanted = set(notebooks)
        nbs = [p for p in nbs if p.stem in wanted or p.stem[:2] in wanted]
    params = {"PROFILE": prof.name, "DATA_ROOT": str(data_root) if data_root else "",
              "RUN_DIR": str(run_dir), "DEVICE": device, "SEED": int(seed), "INTERACTIVE": False}
    skip = skipped_notebooks(spec, nbs)
    atomic_write_json(run_dir / "run.json", {"parameters": params, "overrides": overrides, "skipped": skip,
                                             "device": str(spec.device),
                                             "identities": identity_counts(spec),
                                             "profile": prof.to_dict(),
                                             "environment": environment(prof, device),
                                             "notebooks": [p.name for p in nbs]})
    _copy_lesson_figures(nbs, run_dir / "notebooks")
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
            kernel_log = run_dir / nb.stem / "kernel.log"
            kernel_log.parent.mkdir(parents=True, exist_ok=True)
            log(f"{tag}: running ...")
            t0 = time.time()
            try:
                pm.execute_notebook(str(nb), str(executed), parameters=params, kernel_name="python3",
                                    cwd=str(nb.parent), progress_bar=False, execution_timeout=timeout,
                                    log_output=False, **kernel(kernel_log))
            except pm.PapermillExecutionError as exc:
                cell = _failing_cell(executed)
                raise NotebookFailed(nb.stem, cell, exc.ename, exc.evalue, executed) from None
            except DeadKernelError:
                raise NotebookFailed(nb.stem, _failing_cell(executed, died=True), "DeadKernelError",
                                     "the kernel died (a system short of memory stops the largest process)"
                                     + (f"; its own log: {kernel_log}" if _said_something(kernel_log) else ""),
                                     executed) from None
            except BaseException:
                # a kernel that would not start, an interrupted run: its own log may say why
                if _said_something(kernel_log):
                    log(f"{tag}: the kernel's own log: {kernel_log}")
                raise
            finally:
                if not _said_something(kernel_log):
                    kernel_log.unlink(missing_ok=True)
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
    export_html(run_dir)
    log(f"report: {run_dir / 'report.md'}; web pages: {run_dir / 'html' / 'index.html'}")
    return results


def _copy_lesson_figures(nbs: list[Path], dest: Path) -> None:
    """The drawn figures the lessons' markdown shows (``notebooks/figures/``) beside the executed
    notebooks, so that those open with their pictures in JupyterLab and in the web copy."""
    src = nbs[0].parent / "figures" if nbs else None
    if src is not None and src.is_dir():
        shutil.copytree(src, dest / "figures", dirs_exist_ok=True)


def overrides_from_args(args) -> dict:
    """``--camera-aware``, ``--set`` pairs and ``--subset-ids`` of a command line as
    ``{"section.field": value}`` (validated; raises ``OverrideError``). ``--set`` wins over the
    camera-aware recipe, so one of its parts can be turned off."""

    overrides = dict(CAMERA_AWARE_RECIPE) if getattr(args, "camera_aware", False) else {}
    overrides.update(parse_set(getattr(args, "set", None)))
    if getattr(args, "subset_ids", None) is not None:
        overrides.update(parse_set([f"data.subset_ids={int(args.subset_ids)}"]))
    return overrides


def main_reproduce(args) -> int:

    try:
        overrides = overrides_from_args(args)
        run_dir, results = run_notebooks(args.profile, args.data_root, args.run_dir, args.device, args.seed,
                                         args.notebooks, args.timeout, args.force, overrides=overrides)
    except NotebookFailed as exc:
        print(f"reproduction stopped: {exc}", file=sys.stderr)
        return 1
    except (OverrideError, RunSetupError, RunLockedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyError, FileNotFoundError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    total = sum(r.seconds for r in results)
    print(f"{len(results)} notebooks, {total:.0f} s; next: `make lab` (or `jupyter lab`): a notebook opened "
          f"there reads this run and retrains nothing")
    return 0

"""The training engine shared by HHCL and DGL.

A method (``reidkit.hhcl.method.HHCL``, ``reidkit.dgl.method.DGL``) says what is its own: the data it trains on,
its network and optimiser, what happens at the start of an epoch (cluster and build the memory;
draw the bags) and one step. The engine owns everything else, once for both:

* **seeding and the device**: every epoch re-seeds python, numpy and torch from ``(seed, epoch)``,
  so a run resumed from the checkpoint of epoch e continues bit-exactly on CPU;
* **DDP through torchrun** (``reidkit.train.distributed``): the model is wrapped, rank 0 logs, evaluates
  and writes; ghost BN (``reidkit.nets.ghost_bn``) keeps the paper's per-GPU BN statistics on one device;
* **checkpoints** (``reidkit.train.checkpoints``): ``checkpoint.pt`` after every epoch's training and
  again after its evaluation (a crash while evaluating loses no training, and the resumed run
  evaluates that epoch first), ``model_best.pt`` by the model-selection rule, ``history.json``
  every epoch, resume refused under other settings, ``--no-resume`` moves old files aside;
* **model selection**: ``val`` (a validation split carved from the training identities that
  follows the test protocol, :func:`make_val_split`), ``test`` (the papers' practice: the epoch with
  the best *test* mAP, labelled as such), or ``last``;
* **logs**: every line goes to the caller's ``log`` and, flushed, to ``out_dir/train.log``; a tqdm
  bar shows per-iteration progress on a terminal and a progress line reaches the log file every
  ``REIDKIT_LOG_EVERY`` seconds (default 60), so a run killed under SLURM keeps what it said;
* **one run per out folder** (``reidkit.train.run_lock``): rank 0 locks ``out_dir`` before any file
  in it is touched, and every rank stops at once when another run holds it;
* **order of work**: the query and gallery images are verified before the first epoch, so a
  corrupt file stops the run before any training time is spent.
"""

from __future__ import annotations

import abc
import json
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

from reidkit.core.device import amp_dtype, channels_last, optimizer_steps_to_cpu, seed_everything, tune_cpu_allocator
from reidkit.core.io import atomic_torch_save, atomic_write_json, read_train_checkpoint
from reidkit.core.progress import _interactive_output, progress
from reidkit.data.records import CorruptImageError, Record, check_images
from reidkit.nets.ghost_bn import apply_ghost_bn
from reidkit.train.checkpoints import check_resume_settings, move_aside
from reidkit.train.distributed import barrier, dist_info, finish, owns_process_group
from reidkit.train.run_lock import RunLock, RunLockedError
from reidkit.train.runspec import RunSpec

SELECTIONS = ("val", "test", "last")


#: files a run writes; ``resume=False`` moves the existing ones aside
RUN_FILES = ("checkpoint.pt", "model_best.pt", "history.json")


@dataclass
class TrainResult:
    """What a training run returns (both methods)."""

    out_dir: Path
    method: str
    history: list[dict]
    best_epoch: int | None
    selection: str
    test: dict | None               # the selected epoch's test result (None before the run finishes)
    finished: bool
    model: nn.Module = field(repr=False, default=None)
    variant: str | None = None      # DGL
    network: str | None = None      # DGL
    num_classes: int | None = None  # DGL
    class_of_pid: dict = field(default_factory=dict)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch: python, numpy, torch, the sampler and the loader all start from it."""
    return int(seed) * 10_007 + int(epoch)


def _print_flush(msg: str) -> None:
    print(msg, flush=True)


class TrainLog:
    """One line at a time to the caller's ``log`` and to ``out_dir/train.log`` (line-buffered, with
    a UTC time stamp). Silent on ranks other than 0."""

    def __init__(self, out_dir: Path, log: Callable[[str], None] | None, enabled: bool = True):
        self.enabled = enabled
        self.log = log or _print_flush
        self.fh = open(out_dir / "train.log", "a", buffering=1, encoding="utf-8") if enabled else None

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        self.log(msg)
        self.file(msg)

    def file(self, msg: str) -> None:
        if self.fh is not None:
            self.fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} {msg}\n")

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


class Meter:
    """Per-iteration progress: a tqdm bar on a terminal, and every ``every_s`` seconds one line to
    the log file (and to the log itself when it is not a terminal: a SLURM output file)."""

    def __init__(self, log: TrainLog, desc: str, total: int | None, every_s: float | None = None):

        self.log, self.desc, self.total = log, desc, total
        self.every = float(os.environ.get("REIDKIT_LOG_EVERY", 60)) if every_s is None else every_s
        self.to_log = not _interactive_output()
        self.t0 = self.last = time.time()
        self.images = 0

    def wrap(self, batches: Iterable) -> Iterable:
        quiet = {} if self.log.enabled else {"disable": True}
        return progress(batches, desc=self.desc, total=self.total, **quiet)

    def update(self, it: int, images: int, loss: Any) -> None:
        self.images += images
        now = time.time()
        if now - self.last < self.every:
            return
        self.last = now
        rate = self.images / max(now - self.t0, 1e-9)
        of = f"/{self.total}" if self.total else ""
        shown = "n/a" if loss is None else f"{float(loss):.3f}"
        line = f"{self.desc}: iteration {it + 1}{of}, loss {shown}, {rate:.1f} img/s"
        (self.log if self.to_log else self.log.file)(line)


def make_val_split(records: Sequence[Record], fraction: float = 0.1, min_ids: int = 2, seed: int = 0
                   ) -> tuple[list[Record], list[Record], list[Record]]:
    """Hold out ``fraction`` of the training identities (at least ``min_ids``, only identities seen
    by two or more cameras) as a labelled validation set for model selection.

    Returns (remaining train records, val query, val gallery), following the test protocol: for each
    held-out identity one image of every camera it is seen by is a query (deterministic for
    ``seed``), and its remaining images, same camera included, are the gallery, so that evaluation
    meets same-camera images and removes the same-identity ones as junk, as at test time. A query
    left without an image of another camera in the gallery is moved to the gallery."""
    by_pid: dict[int, list[Record]] = {}
    for r in records:
        by_pid.setdefault(r.pid, []).append(r)
    eligible = sorted(p for p, rs in by_pid.items() if len({r.camid for r in rs if r.camid >= 0}) >= 2)
    n = max(min_ids, int(round(fraction * len(by_pid))))
    if len(eligible) < n:
        raise ValueError(f"only {len(eligible)} training identities are seen by two cameras; "
                         f"{n} are needed for a validation split (use selection='last' or 'test')")
    rng = np.random.default_rng(seed)
    held = set(rng.choice(eligible, size=n, replace=False).tolist())
    query, gallery = [], []
    for pid in sorted(held):
        q_pid, g_pid = _split_identity(by_pid[pid], rng)
        query += q_pid
        gallery += g_pid
    train = [r for r in records if r.pid not in held]
    return train, query, gallery


def _split_identity(rs: list[Record], rng) -> tuple[list[Record], list[Record]]:
    """One query drawn from every camera of the identity; the rest of its images (other cameras and
    the same camera alike) are the gallery, where evaluation treats same-camera matches as junk
    exactly as at test time. A query with no image of another camera left in the gallery goes back
    to the gallery (the identity is seen by >= 2 cameras, so one query stays)."""
    q_pid: list[Record] = []
    for cam in sorted({r.camid for r in rs}):
        in_cam = [r for r in rs if r.camid == cam]
        q_pid.append(in_cam[int(rng.integers(len(in_cam)))])
    g_pid = [r for r in rs if not any(r is q for q in q_pid)]
    for q in list(q_pid):
        if not any(g.camid != q.camid for g in g_pid):
            q_pid.remove(q)
            g_pid.append(q)
    return q_pid, g_pid


#: above this many images, the pre-flight check reads each file's header instead of decoding it
FULL_DECODE_LIMIT = 100_000


def verify_images(records: Sequence[Record], what: str, log: Callable[[str], None]) -> None:
    """Stop before the first epoch if an evaluation image cannot be read: decode every image (up to
    :data:`FULL_DECODE_LIMIT`; beyond it, SYSU-30k's 479k gallery, open each header), and raise one
    error naming the files. A corrupt gallery file otherwise crashes the first evaluation, after
    an epoch of training."""

    paths = [r.path for r in records]
    if len(paths) <= FULL_DECODE_LIMIT:
        errors = check_images(paths, progress_desc=f"checking {what} images")
    else:
        errors = []
        for p in progress(paths, desc=f"checking {what} image headers"):
            try:
                with Image.open(p) as im:
                    im.size  # noqa: B018  (the header parses)
            except Exception as exc:  # noqa: BLE001  (PIL raises several types)
                errors.append(CorruptImageError(p, f"{type(exc).__name__}: {exc}"))
    if errors:
        shown = "; ".join(str(e) for e in errors[:3])
        raise CorruptImageError(errors[0].path, f"{len(errors)} unreadable {what} image(s) found before "
                                f"training: {shown} (remove or replace them)")
    log(f"checked {len(paths):,} {what} images")


class Method(abc.ABC):
    """The part of a training run that is the method's own (``reidkit.hhcl.method.HHCL``,
    ``reidkit.hhcl.supervised.Supervised``, ``reidkit.dgl.method.DGL``); the registry of the
    methods the command line can train is :mod:`reidkit.methods`.

    Class attributes: ``name`` (what ``--method`` and checkpoints call it), ``sections`` (the
    profile sections that shape its training: their overrides go into the checkpoint and are
    compared on resume), ``default_selection`` (its model-selection rule unless asked otherwise),
    ``amp_policy`` (its AMP dtype for a profile and device), ``trains_on_bags`` (it can train on
    SYSU-30k's bag-labelled stream), ``uses_memory`` (``--memory`` / ``hhcl.memory`` chooses its
    cluster memory); :meth:`gpu_plan` is its GPU cost.
    Attributes the engine reads on an instance: ``label`` (for log lines), ``prof``, ``epochs``,
    ``eval_every`` (0: the last epoch only), ``batch_size`` (global), ``ghost_bn`` and
    ``find_unused`` (DDP). The abstract methods below are the hooks the engine calls."""

    name: str = ""
    sections: tuple[str, ...] = ("data", "model", "seed")
    default_selection: str = "last"
    #: whether it trains on data labelled only by bags (SYSU-30k's streamed training set)
    trains_on_bags = False
    #: whether ``hhcl.memory`` (``--memory``) chooses a cluster memory it trains against
    uses_memory = False
    #: the method's AMP policy, ``(profile, device) -> dtype | None``, asked once per run by its RunSpec
    amp_policy = staticmethod(amp_dtype)
    find_unused = False
    ds = None
    spec: RunSpec | None = None
    val_q: tuple = ()
    val_g: tuple = ()

    @classmethod
    def for_run(cls, prof, dataset, data_root=None, epochs: int | None = None, iters: int | None = None) -> "Method":
        """The method as ``reidkit train`` builds it (``iters``: a cap per epoch where the method has one)."""
        return cls(prof, dataset, epochs=epochs, data_root=data_root)

    @classmethod
    def from_spec(cls, spec: RunSpec, epochs: int | None = None, iters: int | None = None) -> "Method":
        """The method on a resolved run: its profile, its dataset (read once), and later its device
        and AMP dtype (:meth:`run_amp`), all from ``spec``."""
        method = cls.for_run(spec.profile, spec.dataset(), spec.data_root, epochs=epochs, iters=iters)
        method.spec = spec
        return method

    @classmethod
    def selection_for(cls, prof) -> str:
        """The model-selection rule of a run of ``prof`` unless one is asked for."""
        return cls.default_selection

    @classmethod
    def gpu_plan(cls, prof) -> dict | None:
        """The run of ``prof`` as :func:`reidkit.train.gpu_cost.estimate` counts it (its fields are
        listed there), or None: no GPU cost model for this method."""
        return None

    def run_amp(self, dev) -> torch.dtype | None:
        """The AMP dtype of this run: its RunSpec's, decided once; a method built without one asks
        its policy here, once, in ``prepare``."""
        if self.spec is not None and self.spec.device.type == torch.device(dev).type:
            return self.spec.amp
        return self.amp_policy(self.prof, dev)

    @abc.abstractmethod
    def describe(self) -> str:
        """One line naming the run (the first line of train.log)."""

    @abc.abstractmethod
    def settings(self) -> dict:
        """What a checkpoint records about the run and resume compares (``run_settings``)."""

    def checkpoint_info(self) -> dict:
        """Extra keys of every checkpoint."""
        return {}

    @abc.abstractmethod
    def prepare(self, dev, selection: str, seed: int, log) -> None:
        """Read the data, make the splits; before the model is built."""

    @abc.abstractmethod
    def build_model(self, dev) -> nn.Module:
        """The network, on ``dev``."""

    @abc.abstractmethod
    def optimizer(self, model: nn.Module):
        """``(optimizer, scheduler)``; the scheduler steps once per epoch."""

    @abc.abstractmethod
    def begin_epoch(self, epoch: int, eseed: int, model, dev, entry: dict, log) -> tuple[Any, int | None]:
        """The epoch's batches and their count, or ``(None, None)`` to skip its steps; writes what
        it measured into ``entry`` (the epoch's line of history.json)."""

    @abc.abstractmethod
    def step(self, net, batch, opt, dev) -> dict:
        """One iteration: the loss, the backward pass and the optimiser step; returns ``{"loss", "images"}``."""

    @abc.abstractmethod
    def end_epoch(self, steps: list[dict]) -> dict:
        """The epoch's summary from its steps' results (merged into ``entry``)."""

    @abc.abstractmethod
    def evaluate(self, model, dev, split: str, log) -> dict:
        """Metrics on ``split`` (``"val"`` or ``"test"``), with ``mAP``."""

    @staticmethod
    @abc.abstractmethod
    def epoch_line(e: dict) -> str:
        """The train.log line of a history entry."""

    def eval_records(self, selection: str) -> dict[str, list[Record]]:
        """The images evaluation will read, checked before the first epoch."""
        recs = {"query": list(self.ds.query), "gallery": list(self.ds.gallery)}
        if selection == "val":
            recs["validation"] = list(self.val_q) + list(self.val_g)
        return recs

    def result_info(self) -> dict:
        return {}


@dataclass
class _Run:
    """The state of one training run, passed between the engine's steps."""

    method: Any
    out: Path
    log: TrainLog
    dev: torch.device
    rank: int
    world: int
    seed: int
    selection: str
    evaluate: bool
    model: nn.Module = None
    net: nn.Module = None
    opt: Any = None
    sched: Any = None
    settings: dict = field(default_factory=dict)
    init_source: str = ""
    history: list = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int | None = None
    start_epoch: int = 0
    eval_pending: bool = False
    ghost_layers: int = 0


def fit(method, out_dir: str | Path, device: Any = "auto", seed: int | None = None, selection: str = "val",
        resume: bool = True, stop_after: int | None = None, evaluate: bool = True,
        log: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``method`` into ``out_dir`` (see the module docstring). ``stop_after`` stops after that
    many epochs of this call (to test resuming); ``evaluate=False`` never evaluates (``selection``
    must then be ``last``)."""

    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if not evaluate and selection != "last":
        raise ValueError(f"selection={selection!r} needs evaluation; use selection='last' with evaluate=False")
    if str(device) == "auto" and getattr(method, "spec", None) is not None:
        device = method.spec.device
    dev, owned = owns_process_group(device)
    rank, world = dist_info()
    out = Path(out_dir)
    try:
        with out_folder_lock(out, rank, world):
            run = _Run(method, out, TrainLog(out, log, enabled=rank == 0), dev, rank, world,
                       method.prof.seed if seed is None else int(seed), selection, evaluate)
            try:
                _setup(run, resume)
                _train_epochs(run, stop_after)
            finally:
                run.log.close()
            finish(owned)
    except BaseException:
        if owned and dist.is_initialized():  # no barrier: the other ranks may be gone
            dist.destroy_process_group()
        raise
    return _result(run)


@contextmanager
def out_folder_lock(out: Path, rank: int, world: int) -> Iterator[None]:
    """Hold ``out``'s run lock for the block (created on rank 0; the other ranks hold nothing).
    When rank 0 cannot take it, every rank raises :class:`RunLockedError` with rank 0's message,
    so no rank waits at a collective for a rank that has stopped."""

    lock, error = None, None
    if rank == 0:
        try:
            lock = RunLock(out).acquire()
        except Exception as exc:  # noqa: BLE001  (told to every rank, then raised)
            error = exc
    else:
        out.mkdir(parents=True, exist_ok=True)
    if world > 1:
        said = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(said, src=0)
        if error is None and said[0] is not None:
            error = RunLockedError(f"rank 0 could not lock {out}: {said[0]}")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _setup(run: _Run, resume: bool) -> None:
    """Data, pre-flight checks, the network, the optimiser, and the checkpoint to resume from."""

    m = run.method
    if m.batch_size % run.world:
        raise ValueError(f"batch size {m.batch_size} does not split over {run.world} processes")
    m.prepare(run.dev, run.selection, run.seed, run.log)
    if run.rank == 0 and run.evaluate:
        for what, recs in m.eval_records(run.selection).items():
            verify_images(recs, what, run.log)
    alloc = ""
    if run.dev.type == "cpu":  # the batches' activations stay in the process (1.03-1.9x on the CPU)
        a = tune_cpu_allocator()
        alloc = " (CPU allocator: batches kept)" if a["tuned"] else f" (CPU allocator: glibc default, {a['why']})"
    seed_everything(run.seed)
    run.model = m.build_model(run.dev)
    run.ghost_layers = apply_ghost_bn(run.model, m.ghost_bn)
    if channels_last(run.dev):
        run.model = run.model.to(memory_format=torch.channels_last)
    run.opt, run.sched = m.optimizer(run.model)
    run.net = run.model
    if run.world > 1:
        ids = [run.dev.index] if run.dev.type == "cuda" else None
        run.net = nn.parallel.DistributedDataParallel(run.model, device_ids=ids,
                                                          find_unused_parameters=m.find_unused)
    run.settings = m.settings()
    run.init_source = str(getattr(run.model, "init_source", m.prof.model.pretrained))
    run.log(f"{m.describe()} | init {run.init_source} | device {run.dev} x {run.world}{alloc} | out {run.out}")
    if not resume and run.rank == 0:
        move_aside(run.out, RUN_FILES, run.log)
    if resume and (run.out / "checkpoint.pt").is_file():
        _resume(run)


def _resume(run: _Run) -> None:

    path = run.out / "checkpoint.pt"
    state = read_train_checkpoint(path, map_location=run.dev)
    check_resume_settings(path, state, run.settings)
    done, asked = int(state["epoch"]), run.method.epochs
    if done > asked:
        raise ValueError(f"{path} has {done} epochs done, more than the {asked} asked (epochs={asked}); "
                         f"ask for at least {done} epochs, or use another out_dir or resume=False (--no-resume)")
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    optimizer_steps_to_cpu(run.opt)  # map_location=dev put Adam's step counters on the GPU
    run.sched.load_state_dict(state["scheduler"])
    run.start_epoch = done
    run.init_source = state.get("init_source", run.init_source)
    run.history = json.loads(state["history"])
    run.best_score = float(state.get("best_score", -math.inf))
    run.best_epoch = state.get("best_epoch")
    run.eval_pending = bool(state.get("eval_pending", False))
    run.log(f"{run.method.label}: resumed from {path} at epoch {done}")


def _train_epochs(run: _Run, stop_after: int | None) -> None:

    if run.eval_pending:  # the last run stopped while evaluating: evaluate that epoch first
        _evaluate_epoch(run, run.history[-1])
    for epoch in range(run.start_epoch, run.method.epochs):
        if stop_after is not None and epoch - run.start_epoch >= stop_after:
            break
        entry = _train_one_epoch(run, epoch)
        run.history.append(entry)
        due = _eval_due(run, epoch)
        run.eval_pending = due
        if run.rank == 0:
            _save(run, epoch + 1)  # the epoch's training is safe before any evaluation starts
        if due:
            _evaluate_epoch(run, entry)
        elif run.selection == "last" and run.rank == 0:
            _save_best(run, epoch)
        run.log(run.method.epoch_line(entry))
        barrier()


def _eval_due(run: _Run, epoch: int) -> bool:
    if not run.evaluate:
        return False
    every = run.method.eval_every
    return epoch + 1 == run.method.epochs or bool(every and (epoch + 1) % every == 0)


def _train_one_epoch(run: _Run, epoch: int) -> dict:
    """Re-seed, let the method set the epoch up, run its steps, step the schedule."""
    m = run.method
    eseed = epoch_seed(run.seed, epoch)
    seed_everything(eseed)
    t0 = time.time()
    entry: dict[str, Any] = {"epoch": epoch, "lr": run.opt.param_groups[0]["lr"]}
    batches, total = m.begin_epoch(epoch, eseed, run.model, run.dev, entry, run.log)
    steps: list[dict] = []
    if batches is not None:
        t1 = time.time()
        meter = Meter(run.log, f"{m.label} epoch {epoch}", total)
        run.net.train()
        for it, batch in enumerate(meter.wrap(batches)):
            if total is not None and it >= total:
                break
            step = m.step(run.net, batch, run.opt, run.dev)
            steps.append(step)
            meter.update(it, step["images"], step["loss"])
        entry["t_train"] = time.time() - t1
        entry.update(m.end_epoch(steps))
    _step_schedule(run.sched, stepped=bool(steps))
    entry["t_epoch"] = time.time() - t0
    return entry


def _step_schedule(sched, stepped: bool) -> None:
    """The schedule counts epochs, so it steps after every one, also an epoch that took no
    optimiser step (``iters=0``, or a method that skipped its steps); torch then warns that the
    schedule stepped before the optimiser, which is what such an epoch means, so not there."""
    if stepped:
        sched.step()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before",
                                category=UserWarning)
        sched.step()


def _evaluate_epoch(run: _Run, entry: dict) -> None:
    """Evaluate on rank 0 (val when selecting on it, then test), keep the best model, checkpoint."""
    epoch = entry["epoch"]
    if run.rank == 0:
        t0 = time.time()
        if run.selection == "val":
            entry["val"] = run.method.evaluate(run.model, run.dev, "val", run.log)
        entry["test"] = run.method.evaluate(run.model, run.dev, "test", run.log)
        entry["t_eval"] = time.time() - t0
        entry["t_epoch"] = entry.get("t_epoch", 0.0) + entry["t_eval"]
        score = float(epoch) if run.selection == "last" else entry[run.selection]["mAP"]
        if score > run.best_score:
            run.best_score, run.best_epoch = score, epoch
            _save_best(run, epoch)
        run.eval_pending = False
        _save(run, epoch + 1)


def _meta(run: _Run) -> dict:
    m = run.method
    prof = m.prof
    return {"profile": prof.name, "method": m.name, "arch": prof.model.arch, "pooling": prof.model.pooling,
            "last_stride": prof.model.last_stride, "settings": run.settings, "init_source": run.init_source,
            "seed": run.seed, "selection": run.selection, **m.checkpoint_info()}


def _save(run: _Run, epochs_done: int) -> None:
    atomic_torch_save({"model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
                       "scheduler": run.sched.state_dict(), "epoch": epochs_done,
                       "history": json.dumps(run.history), "best_score": run.best_score,
                       "best_epoch": run.best_epoch, "eval_pending": run.eval_pending,
                       "ghost_bn_layers": run.ghost_layers, **_meta(run)}, run.out / "checkpoint.pt")
    atomic_write_json(run.out / "history.json", run.history)


def _save_best(run: _Run, epoch: int) -> None:
    if run.selection == "last":
        run.best_epoch = epoch
    atomic_torch_save({"model": run.model.state_dict(), "epoch": epoch + 1, **_meta(run)},
                      run.out / "model_best.pt")


def _result(run: _Run) -> TrainResult:
    m = run.method
    finished = len(run.history) >= m.epochs
    test = None
    if finished and run.best_epoch is not None:
        test = next((h.get("test") for h in run.history if h["epoch"] == run.best_epoch), None)
    extra = m.result_info()
    return TrainResult(run.out, m.name, run.history, run.best_epoch, run.selection, test, finished,
                       run.model, **extra)

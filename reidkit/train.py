"""Training loops: HHCL / Cluster-Contrast (unsupervised), with the paper's protocol.

Each epoch of ``train_hhcl`` (spec hhcl §0, §3, §5):
1. extract L2-normalised features of every training image (eval mode, test transform);
2. k-reciprocal Jaccard distance (k1, k2) and DBSCAN (eps, min_samples) -> pseudo-labels;
   outliers (-1) are dropped for the epoch;
3. a new cluster memory is built from the centroids (``CM``, ``CMhybrid`` or ``CMhybrid_v2``);
4. exactly ``iters`` iterations of camera-aware PK batches (the sampler restarts when exhausted);
   Adam (lr, coupled weight decay, the frozen BN-neck bias excluded), StepLR per epoch;
5. evaluation every ``eval_step`` epochs and at the end; checkpoint every epoch, atomically.

Repeatability: every epoch re-seeds python, numpy and torch (and the sampler and the loader) from
``(seed, epoch)``, so a run resumed from the checkpoint of epoch e continues exactly like the
uninterrupted run on CPU. Model selection uses a validation split carved from the training
identities by default (``selection="val"``); ``selection="test"`` is the papers' practice of
picking the epoch with the best *test* mAP, and is labelled as such in the results.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reidkit.config import Profile, get_profile
from reidkit.data.datasets import Record, ReIDDataset
from reidkit.utils import (activate_device, atomic_torch_save, atomic_write_json, bf16_native,
                           optimizer_steps_to_cpu, resolve_device, seed_everything, torch_load)

SELECTIONS = ("val", "test", "last")


# --------------------------------------------------------------------------------------------
# ghost batch norm: the paper's per-GPU BN statistics on one device

class _GhostBNMixin:
    """BatchNorm whose training-mode statistics are computed per contiguous chunk of ``ghost_chunk``
    samples, with the running statistics updated from the first chunk only: exactly what
    ``nn.DataParallel`` over 4 GPUs does to a batch of 256 (each replica normalises its 64 images;
    only replica 0 shares its buffers with the module)."""

    ghost_chunk: int = 64

    def forward(self, x):
        n = x.shape[0]
        if not self.training or n <= self.ghost_chunk:
            return super().forward(x)
        chunks = x.split(self.ghost_chunk)
        outs = [super().forward(chunks[0])]
        for c in chunks[1:]:
            outs.append(F.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps))
        return torch.cat(outs)


class GhostBatchNorm1d(_GhostBNMixin, nn.BatchNorm1d):
    pass


class GhostBatchNorm2d(_GhostBNMixin, nn.BatchNorm2d):
    pass


def apply_ghost_bn(model: nn.Module, chunk: int | None) -> int:
    """Turn every BatchNorm1d/2d of ``model`` into its ghost version (state dict keys unchanged).
    Returns how many layers changed; ``chunk=None`` changes nothing."""
    if not chunk:
        return 0
    count = 0
    for mod in model.modules():
        for plain, ghost in ((nn.BatchNorm2d, GhostBatchNorm2d), (nn.BatchNorm1d, GhostBatchNorm1d)):
            if type(mod) is plain:
                mod.__class__ = ghost
                mod.ghost_chunk = int(chunk)
                count += 1
    return count


# --------------------------------------------------------------------------------------------
# distributed data parallel (torchrun): one process per device, the global batch split in
# contiguous slices as nn.DataParallel did (each of the paper's 4 GPUs saw 4 pseudo-ids x 16)

def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


#: default collective timeout: rank 0 evaluates (an MSMT17 test set takes well over NCCL's default
#: 10 minutes on a slow GPU) while the other ranks wait at a barrier
DIST_TIMEOUT_S = 6 * 3600


def dist_timeout():
    """Timeout of the process group: ``$REIDKIT_DIST_TIMEOUT`` seconds, default 6 hours."""
    import os
    from datetime import timedelta

    return timedelta(seconds=float(os.environ.get("REIDKIT_DIST_TIMEOUT", DIST_TIMEOUT_S)))


def init_distributed(device: Any = "auto"):
    """Join the process group that ``torchrun`` describes in the environment (nccl on CUDA, gloo on
    CPU, with :func:`dist_timeout`); returns the device this rank should use. Without torchrun it
    only makes an indexed CUDA device (``--device cuda:1``) the current one."""
    import os

    import torch.distributed as dist

    dev = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda":
            dev = activate_device(torch.device("cuda", local))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=dist_timeout())
    elif dev.type == "cuda":
        dev = activate_device(dev)
    return dev


def _sync_buffers(model: nn.Module) -> tuple[float, float]:
    """Give every rank rank 0's buffers (BN running statistics) before the features are extracted:
    DDP broadcasts buffers only at the start of the next training forward, so after an epoch each
    rank holds the statistics of its own last batches, and a sharded extraction would cluster
    features of different models. Returns the spread (max - min over ranks) of a buffer checksum
    before and after the broadcast (0.0 after: identical buffers)."""
    import torch.distributed as dist

    def spread() -> float:
        bufs = [b for b in model.buffers() if b.is_floating_point()]
        total = torch.zeros((), dtype=torch.float64)
        for b in bufs:
            total = total + b.detach().double().sum().cpu()
        sums = _all_gather_cat(total.reshape(1).to(next(model.parameters()).device))
        return float(sums.max() - sums.min())

    before = spread()
    for b in model.buffers():
        dist.broadcast(b.data, 0)
    return before, spread()


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _gather_batch(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _all_gather_cat(x), _all_gather_cat(y)


class RankSlice(torch.utils.data.Sampler):
    """Every rank draws the same global batches and keeps its contiguous slice of each."""

    def __init__(self, batch_sampler, rank: int, world: int):
        self.batch_sampler, self.rank, self.world = batch_sampler, rank, world

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        for batch in self.batch_sampler:
            per = len(batch) // self.world
            yield batch[self.rank * per:(self.rank + 1) * per]


def _extract_sharded(model, records, profile, device, desc):
    """Features of ``records``; under DDP each rank extracts every world-th record, then all gather."""
    rank, world = dist_info()
    if world == 1:
        return extract_records(model, records, profile, device, desc)
    n = len(records)
    mine = extract_records(model, records[rank::world], profile, device, desc)
    per = -(-n // world)
    pad = np.zeros((per, mine.shape[1]), dtype=np.float32)
    pad[:len(mine)] = mine
    full = _all_gather_cat(torch.from_numpy(pad).to(device)).cpu().numpy().reshape(world, per, -1)
    out = np.empty((n, mine.shape[1]), dtype=np.float32)
    for r in range(world):
        cnt = len(range(r, n, world))
        out[r::world] = full[r, :cnt]
    return out


# --------------------------------------------------------------------------------------------
# checkpoints: read safely, record and check the settings they were written under

#: profile fields that may change between a run and its resume (they do not change the result)
RESUMABLE_FIELDS = ("hhcl.epochs", "hhcl.eval_step", "dgl.epochs", "dgl.eval_step", "data.workers",
                    "data.test_batch_size")


def read_train_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a training checkpoint (``weights_only=True``); an empty, truncated or damaged file is a
    one-line :class:`~reidkit.weights.CheckpointError` naming the file."""
    import pickle
    import zipfile

    from reidkit.weights import CheckpointError

    path = Path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: damaged checkpoint: the file is empty (0 bytes); "
                              f"delete it or train with resume=False (--no-resume)")
    try:
        state = torch_load(path, map_location=map_location)
    except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:100] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: damaged checkpoint (truncated or not a torch file): "
                              f"{type(exc).__name__}: {first}; delete it or train with resume=False "
                              f"(--no-resume)") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a training checkpoint (no 'model' entry)")
    return state


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def profile_overrides(prof: Profile) -> dict[str, Any]:
    """The fields of ``prof`` that differ from its named profile (``{}`` for an unknown name),
    less :data:`RESUMABLE_FIELDS`, as plain JSON values."""
    try:
        base = _flat(dataclasses.asdict(get_profile(prof.name)))
    except Exception:  # noqa: BLE001  (a profile built in code, without a registered name)
        base = {}
    mine = _flat(dataclasses.asdict(prof))
    diff = {k: v for k, v in mine.items() if k not in RESUMABLE_FIELDS and base.get(k, object()) != v}
    return json.loads(json.dumps(diff, default=str))


def run_settings(prof: Profile, method: str, **extra: Any) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it (compared on resume)."""
    return {"profile": prof.name, "method": method, **extra, "arch": prof.model.arch,
            "pooling": prof.model.pooling, "last_stride": prof.model.last_stride,
            "init": str(prof.model.pretrained), "overrides": profile_overrides(prof)}


def check_resume_settings(path: Path, state: dict, settings: dict[str, Any]) -> None:
    """Refuse to resume ``state`` (read from ``path``) under ``settings`` that differ from the ones
    it was written under, naming both sides. Keys an older checkpoint lacks are not compared."""
    from reidkit.weights import CheckpointError

    saved = state.get("settings")
    if not isinstance(saved, dict):
        saved = {k: state[k] for k in ("profile", "memory", "variant", "arch") if k in state}
    diffs = []
    for key, now in settings.items():
        if key not in saved or saved[key] == now:
            continue
        if key == "overrides":
            was = saved[key] or {}
            keys = sorted(set(was) | set(now))
            diffs += [f"{k}: checkpoint {was.get(k, '(profile default)')!r} vs now {now.get(k, '(profile default)')!r}"
                      for k in keys if was.get(k, None) != now.get(k, None)]
        else:
            diffs.append(f"{key}: checkpoint {saved[key]!r} vs now {now!r}")
    if diffs:
        raise CheckpointError(f"{path}: refusing to resume under different settings ({'; '.join(diffs)}); "
                              f"use the same settings, another out_dir, or resume=False (--no-resume)")


def move_aside(out_dir: Path, names: Sequence[str], log: Callable[[str], None]) -> list[Path]:
    """Rename the existing ``out_dir/<name>`` files to ``<name>.<UTC timestamp>.bak`` (never
    overwriting); returns the new paths."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    moved = []
    for name in names:
        src = out_dir / name
        if not src.exists():
            continue
        dst, i = out_dir / f"{name}.{stamp}.bak", 1
        while dst.exists():
            dst, i = out_dir / f"{name}.{stamp}.{i}.bak", i + 1
        src.rename(dst)
        moved.append(dst)
        log(f"resume=False: moved the existing {src} aside to {dst}")
    return moved


# --------------------------------------------------------------------------------------------
# validation split and evaluation

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
    eligible = sorted(p for p, rs in by_pid.items() if len({r.camid for r in rs}) >= 2)
    n = max(min_ids, int(round(fraction * len(by_pid))))
    if len(eligible) < n:
        raise ValueError(f"only {len(eligible)} training identities are seen by two cameras; "
                         f"{n} are needed for a validation split (use selection='last' or 'test')")
    rng = np.random.default_rng(seed)
    held = set(rng.choice(eligible, size=n, replace=False).tolist())
    query, gallery = [], []
    for pid in sorted(held):
        rs = by_pid[pid]
        # one query drawn from every camera of the identity; the rest of its images (other cameras
        # and the same camera alike) are the gallery, where evaluation treats same-camera matches as
        # junk exactly as at test time
        q_pid: list[Record] = []
        for cam in sorted({r.camid for r in rs}):
            in_cam = [r for r in rs if r.camid == cam]
            q_pid.append(in_cam[int(rng.integers(len(in_cam)))])
        g_pid = [r for r in rs if not any(r is q for q in q_pid)]
        # a query with no image of another camera left in the gallery would have no valid match:
        # it goes back to the gallery (identities are seen by >= 2 cameras, so one query stays)
        for q in list(q_pid):
            if not any(g.camid != q.camid for g in g_pid):
                q_pid.remove(q)
                g_pid.append(q)
        query += q_pid
        gallery += g_pid
    train = [r for r in records if r.pid not in held]
    return train, query, gallery


def amp_dtype(profile: Profile, device: Any) -> torch.dtype | None:
    """Autocast dtype of a run: None (fp32, as the papers) unless the profile asks for mixed precision;
    then bf16 where the device computes it natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX,
    where it roughly halves the workshop's training time), else fp32."""
    if not profile.hhcl.amp:
        return None
    # native only: GPUs of compute capability < 8 (T4, V100, P100) emulate bf16 without cuDNN
    # bf16 convolutions, slower than fp32
    return torch.bfloat16 if bf16_native(device) else None


def extract_records(model: nn.Module, records: Sequence[Record], profile: Profile, device: Any = "auto",
                    desc: str = "features") -> np.ndarray:
    """L2-normalised features of ``records`` with the test transform of ``profile``."""
    from reidkit.data.transforms import ImageDataset, test_transform
    from reidkit.features import extract_features

    ds = ImageDataset(records, test_transform(profile.data.height, profile.data.width))
    # fp32 features as in the papers unless the profile asks for mixed precision
    return extract_features(model, ds, device=device, batch_size=profile.data.test_batch_size,
                            num_workers=profile.data.workers, amp=amp_dtype(profile, device) or False,
                            desc=desc)


def evaluate_model(model: nn.Module, query: Sequence[Record], gallery: Sequence[Record], profile: Profile,
                   device: Any = "auto", max_rank: int = 20) -> dict:
    """Market-protocol mAP / CMC of ``model`` on (query, gallery) records."""
    from reidkit.evaluation import evaluate_rank, pairwise_distance

    qf = extract_records(model, query, profile, device, "query features")
    gf = extract_records(model, gallery, profile, device, "gallery features")
    dist = pairwise_distance(qf, gf, device=device)
    res = evaluate_rank(np.asarray(dist), np.array([r.pid for r in query]), np.array([r.pid for r in gallery]),
                        np.array([r.camid for r in query]), np.array([r.camid for r in gallery]),
                        max_rank=min(max_rank, len(gallery)), device=device)
    cmc = np.asarray(res["cmc"], dtype=float)
    return {"mAP": float(res["mAP"]), "mINP": float(res["mINP"]),
            "rank1": float(cmc[0]), "rank5": float(cmc[min(4, len(cmc) - 1)]),
            "rank10": float(cmc[min(9, len(cmc) - 1)]), "cmc": cmc.tolist()}


# --------------------------------------------------------------------------------------------
# the unsupervised loop

@dataclass
class TrainResult:
    out_dir: Path
    history: list[dict]
    best_epoch: int | None
    selection: str
    test: dict | None
    model: nn.Module = field(repr=False, default=None)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(seed) * 10_007 + int(epoch)


def _cluster(features: np.ndarray, profile: Profile, device) -> tuple[np.ndarray, dict]:
    from reidkit.clustering import dbscan_labels
    from reidkit.neighbors import jaccard_distance

    t0 = time.time()
    dist = jaccard_distance(features, k1=profile.cluster.k1, k2=profile.cluster.k2, device=device)
    t1 = time.time()
    labels = np.asarray(dbscan_labels(dist, eps=profile.cluster.eps, min_samples=profile.cluster.min_samples))
    t2 = time.time()
    return labels, {"t_jaccard": t1 - t0, "t_dbscan": t2 - t1}


def _optimizer(model, profile: Profile):
    cfg = profile.hhcl
    params = [p for p in model.parameters() if p.requires_grad]  # the frozen neck bias is left out
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    return opt, sched


def train_hhcl(profile: str | Profile = "workshop", dataset: ReIDDataset | None = None,
               out_dir: str | Path = "runs/train", device: Any = "auto", memory: str | None = None,
               seed: int | None = None, selection: str = "val", resume: bool = True,
               epochs: int | None = None, stop_after: int | None = None,
               log: Callable[[str], None] = print, data_root: str | None = None) -> TrainResult:
    """Train HHCL (or Cluster-Contrast with ``memory="CM"``) and return the history.

    ``memory`` overrides the profile's memory mode; ``epochs`` its epoch count; ``stop_after``
    stops after that many epochs of this call (to test resuming). Checkpoints:
    ``out_dir/checkpoint.pt`` (last epoch, for ``resume``) and ``out_dir/model_best.pt``."""
    from torch.utils.data import DataLoader

    from reidkit.data.datasets import load_dataset
    from reidkit.data.samplers import CameraAwarePKSampler
    from reidkit.data.transforms import ImageDataset, train_transform
    from reidkit.memory import ClusterMemory
    from reidkit.models import build_model

    prof = get_profile(profile)
    if memory is not None:
        prof = prof.replace(hhcl__memory=memory)
    if epochs is not None:
        prof = prof.replace(hhcl__epochs=int(epochs))
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}")
    cfg = prof.hhcl
    seed = prof.seed if seed is None else int(seed)
    import torch.distributed as tdist

    owns_group = tdist.is_available() and not tdist.is_initialized()
    dev = init_distributed(device)
    owns_group = owns_group and tdist.is_available() and tdist.is_initialized()
    rank, world = dist_info()
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} does not split over {world} processes")
    if rank != 0:
        log = lambda *_: None  # noqa: E731  (rank 0 speaks for all)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = dataset if dataset is not None else load_dataset(prof.data.dataset, data_root)

    train_recs = list(ds.train)
    val_q = val_g = []
    if selection == "val":
        train_recs, val_q, val_g = make_val_split(train_recs, seed=seed)
    camids = np.array([r.camid for r in train_recs])

    seed_everything(seed)
    model = build_model(prof.model.arch, prof.model.pooling, prof.model.pretrained,
                        last_stride=prof.model.last_stride, device=dev)
    ghost = apply_ghost_bn(model, cfg.ghost_bn)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt, sched = _optimizer(model, prof)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    use_amp = amp_dtype(prof, dev)

    history: list[dict] = []
    start_epoch, best_score, best_epoch = 0, -math.inf, None
    ckpt_path = out_dir / "checkpoint.pt"
    settings = run_settings(prof, "hhcl", memory=cfg.memory)
    init_source = str(getattr(model, "init_source", prof.model.pretrained))  # what the init resolved to
    if not resume and rank == 0:
        move_aside(out_dir, ("checkpoint.pt", "model_best.pt"), log)
    if resume and ckpt_path.is_file():
        state = read_train_checkpoint(ckpt_path, map_location=dev)
        check_resume_settings(ckpt_path, state, settings)
        if int(state["epoch"]) > cfg.epochs:
            raise ValueError(f"{ckpt_path} has {int(state['epoch'])} epochs done, more than the {cfg.epochs} "
                             f"asked (epochs={cfg.epochs}); ask for at least {int(state['epoch'])} epochs, "
                             f"or use another out_dir or resume=False (--no-resume)")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        optimizer_steps_to_cpu(opt)  # map_location=dev put Adam's step counters on the GPU
        sched.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        init_source = state.get("init_source", init_source)
        history = json.loads(state["history"])
        best_score, best_epoch = float(state["best_score"]), state["best_epoch"]
        log(f"resumed from {ckpt_path} at epoch {start_epoch}")

    train_tf = train_transform(prof.data.height, prof.data.width, flip=prof.data.flip, pad=prof.data.pad,
                               erasing_p=prof.data.erasing_p, erasing_fill=prof.data.erasing_fill)
    run_epochs = 0
    for epoch in range(start_epoch, cfg.epochs):
        if stop_after is not None and run_epochs >= stop_after:
            break
        eseed = _epoch_seed(seed, epoch)
        seed_everything(eseed)
        t_epoch = time.time()
        sync = {}
        if world > 1:  # every rank extracts with rank 0's BN statistics
            before, after = _sync_buffers(model)
            sync = {"buffer_spread_unsynced": before, "buffer_spread": after}
        feats = _extract_sharded(model, train_recs, prof, dev, f"epoch {epoch} features")
        t_extract = time.time() - t_epoch
        if world > 1:  # rank 0 clusters (Jaccard + DBSCAN); every rank trains on its pseudo-labels
            import torch.distributed as dist

            if rank == 0:
                labels, times = _cluster(feats, prof, dev)
            else:
                labels, times = np.empty(len(feats), dtype=np.int64), {}
            lab_t = torch.from_numpy(labels.astype(np.int64)).to(dev)
            dist.broadcast(lab_t, 0)
            labels = lab_t.cpu().numpy()
        else:
            labels, times = _cluster(feats, prof, dev)
        keep = np.flatnonzero(labels >= 0)
        n_clusters = int(labels.max()) + 1 if len(keep) else 0
        entry = {"epoch": epoch, "clusters": n_clusters, "outliers": int((labels < 0).sum()),
                 "lr": opt.param_groups[0]["lr"], "t_extract": t_extract, **times, **sync}
        if n_clusters < 2:
            log(f"epoch {epoch}: {n_clusters} clusters, nothing to train on; skipping the epoch's iterations")
            entry.update(loss=None, t_train=0.0)
        else:
            gen = torch.Generator().manual_seed(eseed)
            mem = ClusterMemory.from_features(torch.from_numpy(np.ascontiguousarray(feats)).to(dev), labels,
                                              mode=cfg.memory, temp=cfg.temp, momentum=cfg.momentum,
                                              hard_weight=cfg.hard_weight, num_instances=cfg.num_instances,
                                              generator=gen)
            if world > 1:
                mem.gather = _gather_batch
            if n_clusters * cfg.num_instances < cfg.batch_size:
                raise ValueError(f"epoch {epoch}: {n_clusters} clusters x {cfg.num_instances} instances = "
                                 f"{n_clusters * cfg.num_instances} images per pass, fewer than the batch size "
                                 f"{cfg.batch_size}: no batch can be filled (lower hhcl.batch_size or "
                                 f"hhcl.num_instances, or loosen the clustering)")
            sub = [train_recs[i] for i in keep]
            sampler = CameraAwarePKSampler(labels[keep], camids[keep], num_instances=cfg.num_instances,
                                           seed=eseed, camera_aware=cfg.camera_aware)
            batches = RankSlice(torch.utils.data.BatchSampler(sampler, cfg.batch_size, drop_last=True), rank, world)
            loader = DataLoader(ImageDataset(sub, train_tf, labels=labels[keep].tolist()),
                                batch_sampler=batches, num_workers=prof.data.workers,
                                pin_memory=dev.type == "cuda",
                                generator=torch.Generator().manual_seed(eseed + 7919 * rank))
            entry.update(_train_iterations(net, mem, loader, opt, cfg.iters, dev, use_amp))
        sched.step()
        last = epoch + 1 == cfg.epochs
        if rank == 0 and ((epoch + 1) % cfg.eval_step == 0 or last):
            t0 = time.time()
            if selection == "val":
                entry["val"] = _slim(evaluate_model(model, val_q, val_g, prof, dev))
            entry["test"] = _slim(evaluate_model(model, ds.query, ds.gallery, prof, dev))
            entry["t_eval"] = time.time() - t0
            score = entry["val" if selection == "val" else "test"]["mAP"] if selection != "last" else epoch
            if score > best_score:
                best_score, best_epoch = score, epoch
                atomic_torch_save({"model": model.state_dict(), "epoch": epoch + 1, "profile": prof.name,
                                   "arch": prof.model.arch, "pooling": prof.model.pooling,
                                   "last_stride": prof.model.last_stride, "method": "hhcl",
                                   "memory": cfg.memory, "settings": settings, "init_source": init_source,
                                   "selection": selection}, out_dir / "model_best.pt")
        entry["t_epoch"] = time.time() - t_epoch
        history.append(entry)
        log(_epoch_line(entry))
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        if rank == 0:
            atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "epoch": epoch + 1,
                               "history": json.dumps(history), "best_score": best_score, "best_epoch": best_epoch,
                               "profile": prof.name, "memory": cfg.memory, "seed": seed, "ghost_bn_layers": ghost,
                               "method": "hhcl", "arch": prof.model.arch, "pooling": prof.model.pooling,
                               "last_stride": prof.model.last_stride, "settings": settings,
                               "init_source": init_source},
                              ckpt_path)
        run_epochs += 1
    if rank == 0:
        atomic_write_json(out_dir / "history.json", history)
    finished = len(history) == cfg.epochs
    test = None
    if finished and best_epoch is not None:
        test = next(h["test"] for h in history if h["epoch"] == best_epoch)
    if owns_group:
        tdist.barrier()
        tdist.destroy_process_group()
    return TrainResult(out_dir, history, best_epoch, selection, test, model)


def _slim(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "cmc"} | {"cmc": res["cmc"][:20]}


def _train_iterations(model, mem, loader, opt, iters: int, dev, use_amp: torch.dtype | None) -> dict:
    model.train()
    losses = []
    t0 = time.time()
    it = iter(loader)
    for _ in range(iters):
        try:
            batch = next(it)
        except StopIteration:  # the sampler is exhausted: start a new pass, as the reference does
            it = iter(loader)
            batch = next(it, None)
            if batch is None:
                raise ValueError("the sampler yields no full batch: too few pseudo-identities x instances "
                                 "for the batch size") from None
        x = batch["img"].to(dev, non_blocking=True)
        y = torch.as_tensor(batch["label"]).to(dev)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=use_amp or torch.bfloat16, enabled=use_amp is not None):
            feat = model(x)
        loss = mem(feat.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    if losses and dist_info()[1] > 1:  # log the global-batch loss: the mean of the ranks' losses
        import torch.distributed as dist

        stacked = torch.stack(losses)
        dist.all_reduce(stacked)
        losses = list(stacked / dist_info()[1])
    loss_mean = float(torch.stack(losses).mean()) if losses else None
    return {"loss": loss_mean, "losses": [float(v) for v in losses], "t_train": time.time() - t0, "iters": iters}


def _epoch_line(e: dict) -> str:
    parts = [f"epoch {e['epoch']:3d}", f"clusters {e['clusters']:5d}", f"outliers {e['outliers']:5d}"]
    if e.get("loss") is not None:
        parts.append(f"loss {e['loss']:.3f}")
    for split in ("val", "test"):
        if split in e:
            parts.append(f"{split} mAP {100 * e[split]['mAP']:.1f} r1 {100 * e[split]['rank1']:.1f}")
    parts.append("time " + " ".join(f"{k[2:]} {e[k]:.1f}s" for k in
                                     ("t_extract", "t_jaccard", "t_dbscan", "t_train", "t_eval") if k in e))
    return " | ".join(parts)

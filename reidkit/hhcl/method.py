"""HHCL / Cluster-Contrast (unsupervised): what is the method's own on the shared engine.

Each epoch (spec hhcl §0, §3, §5):
1. extract L2-normalised features of every training image (eval mode, test transform);
2. k-reciprocal Jaccard distance (k1, k2) and DBSCAN (eps, min_samples) -> pseudo-labels;
   outliers (-1) are dropped for the epoch;
3. a new cluster memory is built from the centroids (``CM``, ``CMhybrid`` or ``CMhybrid_v2``);
4. exactly ``iters`` iterations of camera-aware PK batches (the sampler restarts when exhausted);
   Adam (lr, coupled weight decay, the frozen BN-neck bias excluded), StepLR per epoch.

The profile's ``camera`` section adds the camera-aware parts, each on its own: per-camera centring
before the distance, the CA-Jaccard distance, CAP's per-(cluster, camera) proxies beside the memory
and CAP's camera-balanced sampler (all off: HHCL as released). Where the training images carry
true identities, every epoch's pseudo-labels are scored against them (:func:`pseudo_label_quality`,
in ``history.json`` and ``train.log``); the score is diagnostic and never used in training.

Seeding, DDP, checkpoints, evaluation cadence and model selection are the engine's
(``reidkit.train.engine``). Under DDP every rank extracts its shard with rank 0's BN statistics, rank 0
clusters and broadcasts the pseudo-labels, and the memory sees the whole global batch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader

from reidkit.config import Profile, camera_parts, get_profile
from reidkit.core.device import channels_last
from reidkit.data.records import ReIDDataset
from reidkit.data.samplers import CameraAwarePKSampler
from reidkit.data.subset import load_profile_dataset
from reidkit.data.transforms import ImageDataset, train_transform
from reidkit.hhcl.cap import CameraBalancedSampler, CameraProxyMemory, proxy_index
from reidkit.hhcl.clustering import dbscan_labels
from reidkit.hhcl.label_quality import pseudo_label_quality
from reidkit.hhcl.memory import ClusterMemory
from reidkit.nets.backbones import build_model
from reidkit.retrieval.ca_jaccard import ca_jaccard_distance
from reidkit.retrieval.camera_bias import camera_centred
from reidkit.retrieval.jaccard import jaccard_distance
from reidkit.retrieval.protocol import evaluate_model, extract_records
from reidkit.train.checkpoints import run_settings
from reidkit.train.distributed import (
    RankSlice,
    broadcast_labels,
    dist_info,
    extract_sharded,
    gather_batch,
    mean_over_ranks,
    sync_buffers,
)
from reidkit.train.engine import Method, TrainResult, fit, make_val_split
from reidkit.train.gpu_cost import DATASET_SIZES, network_cost
from reidkit.train.runspec import RunSpec


def slim(res: dict) -> dict:
    """An evaluation result with its CMC cut to 20 ranks (what history.json keeps)."""
    return {k: v for k, v in res.items() if k != "cmc"} | {"cmc": res["cmc"][:20]}


def cluster(features: np.ndarray, profile: Profile, device, cams=None, epoch: int | None = None
            ) -> tuple[np.ndarray, dict]:
    """Pseudo-labels of one epoch: the Jaccard distance (plain, or camera-aware as the profile's
    ``camera`` section says, which needs ``cams``), then DBSCAN; with the time of each."""

    cam, k = profile.camera, profile.cluster
    if (cam.centre or cam.jaccard == "ca") and cams is None:
        raise ValueError("camera-aware clustering (camera.centre / camera.jaccard='ca') needs the cameras")
    t0 = time.time()
    x = camera_centred(features, cams) if cam.centre else features
    if cam.jaccard == "ca":
        dist = ca_jaccard_distance(x, cams, k1=k.k1, k2=k.k2, k1_intra=cam.k1_intra, k1_inter=cam.k1_inter,
                                   k2_intra=cam.k2_intra, k2_inter=cam.k2_inter, epoch=epoch, device=device)
    else:
        dist = jaccard_distance(x, k1=k.k1, k2=k.k2, device=device)
    t1 = time.time()
    labels = np.asarray(dbscan_labels(dist, eps=k.eps, min_samples=k.min_samples))
    return labels, {"t_jaccard": t1 - t0, "t_dbscan": time.time() - t1}


def label_quality_line(q: dict) -> str:
    """The ``train.log`` words of one epoch's pseudo-label quality."""
    join = q.get("cross_camera_join_rate")
    share = q.get("ids_joined_across_share")
    purity, lead = q.get("purity"), q.get("ids_joined_across_leading_share")
    return (f"ARI {q['ari']:.3f} purity " + ("n/a" if purity is None else f"{purity:.2f}")
            + " cross-cam pairs joined " + ("n/a" if join is None else f"{100 * join:.1f}%")
            + " ids joined " + ("n/a" if share is None else f"{100 * share:.0f}%")
            + ("" if lead is None else f" ({100 * lead:.0f}% in a cluster they lead)"))


def _restarting(loader, iters: int) -> Iterator:
    """Exactly ``iters`` batches of ``loader``, starting a new pass when the sampler is exhausted (as
    the reference does)."""
    it = iter(loader)
    for _ in range(iters):
        batch = next(it, None)
        if batch is None:
            it = iter(loader)
            batch = next(it, None)
            if batch is None:
                raise ValueError("the sampler yields no full batch: too few pseudo-identities x instances "
                                 "for the batch size")
        yield batch


class HHCL(Method):
    """The unsupervised method on the engine: cluster, build the memory, contrast against it."""

    name = "hhcl"
    sections = ("data", "model", "cluster", "hhcl", "camera", "seed")
    default_selection = "val"
    uses_memory = True
    #: what train.log calls the epoch's label count
    count_label = "clusters"

    def __init__(self, profile: str | Profile, dataset: ReIDDataset | None = None, memory: str | None = None,
                 epochs: int | None = None, data_root: str | None = None):
        prof = get_profile(profile)
        if memory is not None:
            prof = prof.replace(hhcl__memory=memory)
        if epochs is not None:
            prof = prof.replace(hhcl__epochs=int(epochs))
        self.prof, self.cfg = prof, prof.hhcl
        self.dataset, self.data_root = dataset, data_root
        self.epochs, self.eval_every = self.cfg.epochs, self.cfg.eval_step
        self.batch_size, self.ghost_bn = self.cfg.batch_size, self.cfg.ghost_bn
        self.label = self.cfg.memory
        self.mem = self.cap = None
        self.val_q, self.val_g = [], []

    @classmethod
    def selection_for(cls, prof) -> str:
        """``val`` on a real dataset; ``last`` on the embedded sample, where a validation split would
        take 2 of its only 4 training identities seen by two cameras, and score epochs on a gallery
        of 2 identities (notebook 04 shows the cost)."""
        return "last" if prof.data.dataset.lower() in ("mini-mars", "minimars", "sample") else cls.default_selection

    @classmethod
    def gpu_plan(cls, prof) -> dict[str, Any]:
        """The run as the GPU cost model counts it: the batches of an epoch, the extraction of every
        training image for clustering (and its kNN product), evaluation every ``eval_step`` epochs,
        the clustering features and the memory's proxies resident. The supervised bound shares it."""

        h, w, cfg = prof.data.height, prof.data.width, prof.hhcl
        n_train, _, n_q, n_g = DATASET_SIZES[prof.data.dataset]
        net = f"reidnet:{prof.model.arch}:ls{prof.model.last_stride}"
        cost = network_cost(net, h, w)
        return {"method": cls.name, "network": net, "input": (h, w), "batch": cfg.batch_size, "amp": bool(cfg.amp),
                "epochs": cfg.epochs, "train_images": cfg.batch_size * cfg.iters, "train_gflop": cost["train_gflop"],
                "fwd_gflop_epoch": cost["fwd_gflop"] * (n_train + (n_q + n_g) / max(cfg.eval_step, 1))
                + 2 * n_train ** 2 * 2048 / 1e9,
                "eval_gflop": cost["fwd_gflop"] * (n_q + n_g), "act_mb": cost["act_mb"],
                "params_m": cost["params_m"], "opt_states": 2,
                "resident_gb": 2 * n_train * 2048 * 4 / 1e9,   # clustering features + the memory's proxies
                "head": "", "epoch_note": f"{cfg.iters} iterations x {cfg.batch_size} + extraction of "
                                          f"{n_train:,} training images"}

    def describe(self) -> str:
        c = self.cfg
        cam = camera_parts(self.prof)
        memory = c.memory + (" + " + ", ".join(cam) if cam else "")
        return (f"HHCL ({memory}) | profile {self.prof.name} | {self.prof.model.arch} | batch {c.batch_size} = "
                f"{c.batch_size // c.num_instances} x {c.num_instances} | {c.epochs} epochs x {c.iters} iterations")

    def settings(self) -> dict:

        return run_settings(self.prof, self.name, self.sections, memory=self.cfg.memory,
                            camera=camera_parts(self.prof))

    def checkpoint_info(self) -> dict:
        return {"memory": self.cfg.memory, "camera": camera_parts(self.prof)}

    def prepare(self, dev, selection: str, seed: int, log) -> None:

        self.ds = self.dataset if self.dataset is not None else load_profile_dataset(self.prof, self.data_root)
        self.use_amp = self.run_amp(dev)
        self.train_recs, self.val_q, self.val_g = list(self.ds.train), [], []
        if selection == "val":
            self.train_recs, self.val_q, self.val_g = make_val_split(self.train_recs, seed=seed)
        self.camids = np.array([r.camid for r in self.train_recs])
        self.pids = np.array([r.pid for r in self.train_recs])
        # identities known (a labelled dataset read without its labels): score the pseudo-labels
        self.score_labels = len(self.pids) > 0 and bool((self.pids >= 0).any())
        self.train_tf = self._train_transform()

    def _train_transform(self):

        d = self.prof.data
        return train_transform(d.height, d.width, flip=d.flip, pad=d.pad, erasing_p=d.erasing_p,
                               erasing_fill=d.erasing_fill)

    def build_model(self, dev) -> nn.Module:

        m = self.prof.model
        return build_model(m.arch, m.pooling, m.pretrained, last_stride=m.last_stride, device=dev)

    def optimizer(self, model):
        params = [p for p in model.parameters() if p.requires_grad]  # the frozen neck bias is left out
        opt = torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=self.cfg.step_size, gamma=self.cfg.gamma)

    def _features_and_labels(self, model, dev, epoch: int, entry: dict) -> tuple[np.ndarray, np.ndarray]:
        """Every rank extracts its shard with rank 0's BN statistics; rank 0 clusters and broadcasts."""

        rank, world = dist_info()
        t0 = time.time()
        if world > 1:
            before, after = sync_buffers(model)
            entry.update(buffer_spread_unsynced=before, buffer_spread=after)
        feats = extract_sharded(extract_records, model, self.train_recs, self.prof, dev, f"epoch {epoch} features",
                                self.use_amp)
        entry["t_extract"] = time.time() - t0
        labels, times = self.pseudo_labels(feats, epoch, dev) if rank == 0 else (None, {})
        entry.update(times)
        return feats, broadcast_labels(labels, len(feats), dev)

    def pseudo_labels(self, feats: np.ndarray, epoch: int, dev) -> tuple[np.ndarray, dict]:
        """The epoch's training labels (``-1``: left out) and timings: HHCL clusters the features."""
        return cluster(feats, self.prof, dev, self.camids, epoch)

    def begin_epoch(self, epoch: int, eseed: int, model, dev, entry: dict, log) -> tuple[Any, int | None]:
        """Cluster, build the memory, and the epoch's loader; (None, None) when nothing can train."""

        feats, labels = self._features_and_labels(model, dev, epoch, entry)
        keep = np.flatnonzero(labels >= 0)
        n_clusters = int(labels.max()) + 1 if len(keep) else 0
        entry.update(clusters=n_clusters, outliers=int((labels < 0).sum()))
        if self.score_labels and dist_info()[0] == 0:  # diagnostic only: never read by training
            entry["labels"] = pseudo_label_quality(labels, self.pids, self.camids)
        if n_clusters < 2:
            log(f"epoch {epoch}: {n_clusters} clusters, nothing to train on; skipping the epoch's iterations")
            entry.update(loss=None, t_train=0.0)
            return None, None
        c = self.cfg
        # the balanced sampler draws num_instances images per (cluster, camera) proxy, PK per cluster
        balanced = self.prof.camera.balanced
        units = proxy_index(labels[keep], self.camids[keep])[0].size if balanced else n_clusters
        if units * c.num_instances < c.batch_size:
            what = "(cluster, camera) proxies" if balanced else "clusters"
            raise ValueError(f"epoch {epoch}: {units} {what} x {c.num_instances} instances = "
                             f"{units * c.num_instances} images per pass, fewer than the batch size "
                             f"{c.batch_size}: no batch can be filled (lower hhcl.batch_size or "
                             f"hhcl.num_instances, or loosen the clustering)")
        self.mem = self._memory(feats, labels, eseed, dev)
        self.cap = self._proxies(feats, labels, keep, dev)
        self.epoch = epoch
        if dist_info()[1] > 1:  # the memories are updated with the whole global batch
            self.mem.gather = gather_batch
            if self.cap is not None:
                self.cap.gather = gather_batch
        return _restarting(self._loader(labels, keep, eseed, dev), c.iters), c.iters

    def _memory(self, feats: np.ndarray, labels: np.ndarray, eseed: int, dev):

        c = self.cfg
        gen = torch.Generator().manual_seed(eseed)
        return ClusterMemory.from_features(torch.from_numpy(np.ascontiguousarray(feats)).to(dev), labels,
                                           mode=c.memory, temp=c.temp, momentum=c.momentum,
                                           hard_weight=c.hard_weight, num_instances=c.num_instances, generator=gen)

    def _proxies(self, feats: np.ndarray, labels: np.ndarray, keep: np.ndarray, dev):
        """CAP's camera proxies of the kept images (indexed like the epoch's loader), or None."""

        cam = self.prof.camera
        if not cam.proxies:
            return None
        x = torch.from_numpy(np.ascontiguousarray(feats[keep])).to(dev)
        return CameraProxyMemory.from_features(x, labels[keep], self.camids[keep], temp=cam.proxy_temp,
                                               momentum=cam.proxy_momentum, crosscam_epoch=cam.crosscam_epoch,
                                               bg_knn=cam.bg_knn, cross_weight=cam.cross_weight)

    def _sampler(self, labels: np.ndarray, keep: np.ndarray, eseed: int):
        """The order of the kept images (positions in ``keep``) that the batches are cut from."""

        c = self.cfg
        if self.prof.camera.balanced:  # num_instances consecutive images of one (cluster, camera)
            return CameraBalancedSampler(labels[keep], self.camids[keep], k=c.num_instances, seed=eseed)
        return CameraAwarePKSampler(labels[keep], self.camids[keep], num_instances=c.num_instances,
                                    seed=eseed, camera_aware=c.camera_aware)

    def _loader(self, labels: np.ndarray, keep: np.ndarray, eseed: int, dev):
        """PK batches of the kept images (camera-aware, or CAP's camera-balanced ones); each rank
        takes its contiguous slice."""

        rank, world = dist_info()
        batches = RankSlice(BatchSampler(self._sampler(labels, keep, eseed), self.cfg.batch_size, drop_last=True),
                            rank, world)
        sub = [self.train_recs[i] for i in keep]
        return DataLoader(ImageDataset(sub, self.train_tf, labels=labels[keep].tolist()), batch_sampler=batches,
                          num_workers=self.prof.data.workers, pin_memory=dev.type == "cuda",
                          generator=torch.Generator().manual_seed(eseed + 7919 * rank))

    def forward(self, net, batch, dev, return_all: bool = False):
        """The batch's images and labels on ``dev`` and the network's output on them, under the
        run's autocast: ``(x, y, out)``."""
        x = batch["img"].to(dev, non_blocking=True)
        y = torch.as_tensor(batch["label"]).to(dev)
        if channels_last(dev):
            x = x.contiguous(memory_format=torch.channels_last)
        use_amp = self.use_amp
        with torch.autocast(dev.type, dtype=use_amp or torch.bfloat16, enabled=use_amp is not None):
            out = net(x, return_all=True) if return_all else net(x)
        return x, y, out

    def step(self, net, batch, opt, dev) -> dict:
        """One iteration: features of the batch, the memory's contrastive loss, one Adam step."""
        x, y, feat = self.forward(net, batch, dev)
        loss = self.mem(feat.float(), y)
        if self.cap is not None:  # both memories update themselves in the one backward
            loss = loss + self.prof.camera.proxy_weight * self.cap(feat.float(), batch["index"].to(dev),
                                                                   batch["camid"].to(dev), self.epoch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), "images": int(x.shape[0])}

    def end_epoch(self, steps: list[dict]) -> dict:
        """The epoch's losses; under DDP the global-batch loss (the mean of the ranks' losses)."""

        losses = mean_over_ranks([s["loss"] for s in steps])
        return {"loss": float(torch.stack(losses).mean()) if losses else None,
                "losses": [float(v) for v in losses], "iters": len(steps)}

    def evaluate(self, model, dev, split: str, log) -> dict:
        q, g = (self.val_q, self.val_g) if split == "val" else (self.ds.query, self.ds.gallery)
        return slim(evaluate_model(model, q, g, self.prof, dev, amp=self.use_amp))

    def epoch_line(self, e: dict) -> str:
        parts = [f"epoch {e['epoch']:3d}", f"{self.count_label} {e['clusters']:5d}", f"outliers {e['outliers']:5d}"]
        if e.get("labels"):
            parts.append(label_quality_line(e["labels"]))
        if e.get("loss") is not None:
            parts.append(f"loss {e['loss']:.3f}")
        for split in ("val", "test"):
            if split in e:
                parts.append(f"{split} mAP {100 * e[split]['mAP']:.1f} r1 {100 * e[split]['rank1']:.1f}")
        parts.append("time " + " ".join(f"{k[2:]} {e[k]:.1f}s" for k in
                                         ("t_extract", "t_jaccard", "t_dbscan", "t_train", "t_eval") if k in e))
        return " | ".join(parts)


def train_hhcl(profile: str | Profile = "workshop", dataset: ReIDDataset | None = None,
               out_dir: str | Path = "runs/train", device: Any = "auto", memory: str | None = None,
               seed: int | None = None, selection: str | None = None, resume: bool = True,
               epochs: int | None = None, stop_after: int | None = None,
               log: Callable[[str], None] | None = None, data_root: str | None = None) -> TrainResult:
    """Train HHCL (or Cluster-Contrast with ``memory="CM"``) on the engine and return the result.

    The run is resolved as the command line resolves it (a :class:`RunSpec`: the profile's identity
    subset applied to the dataset read from ``data_root``, the device, the AMP dtype). ``memory``
    overrides the profile's memory mode; ``epochs`` its epoch count; ``selection`` defaults to the
    method's rule for the profile (:meth:`HHCL.selection_for`); ``stop_after`` stops after that many
    epochs of this call (to test resuming). Writes ``out_dir/checkpoint.pt``, ``model_best.pt``,
    ``history.json`` and ``train.log``."""
    spec = RunSpec.resolve(profile, data_root, device, method=HHCL.name, amp_policy=HHCL.amp_policy,
                           dataset=dataset)
    method = HHCL(spec.profile, spec.dataset(), memory=memory, epochs=epochs, data_root=data_root)
    method.spec = spec
    return fit(method, out_dir, device=spec.device, seed=seed,
               selection=selection or HHCL.selection_for(spec.profile), resume=resume, stop_after=stop_after,
               log=log)

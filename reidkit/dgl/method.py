"""Weakly supervised training: DGL (differentiable graphical learning over bags), its unary-only
variant, and the fully supervised baseline on the same network (spec dgl-sysu30k §2, §3).

Variants (``train_dgl(..., variant=...)``)
------------------------------------------
``"full"``        The full model: per classifier head ``h``, pseudo-labels ``y_h`` = the most
                  probable id *among the bag's ids* (exact MAP of unary + bag constraint), the CE
                  against them and the relaxed Potts pairwise energy on the low-level kernel
                  (``reidkit.dgl.graphical.graph_loss``); plus the weakly supervised triplet (median in-bag
                  vs hardest out-of-bag distance, ``reidkit.dgl.graphical.weak_triplet_loss``) on the global
                  embeddings (spec §2.4)::

                      L = ce_weight * mean_h [CE(z_h, y_h) + pairwise_weight * L_pair(p_h, g)]
                          + triplet_weight * mean_k L_wtri(f_k, l)

                  Bags are simulated as the reference does (spec §1.2): PK batches of
                  ``ids_per_batch`` ids x ``images_per_id`` images, consecutive groups of
                  ``ids_per_bag`` ids form a bag, re-drawn every epoch; only the bag vector
                  (``reidkit.dgl.graphical.bag_label_vectors``) reaches the loss.
``"unary_only"``  The classifier network of ``UO/train_weak.py`` (spec §3.3): bags of 1, 3 or 5
                  adjacent classes (``ConsecutiveBagSampler``), per bag the greedy balanced
                  assignment of the reference (``assignment="greedy"``; ``"exact"`` solves the same
                  cardinality-constrained problem optimally), CE against those labels. SGD
                  (Nesterov 0.9), backbone lr ``uo_lr_backbone``, head lr ``uo_lr_head``, StepLR.
``"supervised"``  The same network as ``"full"`` and the same PK batches, trained with the *true*
                  ids: ``ce_weight * mean_h CE(z_h, y) + triplet_weight * mean_k`` ordinary
                  batch-hard triplet (margin ``dgl.margin``), i.e. MGN's own supervised recipe.
                  The upper bound a weakly supervised method is compared with.

Training machinery is the engine's (``reidkit.train.engine``, shared with HHCL): seeding, checkpoints and
resume, DDP, model selection, logs. Networks: ``reidkit.nets.weak``; losses:
``reidkit.dgl.objectives``; evaluation: ``reidkit.dgl.evaluate``.

Under DDP each rank forwards its slice of the global batch; the outputs are gathered with their
gradients (``reidkit.train.distributed.gather_with_grad``), so the bag constraints and triplets see the
whole batch, and every rank computes the one-process loss.

Schedules step at the *end* of each epoch (PyTorch >= 1.1 order). The reference called
``scheduler.step()`` at the start of the epoch under the old semantics, which moves every decay one
epoch earlier (e.g. the decay at 250 starts with the 250th epoch instead of the 251st).

SYSU-30k: ``train_dgl`` on the ``sysu30k`` dataset streams the training folders
(:class:`SYSUBagStream`, bags by the consecutive-folder rule, sharded over DDP ranks and loader
workers); :func:`evaluate_sysu30k` scores the official test split with the gallery features
streamed from extraction straight into ``reidkit.retrieval.sysu.sysu30k_evaluate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader

from reidkit.config import DGL_ERASING_FILL, Profile, get_profile
from reidkit.core.device import channels_last
from reidkit.data.records import ReIDDataset, check_batch_fill, relabel
from reidkit.data.samplers import ConsecutiveBagSampler, PKBagSampler
from reidkit.data.subset import load_profile_dataset
from reidkit.data.sysu30k import SYSUBagStream
from reidkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, RandomErasing, train_transform
from reidkit.dgl.evaluate import dgl_amp_dtype, evaluate_sysu30k, evaluate_weak
from reidkit.dgl.graphical import bag_label_vectors
from reidkit.dgl.objectives import bag_matrix, bags_of_batch, balanced_targets, full_dgl_loss, supervised_loss
from reidkit.nets.weak import (
    UO_RESIZE,
    build_weak_model,
    check_variant,
    forward_heads,
    network_for,
    weak_input_size,
)
from reidkit.train.checkpoints import run_settings
from reidkit.train.distributed import RankSlice, all_gather_cat, dist_info, gather_with_grad
from reidkit.train.engine import Method, TrainResult, fit, make_val_split
from reidkit.train.runspec import RunSpec


def _train_transform(prof: Profile, variant: str):
    """full / supervised: resize, flip, random erasing filled with 0 (``DGL_ERASING_FILL``; no crop,
    spec §3.2). unary-only (ft_net): resize by 224/192, random crop, flip, erasing (spec §3.3)."""

    h, w = weak_input_size(prof, variant)
    if variant != "unary_only":
        return train_transform(h, w, flip=prof.data.flip, pad=0, erasing_p=prof.data.erasing_p,
                               erasing_fill=DGL_ERASING_FILL)
    steps = []
    jitter = float(getattr(prof.dgl, "uo_color_jitter", 0.0) or 0.0)
    if jitter:
        steps.append(T.ColorJitter(jitter, jitter, jitter, 0))
    steps += [T.Resize((round(h * UO_RESIZE), round(w * UO_RESIZE)), interpolation=T.InterpolationMode.BICUBIC),
              T.RandomCrop((h, w))]
    if prof.data.flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if prof.data.erasing_p > 0:
        steps.append(RandomErasing(p=prof.data.erasing_p, fill=DGL_ERASING_FILL))
    return T.Compose(steps)


def _mean(vals):
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def is_sysu_stream(ds: ReIDDataset) -> bool:
    """A SYSU-30k dataset loaded without its training listing: training streams its folders."""
    return ds.name == "sysu30k" and not ds.train and (Path(ds.root) / "sysu_train_set_all").is_dir()


class DGL(Method):
    """The weakly supervised method on the engine: bags of images labelled only with their ids."""

    name = "dgl"
    sections = ("data", "model", "dgl", "seed")
    default_selection = "last"  # the reference keeps the final model
    amp_policy = staticmethod(dgl_amp_dtype)  # fp32 unless the profile asks, bf16 only where native

    @classmethod
    def for_run(cls, prof, dataset, data_root=None, epochs: int | None = None, iters: int | None = None) -> "DGL":
        return cls(prof, dataset, variant=prof.dgl.variant, epochs=epochs, iters=iters, data_root=data_root)

    def __init__(self, profile: str | Profile, dataset: ReIDDataset | None = None, variant: str | None = None,
                 epochs: int | None = None, iters: int | None = None, eval_every: int | None = None,
                 assignment: str = "greedy", flip: bool | None = None, data_root: str | None = None):
        prof = get_profile(profile)
        self.variant = variant or prof.dgl.variant
        check_variant(self.variant)
        self.prof, self.cfg = prof, prof.dgl
        self.dataset, self.data_root = dataset, data_root
        default = self.cfg.uo_epochs if self.variant == "unary_only" else self.cfg.epochs
        self.epochs = int(epochs) if epochs is not None else default
        self.iters = self.cfg.iters if iters is None else iters
        self.assignment, self.flip = assignment, flip
        self.eval_every = self.cfg.eval_step if eval_every is None else eval_every
        self.bag_size, self.bags_per_batch = self._batch_layout()
        self.batch_size = self.bag_size * self.bags_per_batch
        self.ghost_bn = self.cfg.ghost_bn
        self.label = self.variant
        self.find_unused = self.variant == "unary_only"  # ft_net's BN neck is outside the loss
        self.val_q, self.val_g = [], []

    def _batch_layout(self) -> tuple[int, int]:
        """(bag size, bags per batch) of the variant."""
        c = self.cfg
        if self.variant == "unary_only":
            return c.uo_batch_size // c.uo_bags_per_batch, c.uo_bags_per_batch
        return c.ids_per_bag * c.images_per_id, c.ids_per_batch // c.ids_per_bag

    def describe(self) -> str:
        return (f"DGL ({self.variant}, {self.network}) | profile {self.prof.name} | {self.num_classes} classes | "
                f"batch {self.batch_size} = {self.bags_per_batch} bags x {self.bag_size} | {self.epochs} epochs"
                + ("" if self.stream is None else " | SYSU-30k bags streamed"))

    def settings(self) -> dict:

        return run_settings(self.prof, self.name, self.sections, variant=self.variant, network=self.network,
                            num_classes=self.num_classes)

    def checkpoint_info(self) -> dict:
        return {"variant": self.variant, "network": self.network, "num_classes": self.num_classes}

    def result_info(self) -> dict:
        return {"variant": self.variant, "network": self.network, "num_classes": self.num_classes,
                "class_of_pid": self.class_of_pid}

    def prepare(self, dev, selection: str, seed: int, log) -> None:
        """The dataset, the training stream or records, the classes, and the validation split."""

        self.ds = self._load_dataset()
        self.use_amp = self.run_amp(dev)
        self.train_tf = _train_transform(self.prof, self.variant)
        self.stream, self.records, self.labels, self.class_of_pid = None, [], None, {}
        self.val_q, self.val_g = [], []
        world = dist_info()[1]
        if is_sysu_stream(self.ds):
            if selection == "val":
                raise ValueError("selection='val' needs camera-labelled training identities; SYSU-30k's training "
                                 "images carry none: use selection='last' (the reference) or 'test'")
            if self.bags_per_batch % world:
                raise ValueError(f"{self.bags_per_batch} bags per batch do not split over {world} processes")
            self.stream = self._stream(seed)
            self.num_classes = self.stream.num_classes
        else:
            self.records = list(self.ds.train)
            if not self.records:
                raise ValueError(f"{self.ds.name}: no training images")
            if selection == "val":
                self.records, self.val_q, self.val_g = make_val_split(self.records, seed=seed)
            self.labels, self.class_of_pid = relabel(self.records)
            self.num_classes = len(self.class_of_pid)
            self._check_batch_fills()
        self.network = network_for(self.prof, self.variant)

    def _load_dataset(self) -> ReIDDataset:

        if self.dataset is not None:
            return self.dataset
        return load_profile_dataset(self.prof, self.data_root)  # the subset applied; SYSU-30k streamed

    def _stream(self, seed: int):

        root = Path(self.ds.root)
        train_list = root / "meta" / "train.txt"
        return SYSUBagStream(root / "sysu_train_set_all", train_list if train_list.is_file() else None,
                             self.train_tf, bag_size=self.bag_size, seed=seed)

    def _check_batch_fills(self) -> None:
        """Stop at the start when not one batch can be drawn from the training identities."""

        c = self.cfg
        if self.variant == "unary_only":  # a batch of bags: each bag holds its own identities
            if self.num_classes < self.bags_per_batch:
                raise ValueError(f"{self.ds.name}: {self.num_classes} training identities cannot fill a batch "
                                 f"of {self.bags_per_batch} bags (dgl.uo_bags_per_batch); lower it with --set, "
                                 "or use more identities")
            return
        check_batch_fill(self.records, c.ids_per_batch, c.images_per_id, f"{self.ds.name} training split",
                         hint="Lower dgl.ids_per_batch or dgl.images_per_id with --set, or use more identities")

    def build_model(self, dev) -> nn.Module:

        return build_weak_model(self.prof, self.variant, self.num_classes, device=dev)

    def optimizer(self, model: nn.Module):
        c = self.cfg
        if self.variant == "unary_only":
            head = [p for p in model.classifier.parameters() if p.requires_grad]
            head_ids = {id(p) for p in head}
            body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
            opt = torch.optim.SGD([{"params": body, "lr": c.uo_lr_backbone, "name": "body"},
                                   {"params": head, "lr": c.uo_lr_head, "name": "classifier"}],
                                  lr=c.uo_lr_backbone, momentum=0.9, nesterov=True, weight_decay=c.weight_decay)
            return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=c.uo_step, gamma=c.gamma)
        params = [p for p in model.parameters() if p.requires_grad]  # the frozen neck bias is left out
        opt = torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay, amsgrad=c.amsgrad)
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(c.milestones), gamma=c.gamma)

    def begin_epoch(self, epoch: int, eseed: int, model, dev, entry: dict, log) -> tuple[Any, int | None]:
        """The epoch's bags: PK bag batches (or consecutive-class bags) of the records, or the stream."""

        loader = self._loader(eseed, epoch, dev)
        total = len(loader) if self.stream is None else None
        if self.iters is not None:
            total = self.iters if total is None else min(total, self.iters)
        return loader, total

    def _loader(self, eseed: int, epoch: int, dev):

        c = self.cfg
        rank, world = dist_info()
        gen = torch.Generator().manual_seed(eseed + 7919 * rank)
        common = dict(num_workers=self.prof.data.workers, pin_memory=dev.type == "cuda", generator=gen)
        if self.stream is not None:  # the stream shards whole bags over ranks and workers itself
            self.stream.set_epoch(epoch)
            return DataLoader(self.stream, batch_size=self.batch_size // world, drop_last=True, **common)
        if self.variant == "unary_only":
            sampler = ConsecutiveBagSampler(self.labels, batch_size=c.uo_batch_size,
                                            bags_per_batch=c.uo_bags_per_batch, seed=eseed)
        else:
            sampler = PKBagSampler(self.labels, ids_per_batch=c.ids_per_batch, images_per_id=c.images_per_id,
                                   ids_per_bag=c.ids_per_bag, seed=eseed)
        return DataLoader(ImageDataset(self.records, self.train_tf, labels=self.labels),
                          batch_sampler=RankSlice(sampler, rank, world), **common)

    def _forward(self, net, x: torch.Tensor):
        """Outputs of this rank's slice, gathered (with their gradients) into the global batch."""

        with torch.autocast(x.device.type, dtype=self.use_amp or torch.bfloat16, enabled=self.use_amp is not None):
            logits, embeddings, low = forward_heads(net, x)
        logits = [gather_with_grad(z.float()) for z in logits]
        embeddings = [gather_with_grad(f.float()) for f in embeddings]
        return logits, embeddings, gather_with_grad(low.float())

    def step(self, net, batch, opt, dev) -> dict:
        """One iteration: the variant's loss over the global batch, one optimiser step."""

        x = batch["img"].to(dev, non_blocking=True)
        if channels_last(dev):
            x = x.contiguous(memory_format=torch.channels_last)
        logits, embeddings, low = self._forward(net, x)
        gather = all_gather_cat if dist_info()[1] > 1 else (lambda t: t)
        y = gather(torch.as_tensor(batch["label"]).long().to(dev))
        bags = {k: gather(batch[k].to(dev)) for k in ("bag", "bag_labels") if k in batch}
        res, acc = self._loss(logits, embeddings, low, y, bags)
        opt.zero_grad(set_to_none=True)
        res["loss"].backward()
        opt.step()
        return {"loss": float(res["loss"].detach()), "ce": res["ce"], "pairwise": res["pairwise"],
                "triplet": res["triplet"], "pseudo_acc": acc, "images": int(y.shape[0])}

    def _loss(self, logits, embeddings, low, y, bags: dict) -> tuple[dict, float | None]:

        c = self.cfg
        if self.variant == "supervised":
            return supervised_loss(logits, embeddings, y, c), None
        if self.variant == "full":
            if self.stream is not None:
                vectors = bag_matrix(bags["bag_labels"], self.num_classes)
            else:
                vectors = bag_label_vectors(y, c.ids_per_bag, c.ids_per_batch, c.images_per_id, self.num_classes)
            res = full_dgl_loss(logits, embeddings, low, vectors, c)
            return res, float(torch.stack([(p == y).float().mean() for p in res["pseudo"]]).mean())
        if self.stream is not None:
            bag_list = bags_of_batch(bags["bag"], bags["bag_labels"])
        else:
            yl, size = y.tolist(), self.bag_size
            bag_list = [(s, s + size, sorted(set(yl[s:s + size]))) for s in range(0, len(yl), size)]
        targets = balanced_targets(logits[0], bag_list, self.assignment)
        ce = F.cross_entropy(logits[0], targets)
        res = {"loss": ce, "ce": float(ce.detach()), "pairwise": None, "triplet": None}
        return res, float((targets == y).float().mean())

    def end_epoch(self, steps: list[dict]) -> dict:
        out = {"iters": len(steps), "images": sum(s["images"] for s in steps), "losses": [s["loss"] for s in steps]}
        for key in ("loss", "ce", "pairwise", "triplet", "pseudo_acc"):
            out[key] = _mean([s[key] for s in steps])
        return out

    def evaluate(self, model, dev, split: str, log) -> dict:
        """Market protocol on records datasets (and the validation split), SYSU-30k's streamed."""

        if split == "test" and self.ds.name == "sysu30k":
            res = evaluate_sysu30k(model, self.ds, self.prof, dev, amp=self.use_amp or False, log=log)
            return {k: res[k] for k in ("rank1", "rank5", "rank10", "mAP", "mAP_standard")} | {"protocol": "sysu30k"}
        q, g = (self.val_q, self.val_g) if split == "val" else (self.ds.query, self.ds.gallery)
        res = evaluate_weak(model, q, g, self.prof, dev, variant=self.variant, flip=self.flip, amp=self.use_amp)
        return {k: v for k, v in res.items() if k != "cmc"} | {"cmc": res["cmc"][:20], "protocol": "market"}

    def epoch_line(self, e: dict) -> str:
        parts = [f"{self.variant} epoch {e['epoch']:3d}", f"lr {e['lr']:.2e}"]
        for key, label in (("loss", "loss"), ("ce", "ce"), ("pairwise", "pair"), ("triplet", "tri")):
            if e.get(key) is not None:
                parts.append(f"{label} {e[key]:.3f}")
        if e.get("pseudo_acc") is not None:
            parts.append(f"pseudo-label acc {100 * e['pseudo_acc']:.1f}%")
        for split in ("val", "test"):
            if split in e:
                parts.append(f"{split} mAP {100 * e[split]['mAP']:.1f} r1 {100 * e[split]['rank1']:.1f}")
        parts.append(f"{e['t_epoch']:.1f}s")
        return " | ".join(parts)


def train_dgl(profile: str | Profile = "workshop", dataset: ReIDDataset | None = None,
              out_dir: str | Path = "runs/dgl", variant: str = "full", device: Any = "auto",
              seed: int | None = None, resume: bool = True, epochs: int | None = None,
              stop_after: int | None = None, iters: int | None = None, evaluate: bool = True,
              eval_every: int | None = None, assignment: str = "greedy", flip: bool | None = None,
              selection: str = "last", data_root: str | None = None,
              log: Callable[[str], None] | None = None) -> TrainResult:
    """Train a DGL variant (``full``, ``unary_only``) or the ``supervised`` baseline on the engine;
    see the module docstring for what each one optimises.

    ``dataset``: a parsed dataset (default: the profile's, from ``data_root``; the ``sysu30k``
    profile streams its training folders). Records datasets (the sample, Market, ...) use the
    training identities only to *form* bags (full / unary-only) or as labels (supervised).
    ``epochs`` overrides the profile's (``dgl.epochs``, or ``dgl.uo_epochs`` for unary-only);
    ``stop_after`` stops after that many epochs of this call (to test resuming); ``iters`` caps the
    iterations per epoch. Evaluation (Market protocol, or the SYSU-30k protocol for sysu30k) runs
    every ``eval_every`` epochs (default ``dgl.eval_step``; 0: the last only) and after the last one
    (``evaluate=False``: never). ``selection``: ``last`` (the reference keeps the final model),
    ``test`` or ``val``. Writes ``checkpoint.pt``, ``model_best.pt``, ``history.json``, ``train.log``."""
    spec = RunSpec.resolve(profile, data_root, device, method=DGL.name, amp_policy=DGL.amp_policy, dataset=dataset)
    method = DGL(spec.profile, spec.dataset(), variant=variant, epochs=epochs, iters=iters, eval_every=eval_every,
                 assignment=assignment, flip=flip, data_root=data_root)
    method.spec = spec
    return fit(method, out_dir, device=spec.device, seed=seed, selection=selection, resume=resume,
               stop_after=stop_after, evaluate=evaluate, log=log)

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
from torch.utils.data import DataLoader

from reidkit.config import Profile, get_profile
from reidkit.core.device import channels_last
from reidkit.data.records import ReIDDataset, relabel
from reidkit.data.subset import load_profile_dataset, streams_sysu30k
from reidkit.data.sysu30k import SYSUBagStream, streams_training
from reidkit.data.transforms import ImageDataset
from reidkit.dgl.evaluate import dgl_amp_dtype, evaluate_sysu30k, evaluate_weak
from reidkit.dgl.variants import SimulatedBags, StreamedBags, Variant, variant_for
from reidkit.nets.weak import build_weak_model, forward_heads, network_for
from reidkit.train.checkpoints import run_settings
from reidkit.train.distributed import RankSlice, all_gather_cat, dist_info, gather_with_grad
from reidkit.train.engine import Method, TrainResult, fit, make_val_split
from reidkit.train.gpu_cost import DATASET_SIZES, network_cost
from reidkit.train.runspec import RunSpec


def _mean(vals):
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


class RecordBags:
    """Training images from parsed records: the variant's sampler over the relabelled identities,
    each batch's bags simulated from its labels."""

    note = ""

    def __init__(self, records, transform, variant: Variant, cfg, bag_size: int):
        self.records, self.transform, self.variant = records, transform, variant
        self.cfg, self.bag_size = cfg, bag_size
        self.labels, self.class_of_pid = relabel(records)
        self.num_classes = len(self.class_of_pid)

    def loader(self, epoch: int, eseed: int, batch_size: int, **common) -> tuple[DataLoader, int]:
        """This rank's batches of the epoch and their count (the variant's sampler sizes them)."""
        rank, world = dist_info()
        sampler = self.variant.sampler(self.labels, self.cfg, eseed)
        loader = DataLoader(ImageDataset(self.records, self.transform, labels=self.labels),
                            batch_sampler=RankSlice(sampler, rank, world), **common)
        return loader, len(loader)

    def bags(self, y: torch.Tensor, batch_bags: dict) -> SimulatedBags:
        return SimulatedBags(y, self.cfg, self.num_classes, self.bag_size)


class StreamBags:
    """SYSU-30k's training folders streamed as bags (consecutive-folder rule), sharded over ranks
    and loader workers by the stream itself; each batch carries its bags."""

    note = " | SYSU-30k bags streamed"

    def __init__(self, ds: ReIDDataset, transform, bag_size: int, seed: int):
        root = Path(ds.root)
        train_list = root / "meta" / "train.txt"
        self.stream = SYSUBagStream(root / "sysu_train_set_all", train_list if train_list.is_file() else None,
                                    transform, bag_size=bag_size, seed=seed)
        self.num_classes, self.class_of_pid = self.stream.num_classes, {}

    def loader(self, epoch: int, eseed: int, batch_size: int, **common) -> tuple[DataLoader, None]:
        """This rank's share of the epoch's bags; the stream has no length."""
        self.stream.set_epoch(epoch)
        return DataLoader(self.stream, batch_size=batch_size, drop_last=True, **common), None

    def bags(self, y: torch.Tensor, batch_bags: dict) -> StreamedBags:
        return StreamedBags(batch_bags, self.num_classes)


class DGL(Method):
    """The weakly supervised method on the engine: bags of images labelled only with their ids. Its
    variant (:mod:`reidkit.dgl.variants`) is chosen once, in the constructor, and its source of bags
    (records or the SYSU-30k stream) once, in :meth:`prepare`."""

    name = "dgl"
    sections = ("data", "model", "dgl", "seed")
    default_selection = "last"  # the reference keeps the final model
    trains_on_bags = True
    amp_policy = staticmethod(dgl_amp_dtype)  # fp32 unless the profile asks, bf16 only where native

    @classmethod
    def for_run(cls, prof, dataset, data_root=None, epochs: int | None = None, iters: int | None = None) -> "DGL":
        return cls(prof, dataset, variant=prof.dgl.variant, epochs=epochs, iters=iters, data_root=data_root)

    def __init__(self, profile: str | Profile, dataset: ReIDDataset | None = None, variant: str | None = None,
                 epochs: int | None = None, iters: int | None = None, eval_every: int | None = None,
                 assignment: str = "greedy", flip: bool | None = None, data_root: str | None = None):
        prof = get_profile(profile)
        self.strategy = variant_for(variant or prof.dgl.variant)
        self.variant = self.label = self.strategy.name
        self.prof, self.cfg = prof, prof.dgl
        self.dataset, self.data_root = dataset, data_root
        self.epochs = int(epochs) if epochs is not None else self.strategy.epochs(self.cfg)
        self.iters = self.cfg.iters if iters is None else iters
        self.assignment, self.flip = assignment, flip
        self.eval_every = self.cfg.eval_step if eval_every is None else eval_every
        self.bag_size, self.bags_per_batch = self.strategy.batch_layout(self.cfg)
        self.batch_size = self.bag_size * self.bags_per_batch
        self.ghost_bn = self.cfg.ghost_bn
        self.find_unused = self.strategy.find_unused
        self.val_q, self.val_g = [], []

    @classmethod
    def gpu_plan(cls, prof) -> dict[str, Any]:
        """The run as the GPU cost model counts it: the variant's network with its classifier heads
        (added analytically: 28,310 classes on SYSU-30k), the images of one epoch (the bag stream's
        three bags per folder on SYSU-30k), evaluation at the variant's test size."""

        cfg, variant = prof.dgl, variant_for(prof.dgl.variant)
        n_train, classes, n_q, n_g = DATASET_SIZES[prof.data.dataset]
        shape, (bag, bags) = variant.gpu_shape(prof), variant.batch_layout(cfg)
        net, (h, w), heads, dim = shape["network"], shape["input"], shape["heads"], shape["dim"]
        cost, ev = network_cost(net, h, w), network_cost(net, *shape["eval_input"])
        head_gflop = heads * 2 * dim * classes / 1e9          # forward; training is 3x
        eval_gflop = 2 * (ev["fwd_gflop"] + head_gflop * shape["eval_head"]) * (n_q + n_g)
        if streams_sysu30k(prof):
            images, note = 3 * classes * bag, f"one pass of the bag stream: {3 * classes:,} bags x {bag} images"
        else:
            images, note = variant.records_epoch(cfg, n_train, classes)
        return {"method": cls.name, "network": net, "input": (h, w), "batch": bag * bags, "amp": bool(cfg.amp),
                "epochs": variant.epochs(cfg), "train_images": images,
                "train_gflop": cost["train_gflop"] + 3 * head_gflop, "fwd_gflop_epoch": 0.0, "eval_gflop": eval_gflop,
                "act_mb": cost["act_mb"] + heads * classes * 4 * 3 / 2**20,   # logits, softmax, their gradient
                "params_m": cost["params_m"] + heads * (dim + 1) * classes / 1e6, "opt_states": shape["opt_states"],
                "resident_gb": 0.0, "head": f"{heads} x Linear({dim}, {classes:,})", "epoch_note": note}

    def describe(self) -> str:
        return (f"DGL ({self.variant}, {self.network}) | profile {self.prof.name} | {self.num_classes} classes | "
                f"batch {self.batch_size} = {self.bags_per_batch} bags x {self.bag_size} | {self.epochs} epochs"
                + self.source.note)

    def settings(self) -> dict:

        return run_settings(self.prof, self.name, self.sections, variant=self.variant, network=self.network,
                            num_classes=self.num_classes)

    def checkpoint_info(self) -> dict:
        return {"variant": self.variant, "network": self.network, "num_classes": self.num_classes}

    def result_info(self) -> dict:
        return {"variant": self.variant, "network": self.network, "num_classes": self.num_classes,
                "class_of_pid": self.source.class_of_pid}

    def prepare(self, dev, selection: str, seed: int, log) -> None:
        """The dataset, its source of bags (the SYSU-30k stream or the records), the classes, and
        the validation split."""

        self.ds = self._load_dataset()
        self.use_amp = self.run_amp(dev)
        self.train_tf = self.strategy.train_transform(self.prof)
        self.val_q, self.val_g = [], []
        if streams_training(self.ds):
            if selection == "val":
                raise ValueError("selection='val' needs camera-labelled training identities; SYSU-30k's training "
                                 "images carry none: use selection='last' (the reference) or 'test'")
            world = dist_info()[1]
            if self.bags_per_batch % world:
                raise ValueError(f"{self.bags_per_batch} bags per batch do not split over {world} processes")
            self.source = StreamBags(self.ds, self.train_tf, self.bag_size, seed)
        else:
            records = list(self.ds.train)
            if not records:
                raise ValueError(f"{self.ds.name}: no training images")
            if selection == "val":
                records, self.val_q, self.val_g = make_val_split(records, seed=seed)
            self.source = RecordBags(records, self.train_tf, self.strategy, self.cfg, self.bag_size)
            self.strategy.check_fill(records, self.source.num_classes, self.bags_per_batch, self.cfg, self.ds.name)
        self.num_classes = self.source.num_classes
        self.network = network_for(self.prof, self.variant)

    def _load_dataset(self) -> ReIDDataset:

        if self.dataset is not None:
            return self.dataset
        return load_profile_dataset(self.prof, self.data_root)  # the subset applied; SYSU-30k streamed

    def build_model(self, dev) -> nn.Module:

        return build_weak_model(self.prof, self.variant, self.num_classes, device=dev)

    def optimizer(self, model: nn.Module):
        return self.strategy.optimizer(model, self.cfg)

    def begin_epoch(self, epoch: int, eseed: int, model, dev, entry: dict, log) -> tuple[Any, int | None]:
        """The epoch's bags from the source, at most ``iters`` batches of them."""

        rank, world = dist_info()
        gen = torch.Generator().manual_seed(eseed + 7919 * rank)
        loader, total = self.source.loader(epoch, eseed, batch_size=self.batch_size // world,
                                           num_workers=self.prof.data.workers, pin_memory=dev.type == "cuda",
                                           generator=gen)
        if self.iters is not None:
            total = self.iters if total is None else min(total, self.iters)
        return loader, total

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
        bags = self.source.bags(y, {k: gather(batch[k].to(dev)) for k in ("bag", "bag_labels") if k in batch})
        res, acc = self.strategy.loss(logits, embeddings, low, y, bags, self.cfg, self.assignment)
        opt.zero_grad(set_to_none=True)
        res["loss"].backward()
        opt.step()
        return {"loss": float(res["loss"].detach()), "ce": res["ce"], "pairwise": res["pairwise"],
                "triplet": res["triplet"], "pseudo_acc": acc, "images": int(y.shape[0])}

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

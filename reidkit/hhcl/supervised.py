"""The supervised references: HHCL's network, sampler and budget, trained with the true labels.

Cluster-Contrast and HHCL measure their unsupervised result against the same recipe fed with the
ground-truth identities instead of DBSCAN's clusters. :class:`Supervised` is that recipe on the
kit's engine: every epoch the memory is built from the centroids of the true identities, and the
loop, the camera-aware PK batches, the optimiser and the evaluation are HHCL's. The gap between
the two runs is what the pseudo-labels cost.

:class:`Softmax` is the classic supervised baseline of re-ID (a linear classifier over the
identities on the BN neck, cross-entropy with label smoothing 0.1, as the ID loss of the "bag of
tricks" baseline), on the same network, optimiser and budget, with batches drawn at random, no
memory and no per-epoch extraction. It says how much of the gap is the contrastive memory's rather than the
labels': on two-camera CUHK03 at the laptop budget it scores well above the memory recipe fed
the same true labels (docs/cameras.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import RandomSampler

from reidkit.config import camera_parts
from reidkit.data.records import relabel
from reidkit.hhcl.method import HHCL, _restarting
from reidkit.nets.backbones import build_model
from reidkit.train.checkpoints import run_settings
from reidkit.train.engine import TrainResult, fit
from reidkit.train.gpu_cost import DATASET_SIZES, network_cost
from reidkit.train.runspec import RunSpec

__all__ = ["Supervised", "Softmax", "train_supervised"]


class Supervised(HHCL):
    """HHCL with the true identities as its labels (``reidkit train --method supervised``)."""

    name = "supervised"
    sections = ("data", "model", "hhcl", "camera", "seed")  # no clustering
    default_selection = "last"
    count_label = "identities"   # the epoch's labels are the true identities, not clusters

    def describe(self) -> str:
        return "supervised upper bound: " + super().describe()

    def prepare(self, dev, selection: str, seed: int, log) -> None:
        super().prepare(dev, selection, seed, log)
        if (self.pids < 0).any():
            raise ValueError(f"{self.ds.name}: the supervised bound needs a true identity for every training image")
        self.true_labels = np.asarray(relabel(self.train_recs)[0], dtype=np.int64)
        self.score_labels = False  # the labels are the truth

    def pseudo_labels(self, feats: np.ndarray, epoch: int, dev) -> tuple[np.ndarray, dict]:
        return self.true_labels.copy(), {}


class Softmax(Supervised):
    """The softmax classifier on the true identities (``reidkit train --method softmax``): HHCL's
    network with a linear classifier on its BN neck, cross-entropy with label smoothing, random
    batches of ``hhcl.batch_size``, HHCL's Adam, step schedule and budget (``hhcl.*``); evaluated on
    the embedding, as every method."""

    name = "softmax"
    sections = ("data", "model", "hhcl", "seed")   # hhcl: batch, sampler, optimiser, budget
    uses_memory = False
    #: the ID loss's label smoothing (the "bag of tricks" baseline's 0.1)
    label_smoothing = 0.1

    @classmethod
    def gpu_plan(cls, prof) -> dict[str, Any]:
        """HHCL's plan without the per-epoch extraction of the training images and its kNN, and
        without the memory; the classifier's weights are counted in the network's."""
        plan = dict(super().gpu_plan(prof))
        cfg, (_, _, n_q, n_g) = prof.hhcl, DATASET_SIZES[prof.data.dataset]
        fwd = network_cost(plan["network"], *plan["input"])["fwd_gflop"]
        plan.update(method=cls.name, fwd_gflop_epoch=fwd * (n_q + n_g) / max(cfg.eval_step, 1), resident_gb=0.0,
                    epoch_note=f"{cfg.iters} iterations x {cfg.batch_size}")
        return plan

    def describe(self) -> str:
        c = self.cfg
        return (f"supervised softmax classifier (label smoothing {self.label_smoothing}) | profile {self.prof.name} | "
                f"{self.prof.model.arch} | random batches of {c.batch_size} | {c.epochs} epochs x {c.iters} iterations")

    def settings(self) -> dict:
        return run_settings(self.prof, self.name, self.sections)

    def checkpoint_info(self) -> dict:
        return {}

    def prepare(self, dev, selection: str, seed: int, log) -> None:
        parts = camera_parts(self.prof)
        if parts:
            raise ValueError(f"the softmax baseline has no camera-aware parts; drop {', '.join(parts)}")
        super().prepare(dev, selection, seed, log)
        self.num_classes = int(self.true_labels.max()) + 1

    def build_model(self, dev) -> nn.Module:
        m = self.prof.model
        return build_model(m.arch, m.pooling, m.pretrained, num_classes=self.num_classes,
                           last_stride=m.last_stride, device=dev)

    def begin_epoch(self, epoch: int, eseed: int, model, dev, entry: dict, log) -> tuple[Any, int | None]:
        """The epoch's batches with the true identities: nothing to extract, no memory to build."""
        labels = self.true_labels
        entry.update(clusters=self.num_classes, outliers=0)
        return _restarting(self._loader(labels, np.arange(len(labels)), eseed, dev), self.cfg.iters), self.cfg.iters

    def _sampler(self, labels: np.ndarray, keep: np.ndarray, eseed: int):
        """All the training images in a random order, a new one each pass: the classic ID-loss
        baseline's batches (PK batches of a few identities serve a memory or a triplet loss, and
        slow a classifier down)."""
        return RandomSampler(range(len(keep)), generator=torch.Generator().manual_seed(eseed))

    def step(self, net, batch, opt, dev) -> dict:
        """One iteration: the classifier's logits, the cross-entropy with label smoothing, one Adam step."""
        x, y, out = self.forward(net, batch, dev, return_all=True)
        loss = F.cross_entropy(out.logits.float(), y, label_smoothing=self.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), "images": int(x.shape[0])}


def train_supervised(profile="workshop", dataset=None, out_dir: str | Path = "runs/supervised", device: Any = "auto",
                     seed: int | None = None, selection: str = "last", resume: bool = True,
                     epochs: int | None = None, log=None, data_root: str | None = None,
                     method: str = "supervised") -> TrainResult:
    """Train a supervised reference on the engine (see :func:`reidkit.hhcl.method.train_hhcl`):
    ``method`` ``"supervised"`` (HHCL's memory on the true identities) or ``"softmax"`` (a classifier)."""
    cls = {c.name: c for c in (Supervised, Softmax)}[method]
    spec = RunSpec.resolve(profile, data_root, device, method=cls.name, amp_policy=cls.amp_policy, dataset=dataset)
    run = cls(spec.profile, spec.dataset(), epochs=epochs, data_root=data_root)
    run.spec = spec
    return fit(run, out_dir, device=spec.device, seed=seed, selection=selection, resume=resume, log=log)

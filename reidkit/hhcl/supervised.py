"""The supervised upper bound: HHCL's network, memory, sampler and budget, trained with the true labels.

Cluster-Contrast and HHCL measure their unsupervised result against the same recipe fed with the
ground-truth identities instead of DBSCAN's clusters. :class:`Supervised` is that recipe on the
kit's engine: every epoch the memory is built from the centroids of the true identities, and the
loop, the camera-aware PK batches, the optimiser and the evaluation are HHCL's. The gap between
the two runs is what the pseudo-labels cost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from reidkit.data.records import relabel
from reidkit.hhcl.method import HHCL
from reidkit.train.engine import TrainResult, fit
from reidkit.train.runspec import RunSpec

__all__ = ["Supervised", "train_supervised"]


class Supervised(HHCL):
    """HHCL with the true identities as its labels (``reidkit train --method supervised``)."""

    name = "supervised"
    sections = ("data", "model", "hhcl", "camera", "seed")  # no clustering
    default_selection = "last"

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


def train_supervised(profile="workshop", dataset=None, out_dir: str | Path = "runs/supervised", device: Any = "auto",
                     seed: int | None = None, selection: str = "last", resume: bool = True,
                     epochs: int | None = None, log=None, data_root: str | None = None) -> TrainResult:
    """Train the supervised upper bound on the engine (see :func:`reidkit.hhcl.method.train_hhcl`)."""
    spec = RunSpec.resolve(profile, data_root, device, method=Supervised.name, amp_policy=Supervised.amp_policy,
                           dataset=dataset)
    method = Supervised(spec.profile, spec.dataset(), epochs=epochs, data_root=data_root)
    method.spec = spec
    return fit(method, out_dir, device=spec.device, seed=seed, selection=selection, resume=resume, log=log)

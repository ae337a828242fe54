"""Batch samplers of the papers.

- ``CameraAwarePKSampler``: HHCL / Cluster-Contrast's sampler (spec hhcl §1.5). Pseudo-ids in a
  random order; for each one a random anchor image, then ``num_instances - 1`` partners taken from
  the same pseudo-id's images seen by *other* cameras (without replacement when there are at least
  ``num_instances`` of them, with replacement otherwise). With no other-camera image, partners come
  from the other images of the pseudo-id (same replacement rule); a singleton emits its anchor only.
- ``PKBagSampler``: DGL's weak simulation (spec dgl §1.2): per epoch the ids are shuffled, each
  gives ``images_per_id`` images (with replacement when it has fewer), batches of ``ids_per_batch``
  ids; consecutive groups of ``ids_per_bag`` ids form a bag. Incomplete last batch dropped.
- ``ConsecutiveBagSampler``: the unary-only variant's and SYSU-30k's bag rule (spec dgl §1.3):
  ``bags_per_batch`` bags around a random permutation of classes, cycling through bags of 1, 3
  and 5 adjacent classes (clamped at the ends).

Each sampler owns a ``numpy.random.Generator`` seeded explicitly, so a run is repeatable and its
state can be saved and restored (``state_dict`` / ``load_state_dict``) for bit-exact resume.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from reidkit.data.sysu import bag_slots


class _SeededSampler:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


def _draw(rng: np.random.Generator, pool: np.ndarray, count: int, num_instances: int) -> np.ndarray:
    """``count`` items of ``pool``: without replacement when ``len(pool) >= num_instances``."""
    return rng.choice(pool, size=count, replace=len(pool) < num_instances)


class CameraAwarePKSampler(_SeededSampler, Sampler[int]):
    """Yields dataset indices, ``num_instances`` consecutive ones per (pseudo-)identity.

    ``labels``: pseudo-label per image (images labelled -1 are skipped); ``camids``: camera per
    image. ``camera_aware=False`` gives the plain PK rule (partners from any other image)."""

    def __init__(self, labels: Sequence[int], camids: Sequence[int], num_instances: int = 16,
                 seed: int = 0, camera_aware: bool = True):
        super().__init__(seed)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.camids = np.asarray(camids, dtype=np.int64)
        if self.labels.shape != self.camids.shape:
            raise ValueError(f"{len(self.labels)} labels but {len(self.camids)} camera ids")
        self.num_instances = int(num_instances)
        self.camera_aware = camera_aware
        groups = defaultdict(list)
        for i, lab in enumerate(self.labels.tolist()):
            if lab >= 0:
                groups[lab].append(i)
        self.pids = sorted(groups)
        self.index_of = {p: np.asarray(v, dtype=np.int64) for p, v in groups.items()}

    def __len__(self) -> int:
        return sum(min(len(v), 1) + (self.num_instances - 1 if len(v) > 1 else 0) for v in self.index_of.values())

    def __iter__(self) -> Iterator[int]:
        for k in self.rng.permutation(len(self.pids)):
            members = self.index_of[self.pids[k]]
            anchor = int(members[self.rng.integers(len(members))])
            out = [anchor]
            if self.camera_aware:
                others = members[self.camids[members] != self.camids[anchor]]
            else:
                others = members[:0]
            if len(others) == 0:
                others = members[members != anchor]
            if len(others):
                out.extend(int(j) for j in _draw(self.rng, others, self.num_instances - 1, self.num_instances))
            yield from out


class PKBagSampler(_SeededSampler, Sampler[list[int]]):
    """Batches of ``ids_per_batch`` ids x ``images_per_id`` images; bags of ``ids_per_bag`` ids."""

    def __init__(self, labels: Sequence[int], ids_per_batch: int = 16, images_per_id: int = 4,
                 ids_per_bag: int = 2, seed: int = 0):
        super().__init__(seed)
        if ids_per_batch % ids_per_bag:
            raise ValueError(f"ids_per_batch={ids_per_batch} is not a multiple of ids_per_bag={ids_per_bag}")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ids_per_batch, self.images_per_id, self.ids_per_bag = ids_per_batch, images_per_id, ids_per_bag
        groups = defaultdict(list)
        for i, lab in enumerate(self.labels.tolist()):
            groups[lab].append(i)
        self.ids = sorted(groups)
        if len(self.ids) < ids_per_batch:
            raise ValueError(f"{len(self.ids)} identities, fewer than ids_per_batch={ids_per_batch}")
        self.index_of = {p: np.asarray(v, dtype=np.int64) for p, v in groups.items()}

    @property
    def batch_size(self) -> int:
        return self.ids_per_batch * self.images_per_id

    def __len__(self) -> int:
        return len(self.ids) // self.ids_per_batch

    def __iter__(self) -> Iterator[list[int]]:
        order = [self.ids[k] for k in self.rng.permutation(len(self.ids))]
        for b in range(len(self)):
            batch = []
            for pid in order[b * self.ids_per_batch:(b + 1) * self.ids_per_batch]:
                pool = self.index_of[pid]
                batch.extend(int(j) for j in self.rng.choice(pool, self.images_per_id,
                                                              replace=len(pool) < self.images_per_id))
            yield batch

    def bag_of_position(self) -> np.ndarray:
        """Bag index (0..bags-1) of each position in a batch."""
        return np.arange(self.batch_size) // (self.ids_per_bag * self.images_per_id)


class ConsecutiveBagSampler(_SeededSampler, Sampler[list[int]]):
    """The unary-only / SYSU-30k bag rule: each batch holds ``bags_per_batch`` bags of
    ``batch_size // bags_per_batch`` images; bag j is built around class t[j] of a random
    permutation, in mode j % 3 (1, 3 or 5 adjacent classes, the bag split evenly among them).
    Images are drawn without replacement when a class has enough of them."""

    def __init__(self, labels: Sequence[int], batch_size: int = 180, bags_per_batch: int = 12,
                 batches_per_epoch: int | None = None, seed: int = 0):
        super().__init__(seed)
        if bags_per_batch < 1:
            raise ValueError(f"bags_per_batch={bags_per_batch} must be at least 1")
        bag_size = batch_size // bags_per_batch
        if batch_size % bags_per_batch or bag_size == 0 or bag_size % 15:
            raise ValueError(
                f"batch_size={batch_size} with {bags_per_batch} bags gives misaligned bags: "
                f"{bag_size} images per bag, {bag_size * bags_per_batch} sampled indices per batch of "
                f"{batch_size}. The batch must split into {bags_per_batch} bags whose size is a multiple "
                f"of 15 (so bags of 1, 3 and 5 classes divide evenly), e.g. {15 * bags_per_batch}; the "
                f"reference README's batch size 32 with 12 bags is this misalignment (spec dgl §1.3)")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size, self.bags_per_batch, self.bag_size = batch_size, bags_per_batch, bag_size
        groups = defaultdict(list)
        for i, lab in enumerate(self.labels.tolist()):
            groups[lab].append(i)
        self.num_classes = int(self.labels.max()) + 1
        missing = [c for c in range(self.num_classes) if c not in groups]
        if missing:
            raise ValueError(f"labels must be 0..C-1 with every class present; missing {missing[:5]}")
        self.index_of = {p: np.asarray(v, dtype=np.int64) for p, v in groups.items()}
        self.batches_per_epoch = batches_per_epoch or max(1, len(self.labels) // batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def bag_classes(self, center: int, mode: int) -> list[int]:
        """The class of each image slot of the bag around class ``center`` in ``mode``
        (:func:`reidkit.data.sysu.bag_slots`: clamped at the ends, duplicates kept)."""
        return bag_slots(center, mode, self.num_classes)

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(len(self)):
            perm = self.rng.permutation(self.num_classes)
            batch = []
            for j in range(self.bags_per_batch):
                classes = self.bag_classes(int(perm[j % self.num_classes]), j % 3)
                per = self.bag_size // len(classes)
                for c in classes:
                    pool = self.index_of[c]
                    batch.extend(int(i) for i in self.rng.choice(pool, per, replace=len(pool) < per))
            yield batch

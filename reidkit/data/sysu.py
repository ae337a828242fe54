"""The SYSU-30k bag rule, in one place (spec dgl-sysu30k §1.3, §1.4).

SYSU-30k labels *bags*, not images. The maintainers' rule (issue #7; ``bag_level_label.json``):
around every training folder (one label each, in sorted order) come three bags, of 1, 3 and 5
adjacent folders::

    mode 0:  [k]                 bag id  bag{3k:010d}      folder 3 -> bag0000000009 = [3]
    mode 1:  [k-1, k, k+1]       bag id  bag{3k+1:010d}    folder 3 -> bag0000000010 = [2, 3, 4]
    mode 2:  [k-2 .. k+2]        bag id  bag{3k+2:010d}    folder 3 -> bag0000000011 = [1 .. 5]

The unary-only reference sampler (``UO/mySampler.py``) builds its bags the same way around class
indices, drawing ``bag_size / (2 * mode + 1)`` images per *slot*. Indices past either end are
clamped, so a boundary bag repeats its end folder in its slots and holds fewer distinct labels
(around the first folder, mode 1 has slots ``[0, 0, 1]`` and label set ``[0, 1]``).

Every user of the rule calls :func:`bag_slots` (the slots, duplicates kept: how many images each
folder gives) or :func:`bag_members` (the label set): the Market/SYSU bag sampler, the SYSU-30k
bag listing and the streamed SYSU-30k training bags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import IterableDataset

__all__ = ["BAG_MODES", "bag_slots", "bag_members", "bag_id", "bag_index", "SYSUBagStream"]

#: bags of 1, 3 and 5 adjacent folders (``mode`` m spans ``2 m + 1`` slots)
BAG_MODES = (0, 1, 2)


def bag_slots(center: int, mode: int, count: int) -> list[int]:
    """The ``2 * mode + 1`` slots of the bag around index ``center`` among ``count`` ordered
    folders (or classes) ``0 .. count-1``: ``center-mode .. center+mode``, each clamped into
    ``[0, count-1]``. Clamped duplicates are kept (a slot is a share of the bag's images)."""
    if mode not in BAG_MODES:
        raise ValueError(f"mode must be one of {BAG_MODES}, got {mode}")
    if not 0 <= center < count:
        raise ValueError(f"center {center} outside [0, {count})")
    return [min(max(center + d, 0), count - 1) for d in range(-mode, mode + 1)]


def bag_members(center: int, mode: int, count: int) -> list[int]:
    """The bag's label set: the distinct indices of :func:`bag_slots`, ascending."""
    return sorted(set(bag_slots(center, mode, count)))


def bag_id(folder_number: int, mode: int) -> str:
    """The maintainers' bag id of the bag around folder ``folder_number``: ``bag`` + 10 digits of
    ``3 * folder_number + mode`` (folder 3: bag0000000009, ...10, ...11)."""
    if mode not in BAG_MODES:
        raise ValueError(f"mode must be one of {BAG_MODES}, got {mode}")
    return f"bag{3 * int(folder_number) + mode:010d}"


def bag_index(ordinal: int, mode: int) -> int:
    """Position of the bag in the bag stream: three bags per folder, ``3 * ordinal + mode`` for the
    folder of 0-based sorted position ``ordinal``."""
    return 3 * int(ordinal) + mode


# --------------------------------------------------------------------------------------------
# the training stream

class SYSUBagStream(IterableDataset):
    """SYSU-30k training images as a stream of whole bags (``reidkit.data.datasets.iter_sysu_bags``).

    Items: ``{"img", "label" (class = folder number - 1), "pid" (folder), "camid" (-1), "bag"
    (stream index of the bag), "bag_labels" (the bag's classes, padded with -1 to 5), "path"}``;
    the ``bag_size`` images of a bag are consecutive. With a DataLoader ``batch_size`` that is a
    multiple of ``bag_size`` every batch holds whole bags (each worker yields its own bags).

    Sharding: the shard of this process is ``rank * num_workers + worker_id`` out of
    ``world_size * num_workers`` (``torch.distributed`` when initialised); bag ``k`` goes to shard
    ``k % num_shards``. ``set_epoch(e)`` re-seeds image draws and the shuffle buffer.

    One pass of the stream (one training "epoch" on SYSU-30k) is one pass over the *bag list*: three
    bags per folder (1, 3, 5 folders) of ``bag_size`` images each, i.e. 84,930 bags and about 1.27M
    images at bag size 15, not all 29.6M images; bags re-draw their images every epoch."""

    def __init__(self, train_dir: str | Path, train_list: str | Path | None = None, transform=None,
                 bag_size: int = 15, seed: int = 0, shuffle_buffer: int = 256, max_bags: int | None = None,
                 num_classes: int | None = None):
        from reidkit.data.datasets import sysu_num_classes

        super().__init__()
        self.train_dir = Path(train_dir)
        self.train_list = Path(train_list) if train_list else None
        self.transform = transform
        self.bag_size, self.seed, self.shuffle_buffer, self.max_bags = int(bag_size), int(seed), shuffle_buffer, max_bags
        self.num_classes = int(num_classes) if num_classes else sysu_num_classes(self.train_dir)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @staticmethod
    def shard_info() -> tuple[int, int]:
        from torch.utils.data import get_worker_info

        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nw + wid, world * nw

    def bags(self, shard: int | None = None, num_shards: int | None = None):
        from reidkit.data.datasets import iter_sysu_bags

        if shard is None:
            shard, num_shards = self.shard_info()
        return iter_sysu_bags(self.train_dir, self.train_list, bag_size=self.bag_size,
                              seed=self.seed * 100_003 + self.epoch, shard=shard, num_shards=num_shards,
                              shuffle_buffer=self.shuffle_buffer, max_bags=self.max_bags)

    def __iter__(self) -> Iterator[dict]:
        from reidkit.data.transforms import decoder_for

        decode = decoder_for(self.transform)  # the tensor backend decodes straight to uint8
        for bag in self.bags():
            classes = [c - 1 for c in bag.labels]
            if any(not 0 <= c < self.num_classes for c in classes):
                raise ValueError(f"bag {bag.bag_id}: folder outside 1..{self.num_classes}")
            padded = torch.full((5,), -1, dtype=torch.long)
            padded[:len(classes)] = torch.tensor(classes[:5])
            for rec in bag.records:
                img = decode(rec.path)
                if self.transform is not None:
                    img = self.transform(img)
                yield {"img": img, "label": rec.pid - 1, "pid": rec.pid, "camid": -1, "bag": bag.index,
                       "bag_labels": padded, "path": rec.path}

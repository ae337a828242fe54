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

__all__ = ['BAG_MODES', 'bag_slots', 'bag_members', 'bag_id', 'bag_index']


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

"""SYSU-30k on disk: the test split, the training folders and their listing, the bags streamed from
``meta/train.txt``, and the tree check."""

from __future__ import annotations

import json
import os
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from reidkit.data import sysu
from reidkit.data.datasets import register
from reidkit.data.records import (
    IMAGE_SUFFIXES,
    LayoutError,
    Record,
    ReIDDataset,
    _find_root,
    _list_images,
    _list_subdirs,
)
from reidkit.data.transforms import decoder_for

_SYSU_TEST_RE = re.compile(r"^([^_]+)_c(\d+)")


SYSU_DISTRACTOR_FOLDER = "0000others"


SYSU_DISTRACTOR_LABEL = -1000


def sysu_test_label(name: str) -> int:
    """Label of a SYSU-30k test identity folder: ``000028311`` -> 28311, ``0000others`` -> -1000."""
    if name == SYSU_DISTRACTOR_FOLDER:
        return SYSU_DISTRACTOR_LABEL
    if not name.isdigit():
        raise LayoutError(f"sysu30k: test identity {name!r} is neither a number (000028311) "
                          f"nor the distractor folder {SYSU_DISTRACTOR_FOLDER}")
    return int(name)


def parse_sysu_test_name(name: str) -> tuple[int, int]:
    """``000028311_c2_2.jpg`` -> (28311, 1); ``0000others_c1_7.jpg`` -> (-1000, 0)."""
    m = _SYSU_TEST_RE.match(name)
    if m is None:
        raise LayoutError(f"sysu30k: test file {name!r} is not <label>_c<camera>_<n>.jpg")
    return sysu_test_label(m.group(1)), int(m.group(2)) - 1


def _sysu_test_split(folder: Path) -> list[Record]:
    """``<split>/<id folder>/<id>_c<cam>_<n>.jpg``. The label is the folder's (as the official
    evaluation reads it, folder by folder); the camera is the file name's ``c<k>`` token."""
    recs = []
    for sub in _list_subdirs(folder):
        label = sysu_test_label(sub.name)
        for p in _list_images(sub):
            m = _SYSU_TEST_RE.match(p.name)
            if m is None:
                raise LayoutError(f"sysu30k: test file {p} is not <label>_c<camera>_<n>.jpg "
                                  f"(e.g. 000028311_c2_2.jpg)")
            recs.append(Record(str(p), label, int(m.group(2)) - 1))
    if not recs:
        raise LayoutError(f"sysu30k: no images under {folder}/<id>/")
    return recs


@dataclass(frozen=True)
class Bag:
    """A SYSU-30k bag: its id, the identity labels it is annotated with, and its image folders."""

    bag_id: str
    labels: tuple[int, ...]
    folders: tuple[str, ...]


def sysu_train_folders(train_dir: str | Path) -> list[str]:
    """The training folders (``0000000001`` ...), sorted; each folder is one label."""
    return sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith("."))


def sysu_consecutive_bags(folders: Sequence[str]) -> Iterator[Bag]:
    """Every bag of the folder list, by the bag rule of :mod:`reidkit.data.sysu`: around each
    folder (sorted by number) the bags of 1, 3 and 5 adjacent folders, with the maintainers' bag
    ids. A folder's label is its integer name; a boundary bag has fewer folders."""
    folders = sorted(folders, key=int)
    for i, center in enumerate(folders):
        for mode in sysu.BAG_MODES:
            sel = [folders[j] for j in sysu.bag_members(i, mode, len(folders))]
            yield Bag(sysu.bag_id(int(center), mode), tuple(int(f) for f in sel), tuple(sel))


def _bag_image_folder(entry: str) -> str:
    """``0000000003/*`` or ``sysu_train_set_all/0000000003/x.jpg`` -> ``0000000003``."""
    parts = [x for x in str(entry).replace("\\", "/").split("/") if x]
    return parts[-2] if len(parts) >= 2 else parts[0]


def read_bag_level_labels(path: str | Path) -> list[Bag]:
    """Read a ``bag_level_label.json``: a list of ``{"BagLabel": [...], "BagID": ..., "BagImages": [...]}``
    (``BagImages`` entries like ``"0000000003/*"``; a bag's folders are their parent folders)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LayoutError(f"sysu30k: {path} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise LayoutError(f"sysu30k: {path} must hold a list of bag records")
    bags = []
    for i, rec in enumerate(data):
        try:
            labels = tuple(int(x) for x in rec["BagLabel"])
            folders = tuple(sorted({_bag_image_folder(im) for im in rec["BagImages"]}))
            bags.append(Bag(str(rec["BagID"]), labels, folders))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise LayoutError(f"sysu30k: {path}: record {i} lacks BagLabel/BagID/BagImages ({exc!r})") from None
    return bags


def _sysu_folder_number(name: str, where: str) -> int:
    if not name.isdigit():
        raise LayoutError(f"sysu30k: {where}: training folder {name!r} is not a number like 0000000001")
    return int(name)


def _sysu_train_entry(line: str, train_dir: Path, where: str) -> Record | None:
    """One line of ``meta/train.txt`` as a record (None for a blank line)."""
    fields = line.split()
    if not fields:
        return None
    parts = [x for x in fields[0].replace("\\", "/").split("/") if x]
    if len(parts) > 2 and parts[0] == train_dir.name:
        parts = parts[1:]
    if len(parts) >= 2:
        folder = parts[-2]
    else:  # a bare file name: its folder is the prefix before the first "_"
        folder = parts[0].split("_")[0]
        parts = [folder, parts[0]]
    return Record(str(train_dir.joinpath(*parts)), _sysu_folder_number(folder, where), -1)


def iter_sysu_train(train_dir: str | Path, train_list: str | Path | None = None) -> Iterator[Record]:
    """Stream the training images as records (pid = folder number, camera unknown = -1) without
    building a list of all 29.6M paths: from ``meta/train.txt`` line by line if given (entries
    ``<folder>/<file>``, optionally prefixed by ``sysu_train_set_all/`` or followed by a label),
    else by scanning the folders one at a time."""
    train_dir = Path(train_dir)
    if train_list is not None:
        with open(train_list) as fh:
            for lineno, line in enumerate(fh, 1):
                rec = _sysu_train_entry(line, train_dir, f"{train_list}:{lineno}")
                if rec is not None:
                    yield rec
        return
    for folder in sysu_train_folders(train_dir):
        pid = _sysu_folder_number(folder, str(train_dir))
        for e in sorted(os.scandir(train_dir / folder), key=lambda e: e.name):
            if e.name.lower().endswith(IMAGE_SUFFIXES) and not e.name.startswith("."):
                yield Record(e.path, pid, -1)


class SysuBag(NamedTuple):
    """One bag drawn by :func:`iter_sysu_bags`: its index in the bag stream (``3 * folder ordinal +
    mode``, :func:`reidkit.data.sysu.bag_index`), its id (``bag`` + 10 digits,
    :func:`reidkit.data.sysu.bag_id`), its label set (folder numbers, ascending) and the images
    drawn for it (in slot order)."""

    index: int
    bag_id: str
    labels: tuple[int, ...]
    records: tuple[Record, ...]


def sysu_num_classes(train_dir: str | Path) -> int:
    """Size of the SYSU-30k label space: the largest training folder number (28,310 for the real
    set; folder ``k`` is class ``k - 1``). Lists folder names only, never the images."""
    folders = sysu_train_folders(train_dir)
    if not folders:
        raise LayoutError(f"sysu30k: no training folders in {train_dir} (expected 0000000001 ...)")
    return max(_sysu_folder_number(f, str(train_dir)) for f in folders)


def _sysu_folder_groups(records: Iterable[Record], where: str) -> Iterator[tuple[int, list[Record]]]:
    """Consecutive records of one folder -> (folder number, its records); a folder that shows up
    again after another one is a layout error (the bag rule needs the folders in order)."""
    seen: set[int] = set()
    current, group = None, []
    for rec in records:
        if rec.pid != current:
            if group:
                yield current, group
            if rec.pid in seen:
                raise LayoutError(f"sysu30k: {where}: images of folder {rec.pid:010d} are not contiguous; "
                                  f"sort the list by folder")
            seen.add(rec.pid)
            current, group = rec.pid, []
        group.append(rec)
    if group:
        yield current, group


def iter_sysu_bags(train_dir: str | Path, train_list: str | Path | None = None, bag_size: int = 15,
                   seed: int = 0, shard: int = 0, num_shards: int = 1, shuffle_buffer: int = 0,
                   max_bags: int | None = None, modes: Sequence[int] = sysu.BAG_MODES) -> Iterator[SysuBag]:
    """Stream SYSU-30k training bags by the consecutive-folder rule, in bounded memory.

    The images come from :func:`iter_sysu_train` (``meta/train.txt`` line by line, or the folder
    tree one folder at a time) and are grouped by folder; a sliding window keeps the last five
    folders, so memory is a few thousand records whatever the size of the set (never the 29.6M
    paths). Around the folder of ordinal ``i`` (0-based, sorted order) come the bags of ``modes``
    (0, 1, 2 -> 1, 3, 5 adjacent folders) with stream index ``3 * i + mode``.

    * **Images of a bag**: its ``2 * mode + 1`` folder slots are clamped at the ends of the folder
      list, as the reference sampler does (a boundary bag repeats the end folder), and
      ``bag_size`` images are split over the slots as evenly as possible (15 -> 15, 5+5+5,
      3+3+3+3+3), drawn without replacement when a folder has enough images. The draw is seeded
      by ``(seed, bag index)``: a bag gets the same images however the stream is sharded.
    * **Sharding**: bag ``k`` belongs to shard ``k % num_shards`` (DDP rank x DataLoader worker);
      every shard reads the listing, but only decodes its own bags.
    * **Order**: stream order, or shuffled through a buffer of ``shuffle_buffer`` bags (seeded by
      ``(seed, shard)``), which mixes bags of distant folders into one batch.
    * ``max_bags``: stop after that many bags of this shard.
    """

    if bag_size < 1:
        raise ValueError(f"bag_size must be >= 1, got {bag_size}")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} outside 0..{num_shards - 1}")
    if any(m not in sysu.BAG_MODES for m in modes):
        raise ValueError(f"modes must be among {sysu.BAG_MODES}, got {tuple(modes)}")
    groups = _sysu_folder_groups(iter_sysu_train(train_dir, train_list), str(train_list or train_dir))
    bags = _sysu_ordered_bags(groups, tuple(modes), bag_size, seed, shard, num_shards)
    if shuffle_buffer > 1:
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, shard, 1_000_003])
        bags = _shuffled(bags, shuffle_buffer, rng)
    for n, bag in enumerate(bags):
        if max_bags is not None and n >= max_bags:
            return
        yield bag


def _sysu_draw_bag(by_ord: dict, center: int, mode: int, count: int, bag_size: int, seed: int) -> SysuBag:
    """The bag of ``mode`` around folder ordinal ``center``: ``bag_size`` images split over its
    slots as evenly as possible, drawn with the bag's own seed ``(seed, bag index)``."""

    k = sysu.bag_index(center, mode)
    slots = sysu.bag_slots(center, mode, count)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, k])
    base, extra = divmod(bag_size, len(slots))
    recs: list[Record] = []
    for j, o in enumerate(slots):
        pool = by_ord[o][1]
        n = base + (j < extra)
        pick = rng.choice(len(pool), size=n, replace=len(pool) < n) if n else []
        recs.extend(pool[int(t)] for t in pick)
    labels = tuple(sorted({by_ord[o][0] for o in slots}))
    return SysuBag(k, sysu.bag_id(by_ord[center][0], mode), labels, tuple(recs))


def _sysu_ordered_bags(groups, modes: tuple[int, ...], bag_size: int, seed: int, shard: int,
                       num_shards: int) -> Iterator[SysuBag]:
    """This shard's bags in stream order, from a sliding window of the last five folders."""

    window: deque = deque(maxlen=5)  # (ordinal, folder number, records)

    def around(center: int, last: int | None) -> Iterator[SysuBag]:
        by_ord = {o: (f, recs) for o, f, recs in window}
        # folders past ``center + 2`` are not read yet: until the last folder is known, the folder
        # count only has to cover the bag's right end (nothing is clamped there)
        count = last + 1 if last is not None else center + max(modes, default=0) + 1
        for mode in modes:
            if sysu.bag_index(center, mode) % num_shards == shard:
                yield _sysu_draw_bag(by_ord, center, mode, count, bag_size, seed)

    ordinal = -1
    for ordinal, (folder, recs) in enumerate(groups):
        window.append((ordinal, folder, recs))
        if ordinal >= 2:  # folder ordinal-2 has both right neighbours now
            yield from around(ordinal - 2, None)
    for center in range(max(0, ordinal - 1), ordinal + 1):  # the last two folders (or fewer)
        yield from around(center, ordinal)


def _shuffled(items: Iterable, size: int, rng) -> Iterator:
    """``items`` shuffled through a buffer of ``size`` (memory bounded by the buffer)."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(len(buf)))
        out, buf[j] = buf[j], item
        yield out
    for j in rng.permutation(len(buf)):
        yield buf[int(j)]


@register("sysu30k")
def sysu30k(root, load_train: bool = True) -> ReIDDataset:
    """SYSU-30k: ``sysu_train_set_all/<10-digit folder>/`` (+ ``meta/train.txt``) and
    ``sysu_test_set_all/{query,gallery}/<9-digit id>/`` with the ``0000others`` distractors (label -1000).

    ``load_train=False`` skips listing the 29.6M training images (the test split alone is read);
    training code streams them with ``iter_sysu_train``."""
    base = _find_root(root, ["SYSU-30k", "sysu30k", "SYSU30k"], ("sysu_test_set_all",), "sysu30k")
    test = base / "sysu_test_set_all"
    for sub in ("query", "gallery"):
        if not (test / sub).is_dir():
            raise LayoutError(f"sysu30k: expected {test / sub}/ with one folder per identity "
                              f"(e.g. {sub}/000028311/000028311_c{1 if sub == 'gallery' else 2}_"
                              f"{1 if sub == 'gallery' else 2}.jpg)")
    query, gallery = _sysu_test_split(test / "query"), _sysu_test_split(test / "gallery")
    notes = []
    train: list[Record] = []
    train_dir = base / "sysu_train_set_all"
    if load_train:
        if not train_dir.is_dir():
            raise LayoutError(f"sysu30k: expected {train_dir}/ with folders 0000000001 ... 0000028310 "
                              f"(pass load_train=False to read the test split alone)")
        train_list = base / "meta" / "train.txt"
        train = list(iter_sysu_train(train_dir, train_list if train_list.is_file() else None))
        notes.append("train from meta/train.txt" if train_list.is_file() else "train from the folder tree")
    n_distract = sum(r.pid == SYSU_DISTRACTOR_LABEL for r in gallery)
    notes.append(f"gallery: {len(gallery) - n_distract:,} true matches + {n_distract:,} distractors ({SYSU_DISTRACTOR_FOLDER})")
    return ReIDDataset("sysu30k", base, train, query, gallery, notes=notes)


SYSU_CANDIDATES = ("SYSU-30k", "sysu30k", "SYSU30k")


def _has_image(folder: Path, depth: int = 0) -> bool:
    """Does ``folder`` (or, with ``depth`` 1, one of its sub-folders) hold an image? Stops at the
    first one found: never lists a folder of 478k distractors."""
    if not folder.is_dir():
        return False
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES):
                return True
            if depth and e.is_dir() and _has_image(Path(e.path), depth - 1):
                return True
    return False


def _sysu_base(root: str | Path) -> Path:
    """The SYSU-30k folder: ``root`` or ``root/<SYSU-30k|sysu30k|SYSU30k>``, the first holding any
    of its top-level entries."""
    root = Path(root).expanduser()
    if not root.exists():
        raise LayoutError(f"sysu30k: data root {root} does not exist")
    tried = [root] + [root / c for c in SYSU_CANDIDATES]
    for cand in tried:
        if any((cand / e).exists() for e in ("sysu_train_set_all", "sysu_test_set_all", "meta")):
            return cand
    raise LayoutError(f"sysu30k: none of sysu_train_set_all/, meta/train.txt, sysu_test_set_all/ found; "
                      f"looked in: {', '.join(str(c) for c in tried)}")


def check_sysu_tree(root: str | Path) -> None:
    """Check a SYSU-30k tree before any training: raise ``LayoutError`` naming every missing part.

    What the ``sysu30k`` profile needs (checked by reading a few directory entries, never the 29.6M
    image listing): ``sysu_train_set_all/`` with numbered folders, the first of them holding
    images; ``meta/train.txt``, not empty, whose first entry is an existing image (the training
    stream reads it line by line; without it the loader would fall back to scanning the tree);
    ``sysu_test_set_all/query/`` and ``gallery/`` with identity folders of images; and the
    distractor folder ``gallery/0000others/`` with images (without it rank-1 is measured against
    1,000 images instead of ~479k and means nothing)."""
    base = _sysu_base(root)
    train_dir, train_list = base / "sysu_train_set_all", base / "meta" / "train.txt"
    test = base / "sysu_test_set_all"
    problems = []
    if not train_dir.is_dir():
        problems.append(f"training folder {train_dir}/ is missing (folders 0000000001 ... 0000028310)")
    else:
        folders = sorted(d for d in os.listdir(train_dir) if not d.startswith("."))  # names only
        first = folders[0] if folders else None
        if first is None:
            problems.append(f"training folder {train_dir}/ is empty (expected folders 0000000001 ... 0000028310)")
        elif not first.isdigit() or not _has_image(train_dir / first):
            problems.append(f"{train_dir / first}/ is not a numbered folder of images (like 0000000001/)")
    problems += _check_sysu_train_list(train_list, train_dir)
    for sub in ("query", "gallery"):
        if not (test / sub).is_dir():
            problems.append(f"test folder {test / sub}/ is missing (one folder per identity, e.g. "
                            f"{sub}/000028311/)")
        elif not _has_image(test / sub, depth=1):
            problems.append(f"test folder {test / sub}/ holds no identity folder with images")
    others = test / "gallery" / SYSU_DISTRACTOR_FOLDER
    if (test / "gallery").is_dir() and not others.is_dir():
        problems.append(f"distractor folder {others}/ is missing (the ~478k gallery distractors "
                        f"{SYSU_DISTRACTOR_FOLDER}_c1_*.jpg)")
    elif others.is_dir() and not _has_image(others):
        problems.append(f"distractor folder {others}/ holds no images")
    if problems:
        raise LayoutError(f"sysu30k: the tree at {base} is incomplete:\n  - " + "\n  - ".join(problems))


def _check_sysu_train_list(train_list: Path, train_dir: Path) -> list[str]:
    """Problems of ``meta/train.txt``: missing, empty, or a first entry that names no file."""
    if not train_list.is_file():
        return [f"training list {train_list} is missing (one <folder>/<file>.jpg per line; the "
                f"sysu30k profile streams the training set from it)"]
    with open(train_list) as fh:
        line = next((ln for ln in fh if ln.strip()), None)
    if line is None:
        return [f"training list {train_list} is empty"]
    if not train_dir.is_dir():
        return []
    try:
        first = _sysu_train_entry(line, train_dir, f"{train_list}:first entry")
    except LayoutError as exc:
        return [str(exc)]
    if not Path(first.path).is_file():
        return [f"the first entry of {train_list} ({line.split()[0]}) names {first.path}, which does not exist"]
    return []


def streams_training(ds: ReIDDataset) -> bool:
    """Whether ``ds`` is SYSU-30k loaded without its training listing, so that training streams its
    folders as bags (the whole dataset; an identity subset lists its images)."""
    return ds.name == "sysu30k" and not ds.train and (Path(ds.root) / "sysu_train_set_all").is_dir()


__all__ = ['SYSUBagStream']


class SYSUBagStream(IterableDataset):
    """SYSU-30k training images as a stream of whole bags (``reidkit.data.sysu30k.iter_sysu_bags``).

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

        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nw + wid, world * nw

    def bags(self, shard: int | None = None, num_shards: int | None = None):

        if shard is None:
            shard, num_shards = self.shard_info()
        return iter_sysu_bags(self.train_dir, self.train_list, bag_size=self.bag_size,
                              seed=self.seed * 100_003 + self.epoch, shard=shard, num_shards=num_shards,
                              shuffle_buffer=self.shuffle_buffer, max_bags=self.max_bags)

    def __iter__(self) -> Iterator[dict]:

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

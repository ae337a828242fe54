"""An identity subset of any parsed dataset: the real task, small enough for a laptop.

``subset_identities(ds, n)`` keeps ``n`` training identities and ``n`` test identities:

- **Which ids.** Every identity is ranked by a seeded hash of its pid (``blake2b(seed, pid)``) and
  the ``n`` first are kept. The choice depends only on the pids, the seed and ``n``, never on the
  order in which files were listed, the folder the data sits in or the machine; a larger ``n``
  keeps a superset of a smaller one's ids.
- **Train.** The pool is the training pids that are real identities; all images of a kept identity
  are kept (so MARS tracklets and SYSU-30k training folders stay whole; SYSU-30k bags are then
  formed over the kept folders).
- **Test.** The pool is the real identities that have a query image; query and gallery keep the
  same ``n`` identities, with all their images.
- **Distractors and junk.** Junk images (Market / Duke / MARS pid -1) are already dropped by the
  parsers. Distractors stay in a proportional share, so the gallery is as hard per identity as the
  full one: the label distractors (pid 0 of Market-1501, DukeMTMC-reID and MARS galleries,
  SYSU-30k's ``0000others`` = -1000, any negative pid) keep ``n / pool`` of their images (chosen
  by a seeded hash of the file name), and the gallery-only identities (DukeMTMC-reID's 408
  distractor people) keep ``n / pool`` of those identities (by the pid hash). A pool is the number
  of query identities for the test split, of training identities for train.
- ``n`` at or above a pool's size keeps that split whole (and says so in ``ds.notes``).

The result is a new :class:`ReIDDataset` with the same name and root and a note that names the
subset; records are not relabelled.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import PurePath
from typing import Sequence

from reidkit.data.datasets import ALIASES, load_dataset
from reidkit.data.records import IMAGE_SUFFIXES, Record, ReIDDataset
from reidkit.data.sysu30k import check_sysu_tree, sysu_train_folders

# datasets in which pid 0 marks a distractor (MSMT17 and plain folders use 0 as a real identity)
ZERO_IS_DISTRACTOR = {"market1501", "dukemtmcreid", "mars", "mini-mars"}


def is_distractor(pid: int, dataset: str) -> bool:
    """Whether ``pid`` is a distractor label (not a person) in ``dataset``."""
    return pid < 0 or (pid == 0 and dataset in ZERO_IS_DISTRACTOR)


def _rank(key: str, seed: int) -> bytes:
    return hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()


def choose_ids(pids, n: int, seed: int = 0) -> list[int]:
    """The ``n`` pids of ``pids`` (any iterable, duplicates ignored) ranked first by the seeded
    hash; sorted ascending. Independent of the order of ``pids``."""
    uniq = sorted(set(int(p) for p in pids))
    ranked = sorted(uniq, key=lambda p: (_rank(f"pid/{p}", seed), p))
    return sorted(ranked[:max(0, n)])


def _share(records: Sequence[Record], fraction: float, seed: int) -> list[Record]:
    """``round(fraction * len)`` of ``records`` chosen by a seeded hash of the file name (not of
    the full path: the same images wherever the dataset sits), in their original order."""
    k = int(round(fraction * len(records)))
    if k >= len(records):
        return list(records)
    keyed = sorted(range(len(records)), key=lambda i: (_rank(f"img/{PurePath(records[i].path).name}", seed),
                                                       records[i].path))
    keep = set(keyed[:k])
    return [r for i, r in enumerate(records) if i in keep]


def subset_identities(ds: ReIDDataset, n: int, seed: int = 0) -> ReIDDataset:
    """``ds`` cut to ``n`` training and ``n`` test identities (see the module docstring)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"subset_ids must be a positive integer, got {n!r}")
    name = ds.name
    notes = list(ds.notes)

    # train
    train_pool = {r.pid for r in ds.train if not is_distractor(r.pid, name)}
    if ds.train and len(train_pool) > n:
        keep_train = set(choose_ids(train_pool, n, seed))
        frac = n / len(train_pool)
        train = [r for r in ds.train if r.pid in keep_train]
        train_dis = [r for r in ds.train if is_distractor(r.pid, name)]
        if train_dis:
            kept = {id(r) for r in _share(train_dis, frac, seed)}
            train = [r for r in ds.train if r.pid in keep_train or id(r) in kept]
        train_note = f"{n} of {len(train_pool):,} training identities"
    else:
        train = list(ds.train)
        train_note = f"all {len(train_pool):,} training identities (not more than {n})" if ds.train else "no training split"

    # test: query identities; gallery-only identities and label distractors in proportion
    test_pool = {r.pid for r in ds.query if not is_distractor(r.pid, name)}
    if ds.query and len(test_pool) > n:
        keep_test = set(choose_ids(test_pool, n, seed))
        frac = n / len(test_pool)
        gallery_only = {r.pid for r in ds.gallery if not is_distractor(r.pid, name)} - test_pool
        keep_extra = set(choose_ids(gallery_only, int(round(frac * len(gallery_only))), seed))
        dis_kept = {}
        for split_name, recs in (("query", ds.query), ("gallery", ds.gallery)):
            dis = [r for r in recs if is_distractor(r.pid, name)]
            dis_kept[split_name] = {id(r) for r in _share(dis, frac, seed)}
        query = [r for r in ds.query if r.pid in keep_test or id(r) in dis_kept["query"]]
        gallery = [r for r in ds.gallery
                   if r.pid in keep_test or r.pid in keep_extra or id(r) in dis_kept["gallery"]]
        n_dis = sum(is_distractor(r.pid, name) for r in ds.gallery)
        n_dis_kept = sum(is_distractor(r.pid, name) for r in gallery)
        test_note = f"{n} of {len(test_pool):,} test identities"
        extras = []
        if n_dis:
            extras.append(f"{n_dis_kept:,} of {n_dis:,} distractor images")
        if gallery_only:
            extras.append(f"{len(keep_extra):,} of {len(gallery_only):,} gallery-only identities")
        if extras:
            test_note += " (gallery keeps " + " and ".join(extras) + ", in proportion)"
    else:
        query, gallery = list(ds.query), list(ds.gallery)
        test_note = f"all {len(test_pool):,} test identities (not more than {n})" if ds.query else "no test split"

    notes.append(f"identity subset {n} (seed {seed}): {train_note}; {test_note}")
    return ReIDDataset(name, ds.root, train, query, gallery, notes=notes)


def load_subset(name: str, root=None, subset_ids: int | None = None, seed: int = 0, **kwargs) -> ReIDDataset:
    """``load_dataset(name, root, **kwargs)``, then :func:`subset_identities` when ``subset_ids`` is set."""

    key = ALIASES.get(name.lower(), name.lower())
    if key == "sysu30k" and subset_ids is not None and kwargs.get("load_train", True):
        return _sysu_subset(root, subset_ids, seed)
    ds = load_dataset(name, root, **kwargs)
    return subset_identities(ds, subset_ids, seed) if subset_ids is not None else ds


def _sysu_subset(root, n: int, seed: int) -> ReIDDataset:
    """SYSU-30k's subset without listing its 29.6M training images: the test split is read, the
    ``n`` training folders are chosen from the folder names alone (the same choice as
    :func:`subset_identities` makes on the full listing), and only their images are listed."""

    ds = subset_identities(load_dataset("sysu30k", root, load_train=False), n, seed)
    train_dir = ds.root / "sysu_train_set_all"
    if not train_dir.is_dir():
        load_dataset("sysu30k", root)  # raises the parser's error naming the missing folder
    folders = {int(f): f for f in sysu_train_folders(train_dir) if f.isdigit()}
    keep = choose_ids(folders, n, seed)
    train = []
    for pid in keep:
        for e in sorted(os.scandir(train_dir / folders[pid]), key=lambda e: e.name):
            if e.name.lower().endswith(IMAGE_SUFFIXES) and not e.name.startswith("."):
                train.append(Record(e.path, pid, -1))
    notes = ds.notes[:-1] + [ds.notes[-1].replace("no training split",
                                                  f"{len(keep)} of {len(folders):,} training folders (identities)")]
    return ReIDDataset(ds.name, ds.root, train, ds.query, ds.gallery, notes=notes)


def streams_sysu30k(profile) -> bool:
    """Whether a run of ``profile`` trains on SYSU-30k, whose 29.6M training images are streamed from
    their folders and never listed unless an identity subset is asked for (the one place this is
    decided)."""
    return ALIASES.get(profile.data.dataset.lower(), profile.data.dataset.lower()) == "sysu30k"


def load_profile_dataset(profile, root=None, **kwargs) -> ReIDDataset:
    """The dataset a run of ``profile`` reads: ``profile.data.dataset`` under ``root``, cut to
    ``profile.data.subset_ids`` identities when that is set. The whole of SYSU-30k is checked and
    loaded without its training listing (its bags are streamed); a SYSU-30k subset lists the images
    of its kept training folders only."""
    d = profile.data
    if streams_sysu30k(profile) and d.subset_ids is None:
        check_sysu_tree(root)
        return load_dataset("sysu30k", root, load_train=False)
    return load_subset(d.dataset, root, d.subset_ids, d.subset_seed, **kwargs)

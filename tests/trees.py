"""Tiny dataset trees in each paper dataset's real layout, made from the embedded mini-MARS crops.

Every builder writes, under ``root``, the dataset folder the kit's parser
(:mod:`reidkit.data.datasets`) reads, and returns that folder (``load_dataset(name, path)``
accepts it, and so does its parent). The people are the sample's 32 real people: training
identities come from the sample's training people, test identities from its test people (disjoint,
as in the real datasets). Cameras are assigned round-robin over ``cams_per_id`` cameras of the
dataset's range, so every identity spans at least two cameras (the camera-aware memory and the
validation split need that). Sizes are small (tens of images) so dry runs stay fast, but large
enough to fill PK batches at a shrunken batch size: the defaults give 10 training identities x 6
images (e.g. batch 16 = 4 identities x 4 images).

=====================  ============================  =========================================
builder                folder returned               layout
=====================  ============================  =========================================
market1501_tree        Market-1501-v15.09.15         bounding_box_train/ query/ bounding_box_test/,
                                                     ``0002_c1s1_000451_03.jpg``, 0000 distractors
                                                     and -1 junk in the gallery
dukemtmcreid_tree      DukeMTMC-reID                 the same folders, ``0005_c2_f0046985.jpg``,
                                                     cameras 1..8, gallery-only distractor ids
msmt17_tree            MSMT17_V1                     ``layout="original"``: train/ test/ + the four
                                                     list_*.txt (train = list_train + list_val;
                                                     test pids restart at 0, as in the real set);
                                                     ``layout="converted"``: the Market folders
sysu30k_tree           SYSU-30k                      sysu_train_set_all/<10-digit folder>/ (one
                                                     label per folder; bags = 1, 3, 5 consecutive
                                                     folders), meta/train.txt, sysu_test_set_all/
                                                     query|gallery/<9-digit id>/ + gallery/0000others/
=====================  ============================  =========================================

:data:`PAPER_TREES` maps each paper profile's tree to ``(dataset name, builder, kwargs)``;
:func:`build_tree` builds one by that key.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

__all__ = ["market1501_tree", "dukemtmcreid_tree", "msmt17_tree", "sysu30k_tree", "build_tree",
           "PAPER_TREES", "sample_people"]


@lru_cache(maxsize=1)
def sample_people() -> dict[str, tuple[tuple[int, tuple[str, ...]], ...]]:
    """The sample's people: ``{"train": ((pid, paths), ...), "test": (...)}``, sorted by pid; each
    person's images sorted by file name (tracklet, then frame)."""
    from reidkit.data.datasets import load_dataset

    ds = load_dataset("mini-mars")
    out = {}
    for pool, splits in (("train", (ds.train,)), ("test", (ds.query, ds.gallery))):
        people: dict[int, set[str]] = defaultdict(set)
        for recs in splits:
            for r in recs:
                people[r.pid].add(r.path)
        out[pool] = tuple((pid, tuple(sorted(paths, key=lambda p: Path(p).name)))
                          for pid, paths in sorted(people.items()))
    return out


def _pick(paths: tuple[str, ...], n: int, offset: int = 0) -> list[str]:
    """``n`` images spread evenly over a person's frames (different tracklets where there are several)."""
    step = max(1, len(paths) // max(n, 1))
    return [paths[(offset + k * step) % len(paths)] for k in range(n)]


def _people(pool: str, n: int) -> list[tuple[int, tuple[str, ...]]]:
    people = sample_people()[pool]
    if n > len(people):
        raise ValueError(f"the sample has {len(people)} {pool} people, asked for {n}")
    return list(people[:n])


def _copy(src: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)


def _check_sizes(train_ids: int, per_id: int, test_ids: int, cams_per_id: int, max_cam: int) -> None:
    if train_ids < 1 or per_id < 1 or test_ids < 1:
        raise ValueError("train_ids, per_id and test_ids must be >= 1")
    if not 2 <= cams_per_id <= max_cam:
        raise ValueError(f"cams_per_id must be in 2..{max_cam}")


# ----------------------------------------------------------------------------------------------
# Market-style trees (Market-1501, DukeMTMC-reID, converted MSMT17)

def _market_style(base: Path, name_fn, train_ids: int, per_id: int, test_ids: int, gallery_per_id: int,
                  cams_per_id: int, max_cam: int, first_train_pid: int, first_test_pid: int,
                  distractors: list[tuple[int, int]]) -> Path:
    """Write bounding_box_train/ query/ bounding_box_test/. ``name_fn(pid, cam0, k)`` names a
    file (cam0 0-based). Each test id: one query in camera c, ``gallery_per_id`` gallery images in
    the other cameras of its round-robin set. ``distractors``: (pid, count) gallery-only images."""
    for i, (_, paths) in enumerate(_people("train", train_ids)):
        pid = first_train_pid + i
        for k, src in enumerate(_pick(paths, per_id)):
            cam = (i + k % cams_per_id) % max_cam
            _copy(src, base / "bounding_box_train" / name_fn(pid, cam, k))
    test_people = _people("test", test_ids)
    for i, (_, paths) in enumerate(test_people):
        pid = first_test_pid + i
        picks = _pick(paths, 1 + gallery_per_id)
        qcam = i % max_cam
        _copy(picks[0], base / "query" / name_fn(pid, qcam, 0))
        for k, src in enumerate(picks[1:], 1):
            cam = (qcam + 1 + (k - 1) % (cams_per_id - 1)) % max_cam
            _copy(src, base / "bounding_box_test" / name_fn(pid, cam, k))
    spare = sample_people()["test"][test_ids:] or sample_people()["train"][train_ids:]
    n = 0
    for pid, count in distractors:
        for k in range(count):
            _, paths = spare[n % len(spare)]
            _copy(paths[n % len(paths)], base / "bounding_box_test" / name_fn(pid, n % max_cam, 100 + n))
            n += 1
    return base


def market1501_tree(root: str | Path, train_ids: int = 10, per_id: int = 6, test_ids: int = 6,
                    gallery_per_id: int = 3, distractors: int = 3, junk: int = 1, cams_per_id: int = 3) -> Path:
    """``root/Market-1501-v15.09.15``: train pids from 0002, test pids from 1001; cameras c1..c6;
    gallery distractors (0000) and junk (-1) images."""
    _check_sizes(train_ids, per_id, test_ids, cams_per_id, 6)

    def name(pid, cam, k):
        pid_s = "-1" if pid == -1 else f"{pid:04d}"
        return f"{pid_s}_c{cam + 1}s1_{(k + 1) * 25:06d}_{k % 3:02d}.jpg"

    base = Path(root) / "Market-1501-v15.09.15"
    return _market_style(base, name, train_ids, per_id, test_ids, gallery_per_id, cams_per_id, 6, 2, 1001,
                         [(0, distractors), (-1, junk)])


def dukemtmcreid_tree(root: str | Path, train_ids: int = 10, per_id: int = 6, test_ids: int = 6,
                      gallery_per_id: int = 3, distractor_ids: int = 2, cams_per_id: int = 3) -> Path:
    """``root/DukeMTMC-reID``: ``0005_c2_f0046985.jpg`` names, cameras c1..c8 (the tree uses
    c6..c8 too), test pids from 0700, and gallery-only distractor identities (pids from 5000)."""
    _check_sizes(train_ids, per_id, test_ids, cams_per_id, 8)

    def name(pid, cam, k):
        return f"{pid:04d}_c{cam + 1}_f{46985 + 37 * k + pid:07d}.jpg"

    base = Path(root) / "DukeMTMC-reID"
    cams = max(cams_per_id, 3)
    _market_style(base, lambda p, c, k: name(p, (c + 5) % 8, k), train_ids, per_id, test_ids, gallery_per_id,
                  cams, 8, 1, 700, [(5000 + j, 1) for j in range(distractor_ids)])
    return base


# ----------------------------------------------------------------------------------------------
# MSMT17

def _msmt_name(pid: int, k: int, cam: int) -> str:
    """``0000_000_01_0303morning_0015_0.jpg``: pid, image index, camera 01..15, time, frame, 0."""
    return f"{pid:04d}_{k:03d}_{cam + 1:02d}_0303morning_{15 + 7 * k:04d}_0.jpg"


def msmt17_tree(root: str | Path, layout: str = "original", train_ids: int = 10, per_id: int = 6,
                test_ids: int = 6, gallery_per_id: int = 3, val_per_id: int = 1, cams_per_id: int = 3) -> Path:
    """``root/MSMT17_V1`` in the original layout (``train/<pid>/`` + ``test/<pid>/`` and the
    four ``list_*.txt``; the last ``val_per_id`` images of each training id go to list_val.txt;
    test pids restart at 0, so train and test pid numbers overlap as in the real set) or the
    converted one (the Market folders with ``<pid>_c<cam>_...`` names, cameras up to 15)."""
    _check_sizes(train_ids, per_id, test_ids, cams_per_id, 15)
    base = Path(root) / "MSMT17_V1"
    if layout == "converted":
        def name(pid, cam, k):
            return f"{pid:04d}_c{cam + 1}_{k:04d}.jpg"

        # cameras 10..15 used as well: two-digit camera numbers must parse
        return _market_style(base, lambda p, c, k: name(p, (c + 9) % 15, k), train_ids, per_id, test_ids,
                             gallery_per_id, cams_per_id, 15, 0, 2000, [])
    if layout != "original":
        raise ValueError(f"layout must be 'original' or 'converted', got {layout!r}")
    if not 0 <= val_per_id < per_id:
        raise ValueError("val_per_id must leave at least one list_train image per id")
    lists: dict[str, list[str]] = {k: [] for k in ("train", "val", "query", "gallery")}
    for pid, (_, paths) in enumerate(_people("train", train_ids)):
        for k, src in enumerate(_pick(paths, per_id)):
            cam = (pid + 9 + k % cams_per_id) % 15   # cameras 10..15 too: two-digit numbers
            rel = f"{pid:04d}/{_msmt_name(pid, k, cam)}"
            _copy(src, base / "train" / rel)
            lists["val" if k >= per_id - val_per_id else "train"].append(f"{rel} {pid}")
    for pid, (_, paths) in enumerate(_people("test", test_ids)):
        picks = _pick(paths, 1 + gallery_per_id)
        qcam = pid % 15
        for k, src in enumerate(picks):
            cam = qcam if k == 0 else (qcam + 1 + (k - 1) % (cams_per_id - 1)) % 15
            rel = f"{pid:04d}/{_msmt_name(pid, k, cam)}"
            _copy(src, base / "test" / rel)
            lists["query" if k == 0 else "gallery"].append(f"{rel} {pid}")
    for key, lines in lists.items():
        (base / f"list_{key}.txt").write_text("\n".join(lines) + "\n")
    return base


# ----------------------------------------------------------------------------------------------
# SYSU-30k

def sysu30k_tree(root: str | Path, folders: int = 12, per_folder: int = 4, test_ids: int = 4,
                 distractors: int = 8, meta: bool = True, others: bool = True, bag_json: bool = False) -> Path:
    """``root/SYSU-30k`` in the released layout.

    - ``sysu_train_set_all/0000000001 .. <folders>/``: one person per folder (training people of
      the sample, reused round-robin past 16), ``per_folder`` images ``<folder>_<k>.jpg``; the
      bags are 1, 3 and 5 consecutive folders (:mod:`reidkit.data.sysu`);
    - ``meta/train.txt`` (``meta=True``): ``<folder>/<file>`` per line, sorted;
    - ``sysu_test_set_all/query/<9-digit id>/<id>_c2_2.jpg`` and ``gallery/<id>/<id>_c1_1.jpg``
      for ``test_ids`` identities numbered after the last training folder, as in the real set;
    - ``gallery/0000others/0000others_c1_<n>.jpg`` (``others=True``): ``distractors`` images;
    - ``bag_level_label.json`` (``bag_json=True``): the maintainers' bag list for these folders.
    """
    if folders < 1 or per_folder < 1 or test_ids < 1:
        raise ValueError("folders, per_folder and test_ids must be >= 1")
    base = Path(root) / "SYSU-30k"
    train_dir = base / "sysu_train_set_all"
    train_people = sample_people()["train"]
    lines = []
    for f in range(1, folders + 1):
        folder = f"{f:010d}"
        _, paths = train_people[(f - 1) % len(train_people)]
        for k, src in enumerate(_pick(paths, per_folder, offset=(f - 1) // len(train_people))):
            fname = f"{folder}_{k:04d}.jpg"
            _copy(src, train_dir / folder / fname)
            lines.append(f"{folder}/{fname}")
    if meta:
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / "train.txt").write_text("\n".join(lines) + "\n")
    test = base / "sysu_test_set_all"
    for i, (_, paths) in enumerate(_people("test", test_ids)):
        ident = f"{folders + 1 + i:09d}"
        q, g = _pick(paths, 2)
        _copy(q, test / "query" / ident / f"{ident}_c2_2.jpg")
        _copy(g, test / "gallery" / ident / f"{ident}_c1_1.jpg")
    if others:
        spare = sample_people()["test"][test_ids:] or train_people
        for n in range(distractors):
            _, paths = spare[n % len(spare)]
            _copy(paths[(3 * n) % len(paths)], test / "gallery" / "0000others" / f"0000others_c1_{n + 1}.jpg")
    if bag_json:
        from reidkit.data.sysu30k import sysu_consecutive_bags

        bags = [{"BagLabel": list(b.labels), "BagID": b.bag_id, "BagImages": [f"{x}/*" for x in b.folders]}
                for b in sysu_consecutive_bags([f"{f:010d}" for f in range(1, folders + 1)])]
        (base / "bag_level_label.json").write_text(json.dumps(bags))
    return base


# ----------------------------------------------------------------------------------------------

#: the five trees of the paper profiles' dry runs: key -> (dataset name, builder, keyword arguments)
PAPER_TREES = {
    "market1501": ("market1501", market1501_tree, {}),
    "dukemtmcreid": ("dukemtmcreid", dukemtmcreid_tree, {}),
    "msmt17": ("msmt17", msmt17_tree, {"layout": "original"}),
    "msmt17-converted": ("msmt17", msmt17_tree, {"layout": "converted"}),
    "sysu30k": ("sysu30k", sysu30k_tree, {}),
}


def build_tree(key: str, root: str | Path, **kwargs) -> Path:
    """Build the tree ``key`` of :data:`PAPER_TREES` under ``root``; returns the dataset folder."""
    if key not in PAPER_TREES:
        raise KeyError(f"unknown tree {key!r}; known: {', '.join(PAPER_TREES)}")
    _, builder, defaults = PAPER_TREES[key]
    return builder(root, **{**defaults, **kwargs})


def folder_tree(root, ds):
    """The tiny dataset in the plain folder layout (camera as a _c<k> token), linked to the sample."""
    for split in ("train", "query", "gallery"):
        for i, r in enumerate(getattr(ds, split)):
            d = root / split / f"{r.pid:04d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{r.pid:04d}_c{r.camid + 1}_{i:04d}.jpg").symlink_to(r.path)
    return root

"""Dataset parsers: every layout the HHCL and DGL papers use, read into plain records.

A record is ``(path, pid, camid, tracklet, bag)``: the image file, the person id as written in
the dataset (``pid``; 0 is a distractor in Market-style galleries, -1000 a SYSU-30k distractor),
the 0-based camera, and, where the dataset has them, the tracklet (MARS; numbered within its
split) or bag (SYSU-30k) the image belongs to (-1 otherwise). Parsers never relabel: ``relabel`` maps pids to 0..C-1 when a
training loop needs class indices.

Every parser takes the dataset folder itself or a parent of it (``DATA_ROOT``); the folder names
the reference code expects are searched in order, and a wrong layout raises ``LayoutError``
naming what was expected where (an empty split names its folder or list file).

Checks before a paper-scale run spends GPU time: :func:`check_sysu_tree` (every part of a SYSU-30k
tree the ``sysu30k`` profile needs, read from a few directory entries) and
:func:`check_batch_fill` (the training split can fill one P x K batch; DGL checks it at start).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

from reidkit.data import sysu

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class LayoutError(ValueError):
    """The folder does not hold the expected dataset layout."""


class CorruptImageError(OSError):
    """An image file could not be decoded; ``path`` names it."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        super().__init__(f"unreadable image {self.path}: {reason}")


class Record(NamedTuple):
    path: str
    pid: int
    camid: int
    tracklet: int = -1
    bag: int = -1


@dataclass
class SplitStats:
    ids: int
    images: int
    cameras: int


@dataclass
class ReIDDataset:
    """A parsed dataset: train / query / gallery record lists plus where it came from."""

    name: str
    root: Path
    train: list[Record]
    query: list[Record]
    gallery: list[Record]
    notes: list[str] = field(default_factory=list)

    def splits(self) -> dict[str, list[Record]]:
        return {"train": self.train, "query": self.query, "gallery": self.gallery}

    def stats(self) -> dict[str, SplitStats]:
        return {name: split_stats(recs) for name, recs in self.splits().items()}

    def stats_dict(self) -> dict:
        return {name: vars(st) for name, st in self.stats().items()}

    def table(self) -> str:
        rows = [("split", "identities", "images", "cameras")]
        for name, st in self.stats().items():
            rows.append((name, f"{st.ids:,}", f"{st.images:,}", f"{st.cameras:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"{self.name} at {self.root}"]
        for j, r in enumerate(rows):
            lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def split_stats(records: Sequence[Record]) -> SplitStats:
    return SplitStats(
        ids=len({r.pid for r in records}),
        images=len(records),
        cameras=len({r.camid for r in records if r.camid >= 0}),
    )


class BatchFillError(ValueError):
    """The training split cannot fill one batch of the profile (too few identities or images)."""


def check_batch_fill(records: Sequence[Record], ids_per_batch: int, images_per_id: int, what: str,
                     hint: str = "") -> None:
    """Raise :class:`BatchFillError` when ``records`` cannot fill one P x K batch: fewer than
    ``ids_per_batch`` identities, or fewer images than ``ids_per_batch * images_per_id`` (a PK
    sampler repeats the images of a small identity, but not identities). For HHCL the identities
    are an upper bound of the pseudo-identities clustering can find. ``what`` names the split,
    ``hint`` the settings to change."""
    n_ids, n_img = len({r.pid for r in records}), len(records)
    batch = ids_per_batch * images_per_id
    problems = []
    if n_ids < ids_per_batch:
        problems.append(f"{n_ids} identities, and a batch takes {ids_per_batch} ({ids_per_batch} x {images_per_id} "
                        f"= {batch} images)")
    if n_img < batch:
        problems.append(f"{n_img} images, fewer than one batch of {batch}")
    if problems:
        raise BatchFillError(f"{what} cannot fill a batch: " + "; ".join(problems) + (f". {hint}" if hint else ""))


def relabel(records: Sequence[Record]) -> tuple[list[int], dict[int, int]]:
    """Map pids to 0..C-1 in sorted pid order (deterministic, unlike a Python set's order)."""
    mapping = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    return [mapping[r.pid] for r in records], mapping


# --------------------------------------------------------------------------------------------
# registry

PARSERS: dict[str, Callable[..., ReIDDataset]] = {}
ALIASES = {"market": "market1501", "duke": "dukemtmcreid", "dukemtmc": "dukemtmcreid",
           "msmt": "msmt17", "sysu": "sysu30k", "mars": "mars", "folder": "folder"}


def register(name: str):
    def deco(fn):
        PARSERS[name] = fn
        return fn

    return deco


def dataset_names() -> list[str]:
    return sorted(PARSERS)


def load_dataset(name: str, root: str | Path | None = None, **kwargs) -> ReIDDataset:
    """Parse dataset ``name`` under ``root``. ``mini-mars`` with no root reads the embedded sample."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PARSERS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}")
    if root is None:
        if key != "mini-mars":
            raise LayoutError(f"dataset {name!r} needs a root folder (DATA_ROOT)")
    return PARSERS[key](root, **kwargs)


# --------------------------------------------------------------------------------------------
# helpers

def _list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted; hidden files (``._x.jpg`` macOS forks) skipped."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def _list_subdirs(folder: Path) -> list[Path]:
    """Sub-folders of ``folder``, sorted; hidden ones (``.ipynb_checkpoints``) skipped."""
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _find_root(root: str | Path, candidates: Sequence[str], required: Sequence[str], dataset: str) -> Path:
    """Return the first of ``root/<candidate>`` (and ``root`` itself) that holds every ``required`` entry."""
    root = Path(root).expanduser()
    if not root.exists():
        raise LayoutError(f"{dataset}: data root {root} does not exist")
    tried = [root] + [root / c for c in candidates]
    for cand in tried:
        if all((cand / r).exists() for r in required):
            return cand
    # name what is missing in the most plausible candidate (the first that exists)
    best = next((c for c in tried if c.exists() and any((c / r).exists() for r in required)), root)
    missing = [r for r in required if not (best / r).exists()]
    where = ", ".join(str(c) for c in tried)
    raise LayoutError(
        f"{dataset}: expected {', '.join(r for r in required)} inside the dataset folder; "
        f"in {best} missing: {', '.join(missing)}. Looked in: {where}"
    )


def _is_empty_dir(folder: Path) -> bool:
    """True when ``folder`` is a directory with no visible entry (reads one entry, not the listing)."""
    if not folder.is_dir():
        return False
    with os.scandir(folder) as it:
        return not any(not e.name.startswith(".") for e in it)


def check_images(paths: Iterable[str | Path], progress_desc: str | None = None) -> list[CorruptImageError]:
    """Decode every image; return one error per unreadable file (empty list when all are fine)."""
    from PIL import Image

    from reidkit.utils import progress

    errors = []
    for p in progress(list(paths), desc=progress_desc or "checking images"):
        try:
            with Image.open(p) as im:
                im.load()
        except Exception as exc:  # PIL raises several types
            errors.append(CorruptImageError(p, f"{type(exc).__name__}: {exc}"))
    return errors


# --------------------------------------------------------------------------------------------
# Market-1501, DukeMTMC-reID, MSMT17 (converted, Market-style)

_MARKET_RE = re.compile(r"^(-?\d+)_c(\d+)")


def parse_market_name(name: str, max_cam: int) -> tuple[int, int] | None:
    """``0002_c1s1_000451_03.jpg`` -> (2, 0). Returns None when the name does not match."""
    m = _MARKET_RE.search(name)
    if m is None:
        return None
    pid, cam = int(m.group(1)), int(m.group(2))
    if not 1 <= cam <= max_cam:
        raise LayoutError(f"camera c{cam} of {name} outside c1..c{max_cam}")
    return pid, cam - 1


_NAME_EXAMPLES = {"market1501": "0002_c1s1_000451_03.jpg", "dukemtmcreid": "0005_c2_f0046985.jpg",
                  "msmt17": "0000_c1_0000.jpg"}


def _market_split(folder: Path, max_cam: int, max_pid: int, dataset: str) -> list[Record]:
    records = []
    images = _list_images(folder)
    for p in images:
        try:
            parsed = parse_market_name(p.name, max_cam)
        except LayoutError as exc:
            raise LayoutError(f"{dataset}: {p}: {exc}") from None
        if parsed is None:
            raise LayoutError(
                f"{dataset}: file {p} does not follow the <pid>_c<camera>... naming "
                f"(e.g. 0002_c1s1_000451_03.jpg)")
        pid, camid = parsed
        if pid == -1:  # junk images: dropped in every split, as the reference loaders do
            continue
        if not 0 <= pid <= max_pid:
            raise LayoutError(f"{dataset}: {p}: pid {pid} outside 0..{max_pid}")
        records.append(Record(str(p), pid, camid))
    if not records:
        what = "only junk (-1) images" if images else "it is empty"
        example = _NAME_EXAMPLES.get(dataset, _NAME_EXAMPLES["market1501"])
        raise LayoutError(f"{dataset}: no images in {folder} ({what}; expected files named like "
                          f"{example}: is the download or extraction complete?)")
    return records


def _market_like(root, dataset: str, candidates: Sequence[str], max_cam: int, max_pid: int) -> ReIDDataset:
    subdirs = ("bounding_box_train", "query", "bounding_box_test")
    base = _find_root(root, candidates, subdirs, dataset)
    train = _market_split(base / "bounding_box_train", max_cam, max_pid, dataset)
    query = _market_split(base / "query", max_cam, max_pid, dataset)
    gallery = _market_split(base / "bounding_box_test", max_cam, max_pid, dataset)
    return ReIDDataset(dataset, base, train, query, gallery)


@register("market1501")
def market1501(root) -> ReIDDataset:
    """Market-1501: ``bounding_box_train/ query/ bounding_box_test/``; junk (-1) dropped,
    distractors (0000) kept in the gallery, cameras 1..6 read as 0..5."""
    return _market_like(root, "market1501",
                        ["Market-1501-v15.09.15", "market1501/Market-1501-v15.09.15", "market1501",
                         "Market-1501"], max_cam=6, max_pid=1501)


@register("dukemtmcreid")
def dukemtmcreid(root) -> ReIDDataset:
    """DukeMTMC-reID: the Market layout with cameras 1..8 (``0005_c2_f0046985.jpg``)."""
    return _market_like(root, "dukemtmcreid",
                        ["DukeMTMC-reID", "dukemtmcreid/DukeMTMC-reID", "dukemtmcreid"],
                        max_cam=8, max_pid=10_000)


# --------------------------------------------------------------------------------------------
# MSMT17, original layout (train/ test/ list_*.txt) or the converted Market-style one

_MSMT_NAME_RE = re.compile(r"^(\d+)_(\d+)_(\d+)")


def _msmt_list(base: Path, list_name: str, img_dir: str) -> list[Record]:
    list_path = base / list_name
    if _is_empty_dir(base / img_dir):
        raise LayoutError(f"msmt17: the image folder {base / img_dir} is empty ({list_name} names images "
                          f"inside it, e.g. {img_dir}/0000/0000_000_01_0303morning_0015_0.jpg)")
    records = []
    with open(list_path) as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            rel = parts[0]
            m = _MSMT_NAME_RE.match(os.path.basename(rel))
            if m is None:
                raise LayoutError(f"msmt17: {list_path}:{lineno}: {rel!r} is not <pid>_<idx>_<cam>_... .jpg")
            pid = int(parts[1]) if len(parts) > 1 else int(m.group(1))
            cam = int(m.group(3))
            if not 1 <= cam <= 15:
                raise LayoutError(f"msmt17: {list_path}:{lineno}: camera {cam} outside 1..15")
            path = base / img_dir / rel
            if not path.is_file():
                raise LayoutError(f"msmt17: {list_path}:{lineno} names {path}, which does not exist")
            records.append(Record(str(path), pid, cam - 1))
    if not records:
        raise LayoutError(f"msmt17: {list_path} lists no images (the split it defines is empty)")
    return records


@register("msmt17")
def msmt17(root) -> ReIDDataset:
    """MSMT17_V1 in either layout.

    - original: ``train/ test/ list_train.txt list_val.txt list_query.txt list_gallery.txt``;
      train = list_train + list_val (32,621 images), cameras 1..15 read as 0..14;
    - converted (what HHCL and Cluster-Contrast read): the Market layout with ``<pid>_c<cam>``
      names and multi-digit cameras.
    """
    root = Path(root)
    original = ("train", "test", "list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")
    cands = ["MSMT17_V1", "msmt17/MSMT17_V1", "msmt17", "MSMT17"]
    try:
        base = _find_root(root, cands, original, "msmt17")
    except LayoutError as err_original:
        try:
            return _market_like(root, "msmt17", cands, max_cam=15, max_pid=10_000)
        except LayoutError as err_converted:
            raise LayoutError(
                "msmt17: neither layout found.\n  original layout: " + str(err_original)
                + "\n  converted layout: " + str(err_converted)) from None
    train = _msmt_list(base, "list_train.txt", "train") + _msmt_list(base, "list_val.txt", "train")
    query = _msmt_list(base, "list_query.txt", "test")
    gallery = _msmt_list(base, "list_gallery.txt", "test")
    return ReIDDataset("msmt17", base, train, query, gallery, notes=["original layout: train = list_train + list_val"])


# --------------------------------------------------------------------------------------------
# MARS (and the embedded mini-MARS sample)

_MARS_RE = re.compile(r"^(\d{4}|00-1)C(\d)T(\d{4})F(\d{3})")


def parse_mars_name(name: str) -> tuple[int, int, int, int] | None:
    """``0003C4T0003F001.jpg`` -> (pid 3, camid 3, tracklet 3, frame 1); junk ``00-1`` -> pid -1."""
    m = _MARS_RE.match(name)
    if m is None:
        return None
    pid = -1 if m.group(1) == "00-1" else int(m.group(1))
    return pid, int(m.group(2)) - 1, int(m.group(3)), int(m.group(4))


def _mars_record(path: Path, tracklet: int) -> Record:
    parsed = parse_mars_name(path.name)
    if parsed is None:
        raise LayoutError(f"mars: file {path} does not follow <pid>C<cam>T<tracklet>F<frame>.jpg "
                          f"(e.g. 0003C4T0003F001.jpg)")
    pid, camid, _, _ = parsed
    if not 0 <= camid <= 5:
        raise LayoutError(f"mars: {path}: camera outside C1..C6")
    return Record(str(path), pid, camid, tracklet)


MARS_JSON_SPLITS = tuple(f"splits/{s}.json" for s in ("train", "query", "gallery"))
MARS_INFO_FILES = tuple(f"info/{f}" for f in ("train_name.txt", "test_name.txt", "tracks_train_info.mat",
                                              "tracks_test_info.mat", "query_IDX.mat"))


def _mars_from_json(base: Path) -> tuple[list[Record], list[Record], list[Record]]:
    """``splits/{train,query,gallery}.json``: one entry per tracklet. The pid and camera are read
    from the file names (train.json's ``pid`` is a relabel); ``tracklet`` is the entry's index."""
    out = []
    for rel_split in MARS_JSON_SPLITS:
        path = base / rel_split
        try:
            entries = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise LayoutError(f"mars: {path} is not valid JSON: {exc}") from None
        if not isinstance(entries, list):
            raise LayoutError(f"mars: {path} must hold a list of tracklet records")
        records = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "img_paths" not in entry:
                raise LayoutError(f"mars: {path}: entry {i} has no 'img_paths'")
            for rel in entry["img_paths"]:
                p = base / rel
                if not p.is_file():
                    raise LayoutError(f"mars: {path}: entry {i} names {p}, which does not exist")
                rec = _mars_record(p, i)
                if rec.pid == -1:  # junk (00-1), dropped in every split as with the info/ files
                    continue
                records.append(rec)
        out.append(records)
    return out[0], out[1], out[2]


def _mars_from_info(base: Path) -> tuple[list[Record], list[Record], list[Record]]:
    """The official MARS split: ``info/{train_name,test_name}.txt``, ``tracks_*_info.mat`` (rows
    ``[start, end, pid, camid]``, 1-based inclusive frame ranges into the name lists) and
    ``query_IDX.mat`` (1-based rows of the test tracks). Gallery = the test tracks that are not
    queries. Junk (``00-1``) frames are dropped, distractors (``0000``) kept; ``tracklet`` is the
    row of the tracks matrix."""
    from scipy.io import loadmat

    info = base / "info"

    def names(fname, img_dir):
        lines = [ln.strip() for ln in (info / fname).read_text().splitlines() if ln.strip()]
        return [base / img_dir / ln[:4] / ln for ln in lines]

    def matrix(fname):
        try:
            mat = loadmat(str(info / fname))
        except Exception as exc:  # scipy raises ValueError / MatReadError / TypeError
            raise LayoutError(f"mars: {info / fname} is not a readable .mat file: {exc}") from None
        keys = [k for k in mat if not k.startswith("__")]
        if not keys:
            raise LayoutError(f"mars: {info / fname} holds no matrix")
        return mat[keys[0]]

    train_names, test_names = names("train_name.txt", "bbox_train"), names("test_name.txt", "bbox_test")
    tr_tracks, te_tracks = matrix("tracks_train_info.mat"), matrix("tracks_test_info.mat")
    for fname, tracks in (("tracks_train_info.mat", tr_tracks), ("tracks_test_info.mat", te_tracks)):
        if tracks.ndim != 2 or tracks.shape[1] < 2:
            raise LayoutError(f"mars: {info / fname}: expected rows [start, end, pid, camid], got shape {tracks.shape}")
    query_rows = sorted({int(q) - 1 for q in matrix("query_IDX.mat").reshape(-1)})
    if query_rows and not (0 <= query_rows[0] and query_rows[-1] < len(te_tracks)):
        raise LayoutError(f"mars: {info / 'query_IDX.mat'}: indices outside 1..{len(te_tracks)}")
    query_set = set(query_rows)

    def expand(fname, track_rows, all_names, keep_rows):
        recs = []
        for row in keep_rows:
            start, end = int(track_rows[row, 0]) - 1, int(track_rows[row, 1])
            if not 0 <= start < end <= len(all_names):
                raise LayoutError(f"mars: {info / fname}: row {row + 1} spans frames {start + 1}..{end}, "
                                  f"outside the {len(all_names)} names of its name list")
            for p in all_names[start:end]:
                rec = _mars_record(p, row)
                if rec.pid != -1:
                    recs.append(rec)
        return recs

    train = expand("tracks_train_info.mat", tr_tracks, train_names, range(len(tr_tracks)))
    query = expand("tracks_test_info.mat", te_tracks, test_names, query_rows)
    gallery = expand("tracks_test_info.mat", te_tracks, test_names,
                     [i for i in range(len(te_tracks)) if i not in query_set])
    return train, query, gallery


@register("mars")
def mars(root) -> ReIDDataset:
    """MARS: ``bbox_train/<pid>/<pid>C<cam>T<tracklet>F<frame>.jpg`` and ``bbox_test/``, with the
    split read from ``splits/{train,query,gallery}.json`` (the mini-MARS format) or from the
    official ``info/`` files. Records are per image; ``Record.tracklet`` numbers the tracklet
    within its split (the T number of a file name repeats across identities, so it is not used)."""
    base = _find_root(root, ["MARS", "mars", "mini-mars"], ("bbox_train", "bbox_test"), "mars")
    json_missing = [f for f in MARS_JSON_SPLITS if not (base / f).is_file()]
    info_missing = [f for f in MARS_INFO_FILES if not (base / f).is_file()]
    if not json_missing:
        train, query, gallery = _mars_from_json(base)
        note = "split from splits/*.json"
    elif not info_missing:
        train, query, gallery = _mars_from_info(base)
        note = "split from info/ (official MARS files)"
    else:
        partial = ""
        if len(json_missing) < len(MARS_JSON_SPLITS):
            partial = f"; missing {', '.join(json_missing)}"
        elif len(info_missing) < len(MARS_INFO_FILES):
            partial = f"; missing {', '.join(info_missing)}"
        raise LayoutError(
            f"mars: {base} has bbox_train/ and bbox_test/ but no complete split files: expected "
            f"{', '.join(MARS_JSON_SPLITS)} (mini-MARS) or {', '.join(MARS_INFO_FILES)} (official MARS)"
            + partial)
    return ReIDDataset("mars", base, train, query, gallery, notes=[note])


@register("mini-mars")
def mini_mars(root=None) -> ReIDDataset:
    """The real mini-MARS sample that ships inside the kit (or a copy of it under ``root``)."""
    from reidkit.data.sample import sample_root

    ds = mars(root if root is not None else sample_root())
    ds.name = "mini-mars"
    return ds


# --------------------------------------------------------------------------------------------
# SYSU-30k

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
    import numpy as np

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
    import numpy as np

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
    from collections import deque

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


# --------------------------------------------------------------------------------------------
# a plain folder per identity (users' own data)

_CAM_RE = re.compile(r"(?:^|[_\-])[cC](\d+)")


@register("folder")
def folder(root) -> ReIDDataset:
    """Your own data: ``ROOT/train/<identity>/*.jpg`` plus optional ``ROOT/query/`` and
    ``ROOT/gallery/`` in the same form. The camera is read from a ``_c<k>`` / ``c<k>`` token in the
    file name when there is one (1-based, so ``c1`` is camera 0); without cameras, train images get
    camera -1, query images camera -1 and gallery images camera 0, so that no gallery image is
    excluded as same-camera. Identity folder names that are all plain numbers (with no two naming
    the same number, like ``7`` and ``007``) are the pids; otherwise names are numbered 1.. in
    sorted order, the same in every split."""
    base = _find_root(root, [], ("train",), "folder")
    found: dict[str, list[tuple[str, Path, int]]] = {}
    for split in ("train", "query", "gallery"):
        d = base / split
        found[split] = []
        if not d.is_dir():
            continue
        ids = _list_subdirs(d)
        if not ids:
            raise LayoutError(f"folder: {d} holds no identity sub-folders (expected {d}/<identity>/*.jpg)")
        for ident in ids:
            for p in _list_images(ident):
                m = _CAM_RE.search(p.stem)
                if m is not None and int(m.group(1)) == 0:
                    raise LayoutError(f"folder: {p}: camera token c0; camera tokens are 1-based (c1, c2, ...)")
                cam = int(m.group(1)) - 1 if m else (0 if split == "gallery" else -1)
                found[split].append((ident.name, p, cam))
    names = sorted({n for recs in found.values() for n, _, _ in recs})
    if all(n.isdigit() for n in names) and len({int(n) for n in names}) == len(names):
        pid_of = {n: int(n) for n in names}
    else:  # non-numeric (or clashing) identity names: numbered 1.. in sorted order, the same in every split
        pid_of = {n: i + 1 for i, n in enumerate(names)}
    out = {split: [Record(str(p), pid_of[n], cam) for n, p, cam in recs] for split, recs in found.items()}
    if not out["train"]:
        raise LayoutError(f"folder: no images under {base / 'train'}/<identity>/")
    if bool(out["query"]) != bool(out["gallery"]):
        have, lack = ("query", "gallery") if out["query"] else ("gallery", "query")
        raise LayoutError(f"folder: {base} has images in {have}/ but none in {base / lack}/<identity>/; "
                          f"give both query/ and gallery/ or neither")
    return ReIDDataset("folder", base, out["train"], out["query"], out["gallery"])

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
from pathlib import Path
from typing import Callable, Sequence

from scipy.io import loadmat

from reidkit.data.records import (
    LayoutError,
    Record,
    ReIDDataset,
    _find_root,
    _is_empty_dir,
    _list_images,
    _list_subdirs,
)
from reidkit.data.sample import sample_root

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

    ds = mars(root if root is not None else sample_root())
    ds.name = "mini-mars"
    return ds


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

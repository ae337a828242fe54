"""Dataset parsers: small trees in every real layout, with real-format file names.

Each test builds its own tree under ``tmp_path`` (nothing here reads a shared data folder). The
parsers never decode images, so most files are empty; the tests that decode write real JPEGs.
"""

from __future__ import annotations

import inspect
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from reidkit.data import datasets as D
from reidkit.data import sysu30k
from reidkit.data.datasets import load_dataset, register
from reidkit.data.records import CorruptImageError, LayoutError, Record, ReIDDataset, check_images, relabel
from reidkit.data.sysu30k import Bag, iter_sysu_train, read_bag_level_labels, sysu_consecutive_bags


def touch(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def jpeg_bytes(seed: int = 0, size=(16, 32)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def names(records) -> list[str]:
    return [Path(r.path).name for r in records]


def by_name(records) -> dict[str, Record]:
    return {Path(r.path).name: r for r in records}


# ---------------------------------------------------------------------------------------------
# Market-1501

MARKET_TRAIN = ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0007_c3s3_015143_04.jpg",
                "0007_c6s3_085567_02.jpg", "1501_c4s6_000101_01.jpg", "-1_c3s1_000001_00.jpg"]
MARKET_QUERY = ["0002_c5s1_000401_00.jpg", "0007_c1s4_001234_00.jpg", "1501_c6s4_000222_00.jpg",
                "-1_c1s1_000002_00.jpg"]
MARKET_GALLERY = ["0002_c1s1_000551_01.jpg", "0007_c4s1_000101_02.jpg", "1501_c2s1_002001_03.jpg",
                  "0000_c1s1_000123_01.jpg", "0000_c6s2_000333_04.jpg", "-1_c3s1_000001_00.jpg",
                  "-1_c2s1_000010_00.jpg"]


def make_market(base: Path, train=MARKET_TRAIN, query=MARKET_QUERY, gallery=MARKET_GALLERY) -> Path:
    for sub, files in (("bounding_box_train", train), ("query", query), ("bounding_box_test", gallery)):
        (base / sub).mkdir(parents=True, exist_ok=True)
        for f in files:
            touch(base / sub / f)
    # things a real copy carries that are not images of the split
    touch(base / "bounding_box_train" / "Thumbs.db")
    touch(base / "bounding_box_test" / "._0002_c1s1_000551_01.jpg")  # macOS resource fork
    (base / "gt_bbox").mkdir(exist_ok=True)
    return base


@pytest.mark.parametrize("where", ["data_root", "itself", "keyed", "key_folder"])
def test_market_reached_from_parent_itself_and_keyed_folder(tmp_path, where):
    data_root = tmp_path / "DATA_ROOT"
    if where == "keyed" or where == "key_folder":
        ds_dir = make_market(data_root / "market1501" / "Market-1501-v15.09.15")
    else:
        ds_dir = make_market(data_root / "Market-1501-v15.09.15")
    root = {"data_root": data_root, "itself": ds_dir, "keyed": data_root,
            "key_folder": data_root / "market1501"}[where]
    ds = load_dataset("market1501", root)
    assert isinstance(ds, ReIDDataset)
    assert ds.root == ds_dir
    assert ds.name == "market1501"
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (5, 3, 5)


def test_market_pids_camids_junk_and_distractors(tmp_path):
    ds = load_dataset("market", make_market(tmp_path / "Market-1501-v15.09.15"))  # alias
    train, query, gallery = by_name(ds.train), by_name(ds.query), by_name(ds.gallery)
    # junk (-1) dropped in every split
    assert all(r.pid != -1 for split in ds.splits().values() for r in split)
    assert not any(n.startswith("-1_") for split in ds.splits().values() for n in names(split))
    # pid as written (no relabelling), camera 0-based
    assert train["0002_c1s1_000451_03.jpg"][1:3] == (2, 0)
    assert train["0007_c6s3_085567_02.jpg"][1:3] == (7, 5)
    assert train["1501_c4s6_000101_01.jpg"][1:3] == (1501, 3)
    assert query["0002_c5s1_000401_00.jpg"][1:3] == (2, 4)
    # distractors (0000) kept in the gallery as pid 0
    assert sorted(n for n, r in gallery.items() if r.pid == 0) == ["0000_c1s1_000123_01.jpg",
                                                                    "0000_c6s2_000333_04.jpg"]
    assert gallery["0000_c6s2_000333_04.jpg"].camid == 5
    # hidden files and non-images ignored; tracklet / bag unset
    assert "._0002_c1s1_000551_01.jpg" not in gallery
    assert all(r.tracklet == -1 and r.bag == -1 for r in ds.train)
    assert {r.pid for r in ds.train} == {2, 7, 1501}
    assert sorted({r.camid for r in ds.gallery}) == [0, 1, 3, 5]
    stats = ds.stats()
    assert (stats["train"].ids, stats["train"].images, stats["train"].cameras) == (3, 5, 5)
    assert (stats["gallery"].ids, stats["gallery"].images) == (4, 5)
    assert "market1501" in ds.table() and "gallery" in ds.table()
    assert ds.stats_dict()["query"] == {"ids": 3, "images": 3, "cameras": 3}
    # records carry absolute, existing paths
    assert all(Path(r.path).is_file() for r in ds.train)


def test_market_missing_query_names_the_folder(tmp_path):
    base = make_market(tmp_path / "Market-1501-v15.09.15")
    (base / "query").rename(base / "queries")
    with pytest.raises(LayoutError) as exc:
        load_dataset("market1501", tmp_path)
    msg = str(exc.value)
    assert "missing: query" in msg
    assert str(base) in msg
    assert "bounding_box_train" in msg and "bounding_box_test" in msg


def test_market_nonexistent_root(tmp_path):
    with pytest.raises(LayoutError, match="does not exist"):
        load_dataset("market1501", tmp_path / "nope")


def test_market_bad_file_name_names_the_file(tmp_path):
    base = make_market(tmp_path / "Market-1501-v15.09.15")
    touch(base / "query" / "IMG_0001.jpg")
    with pytest.raises(LayoutError) as exc:
        load_dataset("market1501", tmp_path)
    msg = str(exc.value)
    assert str(base / "query" / "IMG_0001.jpg") in msg
    assert "0002_c1s1_000451_03.jpg" in msg  # the expected naming, by example


def test_market_camera_7_is_rejected_with_the_path(tmp_path):
    base = make_market(tmp_path / "Market-1501-v15.09.15")
    touch(base / "bounding_box_test" / "0002_c7s1_000551_01.jpg")
    with pytest.raises(LayoutError) as exc:
        load_dataset("market1501", tmp_path)
    msg = str(exc.value)
    assert "c7" in msg and "c1..c6" in msg
    assert str(base / "bounding_box_test" / "0002_c7s1_000551_01.jpg") in msg


def test_market_pid_out_of_range(tmp_path):
    base = make_market(tmp_path / "Market-1501-v15.09.15")
    touch(base / "bounding_box_train" / "1502_c1s1_000001_01.jpg")
    with pytest.raises(LayoutError, match="pid 1502 outside 0..1501"):
        load_dataset("market1501", tmp_path)


def test_market_empty_split(tmp_path):
    base = make_market(tmp_path / "Market-1501-v15.09.15", query=["-1_c1s1_000002_00.jpg"])
    with pytest.raises(LayoutError, match="no images in .*query"):
        load_dataset("market1501", base)


def test_market_name_parser():
    assert D.parse_market_name("0002_c1s1_000451_03.jpg", 6) == (2, 0)
    assert D.parse_market_name("-1_c3s1_000001_00.jpg", 6) == (-1, 2)
    assert D.parse_market_name("0000_c6s2_000333_04.jpg", 6) == (0, 5)
    assert D.parse_market_name("IMG_0001.jpg", 6) is None
    assert D.parse_market_name("._0002_c1s1_000451_03.jpg", 6) is None
    with pytest.raises(LayoutError, match="c7"):
        D.parse_market_name("0002_c7s1_000451_03.jpg", 6)


# ---------------------------------------------------------------------------------------------
# DukeMTMC-reID

def test_duke_cameras_up_to_8(tmp_path):
    base = tmp_path / "dukemtmcreid" / "DukeMTMC-reID"
    make_market(base, train=["0005_c2_f0046985.jpg", "0005_c5_f0051341.jpg", "0007_c8_f0123456.jpg"],
                query=["0005_c1_f0044102.jpg"], gallery=["0005_c6_f0099999.jpg", "0033_c7_f0000001.jpg"])
    ds = load_dataset("duke", tmp_path)
    assert ds.name == "dukemtmcreid" and ds.root == base
    assert by_name(ds.train)["0005_c2_f0046985.jpg"][1:3] == (5, 1)
    assert by_name(ds.train)["0007_c8_f0123456.jpg"][1:3] == (7, 7)
    assert [r.camid for r in ds.gallery] == [5, 6]
    assert load_dataset("dukemtmcreid", base).root == base
    touch(base / "query" / "0005_c9_f0044102.jpg")
    with pytest.raises(LayoutError, match="c9"):
        load_dataset("dukemtmcreid", base)


# ---------------------------------------------------------------------------------------------
# MSMT17

def make_msmt_original(base: Path) -> Path:
    lists = {
        "list_train.txt": ("train", [("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                                     ("0000/0000_001_05_0303morning_0036_1.jpg", 0),
                                     ("0001/0001_000_15_0303noon_0120_0.jpg", 1)]),
        "list_val.txt": ("train", [("0002/0002_000_07_0303afternoon_0011_0.jpg", 2)]),
        "list_query.txt": ("test", [("0000/0000_000_01_0303morning_0008_0.jpg", 0),
                                    ("0003/0003_002_10_0113noon_0042_1.jpg", 3)]),
        "list_gallery.txt": ("test", [("0000/0000_003_02_0303morning_0077_0.jpg", 0),
                                      ("0003/0003_004_14_0113noon_1042_0.jpg", 3),
                                      ("0004/0004_000_12_0113noon_0001_2.jpg", 4)]),
    }
    for list_name, (img_dir, entries) in lists.items():
        for rel, _ in entries:
            touch(base / img_dir / rel)
        (base / list_name).write_text("".join(f"{rel} {pid}\n" for rel, pid in entries) + "\n")
    return base


def test_msmt_original_layout(tmp_path):
    base = make_msmt_original(tmp_path / "msmt17" / "MSMT17_V1")
    for root in (tmp_path, base):
        ds = load_dataset("msmt17", root)
        assert ds.root == base
        # train = list_train + list_val, in that order
        assert names(ds.train) == ["0000_000_01_0303morning_0015_0.jpg", "0000_001_05_0303morning_0036_1.jpg",
                                   "0001_000_15_0303noon_0120_0.jpg", "0002_000_07_0303afternoon_0011_0.jpg"]
        assert [r.pid for r in ds.train] == [0, 0, 1, 2]
        # camera = third field, 0-based
        assert [r.camid for r in ds.train] == [0, 4, 14, 6]
        assert [(r.pid, r.camid) for r in ds.query] == [(0, 0), (3, 9)]
        assert [(r.pid, r.camid) for r in ds.gallery] == [(0, 1), (3, 13), (4, 11)]
        assert all(Path(r.path).is_file() for r in ds.gallery)
        assert Path(ds.query[0].path).parent.parent.name == "test"
        assert any("list_val" in n for n in ds.notes)


def test_msmt_original_list_names_missing_file(tmp_path):
    base = make_msmt_original(tmp_path / "MSMT17_V1")
    (base / "test" / "0003" / "0003_004_14_0113noon_1042_0.jpg").unlink()
    with pytest.raises(LayoutError) as exc:
        load_dataset("msmt17", tmp_path)
    assert "list_gallery.txt:2" in str(exc.value)
    assert "0003_004_14_0113noon_1042_0.jpg" in str(exc.value)


def test_msmt_original_bad_line(tmp_path):
    base = make_msmt_original(tmp_path / "MSMT17_V1")
    with open(base / "list_val.txt", "a") as fh:
        fh.write("0002/garbage.jpg 2\n")
    with pytest.raises(LayoutError, match=r"list_val.txt:3"):
        load_dataset("msmt17", base)


def test_msmt_converted_layout(tmp_path):
    base = tmp_path / "MSMT17_V1"
    make_market(base, train=["0001_c12s1_000123_00.jpg", "0001_c3s2_000456_01.jpg", "0002_c15s3_000001_00.jpg"],
                query=["0003_c1s1_000001_00.jpg"], gallery=["0003_c10s1_000002_00.jpg", "0004_c2s1_000003_00.jpg"])
    ds = load_dataset("msmt", tmp_path)
    assert ds.name == "msmt17" and ds.root == base
    assert [(r.pid, r.camid) for r in ds.train] == [(1, 11), (1, 2), (2, 14)]
    assert [(r.pid, r.camid) for r in ds.gallery] == [(3, 9), (4, 1)]
    touch(base / "query" / "0003_c16s1_000009_00.jpg")
    with pytest.raises(LayoutError, match="c16"):
        load_dataset("msmt17", tmp_path)


def test_msmt_neither_layout_explains_both(tmp_path):
    base = tmp_path / "MSMT17_V1"
    (base / "train").mkdir(parents=True)
    (base / "test").mkdir()
    (base / "list_train.txt").write_text("")
    with pytest.raises(LayoutError) as exc:
        load_dataset("msmt17", tmp_path)
    msg = str(exc.value)
    assert "neither layout" in msg
    assert "original layout" in msg and "list_val.txt" in msg and "list_gallery.txt" in msg
    assert "converted layout" in msg and "bounding_box_train" in msg


# ---------------------------------------------------------------------------------------------
# MARS: splits/*.json (mini-MARS format) and the official info/ files

def mars_frames(split_dir: str, pid: str, cam: int, tracklet: int, frames: int) -> list[str]:
    return [f"{split_dir}/{pid}/{pid}C{cam}T{tracklet:04d}F{f:03d}.jpg" for f in range(1, frames + 1)]


def make_mars_json(base: Path) -> Path:
    splits = {
        # train.json's pid is a 0-based relabel; the parser reads the pid from the file names
        "train": [(0, 0, mars_frames("bbox_train", "0001", 1, 1, 3)),
                  (0, 1, mars_frames("bbox_train", "0001", 2, 2, 2)),
                  (1, 2, mars_frames("bbox_train", "0005", 3, 1, 2))],
        "query": [(2, 0, mars_frames("bbox_test", "0002", 1, 1, 2)),
                  (6, 4, mars_frames("bbox_test", "0006", 5, 1, 1))],
        "gallery": [(2, 1, mars_frames("bbox_test", "0002", 2, 1, 3)),
                    (6, 5, mars_frames("bbox_test", "0006", 6, 3, 2)),
                    (0, 3, mars_frames("bbox_test", "0000", 4, 1, 1)),
                    (-1, 2, mars_frames("bbox_test", "00-1", 3, 1, 2))],
    }
    for split, entries in splits.items():
        recs = []
        for pid, camid, paths in entries:
            for rel in paths:
                touch(base / rel)
            recs.append({"pid": pid, "camid": camid, "img_paths": paths, "tracklet_length": len(paths)})
        touch(base / "splits" / f"{split}.json", json.dumps(recs).encode())
    return base


def test_mars_json_split(tmp_path):
    base = make_mars_json(tmp_path / "MARS")
    ds = load_dataset("mars", tmp_path)
    assert ds.root == base and ds.name == "mars"
    assert "splits/*.json" in ds.notes[0]
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (7, 3, 6)
    # pids from the file names, not the relabelled json pid
    assert [r.pid for r in ds.train] == [1, 1, 1, 1, 1, 5, 5]
    assert [r.camid for r in ds.train] == [0, 0, 0, 1, 1, 2, 2]
    # tracklet = index of the tracklet record within its split
    assert [r.tracklet for r in ds.train] == [0, 0, 0, 1, 1, 2, 2]
    assert [(r.pid, r.camid, r.tracklet) for r in ds.query] == [(2, 0, 0), (2, 0, 0), (6, 4, 1)]
    # junk 00-1 dropped, distractor 0000 kept
    assert Counter(r.pid for r in ds.gallery) == {2: 3, 6: 2, 0: 1}
    assert by_name(ds.gallery)["0000C4T0001F001.jpg"][1:] == (0, 3, 2, -1)
    assert not any(n.startswith("00-1") for n in names(ds.gallery))


def test_mars_json_missing_frame_and_bad_name(tmp_path):
    base = make_mars_json(tmp_path / "MARS")
    (base / "bbox_test" / "0006" / "0006C5T0001F001.jpg").unlink()
    with pytest.raises(LayoutError) as exc:
        load_dataset("mars", base)
    assert "query.json" in str(exc.value) and "0006C5T0001F001.jpg" in str(exc.value)

    base = make_mars_json(tmp_path / "other" / "MARS")
    entries = json.loads((base / "splits" / "train.json").read_text())
    touch(base / "bbox_train" / "0001" / "frame1.jpg")
    entries[0]["img_paths"].append("bbox_train/0001/frame1.jpg")
    (base / "splits" / "train.json").write_text(json.dumps(entries))
    with pytest.raises(LayoutError, match=r"frame1\.jpg does not follow <pid>C<cam>T<tracklet>F<frame>"):
        load_dataset("mars", base)

    (base / "splits" / "train.json").write_text("{not json")
    with pytest.raises(LayoutError, match="not valid JSON"):
        load_dataset("mars", base)


TEST_NAMES = ["0002C1T0001F001.jpg", "0002C1T0001F002.jpg", "0002C3T0001F001.jpg", "0004C2T0001F001.jpg",
              "0004C4T0001F001.jpg", "0004C4T0001F002.jpg", "00-1C1T0001F001.jpg", "00-1C1T0001F002.jpg",
              "0000C5T0001F001.jpg"]
TRAIN_NAMES = ["0001C1T0001F001.jpg", "0001C1T0001F002.jpg", "0001C2T0001F001.jpg", "0003C1T0001F001.jpg",
               "0003C1T0001F002.jpg"]


def make_mars_info(base: Path) -> Path:
    from scipy.io import savemat

    for name in TRAIN_NAMES:
        touch(base / "bbox_train" / name[:4] / name)
    for name in TEST_NAMES:
        touch(base / "bbox_test" / name[:4] / name)
    info = base / "info"
    info.mkdir(parents=True)
    (info / "train_name.txt").write_text("\n".join(TRAIN_NAMES) + "\n")
    (info / "test_name.txt").write_text("\n".join(TEST_NAMES) + "\n")
    # rows [start, end, pid, camid], 1-based inclusive frame ranges
    savemat(str(info / "tracks_train_info.mat"),
            {"track_train_info": np.array([[1, 2, 1, 1], [3, 3, 1, 2], [4, 5, 3, 1]], dtype=float)})
    savemat(str(info / "tracks_test_info.mat"),
            {"track_test_info": np.array([[1, 2, 2, 1], [3, 3, 2, 3], [4, 4, 4, 2], [5, 6, 4, 4],
                                          [7, 8, -1, 1], [9, 9, 0, 5]], dtype=float)})
    savemat(str(info / "query_IDX.mat"), {"query_IDX": np.array([[1, 3]], dtype=float)})  # 1-based rows
    return base


def test_mars_official_info_files(tmp_path):
    base = make_mars_info(tmp_path / "MARS")
    ds = load_dataset("mars", tmp_path)
    assert "info/" in ds.notes[0]
    assert names(ds.train) == TRAIN_NAMES
    assert [(r.pid, r.camid, r.tracklet) for r in ds.train] == [(1, 0, 0), (1, 0, 0), (1, 1, 1), (3, 0, 2), (3, 0, 2)]
    assert Path(ds.train[3].path) == base / "bbox_train" / "0003" / "0003C1T0001F001.jpg"
    # query = rows 1 and 3 of the test tracks; gallery = the other rows; junk dropped, distractor kept
    assert names(ds.query) == ["0002C1T0001F001.jpg", "0002C1T0001F002.jpg", "0004C2T0001F001.jpg"]
    assert [r.tracklet for r in ds.query] == [0, 0, 2]
    assert names(ds.gallery) == ["0002C3T0001F001.jpg", "0004C4T0001F001.jpg", "0004C4T0001F002.jpg",
                                 "0000C5T0001F001.jpg"]
    assert [(r.pid, r.camid, r.tracklet) for r in ds.gallery] == [(2, 2, 1), (4, 3, 3), (4, 3, 3), (0, 4, 5)]


def test_mars_info_track_outside_name_list(tmp_path):
    from scipy.io import savemat

    base = make_mars_info(tmp_path / "MARS")
    savemat(str(base / "info" / "tracks_train_info.mat"),
            {"track_train_info": np.array([[1, 2, 1, 1], [3, 9, 1, 2]], dtype=float)})
    with pytest.raises(LayoutError, match="row 2 spans frames 3..9"):
        load_dataset("mars", base)


def test_mars_missing_split_files(tmp_path):
    base = tmp_path / "MARS"
    touch(base / "bbox_train" / "0001" / "0001C1T0001F001.jpg")
    touch(base / "bbox_test" / "0002" / "0002C1T0001F001.jpg")
    with pytest.raises(LayoutError) as exc:
        load_dataset("mars", tmp_path)
    msg = str(exc.value)
    for expected in ("splits/train.json", "splits/query.json", "splits/gallery.json", "info/train_name.txt",
                     "info/test_name.txt", "info/tracks_train_info.mat", "info/tracks_test_info.mat",
                     "info/query_IDX.mat"):
        assert expected in msg

    # partly there: the missing ones are named
    make_mars_info(tmp_path / "other" / "MARS")
    (tmp_path / "other" / "MARS" / "info" / "query_IDX.mat").unlink()
    with pytest.raises(LayoutError, match=r"missing info/query_IDX\.mat"):
        load_dataset("mars", tmp_path / "other")

    with pytest.raises(LayoutError, match="bbox_test"):
        load_dataset("mars", tmp_path / "other" / "MARS" / "bbox_train")


def test_mars_name_parser():
    assert D.parse_mars_name("0003C4T0003F001.jpg") == (3, 3, 3, 1)
    assert D.parse_mars_name("00-1C1T0001F002.jpg") == (-1, 0, 1, 2)
    assert D.parse_mars_name("0000C6T0012F120.jpg") == (0, 5, 12, 120)
    assert D.parse_mars_name("0003_c4.jpg") is None


# ---------------------------------------------------------------------------------------------
# the embedded real sample (mini-MARS)

def test_embedded_mini_mars_sample():
    ds = load_dataset("mini-mars")
    assert ds.name == "mini-mars"
    for split in ("train", "query", "gallery"):
        st = ds.stats()[split]
        assert (st.ids, st.images) == (16, 256), split
    train_ids = {r.pid for r in ds.train}
    test_ids = {r.pid for r in ds.query}
    assert test_ids == {r.pid for r in ds.gallery}
    assert not train_ids & test_ids
    assert len(train_ids | test_ids) == 32
    # 96 tracklets of 8 frames, each of a single person and camera
    tracklets = Counter()
    for split, recs in ds.splits().items():
        for r in recs:
            tracklets[(split, r.tracklet)] += 1
        for t in {r.tracklet for r in recs}:
            members = [r for r in recs if r.tracklet == t]
            assert len({(r.pid, r.camid) for r in members}) == 1
    assert len(tracklets) == 96
    assert set(tracklets.values()) == {8}
    assert all(0 <= r.camid <= 5 for recs in ds.splits().values() for r in recs)
    # every image decodes
    paths = [r.path for recs in ds.splits().values() for r in recs]
    assert len(set(paths)) == 768
    assert check_images(paths) == []
    # terms travel with the images
    for doc in ("NOTICE.md", "README.md"):
        text = (ds.root / doc).read_text()
        assert "MARS" in text and "ECCV 2016" in text and "Zheng" in text, doc
        assert "research use only" in text, doc


def test_mini_mars_needs_no_root_but_others_do():
    with pytest.raises(LayoutError, match="needs a root"):
        load_dataset("market1501")
    with pytest.raises(KeyError, match="unknown dataset"):
        load_dataset("cuhk03", "/nonexistent")


# ---------------------------------------------------------------------------------------------
# corrupt images

def test_check_images_reports_corrupt_jpeg_by_path(tmp_path):
    good = touch(tmp_path / "0001_c1s1_000001_00.jpg", jpeg_bytes(1))
    full = jpeg_bytes(2)
    truncated = touch(tmp_path / "0001_c2s1_000002_00.jpg", full[: len(full) // 2])
    garbage = touch(tmp_path / "0001_c3s1_000003_00.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg")
    errors = check_images([good, truncated, garbage])
    assert [e.path for e in errors] == [str(truncated), str(garbage)]
    assert all(isinstance(e, CorruptImageError) for e in errors)
    assert str(truncated) in str(errors[0])
    assert check_images([good]) == []


def test_image_dataset_corrupt_file_raises_with_path(tmp_path):
    from reidkit.data.transforms import ImageDataset, test_transform

    good = touch(tmp_path / "0001_c1s1_000001_00.jpg", jpeg_bytes(3))
    bad = touch(tmp_path / "0001_c2s1_000002_00.jpg", b"not an image at all")
    ds = ImageDataset([Record(str(good), 1, 0), Record(str(bad), 1, 1)], test_transform(), labels=[0, 0])
    item = ds[0]
    assert tuple(item["img"].shape) == (3, 256, 128)
    assert (item["pid"], item["label"], item["camid"], item["index"], item["path"]) == (1, 0, 0, 0, str(good))
    with pytest.raises(CorruptImageError) as exc:
        ds[1]
    assert exc.value.path == str(bad)
    assert str(bad) in str(exc.value)
    with pytest.raises(ValueError, match="labels"):
        ImageDataset([Record(str(good), 1, 0)], labels=[0, 1])


# ---------------------------------------------------------------------------------------------
# SYSU-30k

SYSU_FOLDERS = [f"{i:010d}" for i in range(1, 6)]


def make_sysu(base: Path, train=True, meta=True) -> Path:
    if train:
        for i, folder in enumerate(SYSU_FOLDERS):
            for k in range(i % 2 + 1):
                touch(base / "sysu_train_set_all" / folder / f"{folder}_{k:04d}.jpg")
        touch(base / "sysu_train_set_all" / SYSU_FOLDERS[0] / ".DS_Store")
        if meta:
            lines = [f"{folder}/{folder}_{k:04d}.jpg" for i, folder in enumerate(SYSU_FOLDERS)
                     for k in range(i % 2 + 1)]
            touch(base / "meta" / "train.txt", ("\n".join(lines) + "\n").encode())
    test = base / "sysu_test_set_all"
    for ident in ("000028311", "000028312"):
        touch(test / "query" / ident / f"{ident}_c2_2.jpg")
        touch(test / "gallery" / ident / f"{ident}_c1_1.jpg")
    for k in (5, 6, 7):
        touch(test / "gallery" / "0000others" / f"0000others_c1_{k}.jpg")
    return base


@pytest.mark.parametrize("meta", [True, False])
def test_sysu30k_layout(tmp_path, meta):
    base = make_sysu(tmp_path / "SYSU-30k", meta=meta)
    ds = load_dataset("sysu", tmp_path)
    assert ds.name == "sysu30k" and ds.root == base
    assert [(r.pid, r.camid) for r in ds.query] == [(28311, 1), (28312, 1)]
    assert names(ds.query) == ["000028311_c2_2.jpg", "000028312_c2_2.jpg"]
    assert Counter(r.pid for r in ds.gallery) == {28311: 1, 28312: 1, -1000: 3}
    assert {r.camid for r in ds.gallery} == {0}
    assert by_name(ds.gallery)["0000others_c1_5.jpg"].pid == sysu30k.SYSU_DISTRACTOR_LABEL == -1000
    # train: one label per folder, camera unknown
    assert [r.pid for r in ds.train] == [1, 2, 2, 3, 4, 4, 5]
    assert {r.camid for r in ds.train} == {-1}
    assert all(Path(r.path).is_file() for r in ds.train)
    assert ("meta/train.txt" in " ".join(ds.notes)) == meta
    assert any("3 distractors" in n for n in ds.notes)


def test_sysu30k_load_train_false_reads_test_only(tmp_path):
    base = make_sysu(tmp_path / "SYSU-30k", train=False)
    ds = load_dataset("sysu30k", base, load_train=False)
    assert ds.train == [] and len(ds.query) == 2 and len(ds.gallery) == 5
    with pytest.raises(LayoutError) as exc:
        load_dataset("sysu30k", base)
    assert "sysu_train_set_all" in str(exc.value) and "load_train=False" in str(exc.value)


def test_sysu30k_missing_gallery_and_bad_folder(tmp_path):
    base = make_sysu(tmp_path / "SYSU-30k")
    (base / "sysu_test_set_all" / "gallery").rename(base / "sysu_test_set_all" / "gal")
    with pytest.raises(LayoutError, match=r"sysu_test_set_all/gallery/ with one folder per identity"):
        load_dataset("sysu30k", base)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(LayoutError, match="expected sysu_test_set_all inside"):
        load_dataset("sysu30k", tmp_path / "elsewhere")

    base = make_sysu(tmp_path / "b" / "SYSU-30k")
    touch(base / "sysu_test_set_all" / "query" / "person_a" / "person_a_c2_2.jpg")
    with pytest.raises(LayoutError, match="person_a"):
        load_dataset("sysu30k", base, load_train=False)


def test_sysu_test_name_parser():
    assert sysu30k.parse_sysu_test_name("000028311_c2_2.jpg") == (28311, 1)
    assert sysu30k.parse_sysu_test_name("0000others_c1_7.jpg") == (-1000, 0)
    with pytest.raises(LayoutError):
        sysu30k.parse_sysu_test_name("000028311.jpg")
    with pytest.raises(LayoutError):
        sysu30k.parse_sysu_test_name("someone_c1_7.jpg")


def test_iter_sysu_train_streams(tmp_path):
    base = make_sysu(tmp_path / "SYSU-30k")
    train_dir = base / "sysu_train_set_all"
    # from the list: a generator, yielding before the rest of the list is read
    gen = iter_sysu_train(train_dir, base / "meta" / "train.txt")
    assert inspect.isgenerator(gen)
    first = next(gen)
    assert first == Record(str(train_dir / SYSU_FOLDERS[0] / f"{SYSU_FOLDERS[0]}_0000.jpg"), 1, -1)
    from_list = [first] + list(gen)
    # from the folder tree: the same records, hidden files skipped
    gen = iter_sysu_train(train_dir)
    assert inspect.isgenerator(gen)
    assert list(gen) == from_list
    # list entries with the train folder prefix and a trailing label are understood
    alt = touch(tmp_path / "alt.txt", b"sysu_train_set_all/0000000002/0000000002_0001.jpg 7\n\n")
    assert list(iter_sysu_train(train_dir, alt)) == [
        Record(str(train_dir / "0000000002" / "0000000002_0001.jpg"), 2, -1)]
    bad = touch(tmp_path / "bad.txt", b"0000000001/0000000001_0000.jpg\nfolderX/img.jpg\n")
    gen = iter_sysu_train(train_dir, bad)
    assert next(gen).pid == 1
    with pytest.raises(LayoutError, match=r"bad.txt:2"):
        next(gen)


def test_sysu_consecutive_bags_maintainer_example():
    bags = list(sysu_consecutive_bags(SYSU_FOLDERS))
    assert len(bags) == 3 * len(SYSU_FOLDERS)
    # the three bags around folder 3 (the 7th..9th yielded): [3], [2, 3, 4], [1..5], with the
    # maintainer's bag ids
    assert bags[6:9] == [
        Bag("bag0000000009", (3,), ("0000000003",)),
        Bag("bag0000000010", (2, 3, 4), ("0000000002", "0000000003", "0000000004")),
        Bag("bag0000000011", (1, 2, 3, 4, 5), tuple(SYSU_FOLDERS)),
    ]
    # clipped at the ends
    by_id = {b.bag_id: b for b in bags}
    assert [by_id[f"bag{i:010d}"].labels for i in (3, 4, 5)] == [(1,), (1, 2), (1, 2, 3)]
    assert by_id["bag0000000004"].labels == (1, 2)
    assert by_id["bag0000000005"].labels == (1, 2, 3)
    assert by_id["bag0000000017"].labels == (3, 4, 5)
    assert len(by_id) == len(bags)  # ids unique


def test_read_bag_level_labels(tmp_path):
    path = touch(tmp_path / "bag_level_label.json", json.dumps([
        {"BagLabel": [3], "BagID": "bag0000000009", "BagImages": ["0000000003/*"]},
        {"BagLabel": [2, 3, 4], "BagID": "bag0000000010",
         "BagImages": ["0000000002/*", "0000000003/*", "0000000004/*"]},
        {"BagLabel": [1, 2, 3, 4, 5], "BagID": "bag0000000011",
         "BagImages": [f"sysu_train_set_all/{f}/*" for f in SYSU_FOLDERS]},
    ]).encode())
    bags = read_bag_level_labels(path)
    expected = [b for b in sysu_consecutive_bags(SYSU_FOLDERS) if b.bag_id in
                ("bag0000000009", "bag0000000010", "bag0000000011")]
    assert bags == expected
    touch(path, json.dumps([{"BagID": "bag1", "BagImages": []}]).encode())
    with pytest.raises(LayoutError, match="record 0 lacks BagLabel"):
        read_bag_level_labels(path)
    touch(path, b"[{")
    with pytest.raises(LayoutError, match="not valid JSON"):
        read_bag_level_labels(path)


# ---------------------------------------------------------------------------------------------
# a folder per identity (users' own data)

def test_folder_layout_named_identities(tmp_path):
    root = tmp_path / "mydata"
    touch(root / "train" / "bob" / "bob_c1_0001.jpg")
    touch(root / "train" / "bob" / "bob_c2_0002.jpg")
    touch(root / "train" / "alice" / "a1.jpg")
    touch(root / "query" / "alice" / "alice_c3_0001.jpg")
    touch(root / "query" / "carol" / "carol_c1_0001.jpg")
    touch(root / "gallery" / "carol" / "carol-c2-0001.jpg")
    touch(root / "gallery" / "alice" / "x.jpg")
    (root / "gallery" / ".ipynb_checkpoints").mkdir()
    ds = load_dataset("folder", root)
    # names sorted across all splits -> 1.. ; the same name has the same pid everywhere
    pid = {"alice": 1, "bob": 2, "carol": 3}
    for split in ds.splits().values():
        for r in split:
            assert r.pid == pid[Path(r.path).parent.name]
    cams = {n: r.camid for split in ds.splits().values() for n, r in by_name(split).items()}
    assert cams["bob_c1_0001.jpg"] == 0 and cams["bob_c2_0002.jpg"] == 1
    assert cams["alice_c3_0001.jpg"] == 2 and cams["carol-c2-0001.jpg"] == 1
    # no camera token: train / query -1, gallery 0
    assert cams["a1.jpg"] == -1 and cams["x.jpg"] == 0


def test_folder_layout_numeric_identities(tmp_path):
    root = tmp_path / "mydata"
    touch(root / "train" / "0003" / "img_c1.jpg")
    touch(root / "train" / "12" / "img_c2.jpg")
    touch(root / "query" / "0007" / "q.jpg")
    touch(root / "gallery" / "0007" / "g.jpg")
    ds = load_dataset("folder", root)
    assert [r.pid for r in ds.train] == [3, 12]
    assert [r.pid for r in ds.query] == [7] and [r.pid for r in ds.gallery] == [7]
    assert [r.camid for r in ds.query] == [-1] and [r.camid for r in ds.gallery] == [0]
    # "7" and "007" would both read as 7: numbered by name instead, so they stay apart
    touch(root / "gallery" / "7" / "g2.jpg")
    ds = load_dataset("folder", root)
    assert len({r.pid for r in ds.gallery}) == 2
    assert by_name(ds.query)["q.jpg"].pid == by_name(ds.gallery)["g.jpg"].pid


def test_folder_layout_errors(tmp_path):
    root = tmp_path / "mydata"
    touch(root / "query" / "alice" / "a.jpg")
    with pytest.raises(LayoutError, match="missing: train"):
        load_dataset("folder", root)
    touch(root / "train" / "alice" / "a.jpg")
    with pytest.raises(LayoutError) as exc:  # query/ without gallery/
        load_dataset("folder", root)
    assert "gallery" in str(exc.value) and "query" in str(exc.value)
    touch(root / "gallery" / "alice" / "img_c0.jpg")
    with pytest.raises(LayoutError, match="1-based"):
        load_dataset("folder", root)
    (root / "gallery" / "alice" / "img_c0.jpg").unlink()
    (root / "gallery" / "alice").rmdir()
    with pytest.raises(LayoutError, match="no identity sub-folders"):
        load_dataset("folder", root)


# ---------------------------------------------------------------------------------------------
# registry and relabel

def test_relabel_is_sorted_and_deterministic():
    recs = [Record("a", 7, 0), Record("b", 2, 1), Record("c", 7, 1), Record("d", 1501, 0)]
    labels, mapping = relabel(recs)
    assert mapping == {2: 0, 7: 1, 1501: 2}
    assert labels == [1, 0, 1, 2]


def test_register_adds_a_parser(tmp_path):
    @register("toy-test-dataset")
    def toy(root):
        return ReIDDataset("toy-test-dataset", Path(root), [Record("x", 1, 0)], [], [])

    try:
        assert "toy-test-dataset" in D.dataset_names()
        assert load_dataset("TOY-test-dataset", tmp_path).train == [Record("x", 1, 0)]
    finally:
        D.PARSERS.pop("toy-test-dataset")

"""The small real-layout trees of tests/trees.py, read by the kit's parsers, and the clear errors a
broken tree at paper scale gets before any GPU time is spent."""

import shutil
from collections import Counter
from pathlib import Path

import pytest
from trees import PAPER_TREES, build_tree, market1501_tree, msmt17_tree, sysu30k_tree

from reidkit.data.datasets import load_dataset
from reidkit.data.records import LayoutError
from reidkit.data.sysu30k import check_sysu_tree, iter_sysu_bags, read_bag_level_labels, sysu_num_classes


@pytest.mark.parametrize("key", list(PAPER_TREES))
def test_each_tree_parses_in_its_real_layout(tmp_path, key):
    name, _, _ = PAPER_TREES[key]
    base = build_tree(key, tmp_path / "data")
    ds = load_dataset(name, tmp_path / "data")          # reached from the parent, as DATA_ROOT
    assert ds.root == base and ds.name == name
    per_id = Counter(r.pid for r in ds.train)
    if name == "sysu30k":
        assert per_id == {f: 4 for f in range(1, 13)} and {r.camid for r in ds.train} == {-1}
        assert Counter(r.pid for r in ds.gallery)[-1000] == 8
        assert sorted(r.pid for r in ds.query) == [13, 14, 15, 16]
        return
    assert per_id == {pid: 6 for pid in per_id} and len(per_id) == 10
    # every training identity spans 3 cameras; every query has a match in another camera
    for pid in per_id:
        assert len({r.camid for r in ds.train if r.pid == pid}) == 3
    assert len(ds.query) == 6
    for q in ds.query:
        assert any(g.pid == q.pid and g.camid != q.camid for g in ds.gallery), q
    # the same image bytes are real sample crops, not placeholders
    assert all(Path(r.path).stat().st_size > 1000 for r in ds.train + ds.query + ds.gallery)


def test_market_tree_has_distractors_and_junk(tmp_path):
    base = market1501_tree(tmp_path)
    assert len(list((base / "bounding_box_test").glob("-1_c*.jpg"))) == 1
    ds = load_dataset("market1501", base)
    assert Counter(r.pid for r in ds.gallery)[0] == 3          # distractors kept, junk dropped
    assert {r.pid for r in ds.train}.isdisjoint({r.pid for r in ds.query})


def test_msmt_original_tree_lists_and_overlapping_test_pids(tmp_path):
    base = msmt17_tree(tmp_path)
    for f in ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt"):
        assert (base / f).is_file()
    assert len((base / "list_val.txt").read_text().split("\n")) - 1 == 10
    ds = load_dataset("msmt17", base)
    assert "list_val" in ds.notes[0] and len(ds.train) == 60
    assert {r.pid for r in ds.query} == set(range(6)) and set(range(6)) <= {r.pid for r in ds.train}
    assert max(r.camid for r in ds.train) == 14                # two-digit camera 15 read


def test_sysu_tree_bags_follow_the_consecutive_folder_rule(tmp_path):
    base = sysu30k_tree(tmp_path, bag_json=True)
    assert sysu_num_classes(base / "sysu_train_set_all") == 12
    bags = list(iter_sysu_bags(base / "sysu_train_set_all", base / "meta" / "train.txt", bag_size=15))
    assert len(bags) == 36 and all(len(b.records) == 15 for b in bags)
    by_id = {b.bag_id: b for b in bags}
    assert by_id["bag0000000011"].labels == (1, 2, 3, 4, 5)
    assert by_id["bag0000000010"].labels == (2, 3, 4) and by_id["bag0000000009"].labels == (3,)
    assert {b.bag_id: b.labels for b in read_bag_level_labels(base / "bag_level_label.json")}["bag0000000010"] \
        == (2, 3, 4)
    check_sysu_tree(tmp_path)                                   # complete: no error


# ---------------------------------------------------------------------------------------------
# clear errors before any GPU time

def test_empty_market_split_names_the_folder(tmp_path):
    base = market1501_tree(tmp_path)
    for p in (base / "bounding_box_train").iterdir():
        p.unlink()
    with pytest.raises(LayoutError) as exc:
        load_dataset("market1501", tmp_path)
    assert str(base / "bounding_box_train") in str(exc.value) and "it is empty" in str(exc.value)


def test_empty_msmt_folder_and_empty_list_name_what_is_empty(tmp_path):
    base = msmt17_tree(tmp_path / "a")
    shutil.rmtree(base / "test")
    (base / "test").mkdir()
    with pytest.raises(LayoutError) as exc:
        load_dataset("msmt17", base)
    assert f"the image folder {base / 'test'} is empty" in str(exc.value)
    base = msmt17_tree(tmp_path / "b")
    (base / "list_query.txt").write_text("\n")
    with pytest.raises(LayoutError, match=r"list_query.txt lists no images"):
        load_dataset("msmt17", base)


@pytest.mark.parametrize("kwargs, missing", [
    ({"meta": False}, "training list {base}/meta/train.txt is missing"),
    ({"others": False}, "distractor folder {base}/sysu_test_set_all/gallery/0000others/ is missing"),
])
def test_sysu_tree_without_list_or_distractors_says_which(tmp_path, kwargs, missing):
    base = sysu30k_tree(tmp_path, **kwargs)
    with pytest.raises(LayoutError) as exc:
        check_sysu_tree(tmp_path)
    msg = str(exc.value)
    assert missing.format(base=base) in msg
    assert msg.count("\n  - ") == 1                             # only what is missing


def test_sysu_tree_several_problems_listed_together(tmp_path):
    base = sysu30k_tree(tmp_path)
    shutil.rmtree(base / "sysu_train_set_all")
    (base / "sysu_train_set_all").mkdir()
    (base / "meta" / "train.txt").write_text("")
    for p in (base / "sysu_test_set_all" / "gallery" / "0000others").iterdir():
        p.unlink()
    with pytest.raises(LayoutError) as exc:
        check_sysu_tree(base)
    msg = str(exc.value)
    assert f"training folder {base / 'sysu_train_set_all'}/ is empty" in msg
    assert f"training list {base / 'meta' / 'train.txt'} is empty" in msg
    assert "0000others/ holds no images" in msg


def test_sysu_train_list_whose_entries_name_no_file(tmp_path):
    base = sysu30k_tree(tmp_path)
    (base / "meta" / "train.txt").write_text("images/0000000001/0000000001_0000.jpg\n")
    with pytest.raises(LayoutError, match=r"first entry of .*train.txt .* which does not exist"):
        check_sysu_tree(base)
    (base / "meta" / "train.txt").write_text("person_a/x.jpg\n")
    with pytest.raises(LayoutError, match=r"'person_a' is not a number"):
        check_sysu_tree(base)


def test_sysu_root_without_any_part(tmp_path):
    with pytest.raises(LayoutError, match=r"none of sysu_train_set_all/, meta/train.txt, sysu_test_set_all/"):
        check_sysu_tree(tmp_path)
    with pytest.raises(LayoutError, match="does not exist"):
        check_sysu_tree(tmp_path / "nope")


def test_a_batch_the_tree_cannot_fill_is_named_at_start(tmp_path):
    from reidkit.data.records import BatchFillError, check_batch_fill

    ds = load_dataset("market1501", market1501_tree(tmp_path))          # 10 ids x 6 images
    check_batch_fill(ds.train, 4, 4, "market1501 train")                 # 16 = 4 x 4: fine
    check_batch_fill(ds.train, 10, 6, "market1501 train")                # exactly the tree
    with pytest.raises(BatchFillError) as exc:
        check_batch_fill(ds.train, 16, 16, "market1501 training split", hint="lower hhcl.batch_size")
    assert str(exc.value) == ("market1501 training split cannot fill a batch: 10 identities, and a batch takes 16 "
                              "(16 x 16 = 256 images); 60 images, fewer than one batch of 256. "
                              "lower hhcl.batch_size")
    with pytest.raises(BatchFillError, match=r"^t cannot fill a batch: 60 images, fewer than one batch of 64$"):
        check_batch_fill(ds.train, 4, 16, "t")

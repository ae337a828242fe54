"""Identity subsets (reidkit.data.subset) on every supported layout, the overrides that carry
``subset_ids`` to every notebook, and the ``laptop`` profile end to end on a Market tree made from
the embedded sample's real crops."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from test_datasets import make_market, make_mars_info, make_mars_json, make_msmt_original, make_sysu, touch

from reidkit.config import get_profile
from reidkit.course.runctx import RunContext
from reidkit.data.datasets import load_dataset
from market_trees import sample_as_market, synthetic_market_tree
from reidkit.data.records import ReIDDataset
from reidkit.data.subset import choose_ids, is_distractor, load_profile_dataset, subset_identities


def ids(records) -> set[int]:
    return {r.pid for r in records}


def real_ids(records, name) -> set[int]:
    return {r.pid for r in records if not is_distractor(r.pid, name)}


def check_subset(full: ReIDDataset, sub: ReIDDataset, n: int) -> None:
    """What every subset promises, whatever the layout."""
    name = full.name
    assert sub.name == full.name and sub.root == full.root
    train_pool, test_pool = real_ids(full.train, name), real_ids(full.query, name)
    assert real_ids(sub.train, name) <= train_pool
    assert len(real_ids(sub.train, name)) == min(n, len(train_pool))
    assert len(real_ids(sub.query, name)) == min(n, len(test_pool))
    kept_test = real_ids(sub.query, name)
    assert {p for p in real_ids(sub.gallery, name) if p in test_pool} == kept_test & real_ids(full.gallery, name)
    # every image of a kept identity is kept, and nothing else of a real identity
    for split in ("train", "query", "gallery"):
        fr, sr = getattr(full, split), getattr(sub, split)
        kept = real_ids(sr, name)
        assert [r for r in fr if r.pid in kept] == [r for r in sr if r.pid in kept], split
        assert set(sr) <= set(fr)
    assert "identity subset" in sub.notes[-1]


def shuffled(ds: ReIDDataset, seed: int = 0) -> ReIDDataset:
    rng = random.Random(seed)
    parts = {}
    for split, recs in ds.splits().items():
        recs = list(recs)
        rng.shuffle(recs)
        parts[split] = recs
    return ReIDDataset(ds.name, ds.root, parts["train"], parts["query"], parts["gallery"], list(ds.notes))


def same_selection(a: ReIDDataset, b: ReIDDataset) -> bool:
    return all(sorted(Path(r.path).name for r in getattr(a, s)) == sorted(Path(r.path).name for r in getattr(b, s))
               for s in ("train", "query", "gallery"))


# ---------------------------------------------------------------------------------------------
# the choice itself

def test_choose_ids_is_seeded_order_free_and_nested():
    pool = list(range(1, 751))
    a = choose_ids(pool, 150)
    assert len(a) == 150 and a == sorted(a)
    assert choose_ids(list(reversed(pool)) + pool[:10], 150) == a   # order and duplicates do not matter
    assert set(choose_ids(pool, 50)) <= set(a) <= set(choose_ids(pool, 300))  # larger n, superset
    assert choose_ids(pool, 150, seed=1) != a
    assert a != list(range(1, 151))  # spread over the pool, not its first ids
    assert choose_ids(pool, 1000) == pool


def test_is_distractor_per_dataset():
    assert is_distractor(0, "market1501") and is_distractor(0, "mars") and is_distractor(-1000, "sysu30k")
    assert not is_distractor(0, "msmt17") and not is_distractor(0, "folder")
    assert not is_distractor(7, "market1501")


def test_bad_subset_size():
    ds = load_dataset("mini-mars")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            subset_identities(ds, bad)


# ---------------------------------------------------------------------------------------------
# every layout

def big_market_names(n_train=40, n_test=30, distractors=20, cams=6, gallery_only=0, cam_fmt="c{c}s1"):
    """Market-style names: several images per identity over cameras, distractors (0000) and junk."""
    train = [f"{p:04d}_{cam_fmt.format(c=1 + (p + k) % cams)}_{k:06d}_00.jpg" for p in range(1, n_train + 1)
             for k in range(3)]
    test_ids = range(n_train + 1, n_train + n_test + 1)
    query = [f"{p:04d}_{cam_fmt.format(c=1 + p % cams)}_{0:06d}_00.jpg" for p in test_ids]
    gallery = [f"{p:04d}_{cam_fmt.format(c=1 + (p + 1 + k) % cams)}_{k + 1:06d}_00.jpg" for p in test_ids
               for k in range(2)]
    gallery += [f"{p:04d}_{cam_fmt.format(c=1)}_{1:06d}_00.jpg"
                for p in range(n_train + n_test + 1, n_train + n_test + 1 + gallery_only)]
    gallery += [f"0000_{cam_fmt.format(c=1 + k % cams)}_{k:06d}_00.jpg" for k in range(distractors)]
    gallery += ["-1_c1s1_000001_00.jpg"]
    return train, query, gallery


def test_market_subset(tmp_path):
    train, query, gallery = big_market_names()
    base = make_market(tmp_path / "Market-1501-v15.09.15", train, query, gallery)
    full = load_dataset("market1501", base)
    sub = subset_identities(full, 10)
    check_subset(full, sub, 10)
    assert len(ids(sub.train)) == 10 and len(sub.train) == 30
    assert real_ids(sub.query, "market1501") == real_ids(sub.gallery, "market1501")
    # distractors in proportion: 10 of 30 test ids -> a third of the 20 distractor images
    assert sum(r.pid == 0 for r in sub.gallery) == round(20 * 10 / 30)
    assert all(r.pid != -1 for r in sub.gallery)   # junk stays dropped
    # the same ids every time, whatever the listing order or where the tree sits
    assert same_selection(sub, subset_identities(shuffled(full), 10))
    moved = shutil.copytree(base, tmp_path / "elsewhere" / "Market-1501-v15.09.15")
    assert same_selection(sub, subset_identities(load_dataset("market1501", moved), 10))
    # a larger n keeps what a smaller one kept; n above the pool keeps the split whole
    assert ids(subset_identities(full, 5).train) <= ids(sub.train)
    whole = subset_identities(full, 100)
    assert same_selection(whole, full) and "all 40 training identities" in whole.notes[-1]


def test_market_tiny_builder_tree(tmp_path):
    """The small real-layout tree of test_datasets: pids 2, 7, 1501 and two distractors."""
    full = load_dataset("market1501", make_market(tmp_path / "Market-1501-v15.09.15"))
    sub = subset_identities(full, 2)
    check_subset(full, sub, 2)
    assert ids(sub.query) == real_ids(sub.gallery, "market1501")
    assert sum(r.pid == 0 for r in sub.gallery) == 1   # round(2 / 3 * 2)


def test_duke_subset_keeps_gallery_only_people_in_proportion(tmp_path):
    train, query, gallery = big_market_names(n_train=20, n_test=20, distractors=0, cams=8, gallery_only=10,
                                             cam_fmt="c{c}")
    base = make_market(tmp_path / "DukeMTMC-reID", train, query, gallery)
    full = load_dataset("dukemtmcreid", base)
    sub = subset_identities(full, 10)
    check_subset(full, sub, 10)
    gallery_only = real_ids(sub.gallery, "dukemtmcreid") - ids(sub.query)
    assert len(gallery_only) == 5   # half of the 10 gallery-only people, as half of the test ids
    assert "5 of 10 gallery-only identities" in sub.notes[-1]


def test_msmt17_both_layouts(tmp_path):
    full = load_dataset("msmt17", make_msmt_original(tmp_path / "a" / "MSMT17_V1"))
    sub = subset_identities(full, 2)
    check_subset(full, sub, 2)
    assert 0 in ids(full.train)   # pid 0 is a real MSMT17 person, not a distractor
    assert len(ids(sub.train)) == 2 and len(ids(sub.query)) == 2
    assert ids(sub.query) <= ids(sub.gallery)

    train, query, gallery = big_market_names(n_train=12, n_test=12, distractors=0, cams=15)
    base = make_market(tmp_path / "b" / "MSMT17_V1", train, query, gallery)
    full = load_dataset("msmt17", base)
    sub = subset_identities(full, 4)
    check_subset(full, sub, 4)
    assert ids(sub.query) == ids(sub.gallery)


@pytest.mark.parametrize("maker", [make_mars_json, make_mars_info])
def test_mars_both_split_formats(tmp_path, maker):
    full = load_dataset("mars", maker(tmp_path / "MARS"))
    sub = subset_identities(full, 1)
    check_subset(full, sub, 1)
    assert len(ids(sub.train)) == 1 and len(real_ids(sub.query, "mars")) == 1
    # tracklets stay whole
    kept = ids(sub.train)
    assert Counter(r.tracklet for r in sub.train) == Counter(r.tracklet for r in full.train if r.pid in kept)
    assert same_selection(sub, subset_identities(shuffled(full, 3), 1))


@pytest.mark.parametrize("load_train", [True, False])
def test_sysu30k_test_split_and_bag_folders(tmp_path, load_train):
    base = make_sysu(tmp_path / "SYSU-30k")
    full = load_dataset("sysu30k", base, load_train=load_train)
    sub = subset_identities(full, 1)
    check_subset(full, sub, 1)
    assert len(ids(sub.query)) == 1 and ids(sub.query) == real_ids(sub.gallery, "sysu30k")
    # 1 of 2 test ids: half of the 3 "0000others" distractors (-1000)
    assert sum(r.pid == -1000 for r in sub.gallery) == round(3 / 2)
    if load_train:
        assert len(ids(sub.train)) == 1   # one training folder (a label), all its images
        folder = next(iter(ids(sub.train)))
        assert [r for r in full.train if r.pid == folder] == sub.train
    else:
        assert sub.train == [] and "no training split" in sub.notes[-1]


@pytest.mark.parametrize("meta", [True, False])
def test_sysu30k_profile_loader_lists_only_the_kept_folders(tmp_path, meta):
    """load_profile_dataset picks SYSU-30k's training folders by name (never listing the 29.6M
    images) and gets what subset_identities gets from the full listing."""
    base = make_sysu(tmp_path / "SYSU-30k", meta=meta)
    prof = get_profile("sysu30k").replace(data__subset_ids=2)
    fast = load_profile_dataset(prof, base)
    full = subset_identities(load_dataset("sysu30k", base), 2)
    assert fast.train == full.train and fast.query == full.query and fast.gallery == full.gallery
    assert len(ids(fast.train)) == 2 and "2 of 5 training folders" in fast.notes[-1]
    test_only = load_profile_dataset(prof, base, load_train=False)
    assert test_only.train == [] and test_only.query == full.query


def test_plain_folder(tmp_path):
    root = tmp_path / "mydata"
    for name in ("alice", "bob", "carol", "dave"):
        touch(root / "train" / name / f"{name}_c1_0001.jpg")
        touch(root / "train" / name / f"{name}_c2_0002.jpg")
    for name in ("erin", "frank", "grace"):
        touch(root / "query" / name / f"{name}_c1_0001.jpg")
        touch(root / "gallery" / name / f"{name}_c2_0001.jpg")
    full = load_dataset("folder", root)
    sub = subset_identities(full, 2)
    check_subset(full, sub, 2)
    assert len(ids(sub.train)) == 2 and ids(sub.query) == ids(sub.gallery) and len(ids(sub.query)) == 2


def test_embedded_sample_and_profile_loader():
    full = load_dataset("mini-mars")
    sub = subset_identities(full, 4)
    check_subset(full, sub, 4)
    assert (len(sub.train), len(sub.query), len(sub.gallery)) == (64, 64, 64)
    assert same_selection(sub, subset_identities(load_dataset("mini-mars"), 4))
    prof = get_profile("smoke").replace(data__subset_ids=4)
    assert same_selection(load_profile_dataset(prof), sub)
    assert same_selection(load_profile_dataset(get_profile("smoke")), full)


def test_sample_as_market_tree(tmp_path):
    base = sample_as_market(tmp_path / "Market-1501-v15.09.15")
    ds = load_dataset("market1501", tmp_path)
    mini = load_dataset("mini-mars")
    assert [len(ds.train), len(ds.query)] == [256, 256]
    assert len(ds.gallery) == 256 + 16   # + 16 distractors; the 4 junk images are dropped
    assert ids(ds.train) == ids(mini.train) and ids(ds.query) == ids(mini.query)
    assert sorted(r.camid for r in ds.train) == sorted(r.camid for r in mini.train)
    assert len(list((base / "bounding_box_test").glob("-1_*.jpg"))) == 4
    sub = subset_identities(ds, 8)
    check_subset(ds, sub, 8)
    assert sum(r.pid == 0 for r in sub.gallery) == 8   # half of the 16 distractors for 8 of 16 ids


def test_synthetic_market_tree_counts(tmp_path):
    counts = synthetic_market_tree(tmp_path / "Market-1501-v15.09.15", train_ids=3, test_ids=2, train_per_id=4,
                                   query_per_id=2, gallery_per_id=3, distractors=5)
    assert counts == {"train": 12, "query": 4, "gallery": 6, "distractors": 5}
    ds = load_dataset("market1501", tmp_path)
    assert (len(ids(ds.train)), len(ids(ds.query)), len(ds.gallery)) == (3, 2, 11)
    assert not ids(ds.train) & ids(ds.query)


# ---------------------------------------------------------------------------------------------
# the subset reaches every notebook: run.json overrides, RunContext, the CLI

def test_runctx_applies_run_json_overrides(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({
        "parameters": {"PROFILE": "smoke"}, "overrides": {"data.subset_ids": 4, "dgl.milestones": [1]}}))
    ctx = RunContext.open("smoke", None, str(run_dir), "cpu", 1, name="01_data_prep")
    assert ctx.profile.name == "smoke" and ctx.profile.data.subset_ids == 4
    assert ctx.profile.dgl.milestones == (1,)   # JSON lists back to the field's tuple
    ds = ctx.dataset()
    assert len(ids(ds.train)) == 4 and len(ids(ds.query)) == 4
    # explicit overrides win over the recorded ones
    ctx = RunContext.open("smoke", None, str(run_dir), "cpu", 1, name="x", overrides={"data.subset_ids": 2})
    assert len(ids(ctx.dataset().train)) == 2
    # a run of another profile: its overrides are not applied
    ctx = RunContext.open("workshop", None, str(run_dir), "cpu", 1, name="x")
    assert ctx.profile.data.subset_ids is None


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "reidkit", *args], capture_output=True, text=True)


def test_cli_datasets_subset_table(tmp_path):
    make_market(tmp_path / "Market-1501-v15.09.15")
    out = run_cli("datasets", str(tmp_path), "--dataset", "market1501", "--subset-ids", "2", "--json", "--no-verify")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["splits"]["train"]["ids"] == 2 and info["splits"]["query"]["ids"] == 2
    assert any("identity subset 2" in n for n in info["notes"])
    out = run_cli("datasets", str(tmp_path), "--dataset", "market1501", "--subset-ids", "2", "--no-verify")
    assert out.returncode == 0 and "identity subset 2" in out.stdout and "train" in out.stdout


@pytest.mark.parametrize("argv, message", [
    (["reproduce", "--profile", "smoke", "--set", "hhcl.epochs=two"], "expected an integer"),
    (["reproduce", "--profile", "smoke", "--set", "hhcl.nope=1"], "has no field 'nope'"),
    (["reproduce", "--profile", "smoke", "--set", "data.dataset=cuhk03"], "not a known dataset"),
    (["reproduce", "--profile", "laptop"], "give --data-root"),
    (["reproduce", "--profile", "smoke", "--subset-ids", "0"], "positive"),
    (["train", "--profile", "smoke", "--out", "OUT", "--set", "hhcl.lr=fast"], "expected a number"),
])
def test_cli_bad_overrides_one_line_exit_2(tmp_path, argv, message):
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    out = run_cli(*argv, *(["--run-dir", str(tmp_path / "run")] if argv[0] == "reproduce" else []))
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()   # before any work


def test_digest_changes_with_overrides(tmp_path):
    from reidkit.course.reproduce import params_digest

    nb = tmp_path / "01_x.ipynb"
    nb.write_text("{}")
    params = {"PROFILE": "smoke", "SEED": 1}
    plain = params_digest(params, nb)
    assert params_digest(params, nb, {}) == plain
    a = params_digest(params, nb, {"data.subset_ids": 150})
    assert a != plain and a != params_digest(params, nb, {"data.subset_ids": 100})


# ---------------------------------------------------------------------------------------------
# the laptop profile end to end, cut to seconds

def test_laptop_profile_values():
    p = get_profile("laptop")
    assert p.data.dataset == "market1501" and p.data.subset_ids == 150
    assert (p.data.height, p.data.width) == (256, 128)
    assert (p.model.arch, p.model.pretrained) == ("mobilenetv2", True)
    ws = get_profile("workshop")
    assert p.model == ws.model


FAST = ["data.height=128", "data.width=64", "data.test_batch_size=64", "hhcl.epochs=1", "hhcl.iters=2",
        "hhcl.eval_step=1", "dgl.epochs=1", "dgl.milestones=[1]",
        "dgl.uo_epochs=1", "dgl.uo_height=128", "dgl.uo_width=64"]


@pytest.mark.slow
def test_reproduce_laptop_on_a_sample_market_tree(tmp_path):
    from reidkit.config import parse_set
    from reidkit.course.reproduce import run_notebooks

    data_root = tmp_path / "data"
    sample_as_market(data_root / "Market-1501-v15.09.15")
    overrides = {**parse_set(FAST), "data.subset_ids": 8}
    # the data notebook and the training one (the whole chain runs in test_browser and the paper dry runs)
    run_dir, results = run_notebooks("laptop", str(data_root), tmp_path / "run", "cpu", notebooks=("01", "04"),
                                     log=lambda *_: None, overrides=overrides)
    assert [(r.name, r.status) for r in results] == [("01_data_prep", "ran"), ("04_hybrid_contrast", "ran")]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["overrides"]["data.subset_ids"] == 8 and run["overrides"]["hhcl.iters"] == 2
    assert run["profile"]["data"]["subset_ids"] == 8 and run["profile"]["name"] == "laptop"
    assert run["device"] == "cpu"
    # the notebooks saw the subset: 8 identities in each split (the gallery: + distractor pid 0)
    m01 = json.loads((run_dir / "01_data_prep" / "metrics.json").read_text())
    assert m01["dataset"] == "market1501"
    assert m01["train_ids"] == 8 and m01["query_ids"] == 8 and m01["gallery_ids"] == 9
    assert m01["train_images"] == 8 * 16
    report = (run_dir / "report.md").read_text()
    assert "identity subset: 8 training and 8 test identities" in report
    assert "`data.subset_ids=8`" in report and "`hhcl.iters=2`" in report
    assert "device: `cpu`" in report and "`auto`" not in report

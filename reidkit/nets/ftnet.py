"""The ResNet-50 classifiers of the SYSU-30k code: the kit's ``FtNet`` and the released ``net_6.pth`` layout."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

__all__ = ['SysuFtNet']


# --------------------------------------------------------------------------------------------
# SYSU-30k ft_net, with the authors' module names
# --------------------------------------------------------------------------------------------
class _ClassBlock(nn.Module):
    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Sequential(nn.Linear(in_dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


class SysuFtNet(nn.Module):
    """``ft_net(C)`` of SYSU-30k's test code: torchvision ResNet-50 (last stride 2, its ``fc`` kept
    but unused), global average pool, ``Linear(2048, C)``. ``forward`` returns the logits."""

    def __init__(self, num_classes: int = 28310):
        super().__init__()

        self.model = torchvision.models.resnet50(weights=None)
        self.classifier = _ClassBlock(2048, num_classes)
        self.arch = "ft_net"
        self.num_classes = int(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
        return self.classifier(torch.flatten(m.avgpool(x), 1))


class FtNet(nn.Module):
    """The unary-only variant's ``ft_net``: backbone + average pool + one ``Linear(D, C)`` on the
    pooled feature (no BN neck in the classifier path).

    Wraps a ``ReIDNet`` built without a classifier (its BN neck is still there and keeps running
    statistics, but nothing trains it). ``model(x)`` returns the L2-normalised pooled feature;
    ``model(x, return_all=True)`` the ``ReIDOutput`` with ``logits`` from the pooled feature."""

    def __init__(self, net: nn.Module, num_classes: int):
        super().__init__()
        self.net = net
        self.arch = f"ft_net:{net.arch}"
        self.num_classes = int(num_classes)
        self.feat_dim, self.low_dim = net.feat_dim, net.low_dim
        self.init_source = net.init_source
        self.classifier = nn.Linear(net.feat_dim, self.num_classes)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor, return_all: bool = False):
        out = self.net(x, return_all=True)
        if not return_all:
            return F.normalize(out.pooled, dim=1)
        out.logits = self.classifier(out.pooled).float()
        return out

    def describe(self) -> dict:
        return {**self.net.describe(), "arch": self.arch, "num_classes": self.num_classes,
                "head": "Linear on the pooled feature (ft_net)"}

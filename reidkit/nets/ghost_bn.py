"""Ghost batch norm: the BN statistics of several GPUs reproduced on one device.

The papers trained with ``nn.DataParallel`` over 4 GPUs: each replica normalised its own quarter of
the batch of 256. :func:`apply_ghost_bn` swaps a model's BatchNorm layers for versions that do the
same on one device (and one DDP process holding several replicas' share)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _GhostBNMixin:
    """BatchNorm whose training-mode statistics are computed per contiguous chunk of ``ghost_chunk``
    samples, with the running statistics updated from the first chunk only: exactly what
    ``nn.DataParallel`` over 4 GPUs does to a batch of 256 (each replica normalises its 64 images;
    only replica 0 shares its buffers with the module)."""

    ghost_chunk: int = 64

    def forward(self, x):
        n = x.shape[0]
        if not self.training or n <= self.ghost_chunk:
            return super().forward(x)
        chunks = x.split(self.ghost_chunk)
        outs = [super().forward(chunks[0])]
        for c in chunks[1:]:
            outs.append(F.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps))
        return torch.cat(outs)


class GhostBatchNorm1d(_GhostBNMixin, nn.BatchNorm1d):
    pass


class GhostBatchNorm2d(_GhostBNMixin, nn.BatchNorm2d):
    pass


def apply_ghost_bn(model: nn.Module, chunk: int | None) -> int:
    """Turn every BatchNorm1d/2d of ``model`` into its ghost version (state dict keys unchanged).
    Returns how many layers changed; ``chunk=None`` changes nothing."""
    if not chunk:
        return 0
    count = 0
    for mod in model.modules():
        for plain, ghost in ((nn.BatchNorm2d, GhostBatchNorm2d), (nn.BatchNorm1d, GhostBatchNorm1d)):
            if type(mod) is plain:
                mod.__class__ = ghost
                mod.ghost_chunk = int(chunk)
                count += 1
    return count

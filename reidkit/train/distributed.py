"""Distributed data parallel (torchrun) for both methods: one process per device, the global batch
split in contiguous slices as ``nn.DataParallel`` did (each of the paper's 4 GPUs saw 4 pseudo-ids x 16).

Rank 0 speaks for all (logs, checkpoints, evaluation); collective calls use a long timeout because
the other ranks wait while rank 0 evaluates."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from reidkit.core.device import activate_device, resolve_device


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


#: default collective timeout: rank 0 evaluates (an MSMT17 test set takes well over NCCL's default
#: 10 minutes on a slow GPU) while the other ranks wait at a barrier
DIST_TIMEOUT_S = 6 * 3600


def dist_timeout():
    """Timeout of the process group: ``$REIDKIT_DIST_TIMEOUT`` seconds, default 6 hours."""

    return timedelta(seconds=float(os.environ.get("REIDKIT_DIST_TIMEOUT", DIST_TIMEOUT_S)))


def init_distributed(device: Any = "auto"):
    """Join the process group that ``torchrun`` describes in the environment (nccl on CUDA, gloo on
    CPU, with :func:`dist_timeout`); returns the device this rank should use. Without torchrun it
    only makes an indexed CUDA device (``--device cuda:1``) the current one."""

    dev = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda":
            dev = activate_device(torch.device("cuda", local))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=dist_timeout())
    elif dev.type == "cuda":
        dev = activate_device(dev)
    return dev


def sync_buffers(model: nn.Module) -> tuple[float, float]:
    """Give every rank rank 0's buffers (BN running statistics) before the features are extracted:
    DDP broadcasts buffers only at the start of the next training forward, so after an epoch each
    rank holds the statistics of its own last batches, and a sharded extraction would cluster
    features of different models. Returns the spread (max - min over ranks) of a buffer checksum
    before and after the broadcast (0.0 after: identical buffers)."""

    def spread() -> float:
        bufs = [b for b in model.buffers() if b.is_floating_point()]
        total = torch.zeros((), dtype=torch.float64)
        for b in bufs:
            total = total + b.detach().double().sum().cpu()
        sums = all_gather_cat(total.reshape(1).to(next(model.parameters()).device))
        return float(sums.max() - sums.min())

    before = spread()
    for b in model.buffers():
        dist.broadcast(b.data, 0)
    return before, spread()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_batch(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return all_gather_cat(x), all_gather_cat(y)


class RankSlice(torch.utils.data.Sampler):
    """Every rank draws the same global batches and keeps its contiguous slice of each."""

    def __init__(self, batch_sampler, rank: int, world: int):
        self.batch_sampler, self.rank, self.world = batch_sampler, rank, world

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        for batch in self.batch_sampler:
            per = len(batch) // self.world
            yield batch[self.rank * per:(self.rank + 1) * per]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands every rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, t):

        ctx.rank, ctx.size = dist.get_rank(), t.shape[0]
        return all_gather_cat(t)

    @staticmethod
    def backward(ctx, grad):

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size]


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """The global batch's ``t`` on every rank (identity in one process), differentiable.

    Every rank computes the same loss on the gathered batch; the backward sums the ranks' gradients
    of each slice (``world`` times the gradient of the loss) and DDP then averages over ranks, so the
    parameters get exactly the gradient of the one-process loss over the global batch. Losses that
    compare images across the batch (DGL's bag constraints, batch-hard triplets) stay whole."""
    if dist_info()[1] == 1:
        return t
    return _GatherWithGrad.apply(t)


def mean_over_ranks(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """The per-step values averaged over ranks (unchanged in one process)."""
    rank, world = dist_info()
    if not values or world == 1:
        return values

    stacked = torch.stack(values)
    dist.all_reduce(stacked)
    return list(stacked / world)


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if dist_info()[1] > 1:

        dist.barrier()


def broadcast_labels(labels: np.ndarray | None, n: int, device) -> np.ndarray:
    """Rank 0's int64 ``labels`` (length ``n``) on every rank."""
    if dist_info()[1] == 1:
        return labels

    t = torch.from_numpy(labels.astype(np.int64)) if labels is not None else torch.empty(n, dtype=torch.int64)
    t = t.to(device)
    dist.broadcast(t, 0)
    return t.cpu().numpy()


def extract_sharded(extract, model, records, *args):
    """``extract(model, records, *args)`` over all ``records``; under DDP each rank extracts every
    world-th record and the features are all-gathered back into order."""
    rank, world = dist_info()
    if world == 1:
        return extract(model, records, *args)
    n = len(records)
    mine = extract(model, records[rank::world], *args)
    per = -(-n // world)
    pad = np.zeros((per, mine.shape[1]), dtype=np.float32)
    pad[:len(mine)] = mine
    device = next(model.parameters()).device
    full = all_gather_cat(torch.from_numpy(pad).to(device)).cpu().numpy().reshape(world, per, -1)
    out = np.empty((n, mine.shape[1]), dtype=np.float32)
    for r in range(world):
        out[r::world] = full[r, :len(range(r, n, world))]
    return out


def owns_process_group(device: Any) -> tuple[torch.device, bool]:
    """Join torchrun's group (see :func:`init_distributed`); True when this call created it, so the
    caller destroys it at the end."""

    before = dist.is_available() and dist.is_initialized()
    dev = init_distributed(device)
    return dev, (not before) and dist.is_available() and dist.is_initialized()


def finish(owned: bool) -> None:
    """Leave the process group this run created (after a last barrier)."""
    if owned:

        dist.barrier()
        dist.destroy_process_group()

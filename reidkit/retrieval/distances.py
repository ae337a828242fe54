"""Pairwise distances between query and gallery features."""

from __future__ import annotations

from typing import Any

import torch

from reidkit.core.device import exact_fp32_matmul, resolve_device
from reidkit.retrieval.market import ArrayLike, _is_tensor, _to_numpy

__all__ = ['pairwise_distance']


def pairwise_distance(
    x: ArrayLike, y: ArrayLike, device: str | None = "auto", chunk_size: int = 4096
) -> Any:
    """Squared Euclidean distances ``||x_i||^2 + ||y_j||^2 - 2 x_i.y_j`` in float32.

    The formula and operation order of torchreid's ``compute_distance_matrix(..., 'euclidean')``
    and HHCL's ``pairwise_distance`` (``addmm`` with ``beta=1, alpha=-2``, keyword form), so
    for unit vectors it is ``2 - 2 cos``. Small negative values from round-off are kept, as in
    the references. Rows of ``x`` are processed ``chunk_size`` at a time on ``device``.

    Returns a numpy array when ``x`` is a numpy array, else a CPU ``torch.Tensor``.
    """

    dev = resolve_device(device)
    as_numpy = not _is_tensor(x)
    xt = torch.as_tensor(_to_numpy(x) if as_numpy else x)
    yt = torch.as_tensor(_to_numpy(y) if not _is_tensor(y) else y)
    if xt.ndim != 2 or yt.ndim != 2 or xt.shape[1] != yt.shape[1]:
        raise ValueError(
            f"x and y must be 2-D with the same feature size, got shapes "
            f"{tuple(xt.shape)} and {tuple(yt.shape)}"
        )
    yt = yt.to(device=dev, dtype=torch.float32)
    yy = yt.pow(2).sum(dim=1, keepdim=True).t()
    out = torch.empty((xt.shape[0], yt.shape[0]), dtype=torch.float32)
    with exact_fp32_matmul():  # exact float32 products whatever TF32 setting the caller made
        for s in range(0, xt.shape[0], chunk_size):
            xc = xt[s : s + chunk_size].to(device=dev, dtype=torch.float32)
            xx = xc.pow(2).sum(dim=1, keepdim=True)
            d = xx.expand(-1, yt.shape[0]) + yy.expand(xc.shape[0], -1)
            d.addmm_(xc, yt.t(), beta=1, alpha=-2)
            out[s : s + chunk_size] = d.cpu()
    return out.numpy() if as_numpy else out

"""The symmetric self-search keeps, for every row, the k smallest of the distances its tiles hold:
written plainly here (every tile computed as the search computes it, the lower triangle from the
transposed upper tiles, one sort per row) and compared with the running-threshold selection."""

import numpy as np
import pytest
import torch

from reidkit.retrieval import knn as kn
from reidkit.retrieval.ca_jaccard import _inter_tiles
from reidkit.retrieval.exact import _screen_tile


def _tiled_matrix(x: torch.Tensor, block: int, bounds=None) -> torch.Tensor:
    """The distance matrix the search sees: tile (a, b), a <= b, as computed; (b, a) its transpose.
    ``bounds``: the (start, end) row ranges cut into blocks separately (the cameras)."""
    n = len(x)
    sq = (x * x).sum(1)
    full = torch.empty(n, n)
    starts = [(s, min(s + block, e)) for b0, e in (bounds or [(0, n)]) for s in range(b0, e, block)]
    for a0, a1 in starts:
        for b0, b1 in starts:
            if b0 < a0:
                continue
            tile = torch.empty(a1 - a0, b1 - b0)
            _screen_tile(x[a0:a1], x[b0:b1], sq[a0:a1], sq[b0:b1], tile, "fp32")
            full[a0:a1, b0:b1] = tile
            if b0 != a0:
                full[b0:b1, a0:a1] = tile.T
    return full


@pytest.mark.parametrize("n, dim, k, block", [(700, 48, 12, 100), (1000, 32, 30, 128), (300, 8, 40, 50),
                                              (500, 8, 3, 7), (90, 4, 20, 1000)])
def test_running_threshold_selection_keeps_each_rows_k_smallest(n, dim, k, block):
    rng = np.random.default_rng(n + k)
    base = torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32))
    x = torch.cat([base, base[:20], base[:5]])  # exact duplicates: tied distances across tiles
    idx, dist = kn._torch_knn_self(x, k, block)
    full = _tiled_matrix(x, block)
    expect = torch.sort(full, dim=1).values[:, :k]
    assert torch.equal(dist, expect)                      # the k smallest values, in order
    assert torch.equal(torch.gather(full, 1, idx), dist)  # each index carries its own distance
    assert all(len(set(row)) == k for row in idx.tolist())  # no neighbour twice


def test_entries_below_orders_by_row_or_by_column():
    rng = np.random.default_rng(0)
    tile = torch.from_numpy(rng.standard_normal((50, 70)).astype(np.float32))
    thr_rows = torch.from_numpy(rng.standard_normal((50, 1)).astype(np.float32)) - 1
    thr_cols = torch.from_numpy(rng.standard_normal((1, 70)).astype(np.float32)) - 1
    r, c = kn._entries_below(tile, thr_rows)
    er, ec = torch.nonzero(tile < thr_rows, as_tuple=True)
    assert torch.equal(r, er) and torch.equal(c, ec) and len(r) > 0
    r, c = kn._entries_below(tile, thr_cols, by_column=True)
    ec, er = torch.nonzero((tile < thr_cols).T, as_tuple=True)
    assert torch.equal(r, er) and torch.equal(c, ec) and len(r) > 0


def test_inter_camera_tiles_keep_each_rows_k_smallest_outside_its_camera():
    """CA-Jaccard's inter-camera lists run through the same selection, over the tiles between two
    cameras' blocks only: the plain version masks a row's own camera and sorts."""
    rng = np.random.default_rng(3)
    sizes = [130, 70, 205]
    x = torch.from_numpy(rng.standard_normal((sum(sizes), 16)).astype(np.float32))
    x[140:150] = x[0:10]  # duplicates across two cameras
    ends = np.cumsum(sizes)
    bounds = [(int(e - s), int(e)) for s, e in zip(sizes, ends)]
    k, block = 25, 32
    idx, dist = _inter_tiles(x, bounds, k, block)
    full = _tiled_matrix(x, block, bounds)
    cam = np.repeat(np.arange(len(sizes)), sizes)
    full[torch.from_numpy(cam[:, None] == cam[None, :])] = float("inf")
    assert torch.equal(dist, torch.sort(full, dim=1).values[:, :k])
    assert torch.equal(torch.gather(full, 1, idx), dist)
    assert not (torch.from_numpy(cam)[idx] == torch.from_numpy(cam)[:, None]).any()

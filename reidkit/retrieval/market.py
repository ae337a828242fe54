"""Retrieval evaluation for person re-ID: Market-style CMC/mAP/mINP and the SYSU-30k protocol.

Both evaluators are *exact* re-implementations of the reference protocols, but they never sort a
whole gallery row. Only the position of each true match in the ranked list matters for CMC and
AP, and that position is a count:

    rank(match j) = #{ kept gallery items k ranked before j }

so each kernel counts instead of sorting. The protocol of each function is explained in its
docstring.

Public API
----------
``evaluate_rank``      Market-1501 / DukeMTMC / MSMT17 protocol (torchreid ``evaluate_rank``,
                       cluster-contrast ``mean_ap``/``cmc``), plus mINP.
``sysu30k_evaluate``   the SYSU-30k protocol of ``test_sysu_combine.py``, streamed over the gallery.
``pairwise_distance``  squared Euclidean distances (float32 ``addmm``), computed in chunks.
``re_ranking``         k-reciprocal re-ranking; a thin wrapper around ``reidkit.retrieval.jaccard``.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

from reidkit.core.device import resolve_device
from reidkit.core.progress import progress

__all__ = ['evaluate_rank']


ArrayLike = Any  # numpy array, torch tensor or list


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _to_numpy(x: ArrayLike, dtype=None) -> np.ndarray:
    """numpy view of ``x`` (a CPU tensor is shared without a copy; a CUDA tensor is copied)."""
    if _is_tensor(x):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    if dtype is not None and arr.dtype != dtype:
        arr = arr.astype(dtype)
    return arr


def _labels(x: ArrayLike, name: str) -> np.ndarray:
    arr = _to_numpy(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "iub":
        if arr.dtype.kind == "f" and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _excl_cumsum(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts), dtype=np.int64)
    if len(counts) > 1:
        np.cumsum(counts[:-1], out=out[1:])
    return out


def _ragged_gather(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flattened indices ``[s_0, .., s_0+l_0-1, s_1, ..]`` and the segment id of each of them."""
    lengths = lengths.astype(np.int64, copy=False)
    total = int(lengths.sum())
    seg = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    idx = np.arange(total, dtype=np.int64) - np.repeat(_excl_cumsum(lengths) - starts, lengths)
    return idx, seg


class _LabelIndex:
    """CSR lookup ``label -> positions with that label`` (vectorised, no Python dict)."""

    def __init__(self, labels: np.ndarray):
        self.order = np.argsort(labels, kind="stable")
        self.uniq, self.starts, self.counts = np.unique(
            labels[self.order], return_index=True, return_counts=True
        )

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each key: (start into ``order``, count) of the positions holding that label."""
        if len(self.uniq) == 0:
            zeros = np.zeros(len(keys), dtype=np.int64)
            return zeros, zeros
        pos = np.searchsorted(self.uniq, keys)
        pos_c = np.minimum(pos, len(self.uniq) - 1)
        hit = (pos < len(self.uniq)) & (self.uniq[pos_c] == keys)
        starts = np.where(hit, self.starts[pos_c], 0).astype(np.int64)
        counts = np.where(hit, self.counts[pos_c], 0).astype(np.int64)
        return starts, counts

    def pairs(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All (i, p) with ``labels[p] == keys[i]``, grouped by i in increasing order."""
        starts, counts = self.lookup(keys)
        idx, seg = _ragged_gather(starts, counts)
        return seg, self.order[idx]


#: rows whose number of true matches exceeds this are counted by sorting the row once
#: (an int64 row sort costs about as much as this many counting passes on a 2-core x86 box).
_SORT_ROW_MIN_MATCHES = 40


#: target number of distance entries handled per chunk by the NumPy backend (cache friendly).
_NUMPY_CHUNK_ELEMS = 1 << 22


#: the same for the torch backend (GPU: larger blocks amortise kernel launches).
_TORCH_CHUNK_ELEMS = 1 << 25


def _row_count(mask: np.ndarray) -> np.ndarray:
    """Number of True entries per row of a 2-D boolean array (faster than ``count_nonzero``)."""
    return mask.view(np.uint8).sum(axis=1, dtype=np.int32)


def _f32_order_keys(d: np.ndarray) -> np.ndarray:
    """Map a C-contiguous float32 block (n, G) to unique int64 sort keys.

    ``key = (monotone_int32(d) << 32) | column``, so ``key_a < key_b`` exactly when
    ``(d_a, col_a) < (d_b, col_b)`` lexicographically: the order a *stable* ascending sort
    gives, ties broken by the lower gallery index. ``monotone_int32`` is the IEEE-754 bit
    pattern with the non-sign bits of negative numbers flipped (and -0.0 mapped onto +0.0),
    which is an order-preserving bijection on non-NaN floats.
    """
    n, g = d.shape
    bits = d.view(np.int32)
    keys = np.empty((n, g), dtype=np.int64)
    if sys.byteorder == "little" and g < 2**31:
        halves = keys.view(np.int32).reshape(n, g, 2)
        halves[..., 1] = bits  # high word (signed)
        halves[..., 0] = np.arange(g, dtype=np.int32)  # low word = column index
        if d.size and float(d.min()) <= 0.0:
            neg = bits < 0
            if neg.any():
                hi = halves[..., 1]
                hi[neg] = (hi[neg] ^ 0x7FFFFFFF) + 1
    else:  # portable arithmetic version
        hi = bits.astype(np.int64)
        neg = hi < 0
        hi[neg] = (hi[neg] ^ 0x7FFFFFFF) + 1
        np.multiply(hi, np.int64(1 << 32), out=keys)
        keys += np.arange(g, dtype=np.int64)
    return keys


def _rows_of(distmat: Any, rows: np.ndarray) -> Any:
    """Rows ``rows`` of the distance matrix, keeping its library (numpy or torch)."""
    if _is_tensor(distmat):

        return distmat.index_select(0, torch.as_tensor(rows, device=distmat.device))
    return np.asarray(distmat[rows])


def _count_before_numpy(
    block: np.ndarray, p_rows: np.ndarray, p_cols: np.ndarray, p_junk: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Counting kernel of the NumPy backend.

    ``block`` (n, G) holds the distances of n queries, sorted by decreasing number of true
    matches. ``(p_rows, p_cols)`` are the positions of the queries' same-pid gallery items
    (matches and junk), grouped by row; ``p_junk`` flags the junk ones.

    Returns ``order`` (sorts the pairs by row, then by stable-sort position within the row) and
    ``before`` (in that sorted order): for every *match*, the number of gallery items of its row
    that a stable ascending sort puts before it (junk entries of ``before`` are 0, unused).

    float32 input: items become unique int64 keys (see :func:`_f32_order_keys`), so "before
    match j" is the single test ``key < key_j``. Slot t (the t-th closest match of every row)
    is one vectorised ``count_nonzero(keys < thr)`` pass over the rows having more than t
    matches, which are a contiguous prefix of the block. Rows with more than
    ``_SORT_ROW_MIN_MATCHES`` matches are sorted once instead (cheaper than that many passes).
    Other dtypes (float64) use the lexicographic test ``d < d_j or (d == d_j and k < j)``.
    """
    n, g = block.shape
    float32 = block.dtype == np.float32
    if float32:
        keys = _f32_order_keys(block)
        pair_key = keys[p_rows, p_cols]
        order = np.lexsort((pair_key, p_rows))
    else:
        pair_val = block[p_rows, p_cols]
        order = np.lexsort((p_cols, pair_val, p_rows))
    rows_s, cols_s, is_m = p_rows[order], p_cols[order], ~p_junk[order]
    before = np.zeros(len(order), dtype=np.int64)
    m_rows, m_cols = rows_s[is_m], cols_s[is_m]
    n_match = np.bincount(m_rows, minlength=n)
    if len(m_rows) == 0:
        return order, before
    if np.any(np.diff(n_match) > 0):
        raise AssertionError("rows must be sorted by decreasing number of matches")
    slot = np.arange(len(m_rows), dtype=np.int64) - _excl_cumsum(n_match)[m_rows]
    width = int(n_match[0])
    cnt = np.zeros((n, width), dtype=np.int64)
    heavy = int(np.count_nonzero(n_match > _SORT_ROW_MIN_MATCHES))
    if float32:
        thr = np.zeros((n, width), dtype=np.int64)
        thr[m_rows, slot] = keys[m_rows, m_cols]
        if heavy:  # rows with many matches: one sort of the unique keys, then binary search
            srt = np.sort(keys[:heavy], axis=1)
            for r in range(heavy):
                k = int(n_match[r])
                cnt[r, :k] = np.searchsorted(srt[r], thr[r, :k])
            del srt
    else:
        thr_v = np.zeros((n, width), dtype=block.dtype)
        thr_i = np.zeros((n, width), dtype=np.int64)
        thr_v[m_rows, slot] = block[m_rows, m_cols]
        thr_i[m_rows, slot] = m_cols
        cols = np.arange(g, dtype=np.int64)
        for r in range(heavy):
            k = int(n_match[r])
            pos = np.empty(g, dtype=np.int64)
            pos[np.argsort(block[r], kind="stable")] = np.arange(g)
            cnt[r, :k] = pos[thr_i[r, :k]]
    neg_counts = -n_match
    for t in range(width):
        rows_t = int(np.searchsorted(neg_counts, -t, side="left"))  # rows with > t matches
        if rows_t <= heavy:
            break
        sl = slice(heavy, rows_t)
        if float32:
            cnt[sl, t] = _row_count(keys[sl] < thr[sl, t : t + 1])
        else:
            v, vi, b = thr_v[sl, t : t + 1], thr_i[sl, t : t + 1], block[sl]
            cnt[sl, t] = _row_count(b < v) + _row_count((b == v) & (cols < vi))
    before[np.flatnonzero(is_m)] = cnt[m_rows, slot]
    return order, before


def _count_before_torch(
    block: Any, p_rows: np.ndarray, p_cols: np.ndarray, device
) -> tuple[np.ndarray, np.ndarray]:
    """Torch backend (GPU): a stable sort of each row, and its inverse permutation gives the
    position of every item directly. Exact for any dtype; ``O(n G log G)`` but fast on a GPU.
    Same outputs as :func:`_count_before_numpy` (``before`` is filled for junk items too)."""

    t = torch.as_tensor(block).to(device)
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    n, g = t.shape
    perm = torch.sort(t, dim=1, stable=True).indices
    pos = torch.empty_like(perm)
    pos.scatter_(1, perm, torch.arange(g, device=t.device).expand(n, g))
    del perm
    rr = torch.as_tensor(p_rows, device=t.device)
    cc = torch.as_tensor(p_cols, device=t.device)
    before = pos[rr, cc].cpu().numpy()
    order = np.lexsort((before, p_rows))
    return order, before[order]


def _has_nan(block: Any) -> bool:
    if _is_tensor(block):
        return bool(block.isnan().any()) if block.is_floating_point() else False
    return block.dtype.kind == "f" and bool(np.isnan(block).any())


def _rank_inputs(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int):
    """Step 0 of :func:`evaluate_rank`: validate the shapes and labels; returns the distance matrix
    (numpy or torch), the four int64 label arrays and the CMC length (cut to the gallery size)."""
    if not hasattr(distmat, "shape") or len(distmat.shape) != 2:
        shape = tuple(getattr(distmat, "shape", np.shape(distmat)))
        raise ValueError(f"distmat must be 2-D (num_query, num_gallery), got shape {shape}")
    if not _is_tensor(distmat) and not isinstance(distmat, np.ndarray):
        distmat = np.asarray(distmat)
    num_q, num_g = (int(s) for s in distmat.shape)
    q_pids, g_pids = _labels(q_pids, "q_pids"), _labels(g_pids, "g_pids")
    q_camids, g_camids = _labels(q_camids, "q_camids"), _labels(g_camids, "g_camids")
    for name, arr, n, what in (
        ("q_pids", q_pids, num_q, "num_query"),
        ("q_camids", q_camids, num_q, "num_query"),
        ("g_pids", g_pids, num_g, "num_gallery"),
        ("g_camids", g_camids, num_g, "num_gallery"),
    ):
        if len(arr) != n:
            raise ValueError(
                f"{name} has shape {tuple(arr.shape)} but distmat has shape "
                f"{(num_q, num_g)}: expected length {n} ({what})"
            )
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    max_rank = min(int(max_rank), num_g) if num_g else int(max_rank)
    return distmat, q_pids, g_pids, q_camids, g_camids, max_rank


def _rank_backend(distmat, device, backend: str):
    """Step 1: choose the counting kernel (NumPy int64 keys on CPU, torch stable sort on a GPU);
    returns (distmat converted for it, use_torch, device or None, backend name)."""
    if backend not in ("auto", "numpy", "torch"):
        raise ValueError(f"backend must be 'auto', 'numpy' or 'torch', got {backend!r}")
    if backend == "numpy" or (backend == "auto" and str(device) == "cpu"):
        use_torch, dev = False, None  # pure NumPy: torch is not even imported
    else:
        dev = resolve_device(device)
        use_torch = backend == "torch" or dev.type != "cpu"
    name = f"torch-stable-sort[{dev.type}]" if use_torch else "numpy-int64-key-count"
    if not use_torch and _is_tensor(distmat):
        distmat = _to_numpy(distmat)
    if not use_torch and distmat.dtype not in (np.float32, np.float64):
        if distmat.dtype == np.float16:
            distmat = distmat.astype(np.float32)  # exact upcast
        else:
            distmat = distmat.astype(np.float64)
    return distmat, use_torch, dev, name


def _rank_block(block, rows: np.ndarray, same: tuple, n_match: np.ndarray, use_torch: bool, dev):
    """Step 2, one block of query rows (sorted by decreasing number of matches): the 0-based
    positions of the matches in the filtered lists; returns (AP, INP, first-match rank) of the rows.

    ``same = (p_g, p_junk, ptr, n_same)``: the CSR table of every query's same-pid gallery items."""
    p_g, p_junk, ptr, n_same = same
    idx, seg = _ragged_gather(ptr[rows], n_same[rows])
    p_rows, p_cols, p_jk = seg, p_g[idx], p_junk[idx]
    if use_torch:
        order, before = _count_before_torch(block, p_rows, p_cols, dev)
    else:
        order, before = _count_before_numpy(np.ascontiguousarray(block), p_rows, p_cols, p_jk)
    p_rows, p_jk = p_rows[order], p_jk[order]
    # within a row the same-pid items are now in ranking order: count the removed (junk)
    # items before each match and the match's hit index (0-based among the matches)
    junk_i = p_jk.astype(np.int64)
    row_start = _excl_cumsum(np.bincount(p_rows, minlength=len(rows)))
    cj_excl = np.cumsum(junk_i) - junk_i
    junk_before = cj_excl - cj_excl[row_start][p_rows]
    keep = ~p_jk
    r = (before - junk_before)[keep]  # 0-based position in the filtered list
    mr = p_rows[keep]
    hit = np.arange(len(mr)) - _excl_cumsum(np.bincount(mr, minlength=len(rows)))[mr]
    m = n_match[rows].astype(np.float64)
    ap = np.bincount(mr, weights=(hit + 1) / (r + 1.0), minlength=len(rows)) / m
    last = np.zeros(len(rows), dtype=np.int64)
    last[mr] = r  # ascending within a row: the last write is the hardest match
    first = np.full(len(rows), -1, dtype=np.int64)
    first[mr[hit == 0]] = r[hit == 0]
    return ap, m / (last + 1.0), first


def evaluate_rank(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    max_rank: int = 50,
    *,
    device: str | None = "auto",
    backend: str = "auto",
    chunk_size: int | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """CMC, mAP and mINP under the Market-1501 protocol (exactly torchreid's ``evaluate_rank``
    with ``use_metric_cuhk03=False``, ties broken by gallery index).

    Protocol, per query ``q``:

    1. Rank the gallery by ascending distance. Equal distances are ordered by gallery index
       (what a *stable* sort gives; numpy's default ``argsort`` is not stable, so with exact
       ties the references can differ from this by platform).
    2. Remove the gallery items with the **same pid and the same camera** as the query (the
       same person seen by the same camera is too easy). Everything else stays, including
       distractors (Market pid 0).
    3. True matches are the remaining items with the query's pid. A query with no true match
       left is **skipped** (counted neither in CMC nor in mAP).
    4. With ``r_1 < r_2 < ... < r_M`` the 0-based positions of the M matches in the filtered
       list: ``CMC@k = mean_q [r_1 < k]``, ``AP = (1/M) * sum_i i / (r_i + 1)``
       (non-interpolated; equals sklearn's ``average_precision_score`` without ties) and
       ``INP = M / (r_M + 1)`` (Ye et al., 2021: how hard is the hardest match).

    How it is computed (no full sort): ``r_i`` is the number of kept gallery items that come
    before match i, which is *(all items before it in the row) - (removed items before it)*.
    The second term involves only the query's few same-pid items. The first is counted: on CPU
    each float32 distance becomes a unique int64 key ``(ordered bits of d, gallery index)`` and
    ``#{key < key_i}`` is one vectorised comparison pass per match slot over a block of query
    rows; rows with more than 40 matches are sorted once instead. On a GPU each row is sorted
    (stable) and the inverse permutation gives every position. Queries are processed in
    blocks of rows, so memory stays at a few tens of MB beyond the input (MSMT17's
    11,659 x 82,161 matrix is never copied as a whole). No float tolerance is involved: the
    result is the exact integer ranks.

    Args:
        distmat: (num_query, num_gallery) distances, numpy array or torch tensor (any float
            dtype; float32 is the fast path). NaN is rejected.
        q_pids, g_pids, q_camids, g_camids: 1-D integer labels.
        max_rank: length of the CMC curve (cut to the gallery size if it is larger, as in
            torchreid).
        device: "auto" (CUDA when available), "cpu" or a torch device.
        backend: "auto" (NumPy counting kernel on CPU, torch stable-sort kernel on CUDA),
            "numpy" or "torch" (the torch kernel also runs on CPU, but slower).
        chunk_size: queries per block (default: about 4M distances per block on CPU, 32M on GPU).
        show_progress: show a progress bar over blocks.

    Returns:
        dict with ``cmc`` (float64, length ``max_rank``), ``mAP``, ``mINP``, ``num_valid_q``,
        and per query ``AP`` and ``INP`` (NaN for skipped queries), ``first_match_rank``
        (0-based position of the first true match in the filtered list, -1 if skipped),
        ``num_matches`` and ``backend`` (which kernel ran).
    """
    distmat, q_pids, g_pids, q_camids, g_camids, max_rank = _rank_inputs(
        distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    num_q, num_g = (int(s) for s in distmat.shape)
    distmat, use_torch, dev, backend = _rank_backend(distmat, device, backend)

    # same-pid pairs (query, gallery item): the only items that need individual treatment
    p_q, p_g = _LabelIndex(g_pids).pairs(q_pids)
    p_junk = g_camids[p_g] == q_camids[p_q]
    n_match = np.bincount(p_q[~p_junk], minlength=num_q)
    n_same = np.bincount(p_q, minlength=num_q)
    same = (p_g, p_junk, _excl_cumsum(n_same), n_same)

    ap = np.full(num_q, np.nan)
    inp = np.full(num_q, np.nan)
    first = np.full(num_q, -1, dtype=np.int64)
    valid = np.flatnonzero(n_match > 0)
    if chunk_size is None:
        per = (_TORCH_CHUNK_ELEMS if use_torch else _NUMPY_CHUNK_ELEMS) // max(num_g, 1)
        chunk_size = max(1, per)
    blocks = [valid[i : i + chunk_size] for i in range(0, len(valid), chunk_size)]
    for rows in progress(blocks, desc="evaluate_rank", disable=not show_progress):
        rows = rows[np.argsort(-n_match[rows], kind="stable")]  # most matches first
        block = _rows_of(distmat, rows)
        if _has_nan(block):
            raise ValueError("distmat contains NaN")
        ap[rows], inp[rows], first[rows] = _rank_block(block, rows, same, n_match, use_torch, dev)

    num_valid = len(valid)
    if num_valid == 0:
        raise ValueError("all query identities are missing from the gallery (no valid query)")
    hist = np.bincount(first[valid], minlength=num_g)[:max_rank]
    cmc = np.cumsum(hist) / num_valid
    if len(cmc) < max_rank:
        cmc = np.concatenate([cmc, np.full(max_rank - len(cmc), cmc[-1] if len(cmc) else 0.0)])
    return {
        "cmc": cmc.astype(np.float64),
        "mAP": float(np.mean(ap[valid])),
        "mINP": float(np.mean(inp[valid])),
        "num_valid_q": int(num_valid),
        "AP": ap,
        "INP": inp,
        "first_match_rank": first,
        "num_matches": n_match,
        "backend": backend,
    }

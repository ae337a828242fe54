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
``re_ranking``         k-reciprocal re-ranking; a thin wrapper around ``reidkit.neighbors``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from reidkit.utils import exact_fp32_matmul, progress, resolve_device

__all__ = ["evaluate_rank", "sysu30k_evaluate", "pairwise_distance", "re_ranking"]

ArrayLike = Any  # numpy array, torch tensor or list

# ----------------------------------------------------------------------------------------------
# small conversion helpers
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Market-style evaluation
# ----------------------------------------------------------------------------------------------

#: rows whose number of true matches exceeds this are counted by sorting the row once
#: (an int64 row sort costs about as much as this many counting passes on a 2-core x86 box).
_SORT_ROW_MIN_MATCHES = 40
#: target number of distance entries handled per chunk by the NumPy backend (cache friendly).
_NUMPY_CHUNK_ELEMS = 1 << 22
#: the same for the torch backend (GPU: larger blocks amortise kernel launches).
_TORCH_CHUNK_ELEMS = 1 << 25
#: tests set this to run the torch (GPU) code paths of the SYSU kernel on CPU tensors.
_FORCE_TORCH_OPS = False


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
        import torch

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
    import torch

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


# ----------------------------------------------------------------------------------------------
# SYSU-30k evaluation (streamed)
# ----------------------------------------------------------------------------------------------

GalleryChunk = tuple[ArrayLike, ArrayLike, ArrayLike]


def _is_array_triple(g: Any) -> bool:
    """``(features, labels, cams)`` arrays, as opposed to a sequence of such chunks."""
    return (
        isinstance(g, (tuple, list))
        and len(g) == 3
        and hasattr(g[0], "shape")
        and len(g[0].shape) == 2
    )


def _gallery_source(
    gallery: Any, chunk_size: int
) -> tuple[Callable[[], Iterator[GalleryChunk]], bool, int | None]:
    """Normalise ``gallery`` to (factory of chunk iterators, re-iterable?, total if known)."""
    if _is_array_triple(gallery):
        feats, labels, cams = gallery
        n = int(feats.shape[0])

        def slices() -> Iterator[GalleryChunk]:
            for s in range(0, n, chunk_size):
                e = s + chunk_size
                yield feats[s:e], labels[s:e], cams[s:e]

        return slices, True, n
    if callable(gallery):
        return (lambda: iter(gallery())), True, None
    if isinstance(gallery, Sequence):
        return (lambda: iter(gallery)), True, None
    if isinstance(gallery, Iterable):
        it = iter(gallery)
        used = [False]

        def once() -> Iterator[GalleryChunk]:
            if used[0]:
                raise RuntimeError("one-shot gallery iterator consumed twice")
            used[0] = True
            return it

        return once, False, None
    raise TypeError(
        "gallery must be (features, labels, cams), an iterable of such chunks, or a "
        f"callable returning one; got {type(gallery).__name__}"
    )


def _split_chunks(
    chunks: Iterator[GalleryChunk], chunk_size: int, dim: int
) -> Iterator[tuple[int, Any, np.ndarray, np.ndarray]]:
    """Validate chunks, split big ones, and attach the global offset of their first item."""
    offset = 0
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, (tuple, list)) or len(chunk) != 3:
            raise ValueError(f"gallery chunk {i} must be a (features, labels, cams) triple")
        feats, labels, cams = chunk
        shape = tuple(feats.shape)
        labels = _labels(labels, f"gallery chunk {i} labels")
        cams = _labels(cams, f"gallery chunk {i} cams")
        if len(shape) != 2 or shape[1] != dim or len(labels) != shape[0] or len(cams) != shape[0]:
            raise ValueError(
                f"gallery chunk {i}: features {shape}, labels {tuple(labels.shape)}, cams "
                f"{tuple(cams.shape)}; expected features (B, {dim}) and labels/cams (B,)"
            )
        for s in range(0, shape[0], chunk_size):
            e = min(s + chunk_size, shape[0])
            if s == 0 and e == shape[0]:
                yield offset, feats, labels, cams
            else:
                yield offset + s, feats[s:e], labels[s:e], cams[s:e]
        offset += shape[0]


class _ScorePool:
    """Per query, every *earlier* kept score above a threshold ``theta_q`` (numpy, CPU).

    Invariant: all kept scores streamed so far that are ``> theta_q`` are in row q of the pool,
    and the pool holds at least ``k`` of them once ``theta_q > -inf``. So for a good match with
    score ``s >= theta_q``, ``#{earlier kept items > s} = #{pool_q > s}``, exactly.
    New chunks only add their scores above ``theta_q``; when a row grows beyond ``2k`` entries
    it is cut back to its ``k`` largest (``np.partition``) and ``theta_q`` rises to the
    smallest of them. Amortised cost: a comparison pass per chunk plus a rare partition.
    Values are stored negated with ``+inf`` padding (``np.partition`` is far slower with many
    equal values at the low end).
    """

    def __init__(self, nq: int, k: int):
        self.k = k
        self.neg = np.full((nq, 0), np.inf, dtype=np.float32)
        self.fill = np.zeros(nq, dtype=np.int64)
        self.neg_theta = np.full(nq, np.inf, dtype=np.float32)  # -theta

    def add(self, s: Any) -> None:
        """Add the kept scores of one chunk (``s``: torch (nq, B), junk already ``-inf``)."""
        import torch

        nq, b = s.shape
        theta = -self.neg_theta
        if self.neg.shape[1] == 0 and b > 2 * self.k and s.device.type == "cpu" and not _FORCE_TORCH_OPS:
            # first chunk, everything enters: keep each row's k best at once (the same pool as
            # adding all then cutting; rows with fewer than k kept scores keep theta = -inf)
            self.neg = np.ascontiguousarray(np.partition(-s.numpy(), self.k - 1, axis=1)[:, : self.k])
            self.fill[:] = self.k
            self.neg_theta = self.neg.max(axis=1)
            return
        if s.device.type == "cpu" and not _FORCE_TORCH_OPS:
            sn = s.numpy()
            flat = np.flatnonzero(sn > theta[:, None])  # much faster than a 2-D nonzero
            rows, _ = np.divmod(flat, b)
            vals = sn.reshape(-1)[flat]
        else:
            mask = s > torch.as_tensor(theta, device=s.device)[:, None]
            rows = mask.nonzero()[:, 0].cpu().numpy()
            vals = s[mask].cpu().numpy()
        if len(rows) == 0:
            return
        cnt = np.bincount(rows, minlength=nq)
        pos = self.fill[rows] + np.arange(len(rows)) - _excl_cumsum(cnt)[rows]
        self.fill += cnt
        width = int(self.fill.max())
        if width > self.neg.shape[1]:
            pad = np.full((nq, width - self.neg.shape[1]), np.inf, dtype=np.float32)
            self.neg = np.concatenate([self.neg, pad], axis=1)
        self.neg[rows, pos] = -vals
        if width > 2 * self.k:  # cut the long rows back to their k largest scores
            over = np.flatnonzero(self.fill > self.k)
            new = self.neg[:, : self.k].copy()  # rows with fill <= k fit in k columns
            new[over] = np.partition(self.neg[over], self.k - 1, axis=1)[:, : self.k]
            self.neg = new
            self.fill[over] = self.k
            self.neg_theta[over] = new[over].max(axis=1)

    def count_above_exact(self, rows: np.ndarray, c: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For good matches (query ``rows``, canonical score ``c``, band ``[lo, hi] = c -+ B``):
        the number of earlier kept items above (pooled score ``> hi``, plus the band items whose
        pooled screening score is ``> c``), the number of band items (their exact score would need
        the gallery again), and whether every earlier score ``>= lo`` is pooled (``lo > theta``)."""
        if len(rows) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.ones(0, bool)
        hi32 = np.nextafter(hi.astype(np.float32), np.float32(np.inf))
        lo32 = np.nextafter(lo.astype(np.float32), np.float32(-np.inf))
        neg = self.neg[rows]
        cnt = _row_count(neg < -hi32[:, None]).astype(np.int64)
        band = _row_count(neg <= -lo32[:, None]).astype(np.int64) - cnt
        cnt += _row_count((neg < -c[:, None]) & (neg >= -hi32[:, None]))
        return cnt, band, lo32 > -self.neg_theta[rows]


class _SysuScorer:
    """Query-side state of the SYSU kernel: screening scores of a gallery chunk and the exact
    counts built on them (see :func:`sysu30k_evaluate`, "Exact scores")."""

    def __init__(self, qf: Any, dev: Any, precision: str):
        import torch

        from reidkit.neighbors import U_F32, _TINY, score_bound

        self.dev, self.precision, self.dim = dev, precision, int(qf.shape[1])
        self.qf = qf
        self.qs = qf.to(torch.bfloat16) if precision == "bf16" else qf
        self.q64 = qf.double()  # the rows of the exact re-scoring, converted once
        # float32 norms, raised by their worst relative rounding error (d + 2) 2^-24
        self.inflate = 1 + (self.dim + 2) * U_F32
        self.qnorm = qf.norm(dim=1).double().cpu().numpy() * self.inflate
        self.beta = score_bound(self.dim, precision) * (1 + 64 * U_F32)
        self.tiny = 4 * self.dim * _TINY

    def scores(self, feats: Any, rows: np.ndarray | None = None) -> tuple[Any, Any, float]:
        """Screening scores ``Q[rows] @ G^T`` (float32 tensor), the float32 gallery chunk on the
        device and the largest gallery norm of the chunk."""
        import torch

        from reidkit.neighbors import screen_matmul

        g = torch.as_tensor(_to_numpy(feats) if not _is_tensor(feats) else feats)
        g = g.to(device=self.dev, dtype=torch.float32)
        q = self.qs if rows is None else self.qs[torch.as_tensor(rows, device=self.dev)]
        gmax = float(g.norm(dim=1).max()) * self.inflate if len(g) else 0.0
        return screen_matmul(q, g, self.precision), g, gmax

    def bound(self, rows: np.ndarray, gmax: float) -> np.ndarray:
        """Per query: ``|screening score - RN32(q.g)| <= bound`` for gallery norms ``<= gmax``."""
        return self.beta * self.qnorm[rows] * gmax + self.tiny

    def exact(self, rows: np.ndarray, g: Any, cols: np.ndarray) -> np.ndarray:
        """Canonical scores ``RN32(q_rows . g_cols)`` (:func:`reidkit.neighbors.exact_pair_dots`)."""
        from reidkit.neighbors import exact_pair_dots

        return exact_pair_dots(self.qf, g, rows, cols, x64=self.q64)

    def count_above(self, s: Any, rows: np.ndarray, c: np.ndarray, bnd: np.ndarray, g: Any) -> np.ndarray:
        """Per row r of ``s`` (screening scores of query ``rows[r]``, junk ``-inf``): the number of
        gallery items whose canonical score is ``> c[r]``. Items with ``s > c + bnd`` count, items
        with ``s < c - bnd`` do not, the few in between are scored exactly."""
        lo = np.nextafter((c - bnd).astype(np.float32), np.float32(-np.inf))
        hi = np.nextafter((c + bnd).astype(np.float32), np.float32(np.inf))
        r, j, v = _entries_at_least(s, lo)
        above = v > hi[r]
        cnt = np.bincount(r[above], minlength=len(rows)).astype(np.int64)
        amb = np.flatnonzero(~above)
        if len(amb):
            cs = self.exact(rows[r[amb]], g, j[amb])
            cnt += np.bincount(r[amb][cs > c[r[amb]]], minlength=len(rows))
        return cnt


def _entries_at_least(s: Any, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, value) of the entries of ``s`` with ``s[r, j] >= lo[r]``."""
    import torch

    if s.device.type == "cpu" and not _FORCE_TORCH_OPS:
        sn = s.numpy()
        flat = np.flatnonzero(sn >= lo[:, None])
        r, j = np.divmod(flat, sn.shape[1])
        return r, j, sn.reshape(-1)[flat]
    mask = s >= torch.as_tensor(lo, device=s.device)[:, None]
    idx = mask.nonzero()
    r, j = idx[:, 0], idx[:, 1]
    return r.cpu().numpy(), j.cpu().numpy(), s[r, j].cpu().numpy()


class _SysuGoods:
    """Per-good-match state of the streamed SYSU evaluation (grown as good matches appear)."""

    def __init__(self, nq: int):
        self.q = np.zeros(0, np.int64)  # query of the good match
        self.s = np.zeros(0, np.float32)  # its canonical score
        self.idx = np.zeros(0, np.int64)  # global gallery index
        self.start = np.zeros(0, np.int64)  # global offset of the chunk it appeared in
        self.cnt = np.zeros(0, np.int64)  # kept items with a greater score (counted so far)
        self.slot = np.zeros(0, np.int64)  # index among the good matches of its query
        self.unresolved = np.zeros(0, bool)
        self.n_good = np.zeros(nq, np.int64)

    def add(self, q, s, idx, start, cnt, slot, unresolved) -> None:
        """Append new good matches (arrays of equal length)."""
        for name, val in (("q", q), ("s", s), ("idx", idx), ("start", start), ("cnt", cnt),
                          ("slot", slot), ("unresolved", unresolved)):
            setattr(self, name, np.concatenate([getattr(self, name), val]))
        np.add.at(self.n_good, q, 1)


def _sysu_chunk_masks(qlabel_index: _LabelIndex, qc: np.ndarray, labels: np.ndarray,
                      cams: np.ndarray, rows: np.ndarray | None = None):
    """Column ids with label -1, and (query, column) junk / good pairs of this chunk (``rows``:
    restrict to these queries, renumbered ``0..len(rows)-1``)."""
    nq = len(qc)
    neg1 = np.flatnonzero(labels == -1)
    cand = np.flatnonzero(labels != -1)
    starts, counts = qlabel_index.lookup(labels[cand])
    sel = counts > 0
    idx, seg = _ragged_gather(starts[sel], counts[sel])
    pq = qlabel_index.order[idx]
    pc = cand[sel][seg]
    cam_q = qc
    if rows is not None:
        pos = np.full(nq, -1, np.int64)
        pos[rows] = np.arange(len(rows))
        keep = pos[pq] >= 0
        pq, pc = pos[pq[keep]], pc[keep]
        cam_q = qc[rows]
    same_cam = cams[pc] == cam_q[pq]
    return neg1, (pq[same_cam], pc[same_cam]), (pq[~same_cam], pc[~same_cam])


def _mask_junk(s: Any, neg1: np.ndarray, junk: tuple[np.ndarray, np.ndarray]) -> None:
    """Set the junk entries of a score block to ``-inf`` (in place)."""
    import torch

    if len(neg1):
        s[:, torch.as_tensor(neg1, device=s.device)] = -math.inf
    if len(junk[0]):
        jr = torch.as_tensor(junk[0], device=s.device)
        s[jr, torch.as_tensor(junk[1], device=s.device)] = -math.inf


def _sysu_register_goods(st: "_SysuStream", g: Any, offset: int, good) -> None:
    """Step 1 of a chunk: record its good matches (canonical scores) and count, from the score
    pool, the earlier kept items above each; a count the pool cannot certify is left to pass 2."""
    order = np.lexsort((good[1], good[0]))
    nq_new, nc_new = good[0][order], good[1][order]
    ns = st.scorer.exact(nq_new, g, nc_new)
    first_of_q = _excl_cumsum(np.bincount(nq_new, minlength=st.nq))
    slots = st.goods.n_good[nq_new] + np.arange(len(nq_new)) - first_of_q[nq_new]
    if st.K:
        bnd = st.scorer.bound(nq_new, st.gmax_past)
        past, band, pooled = st.pool.count_above_exact(nq_new, ns, ns - bnd, ns + bnd)
        unresolved = ~pooled | ((band > 0) & st.reiterable)
        if not st.reiterable:  # no second pass possible: band items decided by their screening
            st.unverified += int(band[pooled].sum())
    else:
        past = np.zeros(len(nq_new), np.int64)
        unresolved = st.n_past[nq_new] > 0
    if unresolved.any() and not st.reiterable:
        raise RuntimeError(
            f"{int(unresolved.sum())} good match(es) appeared after at least "
            f"buffer_size={st.K} better-scoring gallery items had already streamed past; "
            "their exact rank needs a second pass. Pass the gallery as arrays, a list "
            "of chunks or a callable returning a fresh iterator, or raise buffer_size."
        )
    st.goods.add(nq_new, ns, offset + nc_new, np.full(len(nq_new), offset, np.int64),
                 np.where(unresolved, 0, past), slots, unresolved)
    width = int(st.goods.n_good.max())
    if width > st.thr.shape[1]:
        pad = np.full((st.nq, width - st.thr.shape[1]), np.inf, np.float32)
        st.thr = np.concatenate([st.thr, pad], axis=1)
    st.thr[nq_new, slots] = ns


def _sysu_count_chunk(st: "_SysuStream", s: Any, g: Any, gmax: float) -> None:
    """Step 2 of a chunk: for every known good match, the chunk's kept items scoring above it."""
    import torch

    goods = st.goods
    for t in range(st.thr.shape[1]):
        rows_t = np.flatnonzero(goods.n_good > t)
        c = st.thr[rows_t, t]
        st_rows = s if len(rows_t) == st.nq else s[torch.as_tensor(rows_t, device=s.device)]
        cnt_t = st.scorer.count_above(st_rows, rows_t, c, st.scorer.bound(rows_t, gmax), g)
        sel = goods.slot == t
        pos = np.full(st.nq, -1, np.int64)
        pos[rows_t] = np.arange(len(rows_t))
        goods.cnt[sel] += cnt_t[pos[goods.q[sel]]]


class _SysuStream:
    """Everything :func:`sysu30k_evaluate` carries from one gallery chunk to the next.

    Streaming algorithm (memory ``O(queries x (chunk_size + 2 buffer_size) + #good)``): for
    each chunk, screening scores ``Q @ G_chunk^T`` are computed, junk entries are set to
    ``-inf``, and for every good match found so far the kept items of the chunk above it are
    counted (:meth:`_SysuScorer.count_above`: screening, exact scores in the band). Items streamed *before* a good match appears are covered by a per-query
    pool holding every earlier kept screening score above ``theta_q`` (at least the
    ``buffer_size`` best): when ``c_good - B > theta_q`` and no pooled score lies within ``B``
    of ``c_good``, the pool gives the exact count. Otherwise the count is completed by a second
    pass over the earlier chunks, which needs a re-iterable ``gallery`` (arrays, a list of
    chunks or a callable returning a fresh iterator). A one-shot generator raises
    ``RuntimeError`` when the pool is too small (``c_good - B <= theta_q``); pooled scores
    within ``B`` of ``c_good`` (near-ties, rare with the fp32 band that one-shot galleries use)
    are then decided by their screening score and counted in ``unverified_comparisons``. In
    SYSU-30k's folder order the true matches come first, so one pass always suffices and the
    result is exact.
    """

    def __init__(self, scorer: _SysuScorer, ql: np.ndarray, qc: np.ndarray, K: int, reiterable: bool):
        self.scorer, self.qc, self.K, self.reiterable = scorer, qc, K, reiterable
        self.nq = len(ql)
        self.qlabel_index = _LabelIndex(ql)
        self.goods = _SysuGoods(self.nq)
        self.thr = np.full((self.nq, 0), np.inf, np.float32)  # thr[q, t]: q's t-th good score
        self.pool = _ScorePool(self.nq, K)  # earlier kept scores that a late good match may need
        self.n_past = np.zeros(self.nq, np.int64)  # kept items seen so far
        self.gmax_past = 0.0  # largest gallery norm seen so far (bounds of the pool's scores)
        self.unverified = 0  # comparisons decided by screening scores (one-shot galleries only)

    def chunk(self, offset: int, feats: Any, labels: np.ndarray, cams: np.ndarray) -> None:
        """Process one gallery chunk (steps 1-3 of the streaming algorithm)."""
        s, g, gmax = self.scorer.scores(feats)
        neg1, junk, good = _sysu_chunk_masks(self.qlabel_index, self.qc, labels, cams)
        if len(good[0]):
            _sysu_register_goods(self, g, offset, good)
        _mask_junk(s, neg1, junk)
        _sysu_count_chunk(self, s, g, gmax)
        kept = len(labels) - len(neg1) - np.bincount(junk[0], minlength=self.nq)
        self.gmax_past = max(self.gmax_past, gmax)
        if self.K:
            self.pool.add(s)
        self.n_past += kept

    def second_pass(self, chunks: Iterator) -> None:
        """Count, for the unresolved good matches, the kept items of the chunks before theirs."""
        import torch

        goods = self.goods
        u = np.flatnonzero(goods.unresolved)
        rows = np.unique(goods.q[u])
        pos = np.full(self.nq, -1, np.int64)
        pos[rows] = np.arange(len(rows))
        u_row = torch.as_tensor(pos[goods.q[u]])
        stop = int(goods.start[u].max())
        for offset, feats, labels, cams in chunks:
            if offset >= stop:
                break
            s, g, gmax = self.scorer.scores(feats, rows)
            neg1, junk, _ = _sysu_chunk_masks(self.qlabel_index, self.qc, labels, cams, rows)
            _mask_junk(s, neg1, junk)
            su = s[u_row.to(s.device)]
            cols = torch.arange(offset, offset + len(labels), device=s.device)[None, :]
            lim = torch.as_tensor(goods.start[u], device=s.device)[:, None]
            su.masked_fill_(cols >= lim, -math.inf)  # only the chunks before the good match's own
            bnd = self.scorer.bound(goods.q[u], gmax)
            goods.cnt[u] += self.scorer.count_above(su, goods.q[u], goods.s[u], bnd, g)


def _sysu_summary(goods: _SysuGoods, nq: int, num_gallery: int, max_rank: int | None) -> dict[str, Any]:
    """Ranks (strictly-greater count + equal-score good matches with a lower gallery index),
    trapezoid and standard AP, CMC, as the reference computes them."""
    n_good = goods.n_good
    order = np.lexsort((goods.idx, goods.s, goods.q))
    gq, gs, gcnt = goods.q[order], goods.s[order], goods.cnt[order]
    same_prev = np.zeros(len(gq), np.int64)
    if len(gq):
        new_run = np.ones(len(gq), bool)
        new_run[1:] = (gq[1:] != gq[:-1]) | (gs[1:] != gs[:-1])
        run_start = np.flatnonzero(new_run)
        same_prev = np.arange(len(gq)) - run_start[np.cumsum(new_run) - 1]
    rank = gcnt + same_prev
    order2 = np.lexsort((rank, gq))
    gq, rank = gq[order2], rank[order2]
    j = np.arange(len(gq)) - _excl_cumsum(n_good)[gq]  # index among the query's good matches
    ngood = n_good[gq].astype(np.float64)
    prec = (j + 1) / (rank + 1.0)
    old = np.where(rank != 0, j / np.maximum(rank, 1).astype(np.float64), 1.0)
    per_ap = np.zeros(nq)
    per_ap_std = np.zeros(nq)
    np.add.at(per_ap, gq, (1.0 / ngood) * (old + prec) / 2)  # sequential, in rank order
    np.add.at(per_ap_std, gq, prec / ngood)
    first = np.full(nq, -1, np.int64)
    first[gq[j == 0]] = rank[j == 0]
    all_ranks = np.split(rank, np.cumsum(n_good)[:-1]) if nq else []
    valid = first >= 0
    length = num_gallery if max_rank is None else int(max_rank)
    hist = np.bincount(first[valid], minlength=max(length, 10, 1))
    cum = np.cumsum(hist) / max(nq, 1)
    return {
        "rank1": float(cum[0]),
        "rank5": float(cum[4]),
        "rank10": float(cum[9]),
        "mAP": float(per_ap.sum() / max(nq, 1)),
        "mAP_standard": float(per_ap_std.sum() / max(nq, 1)),
        "cmc": cum[:length] if length else cum[:0],
        "ranks": first,
        "per_query_AP": per_ap,
        "per_query_AP_standard": per_ap_std,
        "all_good_ranks": all_ranks,
        "num_valid_q": int(valid.sum()),
        "num_gallery": int(num_gallery),
    }


def _sysu_queries(query_features, query_labels, query_cams) -> tuple[Any, np.ndarray, np.ndarray]:
    """Validated query tensor (float32, CPU), labels and cameras."""
    import torch

    if not _is_tensor(query_features):
        query_features = _to_numpy(query_features)
    qf = torch.as_tensor(query_features)
    if qf.ndim != 2:
        raise ValueError(f"query_features must be 2-D (nq, d), got shape {tuple(qf.shape)}")
    nq, dim = (int(s) for s in qf.shape)
    ql = _labels(query_labels, "query_labels")
    qc = _labels(query_cams, "query_cams")
    if len(ql) != nq or len(qc) != nq:
        raise ValueError(
            f"query_features has shape {(nq, dim)} but query_labels has shape "
            f"{tuple(ql.shape)} and query_cams {tuple(qc.shape)}: expected ({nq},)"
        )
    return qf, ql, qc


def sysu30k_evaluate(
    query_features: ArrayLike,
    query_labels: ArrayLike,
    query_cams: ArrayLike,
    gallery: Any,
    *,
    max_rank: int | None = 50,
    chunk_size: int = 8192,
    buffer_size: int = 1024,
    device: str | None = "auto",
    precision: str = "auto",
    show_progress: bool = False,
) -> dict[str, Any]:
    """SYSU-30k evaluation, scored like the official ``test_sysu_combine.py``, but with the
    gallery streamed in chunks (the official script holds a 54 GB gallery matrix).

    Protocol, per query ``q`` (features are L2-normalised, so the score is the cosine):

    * ``score_g = <gallery_g, q>``; the ranking is by *descending* score.
    * good  = same label as the query **and** a different camera (label -1 items are never good);
    * junk  = (same label **and** same camera) **or** label == -1. Junk is removed from the
      ranking. Distractors (label -1000 in SYSU-30k) are ordinary negatives, not junk.
    * ``r_0 < r_1 < ...`` = 0-based positions of the good items after junk removal.
      ``CMC_q[k] = [r_0 <= k]``.
    * The reference AP is the *trapezoid* AP of the Market MATLAB code:
      ``AP = sum_j (1/n_good) * (old_j + prec_j) / 2`` with ``prec_j = (j+1)/(r_j+1)`` and
      ``old_j = j / r_j`` (``old_j = 1`` when ``r_j = 0``). With one good match at rank r > 0
      that is ``1/(2(r+1))``, half the usual AP. ``mAP_standard`` reports the usual
      non-interpolated AP ``(1/n_good) sum_j (j+1)/(r_j+1)`` next to it.
    * A query without any good item scores 0 but **is counted** in the denominators: CMC and
      both mAPs are averaged over all queries (``len(query_label)``).

    Exact scores. Every decision compares the *canonical* score ``c = RN32(q.g)``, the exact
    dot product rounded once to float32 (:func:`reidkit.neighbors.exact_pair_dots`): unlike a
    matmul's result it does not depend on the kernel, its blocking or the device. The matmul
    only screens: with ``|screen - c| <= B = beta ||q|| ||g||`` (:func:`reidkit.neighbors.
    score_bound`; ``beta ~ 1.2e-4`` for fp32, ``~ 0.012`` for bf16 at d = 2048), an item with
    ``screen > c_good + B`` has ``c > c_good`` and one with ``screen < c_good - B`` has
    ``c < c_good``; the items in between are scored exactly. So the fp32 and the bf16 screening
    count the same items and give identical ranks. ``precision="auto"`` screens in bf16 where
    the device computes it natively (AMX / AVX512-BF16, CUDA >= 8.0) and the gallery can be
    iterated twice, else in fp32 (a one-shot generator keeps the narrow fp32 band, see below).

    Ties: ``r_j = #{kept items with c > c_j}`` (strictly greater: a good match is put before
    items with an equal score) plus the number of good items of the same query with an equal
    score and a lower gallery index (the reference's unstable argsort makes ties arbitrary).

    Streaming (memory ``O(queries x (chunk_size + 2 buffer_size) + #good)``, one pass when
    the true matches come first, as in SYSU-30k's folder order): see :class:`_SysuStream`.

    Args:
        query_features: (nq, d) float features (numpy or torch).
        query_labels, query_cams: (nq,) integer labels / cameras.
        gallery: ``(features, labels, cams)`` arrays; or an iterable of such chunks; or a
            zero-argument callable returning such an iterable (re-iterable).
        max_rank: CMC length (``None``: the full gallery length, like the reference CMC).
        chunk_size: gallery rows scored at once (bigger chunks are split).
        buffer_size: per-query number of best earlier scores kept at least (see above).
        device: "auto" (CUDA when available), "cpu" or a torch device for the score matmul.
        precision: screening matmul, "auto", "fp32" or "bf16" (same results).
        show_progress: progress bar over chunks.

    Returns:
        dict with ``rank1``, ``rank5``, ``rank10``, ``mAP`` (trapezoid, as the reference),
        ``mAP_standard``, ``cmc``, ``ranks`` (0-based rank of each query's first good match
        after junk removal, -1 if none), ``per_query_AP``, ``per_query_AP_standard``,
        ``all_good_ranks``, ``num_valid_q``, ``num_gallery``, ``passes``, ``device``,
        ``precision`` (the screening that ran) and ``unverified_comparisons`` (0: every
        comparison was made on canonical scores).
    """
    import torch

    from reidkit.neighbors import resolve_precision

    dev = resolve_device(device)
    qf, ql, qc = _sysu_queries(query_features, query_labels, query_cams)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    factory, reiterable, total = _gallery_source(gallery, chunk_size)
    if precision == "auto" and not reiterable:
        precision = "fp32"
    prec = resolve_precision(precision, dev)
    scorer = _SysuScorer(qf.to(device=dev, dtype=torch.float32), dev, prec)
    st = _SysuStream(scorer, ql, qc, max(int(buffer_size), 0), reiterable)
    dim = int(qf.shape[1])
    num_gallery = 0
    bar_total = None if total is None else math.ceil(total / chunk_size)
    chunks = _split_chunks(factory(), chunk_size, dim)
    for offset, feats, labels, cams in progress(chunks, total=bar_total, desc="sysu30k",
                                                disable=not show_progress):
        num_gallery = offset + len(labels)
        st.chunk(offset, feats, labels, cams)
    passes = 1
    if st.goods.unresolved.any():
        passes = 2
        st.second_pass(_split_chunks(factory(), chunk_size, dim))
    out = _sysu_summary(st.goods, st.nq, num_gallery, max_rank)
    out.update({"passes": passes, "device": str(dev), "precision": prec,
                "unverified_comparisons": st.unverified})
    return out


# ----------------------------------------------------------------------------------------------
# distances and re-ranking
# ----------------------------------------------------------------------------------------------


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
    import torch

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


def re_ranking(*args: Any, **kwargs: Any) -> Any:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017), torchreid semantics.

    ``re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3, device="auto")``
    returns the re-ranked (num_query, num_gallery) distance matrix, to be passed to
    :func:`evaluate_rank`. Implemented in :mod:`reidkit.neighbors`; this is a re-export so
    that evaluation code can import everything from one place.
    """
    from reidkit.neighbors import re_ranking as _rr

    return _rr(*args, **kwargs)


def ranked_gallery(dist_row, q_pid: int, q_cam: int, g_pids, g_cams, topk: int | None = None) -> np.ndarray:
    """Gallery indices of one query's ranked list under the Market protocol.

    Gallery images of the query's identity taken by the query's camera are removed (junk), the
    rest is sorted by ascending distance with ties kept in gallery order (a stable sort), and the
    first ``topk`` indices are returned (all of them when ``topk`` is None)."""
    dist_row = np.asarray(dist_row)
    g_pids, g_cams = np.asarray(g_pids), np.asarray(g_cams)
    valid = np.flatnonzero(~((g_pids == q_pid) & (g_cams == q_cam)))
    order = valid[np.argsort(dist_row[valid], kind="stable")]
    return order if topk is None else order[:topk]


# ----------------------------------------------------------------------------------------------
# one query at a time, and two rankings side by side (notebook 06)
# ----------------------------------------------------------------------------------------------


def precision_recall(dist_row, q_pid: int, q_cam: int, g_pids, g_cams) -> dict[str, Any]:
    """One query's ranked list read as a precision-recall curve (Market protocol).

    The list is :func:`ranked_gallery` (same-identity same-camera junk removed, stable sort).
    Returns ``order`` (gallery indices, ranked), ``hits`` (bool per position), ``precision`` and
    ``recall`` after each position, ``match_ranks`` (1-based positions of the true matches),
    ``AP`` (the mean of the precision at each hit: the area under the step curve, the value
    :func:`evaluate_rank` reports) and ``INP`` (matches / position of the last one); both NaN
    when no true match is left."""
    order = ranked_gallery(dist_row, q_pid, q_cam, g_pids, g_cams)
    hits = np.asarray(g_pids)[order] == q_pid
    n = int(hits.sum())
    cum = np.cumsum(hits)
    precision = cum / np.arange(1, len(hits) + 1)
    recall = cum / max(n, 1)
    ranks = np.flatnonzero(hits) + 1
    return {
        "order": order,
        "hits": hits,
        "precision": precision,
        "recall": recall,
        "match_ranks": ranks,
        "AP": float(precision[hits].mean()) if n else math.nan,
        "INP": float(n / ranks[-1]) if n else math.nan,
    }


def queries_by_outcome(result: dict) -> dict[str, np.ndarray]:
    """Query indices grouped by what an :func:`evaluate_rank` result says about them:
    ``"all"``, ``"rank-1 hit"`` (the closest kept gallery image is the same person),
    ``"rank-1 miss"`` (a true match exists but is not first) and ``"no match"`` (only same-camera
    images of the person are in the gallery: skipped by the Market protocol)."""
    first = np.asarray(result["first_match_rank"])
    return {
        "all": np.arange(len(first)),
        "rank-1 hit": np.flatnonzero(first == 0),
        "rank-1 miss": np.flatnonzero(first > 0),
        "no match": np.flatnonzero(first < 0),
    }


def compare_rankings(before: dict, after: dict) -> dict[str, Any]:
    """What changed, query by query, between two :func:`evaluate_rank` results of the same
    queries (e.g. plain distances ``before`` and re-ranked ones ``after``).

    Returns counts over the valid queries: ``first_better`` / ``first_worse`` / ``first_same``
    (the first true match moved up / down / stayed), ``ap_up`` / ``ap_down``, ``rank1_fixed``
    (miss -> hit) / ``rank1_broken`` (hit -> miss), ``worse_first_but_ap_up`` (the first match
    moved down while the AP still rose); the per-query arrays ``first_before``,
    ``first_after`` (0-based), ``ap_before``, ``ap_after`` and ``ap_change`` (NaN for skipped
    queries); and two example queries: ``fixed``, the
    rank-1 miss turned hit with the largest AP gain (else the largest AP gain), and ``broken``,
    the rank-1 hit turned miss with the largest AP loss (else the largest loss). Ties go to the
    lower query index."""
    fb = np.asarray(before["first_match_rank"])
    fa = np.asarray(after["first_match_rank"])
    if fb.shape != fa.shape or not np.array_equal(fb < 0, fa < 0):
        raise ValueError("compare_rankings needs two evaluations of the same queries and gallery")
    valid = np.flatnonzero(fb >= 0)
    if len(valid) == 0:
        raise ValueError("no valid query (no query has a true match)")
    d_ap = np.asarray(after["AP"], dtype=np.float64) - np.asarray(before["AP"], dtype=np.float64)
    b, a, d = fb[valid], fa[valid], d_ap[valid]
    eps = 1e-12

    def pick(mask: np.ndarray, sign: int) -> int:
        pool = valid[mask] if mask.any() else valid
        vals = sign * d_ap[pool]
        return int(pool[np.argmax(vals)])  # argmax: first (lowest index) of the ties

    return {
        "num_valid_q": int(len(valid)),
        "first_better": int((a < b).sum()),
        "first_worse": int((a > b).sum()),
        "first_same": int((a == b).sum()),
        "ap_up": int((d > eps).sum()),
        "ap_down": int((d < -eps).sum()),
        "rank1_fixed": int(((b > 0) & (a == 0)).sum()),
        "rank1_broken": int(((b == 0) & (a > 0)).sum()),
        "worse_first_but_ap_up": int(((a > b) & (d > eps)).sum()),
        "first_before": fb,
        "first_after": fa,
        "ap_before": np.asarray(before["AP"], dtype=np.float64),
        "ap_after": np.asarray(after["AP"], dtype=np.float64),
        "ap_change": d_ap,
        "fixed": pick((b > 0) & (a == 0), +1),
        "broken": pick((b == 0) & (a > 0), -1),
    }


def camera_share_by_rank(dist, q_pids, g_pids, q_cams, g_cams, max_k: int = 50):
    """How often the nearest *other-person* gallery images come from the query's own camera.

    For every query, the gallery images of other identities are sorted by distance (stable);
    ``share[k-1]`` is the fraction, over queries, of the first k of them taken by the query's
    camera, and ``chance`` the same fraction over all of them (what a camera-blind feature gives at
    every k). Returns ``(share, chance)``; ``share`` has ``min(max_k, smallest count)`` entries."""
    d = np.asarray(dist)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_cams, g_cams = np.asarray(q_cams), np.asarray(g_cams)
    k = max_k
    rows, chance = [], []
    for i in range(d.shape[0]):
        other = np.flatnonzero(g_pids != q_pids[i])
        same = g_cams[other] == q_cams[i]
        order = np.argsort(d[i, other], kind="stable")
        k = min(k, len(other))
        rows.append(same[order[:max_k]])
        chance.append(same.mean())
    if not rows or k == 0:
        raise ValueError("no query has gallery images of other identities")
    hits = np.stack([r[:k] for r in rows]).astype(np.float64)
    share = (np.cumsum(hits, axis=1) / np.arange(1, k + 1)).mean(axis=0)
    return share, float(np.mean(chance))

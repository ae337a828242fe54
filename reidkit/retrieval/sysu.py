"""The SYSU-30k protocol: 1,000 queries against a gallery of any size, streamed in bounded memory."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from reidkit.core.device import resolve_device
from reidkit.core.progress import progress
from reidkit.retrieval.exact import (
    _TINY,
    U_F32,
    exact_pair_dots,
    Workspace,
    fp32_pair_dots,
    resolve_precision,
    score_bound,
    screen_matmul,
)
from reidkit.retrieval.market import (
    ArrayLike,
    _excl_cumsum,
    _is_tensor,
    _LabelIndex,
    _labels,
    _ragged_gather,
    _to_numpy,
)
from reidkit.retrieval.score_blocks import _entries_above, _ScorePool

__all__ = ['sysu30k_evaluate']


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


class _SysuScorer:
    """Query-side state of the SYSU kernel: screening scores of a gallery chunk and the exact
    counts built on them (see :func:`sysu30k_evaluate`, "Exact scores")."""

    def __init__(self, qf: Any, dev: Any, precision: str):

        self.dev, self.precision, self.dim = dev, precision, int(qf.shape[1])
        self.qf = qf
        self.qs = qf.to(torch.bfloat16) if precision == "bf16" else qf
        self.q64 = qf.double()  # the rows of the exact re-scoring, converted once
        # float32 norms, raised by their worst relative rounding error (d + 2) 2^-24
        self.inflate = 1 + (self.dim + 2) * U_F32
        self.qnorm = qf.norm(dim=1).double().cpu().numpy() * self.inflate
        self.beta = score_bound(self.dim, precision) * (1 + 64 * U_F32)
        self.beta32 = score_bound(self.dim, "fp32") * (1 + 64 * U_F32)
        self.tiny = 4 * self.dim * _TINY
        self.work = Workspace()  # the chunk's products reuse its buffers (valid until the next chunk)

    def scores(self, feats: Any, rows: np.ndarray | None = None) -> tuple[Any, Any, float]:
        """Screening scores ``Q[rows] @ G^T`` (float32; bfloat16 on a CPU when the screen is bf16),
        the float32 gallery chunk on the device and the largest gallery norm of the chunk."""

        g = torch.as_tensor(_to_numpy(feats) if not _is_tensor(feats) else feats)
        g = g.to(device=self.dev, dtype=torch.float32)
        q = self.qs if rows is None else self.qs[torch.as_tensor(rows, device=self.dev)]
        gmax = float(g.norm(dim=1).max()) * self.inflate if len(g) else 0.0
        # on a CPU the bf16 product stays bf16: the passes over it read its 16-bit patterns
        return screen_matmul(q, g, self.precision, self.work, as_float=self.dev.type != "cpu"), g, gmax

    def bound(self, rows: np.ndarray, gmax: float, beta: float | None = None) -> np.ndarray:
        """Per query: ``|screening score - RN32(q.g)| <= bound`` for gallery norms ``<= gmax``
        (``beta``: another screen's, e.g. :attr:`beta32` for the fp32 level)."""
        return (self.beta if beta is None else beta) * self.qnorm[rows] * gmax + self.tiny

    def exact(self, rows: np.ndarray, g: Any, cols: np.ndarray) -> np.ndarray:
        """Canonical scores ``RN32(q_rows . g_cols)`` (:func:`reidkit.retrieval.exact.exact_pair_dots`)."""

        return exact_pair_dots(self.qf, g, rows, cols, x64=self.q64)

    def band(self, rows: np.ndarray, c: np.ndarray, gmax: float) -> tuple[np.ndarray, np.ndarray]:
        """Float32 ``lo <= c - bound`` and ``hi >= c + bound`` (``c``: canonical scores of query
        ``rows``, shape ``(len(rows),)`` or ``(len(rows), slots)``; ``+inf`` stays ``+inf``)."""
        bnd = self.bound(rows, gmax)
        if c.ndim == 2:
            bnd = bnd[:, None]
        with np.errstate(invalid="ignore"):
            lo = np.nextafter((c - bnd).astype(np.float32), np.float32(-np.inf))
            hi = np.nextafter((c + bnd).astype(np.float32), np.float32(np.inf))
        return np.where(c == np.inf, np.float32(np.inf), lo), hi

    def count_above(self, s: Any, rows: np.ndarray, c: np.ndarray, gmax: float, g: Any) -> np.ndarray:
        """Per row r of ``s`` (screening scores of query ``rows[r]``, junk ``-inf``; gallery norms
        ``<= gmax``): the number of gallery items whose canonical score is ``> c[r]``."""
        lo, hi = self.band(rows, c, gmax)
        r, j, v = _entries_above(s, lo, strict=False)
        return self.count_band(r, j, v, rows, c, hi, gmax, g)

    def count_band(self, r: np.ndarray, j: np.ndarray, v: np.ndarray, rows: np.ndarray, c: np.ndarray,
                   hi: np.ndarray, gmax: float, g: Any) -> np.ndarray:
        """:meth:`count_above` from the entries already taken out of the block: ``(r, j, v)`` =
        (index into ``rows``, gallery column, screening score), every entry with
        ``v >= lo[r]`` among them. Items with ``v > hi`` count; the band between is scored in
        fp32 when the screen was bf16 (decided outside the fp32 band, 100x narrower), the rest
        exactly."""
        above = v > hi[r]
        cnt = np.bincount(r[above], minlength=len(rows)).astype(np.int64)
        amb = np.flatnonzero(~above)
        if len(amb) and self.precision == "bf16":
            f = fp32_pair_dots(self.qf, g, rows[r[amb]], j[amb]).astype(np.float64)
            b32 = self.bound(rows[r[amb]], gmax, self.beta32) * (1 + 2.0**-30)  # + float64 rounding
            ca = c[r[amb]].astype(np.float64)
            cnt += np.bincount(r[amb][f - b32 > ca], minlength=len(rows))
            amb = amb[np.abs(f - ca) <= b32]
        if len(amb):
            cs = self.exact(rows[r[amb]], g, j[amb])
            cnt += np.bincount(r[amb][cs > c[r[amb]]], minlength=len(rows))
        return cnt


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
    """Steps 2-3 of a chunk: for every known good match, the chunk's kept items scoring above it;
    then the chunk's scores above ``theta`` into the pool. One pass takes every entry at or above
    the lowest threshold a query needs out of the block; the counts and the pool are made from it."""

    goods, nq = st.goods, st.nq
    slots = st.thr.shape[1]
    lo_all, hi_all = st.scorer.band(np.arange(nq), st.thr, gmax)
    lo_min = lo_all.min(axis=1) if slots else np.full(nq, np.inf, np.float32)
    whole = bool(st.K) and st.pool.takes_whole(s)
    thr = np.minimum(lo_min, st.pool.theta) if st.K and not whole else lo_min
    r, j, v = _entries_above(s, thr, strict=False) if (thr < np.inf).any() else (
        np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    for t in range(slots):
        rows_t = np.flatnonzero(goods.n_good > t)
        sel = v >= lo_all[r, t]  # +inf where the query has no t-th good match
        pos = np.full(nq, -1, np.int64)
        pos[rows_t] = np.arange(len(rows_t))
        cnt_t = st.scorer.count_band(pos[r[sel]], j[sel], v[sel], rows_t, st.thr[rows_t, t],
                                     hi_all[rows_t, t], gmax, g)
        at_t = goods.slot == t
        goods.cnt[at_t] += cnt_t[pos[goods.q[at_t]]]
    if whole:
        st.pool.add_whole(s)
    elif st.K:
        keep = v > st.pool.theta[r]
        st.pool.add_entries(r[keep], v[keep])


class _SysuStream:
    """Everything :func:`sysu30k_evaluate` carries from one gallery chunk to the next.

    Streaming algorithm (memory ``O(queries x (chunk_size + 2 buffer_size) + #good)``): for
    each chunk, screening scores ``Q @ G_chunk^T`` are computed, junk entries are set to
    ``-inf``, and for every good match found so far the kept items of the chunk above it are
    counted (:meth:`_SysuScorer.count_band`: screening, then fp32 and exact scores in the
    band); one pass over the block takes out the entries the counts and the pool need
    (:func:`_sysu_count_chunk`). Items streamed *before* a good match appears are covered by a
    per-query pool holding every earlier kept screening score above ``theta_q`` (at least the
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
        self.n_past += kept

    def second_pass(self, chunks: Iterator) -> None:
        """Count, for the unresolved good matches, the kept items of the chunks before theirs."""

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
            goods.cnt[u] += self.scorer.count_above(su, goods.q[u], goods.s[u], gmax, g)


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
    dot product rounded once to float32 (:func:`reidkit.retrieval.exact.exact_pair_dots`): unlike a
    matmul's result it does not depend on the kernel, its blocking or the device. The matmul
    only screens: with ``|screen - c| <= B = beta ||q|| ||g||`` (:func:`reidkit.retrieval.jaccard.
    score_bound`; ``beta ~ 1.2e-4`` for fp32, ``~ 0.012`` for bf16 at d = 2048), an item with
    ``screen > c_good + B`` has ``c > c_good`` and one with ``screen < c_good - B`` has
    ``c < c_good``; the items in between are scored again (after a bf16 screen first in fp32,
    whose band is 100 times narrower, :func:`reidkit.retrieval.exact.fp32_pair_dots`), and those
    still within the fp32 band exactly. So the fp32 and the bf16 screening
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

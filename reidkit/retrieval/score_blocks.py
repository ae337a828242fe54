"""Score blocks of a streamed ranking: the entries of a (queries x items) block above per-row
thresholds, float32 or bfloat16, and the per-query pool of earlier scores a one-pass ranking keeps
for the good matches that stream past late (:func:`reidkit.retrieval.sysu.sysu30k_evaluate`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from reidkit.retrieval.market import _excl_cumsum, _row_count

#: tests set this to run the torch (GPU) code paths on CPU tensors.
_FORCE_TORCH_OPS = False


def _entries_above(s: Any, thr: np.ndarray, strict: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, float32 value) of the entries of ``s`` (float32 or bfloat16) with
    ``s[r, j] > thr[r]`` (``strict``) or ``>= thr[r]``, in row-major order. On a CPU numpy's
    ``flatnonzero`` (much faster than a 2-D ``nonzero``; splitting the rows over two threads
    measured slower); a bf16 block is compared as its 16-bit patterns (:func:`_bf16_entries_at_least`)."""

    if s.device.type != "cpu" or _FORCE_TORCH_OPS:
        t = torch.as_tensor(thr, device=s.device)[:, None]
        mask = s > t if strict else s >= t  # a bf16 block is promoted to float32 for this
        idx = mask.nonzero()
        r, j = idx[:, 0], idx[:, 1]
        return r.cpu().numpy(), j.cpu().numpy(), s[r, j].float().cpu().numpy()
    thr = np.asarray(thr, np.float32)
    if strict:  # s > t  <=>  s >= the next float32 above t (s is a float32 or bf16 value)
        thr = np.nextafter(thr, np.float32(np.inf))
    if s.dtype == torch.bfloat16:
        return _bf16_entries_at_least(s, thr)
    sn = s.numpy()
    flat = np.flatnonzero(sn >= thr[:, None])
    r, j = np.divmod(flat, sn.shape[1])
    return r, j, sn.reshape(-1)[flat]


def _bf16_entries_at_least(s: Any, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_entries_above` (``>=``) of a CPU bfloat16 block without converting it to float32
    (a 32 MB copy per chunk of 1,000 x 8,192): ``s >= t`` is ``s >= RU(t)``, ``t`` rounded up to
    bf16, and for a bf16 ``T >= +0`` that is ``bits(s) >= bits(T)`` on the signed 16-bit
    patterns (every negative value, -inf and -0 included, has a negative pattern). Otherwise
    (a threshold <= 0) the block's order keys are compared: the non-sign bits of negative
    patterns flipped."""
    bits = s.view(torch.int16).numpy()
    b = bits.shape[1]
    t32 = thr.view(np.uint32)
    up = ((t32 & 0xFFFF) != 0) & ((t32 >> 31) == 0)  # round up: positive values with lost bits
    tb = ((t32 >> 16) + up).astype(np.uint16).view(np.int16)  # RU(t) as bf16 bits (+inf stays)
    if (tb > 0).all():  # every threshold > +0: the raw patterns are in order
        flat = np.flatnonzero(bits >= tb[:, None])
    else:
        kt = tb ^ ((tb >> 15) & np.int16(0x7FFF))
        kt[(tb == 0) | (tb == np.int16(-32768))] = -1  # t = +-0: -0 (key -1) and +0 both qualify
        flat = np.flatnonzero((bits ^ ((bits >> 15) & np.int16(0x7FFF))) >= kt[:, None])
    r, j = np.divmod(flat, b)
    vals = bits.reshape(-1)[flat]
    return r, j, (vals.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


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

    def add_whole(self, s: Any) -> None:
        """The first chunk, where everything enters (``s``: torch (nq, B), junk already ``-inf``,
        :meth:`takes_whole` true): each row's k best at once, the same pool as adding all then
        cutting (rows with fewer than k kept scores keep ``theta = -inf``)."""
        self.neg = np.ascontiguousarray(np.partition(-s.float().numpy(), self.k - 1, axis=1)[:, : self.k])
        self.fill[:] = self.k
        self.neg_theta = self.neg.max(axis=1)

    def takes_whole(self, s: Any) -> bool:
        """Whether ``s`` goes in by :meth:`add_whole` (the first chunk on a CPU, wider than 2k)."""
        return self.neg.shape[1] == 0 and s.shape[1] > 2 * self.k and s.device.type == "cpu" and not _FORCE_TORCH_OPS

    @property
    def theta(self) -> np.ndarray:
        """Per query, the pool holds every earlier kept score above this."""
        return -self.neg_theta

    def add_entries(self, rows: np.ndarray, vals: np.ndarray) -> None:
        """Add a chunk's kept scores above ``theta`` (``rows`` in ascending order)."""
        if len(rows) == 0:
            return
        nq = len(self.fill)
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

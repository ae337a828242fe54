"""Exact float32 arithmetic for retrieval: the canonical dot products and squared distances, and the
screening matmul (fp32 or bf16) with its proven error bound, so that a fast screen gives the same
neighbours as the exact computation."""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np
import torch

from reidkit.core.device import bf16_native, exact_fp32_matmul

#: numpy array or torch tensor
ArrayLike = Any


def _to_float_tensor(x: ArrayLike, device: torch.device) -> torch.Tensor:
    """A contiguous float32 tensor on ``device`` (no copy when ``x`` already is one)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.detach().to(device=device, dtype=torch.float32).contiguous()


def _to_float_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


@contextmanager
def _full_fp32_matmul():
    """Exact float32 products inside the block (no TF32 / bf16 shortcuts a caller may have enabled).

    A kNN is a ranking: with TF32 (10-bit mantissa) the order of close neighbours would change.
    """
    with exact_fp32_matmul():  # legacy or per-backend precision API, whichever the caller used
        yield


def _default_block(device: torch.device, n: int, precision: str = "fp32") -> int:
    """Tile size of the torch search: big tiles on a GPU; on a CPU, 1024 for small sets (more tiles
    means more of the symmetric saving) and 2048 for large ones (better BLAS efficiency); bf16 tiles
    of 4096 on a CPU (oneDNN's bf16 kernels need large tiles to reach their rate)."""
    if device.type == "cuda":
        return 8192
    if precision == "bf16":
        return 4096
    return 1024 if n <= 8192 else 2048


# =============================================================================================
# Exact scores: correctly rounded float32 dot products, and the screening bound
# =============================================================================================
#: unit roundoffs (round to nearest): bfloat16 (8-bit significand), float32, float64
U_BF16, U_F32, U_F64 = 2.0**-8, 2.0**-24, 2.0**-53


#: absolute slack for flushed denormals (AMX and some GPU kernels flush them), per term of a sum
_TINY = 2.0**-120


PRECISIONS = ("auto", "fp32", "bf16")


#: the kNN's choices: the direct fp32 search, or canonical distances screened in fp32 or bf16
KNN_PRECISIONS = ("fp32", "exact", "bf16")


def _gamma(n: int, u: float) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: bounds the rounding error of an n-term dot product."""
    if n * u >= 0.5:
        raise ValueError(f"dimension {n} too large for the error bound")
    return n * u / (1.0 - n * u)


def score_bound(dim: int, precision: str) -> float:
    """``beta`` with ``|screen(a, b) - RN32(a.b)| <= beta ||a|| ||b|| + dim * 2^-120``.

    ``screen`` is the score a fast matmul gives, ``RN32(a.b)`` the exact dot product rounded once
    to float32 (the *canonical* score every decision is made on). Proof, ``u = 2^-8`` (bf16),
    ``v = 2^-24`` (fp32), ``g = gamma_dim(v)``:

    * fp32 matmul, any summation order, with or without FMA: ``|fl(a.b) - a.b| <= g sum|a_i b_i|
      <= g ||a|| ||b||`` (Cauchy-Schwarz), so ``beta = g + v`` (``v``: the rounding of ``RN32``).
    * bf16: the inputs are rounded, ``a~_i = a_i (1 + d_i)``, ``|d_i| <= u``, so
      ``|a~.b~ - a.b| <= (2u + u^2) sum|a_i b_i|``. The products of bf16 numbers are exact in
      fp32 and accumulated in fp32: error ``<= g (1 + u)^2 sum|a_i b_i|``. The result is rounded
      to bf16 (CPU matmuls return bf16): ``u`` times the accumulated value, itself at most
      ``(1 + 2u + u^2 + g (1 + u)^2) ||a|| ||b||``. Plus ``v`` for ``RN32``. Flushed denormals
      (DAZ/FTZ) change each term by less than ``2^-126``: the absolute ``dim * 2^-120``. For bf16
      ``g`` is taken with ``2v`` (GPU tensor-core adders may truncate instead of rounding), and
      :func:`screen_matmul` turns off cuBLAS's reduced-precision (bf16) reductions.

    The bound is multiplied by ``1 + 2^-20`` to absorb the rounding of its own evaluation.
    """
    g = _gamma(max(int(dim), 1), U_F32)
    if precision == "fp32":
        beta = g + U_F32
    elif precision == "bf16":
        u = U_BF16
        g = _gamma(max(int(dim), 1), 2 * U_F32)  # tensor-core adders may truncate: 2v per addition
        acc = (2 * u + u * u) + g * (1 + u) ** 2
        beta = acc + u * (1 + acc) + U_F32
    else:
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return beta * (1 + 2.0**-20)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` where ``device`` computes bf16 natively (AMX / AVX512-BF16 CPU,
    CUDA compute capability >= 8), else ``"fp32"``; an explicit choice is returned as is."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision

    return "bf16" if bf16_native(device) else "fp32"


class Workspace:
    """Reusable buffers for a stream of same-sized products: allocating a fresh 30 MB tensor for
    every chunk costs more than the copy into it (page faults), e.g. the bf16 copy of a gallery
    chunk takes 16 ms fresh and 6 ms into a kept buffer on two cores."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous ``shape`` tensor, a view of the buffer ``name`` (grown when too small)."""
        n = math.prod(int(d) for d in shape)
        key = (name, dtype, torch.device(device))
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            with torch.inference_mode(False):  # a normal tensor: written in and out of inference mode
                buf = torch.empty(n, dtype=dtype, device=device)
            self._bufs[key] = buf
        return buf[:n].view(shape)


def screen_matmul(a: torch.Tensor, b: torch.Tensor, precision: str, work: Workspace | None = None,
                  as_float: bool = True) -> torch.Tensor:
    """Float32 ``a @ b.T`` for screening: exact fp32 products, or bf16 inputs (``a``/``b`` already
    bf16 is fine) with the result converted back to float32 (``as_float=False``: the bf16 product
    as the kernel returned it, every value exactly a float32 too). With ``work`` the bf16 copy of
    ``b``, the product and the float32 result live in its buffers (the result is overwritten by
    the next call with the same workspace)."""
    if precision == "bf16":
        flags = torch.backends.cuda.matmul
        saved = flags.allow_bf16_reduced_precision_reduction
        flags.allow_bf16_reduced_precision_reduction = False  # fp32 accumulation (the bound's)
        try:
            if work is None:
                prod = torch.mm(a.to(torch.bfloat16), b.to(torch.bfloat16).T)
                return prod.float() if as_float else prod
            shape = (int(a.shape[0]), int(b.shape[0]))
            bb = b if b.dtype == torch.bfloat16 else work.get("b16", tuple(b.shape), torch.bfloat16, b.device).copy_(b)
            prod = torch.mm(a.to(torch.bfloat16), bb.T, out=work.get("p16", shape, torch.bfloat16, a.device))
            return work.get("p32", shape, torch.float32, a.device).copy_(prod) if as_float else prod
        finally:
            flags.allow_bf16_reduced_precision_reduction = saved
    with exact_fp32_matmul():
        if work is None:
            return a @ b.T
        return torch.mm(a, b.T, out=work.get("p32", (int(a.shape[0]), int(b.shape[0])), torch.float32, a.device))


def _round_to_f32(num: int, exp: int) -> np.float32:
    """``num * 2**exp`` (an exact rational, Python ints) rounded to nearest-even float32."""
    if num == 0:
        return np.float32(0.0)
    neg, num = num < 0, abs(num)
    lead = num.bit_length() - 1 + exp  # exponent of the leading bit
    ulp = max(lead - 23, -149)  # float32 spacing at that magnitude (subnormals: 2^-149)
    if ulp > exp:
        sh = ulp - exp
        q, r = num >> sh, num & ((1 << sh) - 1)
        half = 1 << (sh - 1)
        if r > half or (r == half and q & 1):
            q += 1
        num, exp = q, ulp
    val = np.float32(np.ldexp(float(num), exp)) if lead < 128 else np.float32(np.inf)
    return -val if neg else val


def _exact_dot_f32(a: np.ndarray, b: np.ndarray) -> np.float32:
    """``RN32(a.b)`` of two float32 vectors with integer arithmetic (exact, slow: the fallback)."""
    ma, ea = np.frexp(a.astype(np.float64))
    mb, eb = np.frexp(b.astype(np.float64))
    p = (ma * 2.0**24).astype(np.int64) * (mb * 2.0**24).astype(np.int64)  # exact: < 2^48
    e = ea.astype(np.int64) + eb.astype(np.int64) - 48
    nz = p != 0
    if not nz.any():
        return np.float32(0.0)
    p, e = p[nz], e[nz]
    order = np.argsort(e, kind="stable")
    p, e = p[order], e[order]
    starts = np.flatnonzero(np.r_[True, e[1:] != e[:-1]])
    sums = np.add.reduceat(p, starts)  # per exponent: < 2048 * 2^48 < 2^63, exact
    emin = int(e[0])
    total = sum(int(s) << int(x - emin) for s, x in zip(sums, e[starts]))
    return _round_to_f32(total, emin)


def _verified_round(r64: np.ndarray, err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round float64 approximations ``r64`` (``|r64 - exact| <= err``) to float32 and flag where
    that is provably ``RN32(exact)``: the whole interval ``r64 +- err`` lies strictly inside the
    rounding interval of ``fl32(r64)`` (between the midpoints to its float32 neighbours, which are
    exact in float64)."""
    with np.errstate(over="ignore", invalid="ignore"):
        r32 = r64.astype(np.float32)
        lo = np.nextafter(r32, np.float32(-np.inf)).astype(np.float64)
        hi = np.nextafter(r32, np.float32(np.inf)).astype(np.float64)
        mid_lo = (r32.astype(np.float64) + lo) / 2
        mid_hi = (r32.astype(np.float64) + hi) / 2
        e = err * (1 + 2.0**-30) + np.abs(r64) * 2.0**-51 + 2.0**-1070
        ok = (r64 - e > mid_lo) & (r64 + e < mid_hi) & np.isfinite(r64)
    return r32, ok


def _split_by_row(fn: Callable[[np.ndarray, np.ndarray], Any], rows: np.ndarray, cols: np.ndarray,
                  threads: int) -> Any:
    """``fn(rows, cols)`` (one array, or a tuple of arrays, with a value per pair) computed over
    ``threads`` threads on row-sorted parts of the pairs and put back in the pairs' order; in one
    call below 2 threads or 50,000 pairs. For the sampled products, which run on one thread."""
    if threads < 2 or len(rows) < 50_000:
        return fn(rows, cols)
    parts = np.array_split(np.argsort(rows, kind="stable"), threads)
    with ThreadPoolExecutor(threads) as pool:
        res = list(pool.map(lambda p: fn(rows[p], cols[p]), parts))
    single = not isinstance(res[0], tuple)
    outs = [np.empty(len(rows), a.dtype) for a in ((res[0],) if single else res[0])]
    for p, r in zip(parts, res):
        for o, a in zip(outs, (r,) if single else r):
            o[p] = a
    return outs[0] if single else tuple(outs)


def _f64_pair_dots(x: torch.Tensor, y: torch.Tensor, rows: np.ndarray, cols: np.ndarray,
                   absolute: bool = False, x64: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``x[rows[t]] . y[cols[t]]`` in float64 (products exact, any summation order) and the float64
    product of the two vectors' norms. Large CPU batches are split over torch's threads (the
    sampled product below runs on one)."""
    threads = torch.get_num_threads() if x.device.type == "cpu" else 1
    return _split_by_row(lambda r, c: _f64_pair_dots_one(x, y, r, c, absolute, x64), rows, cols, threads)


def _sampled_dots(a: torch.Tensor, b: torch.Tensor, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``a[r[t]] . b[c[t]]`` for every pair, in ``a``'s dtype and on its device: a sampled
    dense-dense product over the pairs' CSR pattern (each distinct pair once, no gathered copy per
    pair), returned in the pairs' order."""
    nb = int(b.shape[0])
    ukey, kinv = np.unique(r * nb + c, return_inverse=True)  # sorted by (row, col), no duplicates
    pr, pc = ukey // nb, ukey % nb
    crow = np.concatenate([[0], np.cumsum(np.bincount(pr, minlength=int(a.shape[0])))])
    dev = a.device
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(torch.from_numpy(crow).to(dev), torch.from_numpy(pc).to(dev),
                                          torch.zeros(len(ukey), dtype=a.dtype, device=dev),
                                          size=(int(a.shape[0]), nb), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, a, b.T, beta=0.0).values().cpu().numpy()[kinv]


def _f64_pair_dots_one(x: torch.Tensor, y: torch.Tensor, rows: np.ndarray, cols: np.ndarray,
                       absolute: bool = False, x64: torch.Tensor | None = None,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_f64_pair_dots` on one thread: a sampled dense-dense product over the pairs' pattern
    (no gathered copy per pair)."""
    if len(rows) == 0:
        return np.zeros(0, np.float64), np.zeros(0, np.float64)
    ur, rinv = np.unique(rows, return_inverse=True)
    uc, cinv = np.unique(cols, return_inverse=True)
    dev = x.device
    a = (x if x64 is None else x64).index_select(0, torch.from_numpy(ur).to(dev)).double()
    b = y.index_select(0, torch.from_numpy(uc).to(dev)).double()
    if absolute:
        a, b = a.abs_(), b.abs_()
    out = _sampled_dots(a, b, rinv.astype(np.int64), cinv.astype(np.int64))
    na = torch.linalg.vector_norm(a, dim=1).cpu().numpy()
    nb = na if (y is x and np.array_equal(ur, uc)) else torch.linalg.vector_norm(b, dim=1).cpu().numpy()
    return out, na[rinv] * nb[cinv]


def fp32_pair_dots(x: torch.Tensor, y: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``fl32(x[rows[t]] . y[cols[t]])``: float32 dot products of the pairs, summed in whatever order
    the kernel chooses, so within ``score_bound(d, "fp32") ||x|| ||y||`` of the canonical score
    :func:`exact_pair_dots` gives. The middle level of a two-level screen: it settles the pairs a
    bf16 screen left in its band, leaving the exact float64 scoring only the few within the
    (100 times narrower) fp32 band. On a CPU a sampled dense product over the pairs' pattern (no
    gathered copy); on a GPU a gathered elementwise product (no tensor-core, TF32 path)."""
    rows = np.asarray(rows, np.int64)
    cols = np.asarray(cols, np.int64)
    if len(rows) == 0:
        return np.zeros(0, np.float32)
    if x.device.type != "cpu":
        return _gathered_pair_dots(x, y, rows, cols)
    xf, yf = x.float(), y.float()
    return _split_by_row(lambda r, c: _sampled_dots(xf, yf, r, c), rows, cols, torch.get_num_threads())


def _gathered_pair_dots(x: torch.Tensor, y: torch.Tensor, rows: np.ndarray, cols: np.ndarray,
                        elems: int = 1 << 26) -> np.ndarray:
    """:func:`fp32_pair_dots` on a GPU: the pairs' rows gathered and multiplied elementwise, in
    blocks of at most ``elems`` gathered elements (the 28,310-d feature)."""
    dev = x.device
    step = max(1, elems // max(int(x.shape[1]), 1))
    out = np.empty(len(rows), np.float32)
    for s in range(0, len(rows), step):
        r = torch.from_numpy(rows[s:s + step]).to(dev)
        c = torch.from_numpy(cols[s:s + step]).to(dev)
        out[s:s + step] = (x.index_select(0, r).float() * y.index_select(0, c).float()).sum(1).cpu().numpy()
    return out


def exact_pair_dots(x: torch.Tensor, y: torch.Tensor, rows: np.ndarray, cols: np.ndarray,
                    x64: torch.Tensor | None = None) -> np.ndarray:
    """``RN32(x[rows[t]] . y[cols[t]])``: the exact dot products rounded once to float32.

    A deterministic function of the two vectors alone (not of the kernel, the batch or the
    device), which is what lets a bf16 search and an fp32 search make identical decisions.
    Three stages: a float64 sum (error ``<= gamma_d(2^-53) ||a|| ||b||``) whose rounding is
    verified (:func:`_verified_round`); where that is too coarse (near-zero scores), the same
    with the tighter ``gamma_d sum|a_i b_i|``; the rest exactly with integers. ``x64``: ``x`` in
    float64 when the caller keeps it (saves converting the rows at every call).
    """
    rows = np.asarray(rows, np.int64)
    cols = np.asarray(cols, np.int64)
    d = int(x.shape[1])
    g = _gamma(d + 2, U_F64)
    r64, norms = _f64_pair_dots(x, y, rows, cols, x64=x64)
    out, ok = _verified_round(r64, g * norms * (1 + 2 * g))
    bad = np.flatnonzero(~ok)
    if len(bad):
        absd, _ = _f64_pair_dots(x, y, rows[bad], cols[bad], absolute=True, x64=x64)
        out2, ok2 = _verified_round(r64[bad], g * absd * (1 + 4 * g))
        out[bad[ok2]] = out2[ok2]
        bad = bad[~ok2]
    if len(bad):
        xa, ya = x.cpu().numpy(), y.cpu().numpy()
        for t in bad:
            out[t] = _exact_dot_f32(xa[rows[t]], ya[cols[t]])
    return out


def exact_sqnorms(x: torch.Tensor) -> np.ndarray:
    """``RN32(||x_i||^2)`` for every row (see :func:`exact_pair_dots`)."""
    n, d = int(x.shape[0]), int(x.shape[1])
    out = np.empty(n, np.float32)
    g = _gamma(d + 2, U_F64)
    step = max(1, (1 << 22) // max(d, 1))
    for s in range(0, n, step):
        r64 = x[s:s + step].double().pow(2).sum(1).cpu().numpy()  # all terms >= 0: error g * r64
        r32, ok = _verified_round(r64, g * r64 * (1 + 2 * g))
        for t in np.flatnonzero(~ok):
            row = x[s + t].cpu().numpy()
            r32[t] = _exact_dot_f32(row, row)
        out[s:s + step] = r32
    return out


def _screen_tile(xa: torch.Tensor, xb: torch.Tensor, sqa: torch.Tensor, sqb: torch.Tensor,
                 out: torch.Tensor, precision: str) -> torch.Tensor:
    """Screening squared distances ``|a|^2 + |b|^2 - 2 a.b`` of a tile, written into ``out``
    (float32); the products in exact fp32 (``addmm``) or in bf16 (``xa``/``xb`` already bf16)."""
    if precision == "bf16":
        out.copy_(screen_matmul(xa, xb, "bf16")).mul_(-2.0).add_(sqb[None, :])
    else:
        torch.addmm(sqb[None, :], xa, xb.T, beta=1.0, alpha=-2.0, out=out)
    return out.add_(sqa[:, None])


def distance_bound(dim: int, precision: str) -> float:
    """``beta_D`` with ``|e_ij - D_ij| <= beta_D (|q_i|^2 + |x_j|^2) + 4 dim 2^-120`` where ``e`` is
    the screening squared distance (:func:`_screen_tile`) and ``D_ij = fl32(fl32(n_i + n_j) -
    2 c_ij)`` the canonical one, ``n = RN32(|.|^2)``, ``c = RN32(q_i.x_j)``.

    Proof, ``W = |q|^2 + |x|^2``, ``v = 2^-24``: both approximate ``X = |q|^2 + |x|^2 - 2 q.x``.
    The screening norms (float32 sums) are off by ``gamma_d |.|^2`` each (``gamma_d W``), the
    screening product by ``beta |q||x| <= beta W / 2`` (:func:`score_bound`), so ``2 q.x`` by
    ``beta W``; two float32 additions round values of magnitude ``<= (|q| + |x|)^2 <= 2W``:
    ``4 v W``. For ``D``: the two rounded norms ``v W``, their rounded sum ``v W``, ``2c``
    ``v W``, the final subtraction ``2 v W``: ``5 v W``. Total ``(beta + gamma_d + 9v) W``; the
    ``10v`` and the ``1 + 2^-10`` factor cover the second-order terms.
    """
    return (score_bound(dim, precision) + _gamma(max(int(dim), 1), U_F32) + 10 * U_F32) * (1 + 2.0**-10)


def distance_error_bound(dim: int, precision: str, w: Any) -> Any:
    """The whole bound of :func:`distance_bound` on ``|e_ij - D_ij|`` for pairs with
    ``W = |q_i|^2 + |x_j|^2 <= w`` (a number or an array): ``beta_D w + 4 dim 2^-120``."""
    return distance_bound(dim, precision) * w + 4 * int(dim) * _TINY


def _canonical_sqdist(x: torch.Tensor, q: torch.Tensor, nx: np.ndarray, nq: np.ndarray,
                      rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``D = fl32(fl32(nq_i + nx_j) - 2 RN32(q_i . x_j))`` for the pairs: a function of the two
    vectors alone, the value every decision and every returned distance is made of."""
    c = exact_pair_dots(q, x, rows, cols)
    return (nq[rows] + nx[cols]) - np.float32(2.0) * c

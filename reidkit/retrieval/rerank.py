"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) with torchreid semantics, on the CPU or the GPU
by the memory it needs."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch

from reidkit.core.device import resolve_device
from reidkit.core.progress import progress
from reidkit.retrieval.exact import _to_float_tensor
from reidkit.retrieval.jaccard import _inverted_index, _kreciprocal_encoding, _minsum_triples
from reidkit.retrieval.knn import ArrayLike, log

__all__ = ['re_ranking']


# =============================================================================================
# Re-ranking (torchreid semantics)
# =============================================================================================
def _absmax_rows(t: torch.Tensor, dim: int, chunk: int = 1024) -> torch.Tensor:
    """``t.abs().amax(dim)`` in row chunks (no full-size temporary)."""
    if dim == 1:
        return torch.cat([t[s:s + chunk].abs().amax(1) for s in range(0, t.shape[0], chunk)])
    out = None
    for s in range(0, t.shape[0], chunk):
        m = t[s:s + chunk].abs().amax(0)
        out = m if out is None else torch.maximum(out, m)
    return out


def _rerank_bytes(nq: int, ng: int) -> int:
    """Device bytes re-ranking holds: the three input blocks (the gallery x gallery block dominates:
    27 GB for MSMT17's 82,161 images), the (q, g) output and the working set of the row chunks."""
    return 4 * (nq * nq + 2 * nq * ng + ng * ng) + 3 * 4 * 16_000_000


def _rerank_device(device, nq: int, ng: int, headroom: float = 1.25) -> torch.device:
    """``device="auto"``: CUDA only when its free memory (``torch.cuda.mem_get_info``, after
    returning PyTorch's cached blocks) holds what re-ranking needs with some headroom, else the CPU.
    An explicit device is used as given."""
    if device is not None and str(device) != "auto":
        return resolve_device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    need = _rerank_bytes(nq, ng)
    try:
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info()
    except Exception:
        return torch.device("cpu")
    if free >= headroom * need:
        return torch.device("cuda", torch.cuda.current_device())
    log.info("re-ranking on the CPU: it needs %.1f GB, the GPU has %.1f GB free", need / 1e9, free / 1e9)
    return torch.device("cpu")


def _rerank_colmax(qq: torch.Tensor, qg: torch.Tensor, gg: torch.Tensor) -> torch.Tensor:
    """Step 1: column maxima of ``B^2`` (max of squares = square of the max |value|)."""
    colmax_q = torch.maximum(_absmax_rows(qq, 0), _absmax_rows(qg, 1)) ** 2  # columns 0..q-1
    colmax_g = torch.maximum(_absmax_rows(qg, 0), _absmax_rows(gg, 0)) ** 2  # columns q..
    return torch.cat([colmax_q, colmax_g])


def _rerank_rank_table(qq: torch.Tensor, qg: torch.Tensor, gg: torch.Tensor, colmax: torch.Tensor,
                       width: int, chunk: int) -> np.ndarray:
    """Step 2: the ``width`` smallest entries of each row of ``O``, built in row chunks."""
    nq = qq.shape[0]
    n = nq + gg.shape[0]
    ranks = []
    for s in progress(range(0, n, chunk), desc="re-ranking rows"):
        e = min(s + chunk, n)
        parts = []
        if s < nq:  # query rows i: column i of B = [qq[:, i]; qg[i, :]]
            qe = min(e, nq)
            parts.append(torch.cat([qq[:, s:qe].T, qg[s:qe]], dim=1))
        if e > nq:  # gallery rows q+g': column of B = [qg[:, g']; gg[:, g']]
            gs, ge = max(s, nq) - nq, e - nq
            parts.append(torch.cat([qg[:, gs:ge].T, gg[:, gs:ge].T], dim=1))
        o = torch.cat(parts) if len(parts) > 1 else parts[0]  # always a fresh tensor
        del parts
        o.mul_(o).div_(colmax[s:e, None])  # O rows = column of B^2 / its max (in place)
        ranks.append(torch.topk(o, width, dim=1, largest=False, sorted=True).indices)
        del o
    return torch.cat(ranks).cpu().numpy().astype(np.int64)


def _rerank_pair_dist(qq: torch.Tensor, qg: torch.Tensor, gg: torch.Tensor, colmax: torch.Tensor,
                      ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Step 3: ``pair_dist`` of re-ranking, ``O[i, j] = B[j, i]^2 / colmax[i]`` read from the input
    block that holds ``B[j, i]``."""
    nq, dev = qq.shape[0], qq.device

    def pair_dist(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        out = torch.empty(len(rows), dtype=torch.float32)
        r = torch.from_numpy(rows)
        c = torch.from_numpy(cols)
        for sel_r, sel_c, block, ro, co in (
            (r < nq, c < nq, qq, 0, 0),  # B[j, i] = qq[j, i]
            (r >= nq, c < nq, qg, 0, nq),  # B[j, i] = qg[j, i - q]
            (r < nq, c >= nq, qg.T, nq, 0),  # B[j, i] = qg[i, j - q]
            (r >= nq, c >= nq, gg, nq, nq),  # B[j, i] = gg[j - q, i - q]
        ):
            m = sel_r & sel_c
            if not bool(m.any()):
                continue
            jj = (c[m] - ro).to(dev)
            ii = (r[m] - co).to(dev)
            val = block[jj, ii]
            out[m] = (val * val / colmax[r[m].to(dev)]).cpu()
        return out.numpy()

    return pair_dist


def _rerank_final(v: sp.csr_matrix, qg: torch.Tensor, colmax: torch.Tensor, lam: float) -> np.ndarray:
    """Steps 5-6: ``m`` for query rows x gallery columns accumulated straight into the output, then
    ``(1 - lambda) (1 - m/(2 - m)) + lambda O[:q, q:]`` in place, in row chunks."""
    nq, ng = qg.shape
    dev = qg.device
    inv = _inverted_index(v, dev)
    final = torch.zeros(nq * ng, dtype=torch.float32, device=dev)
    max_triples = 32_000_000 if dev.type == "cuda" else 2_000_000
    for _b0, _b1, i, j, val in _minsum_triples(inv, (0, nq), "range", partner_rows=(nq, nq + ng),
                                               max_triples=max_triples, desc="re-ranking min-sum"):
        final.index_add_(0, i * ng + (j - nq), val)
    final = final.view(nq, ng)
    with torch.no_grad():
        step = max(1, 16_000_000 // max(ng, 1))
        for s in range(0, nq, step):
            e = min(s + step, nq)
            m = final[s:e]  # view: everything below is in place
            den = 2.0 - m
            m.div_(den).neg_().add_(1.0)  # jaccard = 1 - m/(2-m); m = 0 (no shared support) gives 1
            del den
            o = qg[s:e] * qg[s:e]
            o.div_(colmax[s:e, None]).mul_(lam)  # lambda * O[i, q+g']
            m.mul_(1.0 - lam).add_(o)
            del o
    return final.cpu().numpy()


def re_ranking(
    q_g_dist: ArrayLike,
    q_q_dist: ArrayLike,
    g_g_dist: ArrayLike,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    device: str | torch.device | None = "auto",
    return_info: bool = False,
    chunk: int | None = None,
):
    """k-reciprocal re-ranking (Zhong et al., CVPR'17) with the semantics of torchreid's ``re_ranking``.

    Conventions of the reference (golden README §3) that this reproduces:

    * the block matrix ``B = [[qq, qg], [qg^T, gg]]`` is squared element-wise (the inputs are
      already squared distances, so this is the 4th power of the Euclidean distance);
    * ``O = (B^2 / colmax(B^2))^T``: row ``i`` of ``O`` is column ``i`` of ``B^2`` divided by its max;
    * forward neighbourhoods have ``k + 1`` entries (``k1 + 1`` and ``h + 1``, ``h = round(k1/2)``);
      the 2/3 expansion rule, ``V = softmax(-O)`` over the expanded set and query expansion over
      the first ``k2`` entries of the ranking are the shared machinery of :func:`jaccard_distance`;
    * the Jaccard distance is computed for the query rows only and is **not** clipped;
    * ``final = (1 - lambda) * jaccard + lambda * O[:q]``, returned as the query x gallery block.

    Memory: the (q+g)^2 matrix is never formed. ``O`` is produced in row chunks from the three input
    blocks, keeping only each row's ``max(k1 + 1, k2)`` smallest entries; the values needed later
    (``O[i, j]`` of expanded sets and the query x gallery block) are read back from the inputs.
    The output is the only (q, g) array allocated.

    Parameters
    ----------
    q_g_dist, q_q_dist, g_g_dist : squared Euclidean distances (numpy or torch), shapes (q, g),
        (q, q), (g, g).
    k1, k2, lambda_value : re-ranking parameters (torchreid defaults 20, 6, 0.3).
    device : ``"auto"``, ``"cpu"``, ``"cuda"``... Auto takes CUDA only when its free memory holds
        the blocks (:func:`_rerank_device`), else the CPU.
    return_info : also return a dict with device and timings.
    chunk : rows of ``O`` materialised at once (default: about 16M floats).

    Returns
    -------
    (q, g) float32 numpy array (and the info dict when ``return_info``).
    """
    t_start = time.perf_counter()
    dev = _rerank_device(device, int(q_g_dist.shape[0]), int(q_g_dist.shape[1]))
    qg = _to_float_tensor(q_g_dist, dev)
    qq = _to_float_tensor(q_q_dist, dev)
    gg = _to_float_tensor(g_g_dist, dev)
    nq, ng = qg.shape
    if qq.shape != (nq, nq) or gg.shape != (ng, ng):
        raise ValueError(f"inconsistent shapes {tuple(qg.shape)}, {tuple(qq.shape)}, {tuple(gg.shape)}")
    n = nq + ng
    h = int(np.around(k1 / 2.0))
    n_full, n_half, n_qe = min(k1 + 1, n), min(h + 1, n), min(k2, n)
    if chunk is None:
        chunk = max(1, 16_000_000 // n)
    with torch.no_grad():
        colmax = _rerank_colmax(qq, qg, gg)
        rank = _rerank_rank_table(qq, qg, gg, colmax, max(n_full, n_half, n_qe), chunk)
    t_rank = time.perf_counter()
    v = _kreciprocal_encoding(rank, n_full, n_half, n_qe, _rerank_pair_dist(qq, qg, gg, colmax))
    del rank
    t_enc = time.perf_counter()
    out = _rerank_final(v, qg, colmax, float(lambda_value))
    t_end = time.perf_counter()
    if not return_info:
        return out
    info = {
        "device": str(dev),
        "n_query": nq,
        "n_gallery": ng,
        "v_nnz": int(v.nnz),
        "time_rank_s": t_rank - t_start,
        "time_encoding_s": t_enc - t_rank,
        "time_minsum_s": t_end - t_enc,
        "time_total_s": t_end - t_start,
    }
    return out, info


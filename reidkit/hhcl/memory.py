"""Cluster memories for unsupervised re-ID: Cluster-Contrast (``CM``) and HHCL (``CMhybrid``,
``CMhybrid_v2``). Spec: ``hhcl.md`` §3.4 and §4.

The idea, for learners
----------------------
After clustering, every pseudo-identity ``k`` is represented by one or more **proxies**: unit
vectors kept in a *memory* (a buffer, not a parameter: no optimiser touches it). A batch feature
``f_i`` with pseudo-label ``y_i`` is trained with a softmax over its similarities to all proxies
(InfoNCE at temperature ``T``): pulled towards its own cluster's proxy, pushed from the others.
The proxies are not learned by gradient descent. After each step they are moved towards the
batch features by a momentum update ``p <- normalize(m*p + (1-m)*f)``. ``m`` is the weight of the
**old** value, so ``m = 0.1`` means 90 % of each update is the new feature.

Which feature a proxy follows is the whole difference between the variants:

* ``CM`` (Cluster-Contrast): one proxy per cluster, updated with every member in turn, in batch
  order. With ``m = 0.1`` it ends up close to the last member seen.
* ``CMhybrid`` (HHCL as released): **two** proxies per cluster.

  - The **mean proxy** ``c_k`` follows the batch mean of the cluster. It is a stable,
    centroid-like summary that gives a smooth training signal.
  - The **hard proxy** ``h_k`` follows the cluster's *hardest positive*: the batch member least
    similar to ``h_k``. Pulling every member towards that proxy makes the loss focus on the
    difficult views of an identity (other camera, pose, occlusion). Those carry most of the
    information, but also most of the clustering noise.

  Two proxies combine both: the mean proxy keeps training stable, the hard proxy supplies the
  hard-sample signal. The loss is ``hw*(CE_hard + (1-hw)*CE_mean)`` = ``0.5*CE_hard + 0.25*CE_mean``
  (the bracket placement of the reference code).
* ``CMhybrid_v2`` (the paper's hard-*instance* variant): a centroid per cluster plus ``P`` stored
  instance features per cluster. The hard logit of sample ``i`` for its own cluster is its
  *least* similar stored instance (hardest positive). For every other cluster it is the *most*
  similar one (hardest negative). ``L = w*CE(centroids) + (1-w)*CE(hard instances)``.

How autograd is used
--------------------
As in both reference repos, the similarity ``x @ M.T`` is a custom :class:`torch.autograd.Function`.
Its backward first returns ``dL/dx = dL/dS @ M`` with the **pre-update** memory, then updates the
memory in place. So the memory changes during ``loss.backward()``, never in ``forward``. A forward
pass under ``torch.no_grad()`` (or one whose loss is never back-propagated) leaves the memory
untouched. The memory buffer is saved for backward with autograd's version check. A second
backward through the same graph (``retain_graph=True``), or one graph that holds two memory calls
(``mem(x1, y1) + mem(x2, y2)``), therefore raises autograd's "modified by an inplace operation"
error instead of silently using an already-updated memory. The reference keeps no such check.
Use one memory call per backward.

All updates are vectorised with index ops: no loop over samples and no host sync per sample.
CM's sequential per-sample recurrence is exact. It runs as a loop over the *position within the
cluster* (at most ``max |B_k|`` iterations, ~16 with the PK sampler), and each iteration updates all
clusters at once. The code is device-agnostic. Inputs in fp16/bf16 (autocast) are cast to the
memory dtype, and the memory math always runs in that dtype with autocast disabled.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from reidkit.config import MEMORY_MODES

__all__ = ['ClusterMemory', 'cluster_centroids', 'sample_instances', 'init_memory_features', 'MODES']


MODES = MEMORY_MODES


_EPS = 1e-12


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _l2n(v: torch.Tensor) -> torch.Tensor:
    """Row-wise ``v / ||v||`` (norm clamped at 1e-12, like ``F.normalize``)."""
    return v / v.norm(dim=1, keepdim=True).clamp_min(_EPS)


def _no_autocast(device_type: str):
    """Context that disables autocast for ``device_type`` (no-op where autocast is unsupported)."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, ValueError):  # pragma: no cover - exotic device types
        return contextlib.nullcontext()


def _group(targets: torch.Tensor):
    """Group a batch by label, keeping batch order inside each group.

    Returns ``present`` (G,) the distinct labels (ascending), ``inv`` (B,) the group index of
    every sample, ``counts`` (G,), and ``pos`` (B,) the 0-based position of every sample among the
    members of its group, in batch order. One implicit host sync (``torch.unique``).
    """
    present, inv, counts = torch.unique(targets, sorted=True, return_inverse=True, return_counts=True)
    b = targets.numel()
    order = torch.argsort(inv, stable=True)  # samples grouped, batch order kept inside a group
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(inv)
    pos[order] = torch.arange(b, device=targets.device) - starts[inv[order]]
    return present, inv, counts, pos


# --------------------------------------------------------------------------------------------
# memory updates (in place, no grad); each mirrors one reference update rule
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def _update_cm(features: torch.Tensor, x: torch.Tensor, targets: torch.Tensor, momentum: float) -> None:
    """CC: ``M[y_b] <- normalize(m*M[y_b] + (1-m)*x_b)`` sequentially for b = 0..B-1.

    The updates of different clusters do not interact, and inside one cluster they must run in
    batch order. Step ``p`` of the loop applies the p-th update of *every* cluster that has at
    least p+1 members in the batch. That is the same sequence of float operations per row as the
    per-sample loop.
    """
    present, inv, counts, pos = _group(targets)
    n_steps = int(counts.max())  # the one host sync of this update
    g = present.numel()
    table = torch.full((n_steps, g), -1, dtype=torch.long, device=targets.device)
    table[pos, inv] = torch.arange(targets.numel(), device=targets.device)
    rows = features.index_select(0, present)
    for p in range(n_steps):
        idx = table[p]
        cand = rows * momentum + (1.0 - momentum) * x.index_select(0, idx.clamp_min(0))
        rows = torch.where((idx >= 0)[:, None], _l2n(cand), rows)
    features.index_copy_(0, present, rows)


@torch.no_grad()
def _batch_means(x: torch.Tensor, inv: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    sums = torch.zeros(counts.numel(), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, inv, x)
    return sums / counts.to(x.dtype)[:, None]


@torch.no_grad()
def _update_hybrid(features: torch.Tensor, x: torch.Tensor, targets: torch.Tensor, momentum: float) -> None:
    """HHCL CMhybrid: once per cluster k in the batch, with the pre-update rows.

    * hard row ``k``: ``normalize(m*h_k + (1-m)*x_sel)``, where ``sel`` is the member with the
      smallest ``x . h_k`` (first in batch order on ties, like ``np.argmin``);
    * mean row ``K+k``: ``normalize(m*c_k + (1-m)*mean of the members)``.
    """
    k_total = features.shape[0] // 2
    present, inv, counts, _ = _group(targets)
    b, g = targets.numel(), present.numel()
    hard = features.index_select(0, present)
    mean_rows = features.index_select(0, present + k_total)

    sims = (x * hard.index_select(0, inv)).sum(1)  # x_i . h_{y_i}
    min_sim = torch.full((g,), float("inf"), dtype=sims.dtype, device=x.device)
    min_sim = min_sim.scatter_reduce(0, inv, sims, reduce="amin")
    cand = torch.where(sims == min_sim[inv], torch.arange(b, device=x.device), b)
    sel = torch.full((g,), b, dtype=torch.long, device=x.device).scatter_reduce(0, inv, cand, reduce="amin")

    new_hard = _l2n(hard * momentum + (1.0 - momentum) * x.index_select(0, sel))
    new_mean = _l2n(mean_rows * momentum + (1.0 - momentum) * _batch_means(x, inv, counts))
    features.index_copy_(0, present, new_hard)
    features.index_copy_(0, present + k_total, new_mean)


@torch.no_grad()
def _update_hybrid_v2(features: torch.Tensor, x: torch.Tensor, targets: torch.Tensor, momentum: float,
                      num_instances: int) -> None:
    """CMhybrid_v2: centroid momentum update with the batch mean, and instance slots overwritten.

    Slot p (1-based) of cluster k is row ``k + p*K``. It receives the p-th member of k in batch
    order, for p = 1..min(|B_k|, P), with no momentum. Members beyond P are ignored. The reference
    would write them into other clusters' rows.
    """
    k_total = features.shape[0] // (num_instances + 1)
    present, inv, counts, pos = _group(targets)
    cent = features.index_select(0, present)
    features.index_copy_(0, present, _l2n(cent * momentum + (1.0 - momentum) * _batch_means(x, inv, counts)))
    keep = pos < num_instances
    rows = (targets + (pos + 1) * k_total)[keep]
    features.index_copy_(0, rows, x[keep])


class _MemorySimilarity(torch.autograd.Function):
    """``S = x @ M.T``; backward returns ``dL/dS @ M`` (pre-update M), then calls ``update``."""

    @staticmethod
    def forward(ctx, x, targets, features, update):
        ctx.save_for_backward(x, targets, features)
        ctx.update = update
        with _no_autocast(x.device.type):
            return x.mm(features.t())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, targets, features = ctx.saved_tensors
        grad_x = None
        with _no_autocast(x.device.type):
            if ctx.needs_input_grad[0]:
                grad_x = grad_out.to(features.dtype).mm(features)
            ctx.update(features, x.detach(), targets)  # memory changes only after dL/dx is computed
        return grad_x, None, None, None


# --------------------------------------------------------------------------------------------
# initialisation
# --------------------------------------------------------------------------------------------
def _check_labels(features: torch.Tensor, labels, num_clusters: int | None):
    labels = torch.as_tensor(labels, device=features.device).long().reshape(-1)
    if labels.numel() != features.shape[0]:
        raise ValueError(f"{labels.numel()} labels for {features.shape[0]} features")
    valid = labels >= 0
    k = int(labels.max()) + 1 if num_clusters is None else int(num_clusters)
    if bool((labels[valid] >= k).any()):
        raise ValueError(f"a label is >= num_clusters={k}")
    counts = torch.bincount(labels[valid], minlength=k)
    if k == 0 or bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten()[:10].tolist()
        raise ValueError(f"clusters without members (first ids: {empty}); relabel to 0..K-1 first")
    return labels, valid, k, counts


@torch.no_grad()
def cluster_centroids(features: torch.Tensor, labels, num_clusters: int | None = None) -> torch.Tensor:
    """L2-normalised mean feature of every cluster ``0..K-1``. Label ``-1`` (outlier) is ignored.

    This is the reference ``generate_cluster_features`` followed by the ``F.normalize`` of the
    memory initialisation. Sums are accumulated in float64. Returns ``(K, D)`` in the dtype of
    ``features``. Raises if a cluster id in ``0..K-1`` has no member.
    """
    features = torch.as_tensor(features)
    labels, valid, k, counts = _check_labels(features, labels, num_clusters)
    acc = torch.float64 if features.device.type != "mps" else torch.float32
    sums = torch.zeros(k, features.shape[1], dtype=acc, device=features.device)
    sums.index_add_(0, labels[valid], features[valid].to(acc))
    return _l2n(sums / counts.to(acc)[:, None]).to(features.dtype)


@torch.no_grad()
def sample_instances(features: torch.Tensor, labels, num_instances: int, num_clusters: int | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Instance slots of a ``CMhybrid_v2`` memory: ``num_instances`` members per cluster.

    Each one is drawn uniformly **with replacement** from the cluster's members (label -1
    excluded). The indices are int64: the reference built them as float64, which cannot index a
    tensor. Draws come from ``generator`` (a CPU ``torch.Generator``, or the global RNG when
    None). Returns ``(P*K, D)`` L2-normalised rows in memory order: row ``(p-1)*K + k`` is slot p
    of cluster k, i.e. memory row ``k + p*K`` once the K centroids are put in front.
    """
    features = torch.as_tensor(features)
    labels, valid, k, counts = _check_labels(features, labels, num_clusters)
    p = int(num_instances)
    member_idx = torch.nonzero(valid).flatten()
    order = member_idx[torch.argsort(labels[member_idx], stable=True)]  # members grouped by cluster
    starts = torch.cumsum(counts, 0) - counts
    u = torch.rand(p, k, generator=generator, dtype=torch.float64)  # (P, K): slot-major
    offs = (u * counts.cpu().to(torch.float64)).floor().long()
    offs = torch.minimum(offs, counts.cpu()[None, :] - 1).to(features.device)
    idx = order[starts[None, :] + offs]  # (P, K) int64 indices into features
    return _l2n(features[idx.reshape(-1)].to(features.dtype))


@torch.no_grad()
def init_memory_features(features: torch.Tensor, labels, mode: str = "CM", num_instances: int = 16,
                         num_clusters: int | None = None, generator: torch.Generator | None = None
                         ) -> torch.Tensor:
    """Rows of a fresh memory for ``mode`` (spec §3.4), built from extracted features + labels.

    * ``CM``: the K normalised centroids.
    * ``CMhybrid``: the centroids twice (hard rows, then mean rows), as at every epoch start.
    * ``CMhybrid_v2``: the centroids, then ``num_instances`` random member features per cluster
      (:func:`sample_instances`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cent = cluster_centroids(features, labels, num_clusters)
    if mode == "CM":
        return cent
    if mode == "CMhybrid":
        return cent.repeat(2, 1)
    inst = sample_instances(features, labels, num_instances, cent.shape[0], generator)
    return torch.cat([cent, inst], 0)


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------
class ClusterMemory(nn.Module):
    """Proxy memory + contrastive loss: ``loss = memory(inputs, targets)``; update on backward.

    Args:
        num_features: feature dimension D.
        num_clusters: K, the number of pseudo-identities (labels must be in ``0..K-1``).
        temp: softmax temperature T (0.05).
        momentum: weight ``m`` of the **old** memory row in the update (0.1 in the runs).
        mode: ``"CM"`` | ``"CMhybrid"`` | ``"CMhybrid_v2"`` (see the module docstring).
        hard_weight: ``hw`` of the hybrid losses (0.5; the released training script never changes it).
        num_instances: P, instance slots per cluster (``CMhybrid_v2`` only).

    Buffer ``features`` (the rows):

    * ``CM``: ``(K, D)``.
    * ``CMhybrid``: ``(2K, D)``: rows ``0..K-1`` are the hard proxies, rows ``K..2K-1`` the mean
      proxies.
    * ``CMhybrid_v2``: ``((P+1)K, D)``: the K centroids, then slot p of cluster k at row
      ``k + p*K`` (p = 1..P).

    Fill it with :meth:`from_features` or by assigning ``memory.features = rows``. The buffer
    starts as zeros.

    Inputs: ``CM`` L2-normalises them in ``forward``, and the gradient flows through that
    normalisation. The hybrid modes use them as given; HHCL's encoder already outputs unit
    vectors. ``targets`` must be int labels in ``0..K-1``. DBSCAN outliers are dropped before
    training.
    """

    def __init__(self, num_features: int, num_clusters: int, temp: float = 0.05, momentum: float = 0.1,
                 mode: str = "CM", hard_weight: float = 0.5, num_instances: int = 16):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "CMhybrid_v2" and int(num_instances) < 1:
            raise ValueError("CMhybrid_v2 needs num_instances >= 1")
        self.num_features = int(num_features)
        self.num_clusters = int(num_clusters)
        self.temp = float(temp)
        self.momentum = float(momentum)
        self.mode = mode
        self.hard_weight = float(hard_weight)
        self.num_instances = int(num_instances)
        self.register_buffer("features", torch.zeros(self.num_rows, self.num_features))

    @property
    def num_rows(self) -> int:
        k = self.num_clusters
        return {"CM": k, "CMhybrid": 2 * k, "CMhybrid_v2": (self.num_instances + 1) * k}[self.mode]

    def extra_repr(self) -> str:
        s = (f"num_features={self.num_features}, num_clusters={self.num_clusters}, mode={self.mode!r}, "
             f"temp={self.temp}, momentum={self.momentum}")
        if self.mode != "CM":
            s += f", hard_weight={self.hard_weight}"
        if self.mode == "CMhybrid_v2":
            s += f", num_instances={self.num_instances}"
        return s

    @classmethod
    def from_features(cls, features: torch.Tensor, labels, mode: str = "CM", temp: float = 0.05,
                      momentum: float = 0.1, hard_weight: float = 0.5, num_instances: int = 16,
                      num_clusters: int | None = None, generator: torch.Generator | None = None
                      ) -> "ClusterMemory":
        """Build a memory from extracted features ``(N, D)`` and cluster labels (-1 = outlier).

        The memory sits on the device of ``features`` in float32, unless ``features`` is float64.
        See :func:`init_memory_features` for the rows of each mode.
        """
        features = torch.as_tensor(features)
        if features.dtype != torch.float64:
            features = features.float()
        rows = init_memory_features(features, labels, mode, num_instances, num_clusters, generator)
        k = rows.shape[0] // {"CM": 1, "CMhybrid": 2, "CMhybrid_v2": int(num_instances) + 1}[mode]
        mem = cls(features.shape[1], k, temp=temp, momentum=momentum, mode=mode, hard_weight=hard_weight,
                  num_instances=num_instances)
        mem.features = rows.contiguous()
        return mem

    # ------------------------------------------------------------------------------------
    def _prep(self, inputs: torch.Tensor, targets: torch.Tensor):
        mem = self.features
        if mem.shape != (self.num_rows, self.num_features):
            raise ValueError(f"memory.features has shape {tuple(mem.shape)}, expected "
                             f"{(self.num_rows, self.num_features)} for mode {self.mode!r}")
        if inputs.dim() != 2 or inputs.shape[1] != self.num_features:
            raise ValueError(f"inputs must be (B, {self.num_features}), got {tuple(inputs.shape)}")
        targets = torch.as_tensor(targets, device=mem.device).long().reshape(-1)
        if targets.numel() != inputs.shape[0]:
            raise ValueError(f"{targets.numel()} targets for a batch of {inputs.shape[0]}")
        return inputs.to(mem.dtype), targets  # fp16/bf16 (autocast) -> memory dtype

    #: optional ``gather(x, targets) -> (x_all, targets_all)`` applied before every memory update;
    #: distributed training sets it to an all-gather so that every rank's memory sees the whole
    #: global batch, in global batch order (the loss itself stays per rank).
    gather = None

    def _update_fn(self):
        m = self.momentum
        if self.mode == "CM":
            fn = lambda f, x, y: _update_cm(f, x, y, m)  # noqa: E731
        elif self.mode == "CMhybrid":
            fn = lambda f, x, y: _update_hybrid(f, x, y, m)  # noqa: E731
        else:
            p = self.num_instances
            fn = lambda f, x, y: _update_hybrid_v2(f, x, y, m, p)  # noqa: E731
        gather = self.gather
        if gather is None:
            return fn
        return lambda f, x, y: fn(f, *gather(x, y))

    def similarities(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``S = x @ M.T`` (``x`` normalised first in CM mode), before the temperature, hooked so
        that ``backward`` updates the memory. Most callers want ``forward`` (the loss)."""
        x, targets = self._prep(inputs, targets)
        with _no_autocast(x.device.type):
            if self.mode == "CM":
                x = F.normalize(x, dim=1)
            return _MemorySimilarity.apply(x, targets, self.features, self._update_fn())

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x, targets = self._prep(inputs, targets)
        with _no_autocast(x.device.type):
            if self.mode == "CM":
                x = F.normalize(x, dim=1)
            logits = _MemorySimilarity.apply(x, targets, self.features, self._update_fn())
            logits = logits / self.temp
            k, hw = self.num_clusters, self.hard_weight
            if self.mode == "CM":
                return F.cross_entropy(logits, targets)
            if self.mode == "CMhybrid":
                hard, mean = torch.chunk(logits, 2, dim=1)
                return hw * (F.cross_entropy(hard, targets) + (1.0 - hw) * F.cross_entropy(mean, targets))
            # CMhybrid_v2
            cent = logits[:, :k]
            inst = logits[:, k:].reshape(-1, self.num_instances, k)  # [i, p-1, k] = x_i . I_{p,k} / T
            own = F.one_hot(targets, k).bool()
            hard = torch.where(own, inst.min(dim=1).values, inst.max(dim=1).values)
            return hw * F.cross_entropy(cent, targets) + (1.0 - hw) * F.cross_entropy(hard, targets)

    @torch.no_grad()
    def update(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Apply the mode's memory update for a batch, without a loss or backward.

        This is what ``backward`` does after computing the gradient. In CM mode the inputs are
        normalised first, as in ``forward``.
        """
        x, targets = self._prep(inputs.detach(), targets)
        if self.mode == "CM":
            x = F.normalize(x, dim=1)
        self._update_fn()(self.features, x, targets)

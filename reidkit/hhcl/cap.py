"""Camera-aware proxies (CAP, Wang et al., AAAI 2021): one proxy per (cluster, camera).

Spec: ``tests/golden/README.md`` §9 (``cap_memory.npz``).

The idea, for learners
----------------------
A camera changes how a person looks (light, angle, background) more than it changes who they
are, so a cluster's features split by camera. CAP keeps one proxy per **(cluster, camera)** pair
instead of one per cluster:

* **intra-camera contrast**: a feature from camera ``c`` is classified against camera ``c``'s
  proxies only (InfoNCE at temperature ``temp``). The camera's look is then shared by the
  positive and every negative, so it does not help to tell them apart;
* **inter-camera association** (from epoch ``crosscam_epoch`` on): the same feature is pulled
  towards *all* its cluster's proxies, in every camera, at once, and pushed away from the
  ``bg_knn`` most similar other proxies (hard negatives);
* a **camera-balanced sampler** draws every (cluster, camera) proxy equally often
  (:class:`CameraBalancedSampler`).

The proxies follow the features like the kit's ``CM`` memory: after ``dL/dx`` is computed in
``backward``, each batch row updates its proxy in batch order,
``p <- normalize(m*p + (1-m)*x)``, with ``m = momentum`` the weight of the **old** row (CAP's
``alpha``). The autograd plumbing, the update rule and the autocast handling are those of
:mod:`reidkit.hhcl.memory` (``_MemorySimilarity``, ``_update_cm``).

Camera ids are compared by value: any integers work (Market's 1..6, a sparse ``{0, 3, 5}``). Proxies
are ordered by ascending camera id, then ascending pseudo-label. For cameras ``0..C-1`` this is
CAP's order: ``cat(percam_memory)``. CAP itself needs ``0..C-1`` because it indexes Python lists
by the camera id. A camera without clustered images simply has no proxies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler

from reidkit.data.samplers import _SeededSampler
from reidkit.hhcl.memory import _l2n, _MemorySimilarity, _no_autocast, _update_cm

__all__ = ["CameraBalancedSampler", "CameraProxyMemory", "camera_proxies", "proxy_index"]


# --------------------------------------------------------------------------------------------
# proxies
# --------------------------------------------------------------------------------------------
def proxy_index(pseudo_labels, cams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (camera, cluster) proxies of a labelled image set, in proxy order.

    Returns ``proxy_label`` (P,), ``proxy_cam`` (P,) and ``image_proxy`` (N,): the proxy row of
    every image, -1 for an outlier (label < 0). Rows are sorted by camera id, then label. The
    row is CAP's "accumulated label", the class :class:`CameraBalancedSampler` draws by.
    """
    labels = np.asarray(torch.as_tensor(pseudo_labels).cpu(), dtype=np.int64).reshape(-1)
    cams = np.asarray(torch.as_tensor(cams).cpu(), dtype=np.int64).reshape(-1)
    if labels.shape != cams.shape:
        raise ValueError(f"{labels.size} pseudo-labels but {cams.size} camera ids")
    valid = labels >= 0
    if not valid.any():
        raise ValueError("no clustered image (every pseudo-label is -1): there is no proxy to build")
    ucams, cam_rank = np.unique(cams, return_inverse=True)
    stride = int(labels.max()) + 1
    keys, inv = np.unique(cam_rank[valid] * stride + labels[valid], return_inverse=True)
    image_proxy = np.full(labels.shape, -1, dtype=np.int64)
    image_proxy[valid] = inv.reshape(-1)
    return keys % stride, ucams[keys // stride], image_proxy


@torch.no_grad()
def camera_proxies(features, pseudo_labels, cams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Initial CAP proxies: one row per (camera, pseudo-label) with label >= 0.

    Row = L2-normalise(mean of the **re-L2-normalised** features of that camera and label), sums in
    float64. Order: ascending camera id, then ascending label (golden §9 step 1).
    Returns ``proxies`` (P, D) in the dtype of ``features``, ``proxy_label`` (P,) and
    ``proxy_cam`` (P,), int64 on the device of ``features``.
    """
    features = torch.as_tensor(features)
    if features.dim() != 2:
        raise ValueError(f"features must be (N, D), got {tuple(features.shape)}")
    plab, pcam, img = proxy_index(pseudo_labels, cams)
    if img.size != features.shape[0]:
        raise ValueError(f"{img.size} pseudo-labels for {features.shape[0]} features")
    dev = features.device
    acc = torch.float64 if dev.type != "mps" else torch.float32
    img_t = torch.from_numpy(img).to(dev)
    keep = img_t >= 0
    x = _l2n(features[keep].to(acc))
    sums = torch.zeros(plab.size, features.shape[1], dtype=acc, device=dev).index_add_(0, img_t[keep], x)
    # the mean's 1/n does not change the direction: normalise the sums directly
    return (_l2n(sums).to(features.dtype), torch.from_numpy(plab).to(dev), torch.from_numpy(pcam).to(dev))


# --------------------------------------------------------------------------------------------
# the memory
# --------------------------------------------------------------------------------------------
class CameraProxyMemory(nn.Module):
    """CAP's camera-aware proxy memory + loss: ``loss = memory(x, image_index, cams, epoch)``.

    Args:
        num_features: feature dimension D.
        temp: softmax temperature (CAP's ``beta``, 0.07).
        momentum: weight of the **old** proxy in the update (CAP's ``alpha``, 0.2).
        crosscam_epoch: first epoch with the inter-camera association loss (5).
        bg_knn: hard negatives per sample in the association loss (50).
        cross_weight: weight of the association loss (0.5).

    Buffers, set by :meth:`reset` (or :meth:`from_features`) at every epoch start:
    ``features`` (P, D) the proxies; ``proxy_label``, ``proxy_cam`` (P,); ``image_label``,
    ``image_cam``, ``image_proxy`` (N,), indexed by the image index that ``forward`` takes as target.

    Loss of one batch, with ``n_c`` the batch rows from camera ``c`` and ``S = x @ M.T`` against
    the pre-update memory:

    * intra: ``sum_b CE(S_b[cam_b's proxies] / temp, own proxy) / n_{cam_b}``: per-camera means, summed;
    * cross (``epoch >= crosscam_epoch``): positives = every proxy of the row's cluster (all cameras),
      negatives = the ``bg_knn`` most similar other proxies (selection detached),
      ``l_b = -mean_pos log_softmax([S_pos, S_neg] / temp)``, and ``cross_weight * sum_b l_b / n_{cam_b}``.
      With fewer than ``bg_knn`` other proxies, all of them are the negatives. A positive never
      counts as a negative (CAP would count it: golden README §9 "Quirk").

    ``backward`` computes ``dL/dx`` with the pre-update proxies, then applies the update of
    golden §9 step 5, which is the ``CM`` rule on the proxy rows, in batch order (duplicates
    included). A forward under ``torch.no_grad()`` leaves the memory untouched. The inputs are used
    as given (unit rows, not normalised here). fp16/bf16 inputs are cast to the memory dtype.

    It composes with :class:`reidkit.hhcl.memory.ClusterMemory`: add the two losses and back-propagate
    once, and each memory updates itself in that backward.
    """

    #: optional ``gather(x, rows) -> (x_all, rows_all)`` applied before every update (distributed
    #: training: every rank's memory sees the global batch), as in ``ClusterMemory.gather``.
    gather = None

    def __init__(self, num_features: int, temp: float = 0.07, momentum: float = 0.2, crosscam_epoch: int = 5,
                 bg_knn: int = 50, cross_weight: float = 0.5):
        super().__init__()
        if int(bg_knn) < 1:
            raise ValueError(f"bg_knn must be >= 1, got {bg_knn}")
        if not temp > 0:
            raise ValueError(f"temp must be > 0, got {temp}")
        self.num_features = int(num_features)
        self.temp = float(temp)
        self.momentum = float(momentum)
        self.crosscam_epoch = int(crosscam_epoch)
        self.bg_knn = int(bg_knn)
        self.cross_weight = float(cross_weight)
        for name in ("proxy_label", "proxy_cam", "image_label", "image_cam", "image_proxy"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.long))
        self.register_buffer("features", torch.zeros(0, self.num_features))

    @property
    def num_proxies(self) -> int:
        return self.features.shape[0]

    def extra_repr(self) -> str:
        return (f"num_features={self.num_features}, proxies={self.num_proxies}, temp={self.temp}, "
                f"momentum={self.momentum}, crosscam_epoch={self.crosscam_epoch}, bg_knn={self.bg_knn}, "
                f"cross_weight={self.cross_weight}")

    @torch.no_grad()
    def reset(self, features: torch.Tensor, pseudo_labels, cams) -> CameraProxyMemory:
        """Rebuild the proxies from the extracted features of all N training images (epoch start).

        ``pseudo_labels`` (-1 = outlier) and ``cams`` are per image. ``forward``'s targets index
        these N images. The memory is float32, or float64 for float64 features, on their device.
        """
        features = torch.as_tensor(features)
        if features.dtype != torch.float64:
            features = features.float()
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"features must be (N, {self.num_features}), got {tuple(features.shape)}")
        dev = features.device
        proxies, plab, pcam = camera_proxies(features, pseudo_labels, cams)
        _, _, img = proxy_index(pseudo_labels, cams)
        self.features = proxies.contiguous()
        self.proxy_label, self.proxy_cam, self.image_proxy = plab, pcam, torch.from_numpy(img).to(dev)
        self.image_label = torch.as_tensor(pseudo_labels, device=dev).long().reshape(-1)
        self.image_cam = torch.as_tensor(cams, device=dev).long().reshape(-1)
        return self

    @classmethod
    def from_features(cls, features: torch.Tensor, pseudo_labels, cams, **kwargs) -> CameraProxyMemory:
        """A memory built with :meth:`reset`; ``kwargs`` go to the constructor."""
        features = torch.as_tensor(features)
        mem = cls(features.shape[1], **kwargs)
        mem.to(features.device)
        return mem.reset(features, pseudo_labels, cams)

    # ------------------------------------------------------------------------------------
    def proxy_rows(self, targets, cams=None) -> torch.Tensor:
        """The proxy row of every batch row, from image indices; checks the cameras if given."""
        n = self.image_proxy.numel()
        if n == 0:
            raise ValueError("the memory is empty: call reset(features, pseudo_labels, cams) first")
        dev = self.features.device
        targets = torch.as_tensor(targets, device=dev).long().reshape(-1)
        if targets.numel() and bool(((targets < 0) | (targets >= n)).any()):
            raise ValueError(f"targets are image indices in 0..{n - 1}; got {targets.min()}..{targets.max()}")
        rows = self.image_proxy[targets]
        if bool((rows < 0).any()):
            bad = targets[rows < 0][:5].tolist()
            raise ValueError(f"images {bad} are outliers (pseudo-label -1): they have no proxy; "
                             "train on clustered images only")
        if cams is not None:
            cams = torch.as_tensor(cams, device=dev).long().reshape(-1)
            if cams.shape != targets.shape:
                raise ValueError(f"{cams.numel()} camera ids for {targets.numel()} targets")
            wrong = cams != self.image_cam[targets]
            if bool(wrong.any()):
                i = int(torch.nonzero(wrong)[0])
                seen = int(self.image_cam[targets[i]])
                raise ValueError(f"batch row {i}: camera {int(cams[i])} but image {int(targets[i])} was "
                                 f"seen by camera {seen} when the memory was built")
        return rows

    def _update_fn(self):
        m, gather = self.momentum, self.gather
        if gather is None:
            return lambda f, x, y: _update_cm(f, x, y, m)
        return lambda f, x, y: _update_cm(f, *gather(x, y), m)

    def forward(self, inputs: torch.Tensor, targets, cams=None, epoch: int = 0) -> torch.Tensor:
        """The CAP loss of a batch: ``inputs`` (B, D) features, ``targets`` (B,) image indices,
        ``cams`` (B,) their cameras (checked against the memory; None: taken from it), ``epoch``."""
        mem = self.features
        if inputs.dim() != 2 or inputs.shape[1] != self.num_features:
            raise ValueError(f"inputs must be (B, {self.num_features}), got {tuple(inputs.shape)}")
        rows = self.proxy_rows(targets, cams)
        if rows.numel() != inputs.shape[0]:
            raise ValueError(f"{rows.numel()} targets for a batch of {inputs.shape[0]}")
        x = inputs.to(mem.dtype)
        cam_of = self.proxy_cam[rows]
        _, cam_inv, cam_n = torch.unique(cam_of, return_inverse=True, return_counts=True)
        weight = 1.0 / cam_n.to(mem.dtype)[cam_inv]  # 1/n_c: per-camera means, summed over cameras
        with _no_autocast(x.device.type):
            logits = _MemorySimilarity.apply(x, rows, mem, self._update_fn()) / self.temp
            other_cam = self.proxy_cam[None, :] != cam_of[:, None]
            intra = F.cross_entropy(logits.masked_fill(other_cam, float("-inf")), rows, reduction="none")
            loss = (intra * weight).sum()
            if epoch >= self.crosscam_epoch:
                loss = loss + self.cross_weight * (self._association(logits, rows) * weight).sum()
        return loss

    def _association(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Per-row inter-camera association loss ``l_b`` (B,) from ``logits = S / temp``."""
        pos = self.proxy_label[None, :] == self.proxy_label[rows][:, None]  # (B, P), own proxy included
        cand = logits.detach().masked_fill(pos, float("-inf"))
        k = min(self.bg_knn, cand.shape[1])
        top, idx = cand.topk(k, dim=1)
        # positives sit at -inf, so they enter the top-k only when fewer than k negatives exist: drop them
        neg = torch.zeros_like(pos).scatter_(1, idx, top > float("-inf"))
        lse = logits.masked_fill(~(pos | neg), float("-inf")).logsumexp(dim=1)
        mean_pos = (logits * pos).sum(1) / pos.sum(1).to(logits.dtype)
        return lse - mean_pos

    @torch.no_grad()
    def update(self, inputs: torch.Tensor, targets, cams=None) -> None:
        """Apply the proxy update of a batch without a loss (what ``backward`` does after ``dL/dx``)."""
        rows = self.proxy_rows(targets, cams)
        self._update_fn()(self.features, inputs.detach().to(self.features.dtype), rows)


# --------------------------------------------------------------------------------------------
# the sampler
# --------------------------------------------------------------------------------------------
class CameraBalancedSampler(_SeededSampler, Sampler[int]):
    """CAP's ``ClassUniformlySampler`` over (cluster, camera) proxies; yields dataset indices.

    Every epoch the proxies (:func:`proxy_index` order) are shuffled and each gives ``k``
    consecutive images of its own camera and cluster: ``k`` distinct ones when it has at least
    ``k``; otherwise ``k`` draws without replacement from its images repeated ``k`` times (CAP's
    ``value * k``, shuffled, first ``k``), so a small proxy repeats some images. Images labelled -1
    are skipped. So each proxy, hence each camera of a cluster, fills the same share of the epoch.
    ``len`` = ``k x`` the number of proxies. Seeded, with ``state_dict`` like the kit's samplers.
    """

    def __init__(self, labels: Sequence[int], camids: Sequence[int], k: int = 4, seed: int = 0):
        super().__init__(seed)
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = int(k)
        self.proxy_label, self.proxy_cam, image_proxy = proxy_index(labels, camids)
        keep = np.flatnonzero(image_proxy >= 0)
        order = keep[np.argsort(image_proxy[keep], kind="stable")]
        bounds = np.cumsum(np.bincount(image_proxy[keep], minlength=self.proxy_label.size))[:-1]
        self.members = np.split(order, bounds)  # members[p]: the images of proxy p, ascending

    def __len__(self) -> int:
        return self.k * len(self.members)

    def __iter__(self) -> Iterator[int]:
        k = self.k
        for p in self.rng.permutation(len(self.members)):
            pool = self.members[p]
            if len(pool) < k:
                pool = np.tile(pool, k)
            yield from (int(i) for i in self.rng.permutation(pool)[:k])

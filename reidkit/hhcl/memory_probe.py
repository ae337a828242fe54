"""What the cluster memories do, measured on small inputs: the InfoNCE gradient, the temperature,
the memories compared and the hard proxy followed (notebook 04's probes)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from reidkit.data.samplers import CameraAwarePKSampler
from reidkit.hhcl.memory import MODES, ClusterMemory, cluster_centroids

__all__ = ['infonce_gradient', 'temperature_table', 'compare_memories', 'typical_and_hardest', 'follow_hard_proxy', 'train_probe']


# --------------------------------------------------------------------------------------------
# teaching helpers (notebook 04 and its exercises): small measurements on extracted features
# --------------------------------------------------------------------------------------------
def infonce_gradient(feature, proxies, target: int, temp: float = 0.05) -> dict:
    """The cluster-level InfoNCE of one feature ``f`` against proxies ``C`` (K, D), in closed form.

    ``loss = -log softmax(C f / temp)[target]`` and its gradient with respect to ``f``,
    ``dL/df = (p - e_target) @ C / temp``, where ``p`` is the softmax. Float64 NumPy, no
    normalisation of ``f`` (the hybrid memories use the features as given).
    Returns ``{"loss", "probs" (K,), "logits" (K,), "grad" (D,)}``.
    """
    f = np.asarray(feature, dtype=np.float64).reshape(-1)
    c = np.asarray(proxies, dtype=np.float64)
    logits = c @ f / float(temp)
    z = logits - logits.max()
    p = np.exp(z) / np.exp(z).sum()
    onehot = np.zeros_like(p)
    onehot[int(target)] = 1.0
    return {"loss": float(np.log(np.exp(z).sum()) - z[int(target)]), "probs": p, "logits": logits,
            "grad": (p - onehot) @ c / float(temp)}


def pk_batches(labels, camids=None, ids_per_batch: int = 8, num_instances: int = 4, steps: int = 20,
               seed: int = 0) -> list[np.ndarray]:
    """``steps`` batches of ``ids_per_batch * num_instances`` indices, drawn like the training loop
    does (the camera-aware PK sampler, restarted when exhausted). Outliers (-1) never appear. With
    fewer clusters than ``ids_per_batch`` (a dry run on a tiny tree), every cluster is in every batch."""

    labels = np.asarray(labels)
    ids_per_batch = max(1, min(int(ids_per_batch), len(np.unique(labels[labels >= 0]))))
    camids = np.zeros_like(labels) if camids is None else np.asarray(camids)
    sampler = CameraAwarePKSampler(labels, camids, num_instances=num_instances, seed=seed)
    size = ids_per_batch * num_instances
    out, buf = [], []
    while len(out) < steps:
        before = len(out)
        for i in sampler:
            buf.append(i)
            if len(buf) == size:
                out.append(np.asarray(buf))
                buf = []
                if len(out) == steps:
                    break
        buf = []  # drop_last, as the loader does
        if len(out) == before:
            raise ValueError(f"not enough clustered images for one batch of {size}")
    return out


def temperature_table(features, labels, temps=(0.05, 0.1, 0.5, 1.0)) -> list[dict]:
    """What the temperature does to the loss of every clustered feature against its centroids.

    For each ``temp``: the mean loss, the mean gradient norm ``|dL/df|``, the mean softmax weight of
    the own proxy, the mean share of the negatives' weight taken by the single most similar
    negative, and the effective number of negatives (``exp`` of the entropy of the negatives'
    weights, averaged). Outliers (label -1) are left out. ``log K`` is the loss of a uniform guess.
    """
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    labels = np.asarray(labels)
    keep = labels >= 0
    x, y = x[keep], torch.as_tensor(labels[keep]).long()
    cent = cluster_centroids(x, y)
    k = cent.shape[0]
    own = F.one_hot(y, k).bool()
    rows = []
    for t in temps:
        p = torch.softmax(x @ cent.T / float(t), dim=1)
        grad = (p - own.double()) @ cent / float(t)
        neg = p.masked_fill(own, 0.0)
        neg = neg / neg.sum(1, keepdim=True).clamp_min(1e-300)
        ent = -(neg * neg.clamp_min(1e-300).log()).sum(1)
        rows.append({"temp": float(t), "loss": float(-p[own].log().mean()), "grad_norm": float(grad.norm(dim=1).mean()),
                     "p_own": float(p[own].mean()), "top_negative_share": float(neg.max(1).values.mean()),
                     "effective_negatives": float(ent.exp().mean()), "log_K": float(np.log(k))})
    return rows


@torch.no_grad()
def compare_memories(features, labels, batch, noise: float = 0.3, num_instances: int = 4, seed: int = 1,
                     modes=MODES, temp: float = 0.05, momentum: float = 0.1) -> list[dict]:
    """The three memories on one batch: the same batch of (noisy) features through each mode.

    ``batch`` indexes ``features``; Gaussian noise of expected norm about ``noise`` (std
    ``noise / sqrt(D)`` per dimension) is added and the rows are normalised (a stand-in for an
    augmented view). For each mode: the memory rows, the loss, how
    many rows one backward updates, the largest move of a row, and the gradient norm.
    """
    g = torch.Generator().manual_seed(seed)
    f_all = torch.as_tensor(np.ascontiguousarray(features)).float()
    batch = torch.as_tensor(np.asarray(batch)).long()
    d = f_all.shape[1]
    xb = F.normalize(f_all[batch] + noise / np.sqrt(d) * torch.randn(len(batch), d, generator=g), dim=1)
    yb = torch.as_tensor(np.asarray(labels)[batch.numpy()]).long()
    rows = []
    for mode in modes:
        mem = ClusterMemory.from_features(f_all, labels, mode=mode, temp=temp, momentum=momentum,
                                          num_instances=num_instances, generator=torch.Generator().manual_seed(seed))
        before = mem.features.clone()
        with torch.enable_grad():
            x = xb.clone().requires_grad_(True)
            loss = mem(x, yb)
            loss.backward()
        moved = (mem.features - before).norm(dim=1)
        rows.append({"mode": mode, "rows": int(mem.features.shape[0]), "loss": float(loss),
                     "rows_updated": int((moved > 0).sum()), "largest_move": float(moved.max()),
                     "grad_norm": float(x.grad.norm())})
    return rows


def typical_and_hardest(features, labels, clusters=None, n: int = 4) -> list[dict]:
    """For clusters (default the first ``n``): the member most similar to the normalised cluster mean
    (``typical``) and the least similar one (``hardest``, the member a hard proxy started at the
    centroid would follow first). Indices are into ``features``."""
    f = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if clusters is None:
        clusters = range(min(int(n), int(labels.max()) + 1))
    out = []
    for k in clusters:
        idx = np.flatnonzero(labels == k)
        centre = f[idx].mean(0)
        sims = f[idx] @ (centre / np.linalg.norm(centre))
        out.append({"cluster": int(k), "typical": int(idx[np.argmax(sims)]), "hardest": int(idx[np.argmin(sims)]),
                    "typical_sim": float(sims.max()), "hardest_sim": float(sims.min()), "size": int(len(idx))})
    return out


@torch.no_grad()
def follow_hard_proxy(features, labels, camids=None, pids=None, steps: int = 40, ids_per_batch: int = 8,
                      num_instances: int = 4, momentum: float = 0.1, seed: int = 0) -> dict:
    """Run ``CMhybrid`` updates on PK batches of fixed features and record what the hard proxy follows.

    Before each update the member each hard proxy will follow is found (the least similar one,
    the rule of :func:`_update_hybrid`), then ``ClusterMemory.update`` applies the step. For every
    pick: is its camera other than the cluster's most common camera (``cross_camera``), and is its
    true identity other than the cluster's most common one (``intruder``)? ``*_vs_centroid`` is the
    same rate for the member least similar to the cluster's starting centroid (the hardest member
    of the batch in the plain sense), and ``*_share`` the rate over all batch members, the rate a
    random pick would have.
    Returns the rates and ``cos_hard_mean``, the mean cosine between each cluster's hard and mean
    proxy at the end.
    """
    labels = np.asarray(labels)
    f_all = torch.as_tensor(np.ascontiguousarray(features)).float()
    mem = ClusterMemory.from_features(f_all, labels, mode="CMhybrid", momentum=momentum)
    k = mem.num_clusters

    def majority(values):
        out = np.full(k, -1)
        for c in range(k):
            vals, counts = np.unique(values[labels == c], return_counts=True)
            out[c] = vals[np.argmax(counts)]
        return out

    cams = np.zeros_like(labels) if camids is None else np.asarray(camids)
    ids = labels if pids is None else np.asarray(pids)
    cam_major, id_major = majority(cams), majority(ids)
    centres = mem.features[:k].clone()  # the centroids the memory starts from
    picks, central, members = [], [], []
    for idx in pk_batches(labels, cams, ids_per_batch, num_instances, steps, seed):
        x, y = f_all[idx], torch.as_tensor(labels[idx]).long()
        sims = (x * mem.features[y]).sum(1)
        to_centre = (x * centres[y]).sum(1)
        for c in torch.unique(y).tolist():
            where = np.flatnonzero(y.numpy() == c)
            picks.append(int(idx[where[int(torch.argmin(sims[where]))]]))
            central.append(int(idx[where[int(torch.argmin(to_centre[where]))]]))
        members.extend(idx.tolist())
        mem.update(x, y)
    picks, central, members = np.asarray(picks), np.asarray(central), np.asarray(members)
    lab_p, lab_m = labels[picks], labels[members]
    cos = (mem.features[:k] * mem.features[k:]).sum(1)
    return {"picks": picks,
            "cross_camera": float(np.mean(cams[picks] != cam_major[lab_p])),
            "cross_camera_vs_centroid": float(np.mean(cams[central] != cam_major[lab_p])),
            "cross_camera_share": float(np.mean(cams[members] != cam_major[lab_m])),
            "intruder": float(np.mean(ids[picks] != id_major[lab_p])),
            "intruder_vs_centroid": float(np.mean(ids[central] != id_major[lab_p])),
            "intruder_share": float(np.mean(ids[members] != id_major[lab_m])),
            "cos_hard_mean": float(cos.mean()), "clusters": k}


def train_probe(features, labels, camids=None, mode: str = "CMhybrid", temp: float = 0.05,
                momentum: float = 0.1, hard_weight: float = 0.5, dim: int = 64, epochs: int = 3,
                iters: int = 20, ids_per_batch: int = 8, num_instances: int = 4, lr: float = 3e-4,
                seed: int = 0) -> dict:
    """A teaching-size HHCL loop on frozen features: only a linear head ``W`` (D -> dim) is trained.

    Every epoch the projected features ``normalize(X W)`` give the centroids that rebuild the
    memory (the pseudo-labels stay fixed: no re-clustering); then ``iters`` PK batches train ``W``
    with the memory's loss (Adam), the memory updating in every backward. Recorded per iteration:
    ``loss`` and ``lag``, the mean cosine between each cluster's proxy (the mean proxy for
    ``CMhybrid``, the centroid row for ``CMhybrid_v2``) and the current centroid of its cluster
    under the current head: 1 means the memory is up to date. Takes well under a second for the
    sample. Returns ``{"loss", "lag", "W", "iters"}`` (W as a (D, dim) array).
    """
    labels = np.asarray(labels)
    keep = labels >= 0
    x_all = torch.as_tensor(np.ascontiguousarray(features)).float()
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(x_all.shape[1], dim, generator=g) / np.sqrt(x_all.shape[1])).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    y_keep = torch.as_tensor(labels[keep]).long()
    hist = {"loss": [], "lag": []}
    for epoch in range(epochs):
        with torch.no_grad():
            z = F.normalize(x_all[keep] @ w, dim=1)
        mem = ClusterMemory.from_features(z, y_keep, mode=mode, temp=temp, momentum=momentum,
                                          hard_weight=hard_weight, num_instances=num_instances,
                                          generator=torch.Generator().manual_seed(seed + epoch))
        k = mem.num_clusters
        proxy_rows = slice(k, 2 * k) if mode == "CMhybrid" else slice(0, k)
        for idx in pk_batches(labels, camids, ids_per_batch, num_instances, iters, seed * 1000 + epoch):
            loss = mem(F.normalize(x_all[idx] @ w, dim=1), torch.as_tensor(labels[idx]).long())
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                cent = cluster_centroids(F.normalize(x_all[keep] @ w, dim=1), y_keep)
                hist["lag"].append(float((mem.features[proxy_rows] * cent).sum(1).mean()))
            hist["loss"].append(float(loss.detach()))
    hist["W"] = w.detach().numpy()
    hist["iters"] = int(iters)
    return hist

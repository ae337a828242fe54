"""Tests for the camera-aware proxies (CAP): golden parity with one step of CAP's ``CAPMemory``
(``cap_memory.npz``, README §9), an independent per-sample float64 reference, finite differences,
the bg_knn quirk, camera ids, bad inputs, composition with ClusterMemory, and the sampler."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _golden import case_prefixes, load_golden
from torch.utils.data import BatchSampler

from reidkit.hhcl.cap import CameraBalancedSampler, CameraProxyMemory, camera_proxies, proxy_index
from reidkit.hhcl.memory import ClusterMemory

ATOL, RTOL, GRAD_ATOL = 1e-6, 1e-5, 5e-6


@pytest.fixture(scope="module")
def z():
    return load_golden("cap_memory")


def _t(a):
    return torch.from_numpy(np.array(a))


def _golden_memory(z, epoch_key="crosscam_epoch"):
    mem = CameraProxyMemory.from_features(_t(z["train_features"]), z["all_pseudo_label"], z["all_img_cams"],
                                          temp=z["beta"].item(), momentum=z["alpha"].item(),
                                          crosscam_epoch=z[epoch_key].item(), bg_knn=z["bg_knn"].item())
    mem.features = _t(z["proxy_init"]).clone()  # a fresh copy of the reference proxies for every case
    return mem


# --------------------------------------------------------------------------------------------
# an independent per-sample reference (float64 NumPy), written from README §9
# --------------------------------------------------------------------------------------------
def _reference_step(x, rows, cams, memory, proxy_label, proxy_cam, epoch, temp, momentum, crosscam_epoch,
                    bg_knn, cross_weight=0.5, quirk=False):
    """Loss, dL/dx and the updated memory by explicit loops. ``quirk``: CAP's negative selection."""
    x, memory = np.asarray(x, np.float64), np.asarray(memory, np.float64)
    grad = np.zeros_like(x)
    loss = 0.0
    for c in np.unique(cams):
        idx = np.flatnonzero(cams == c)
        own = np.flatnonzero(proxy_cam == c)
        for b in idx:
            z = x[b] @ memory[own].T / temp
            p = np.exp(z - z.max())
            p /= p.sum()
            t = int(np.flatnonzero(own == rows[b])[0])
            loss += -np.log(p[t]) / len(idx)
            g = p.copy()
            g[t] -= 1.0
            grad[b] += g @ memory[own] / temp / len(idx)
            if epoch >= crosscam_epoch:
                s = x[b] @ memory.T
                pos = np.flatnonzero(proxy_label == proxy_label[rows[b]])
                masked = s.copy()
                masked[pos] = -10000.0
                order = np.argsort(masked, kind="stable")
                neg = order[-bg_knn:] if quirk else [j for j in order[::-1][:bg_knn] if j not in set(pos)]
                sel = np.concatenate([pos, np.asarray(neg, dtype=np.int64)])
                zz = s[sel] / temp
                q = np.exp(zz - zz.max())
                q /= q.sum()
                w = np.zeros(len(sel))
                w[: len(pos)] = 1.0 / len(pos)
                loss += cross_weight * -(w * np.log(q)).sum() / len(idx)
                grad[b] += cross_weight * ((q - w) @ memory[sel]) / temp / len(idx)
    new = memory.copy()
    for c in np.unique(cams):  # camera by camera, batch order inside a camera
        for b in np.flatnonzero(cams == c):
            v = momentum * new[rows[b]] + (1 - momentum) * x[b]
            new[rows[b]] = v / np.linalg.norm(v)
    return loss, grad, new


def _random_case(seed=0, n=60, d=8, clusters=6, cams=3, batch=10):
    """Unit features; every cluster seen by 1..cams cameras; a batch with repeated images."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, clusters, n)
    labels[:clusters] = np.arange(clusters)
    cam = rng.integers(0, cams, n)
    f = rng.normal(size=(n, d)) + 2 * rng.normal(size=(clusters, d))[np.maximum(labels, 0)]
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    clustered = np.flatnonzero(labels >= 0)
    targets = rng.choice(clustered, batch)
    targets[-2:] = targets[:2]  # duplicates: applied in batch order
    xb = f[targets] + 0.3 * rng.normal(size=(batch, d))
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    return f, labels, cam, targets, xb


# --------------------------------------------------------------------------------------------
# golden
# --------------------------------------------------------------------------------------------
def test_golden_proxy_init(z):
    proxies, plab, pcam = camera_proxies(_t(z["train_features"]), z["all_pseudo_label"], z["all_img_cams"])
    assert proxies.dtype == torch.float32
    np.testing.assert_allclose(proxies.numpy(), z["proxy_init"], rtol=0, atol=ATOL)
    np.testing.assert_array_equal(plab.numpy(), z["proxy_label"])
    np.testing.assert_array_equal(pcam.numpy(), z["proxy_cam"])


def test_golden_cases_present(z):
    assert {"intra_", "cross_"} <= set(case_prefixes(z, "epoch", "loss"))


@pytest.mark.parametrize("case", ["intra_", "cross_"])
def test_golden_step(z, case):
    worst = {}
    for pre in case_prefixes(z, "epoch", "loss"):
        if not pre.startswith(case):
            continue
        mem = _golden_memory(z)
        np.testing.assert_array_equal(mem.proxy_label.numpy(), z["proxy_label"])
        x = _t(z["batch_features"]).requires_grad_(True)
        loss = mem(x, _t(z["batch_targets"]), _t(z["batch_cams"]), epoch=int(z[pre + "epoch"]))
        loss.backward()
        assert loss.shape == () and loss.dtype == torch.float32
        np.testing.assert_allclose(loss.item(), z[pre + "loss"].item(), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(x.grad.numpy(), z[pre + "grad"], rtol=0, atol=GRAD_ATOL)
        np.testing.assert_allclose(mem.features.numpy(), z[pre + "memory_after"], rtol=0, atol=ATOL)
        worst[pre] = (abs(loss.item() - z[pre + "loss"].item()),
                      np.abs(x.grad.numpy() - z[pre + "grad"]).max(),
                      np.abs(mem.features.numpy() - z[pre + "memory_after"]).max())
    assert worst, f"no {case} case"
    print("worst |diff| loss, grad, memory:", worst)


def test_golden_intra_is_not_cross(z):
    """The two epochs differ by the association loss only; the update does not depend on the epoch."""
    assert abs(z["cross_loss"].item() - z["intra_loss"].item()) > 1.0
    np.testing.assert_array_equal(z["cross_memory_after"], z["intra_memory_after"])


def test_golden_against_float64_loop(z):
    """The independent loop reference reproduces the golden values too (it checks the test's own oracle)."""
    for pre in ("intra_", "cross_"):
        rows = proxy_index(z["all_pseudo_label"], z["all_img_cams"])[2][z["batch_targets"]]
        loss, grad, new = _reference_step(z["batch_features"], rows, z["batch_cams"], z["proxy_init"],
                                          z["proxy_label"], z["proxy_cam"], z[pre + "epoch"].item(),
                                          z["beta"].item(), z["alpha"].item(), z["crosscam_epoch"].item(),
                                          z["bg_knn"].item())
        np.testing.assert_allclose(loss, z[pre + "loss"].item(), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(grad, z[pre + "grad"], atol=GRAD_ATOL)
        np.testing.assert_allclose(new, z[pre + "memory_after"], atol=ATOL)


# --------------------------------------------------------------------------------------------
# random cases, float64
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("epoch,bg_knn", [(0, 50), (5, 4), (7, 50)])
def test_matches_loop_reference(epoch, bg_knn):
    f, labels, cam, targets, xb = _random_case(seed=epoch + bg_knn)
    mem = CameraProxyMemory.from_features(_t(f), labels, cam, bg_knn=bg_knn)
    assert mem.features.dtype == torch.float64
    before = mem.features.clone()
    rows = mem.proxy_rows(targets).numpy()
    loss_ref, grad_ref, new_ref = _reference_step(xb, rows, cam[targets], before.numpy(),
                                                  mem.proxy_label.numpy(), mem.proxy_cam.numpy(), epoch,
                                                  0.07, 0.2, 5, bg_knn)
    x = _t(xb).requires_grad_(True)
    loss = mem(x, _t(targets), _t(cam[targets]), epoch=epoch)
    loss.backward()
    np.testing.assert_allclose(loss.item(), loss_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), grad_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(mem.features.numpy(), new_ref, rtol=0, atol=1e-12)
    untouched = np.setdiff1d(np.arange(mem.num_proxies), rows)
    assert torch.equal(mem.features[untouched], before[untouched])


def test_fewer_negatives_than_bg_knn():
    """bg_knn > the non-positive proxies: all of them are negatives, no positive counts as one.
    CAP's selection would add the positives' logits as negatives too; that value differs."""
    f, labels, cam, targets, xb = _random_case(seed=3, clusters=3, cams=2)
    mem = CameraProxyMemory.from_features(_t(f), labels, cam, bg_knn=50)
    p = mem.num_proxies
    assert p < 50
    args = (mem.proxy_rows(targets).numpy(), cam[targets], mem.features.numpy(), mem.proxy_label.numpy(),
            mem.proxy_cam.numpy(), 5, 0.07, 0.2, 5)
    fixed, _, _ = _reference_step(xb, *args, bg_knn=50)
    quirk, _, _ = _reference_step(xb, *args, bg_knn=50, quirk=True)
    assert abs(quirk - fixed) > 1e-3
    with torch.no_grad():
        loss = mem(_t(xb), _t(targets), epoch=5).item()
        every = CameraProxyMemory.from_features(_t(f), labels, cam, bg_knn=p)
        loss_all = every(_t(xb), _t(targets), epoch=5).item()
    np.testing.assert_allclose(loss, fixed, rtol=1e-12)
    assert loss == loss_all  # bg_knn = P: every non-positive proxy, exactly as bg_knn = 50


def test_finite_differences():
    """Central differences on a tiny float64 case vs one backward (a fresh memory for every evaluation:
    a backward updates the memory, so autograd's gradcheck, which back-propagates repeatedly, cannot run)."""
    f, labels, cam, targets, xb = _random_case(seed=5, n=30, d=5, clusters=4, batch=6)
    template = CameraProxyMemory.from_features(_t(f), labels, cam, bg_knn=3)

    def loss_fn(x):
        return copy.deepcopy(template)(x, _t(targets), _t(cam[targets]), epoch=6)

    x = _t(xb).requires_grad_(True)
    loss_fn(x).backward()
    num = np.zeros_like(xb)
    eps = 1e-6
    with torch.no_grad():
        for i, j in np.ndindex(*xb.shape):
            d = np.zeros_like(xb)
            d[i, j] = eps
            num[i, j] = (loss_fn(_t(xb + d)).item() - loss_fn(_t(xb - d)).item()) / (2 * eps)
    assert np.abs(x.grad.numpy()).max() > 0.1
    np.testing.assert_allclose(x.grad.numpy(), num, rtol=1e-6, atol=1e-7)


def test_no_grad_and_update():
    f, labels, cam, targets, xb = _random_case(seed=7)
    mem = CameraProxyMemory.from_features(_t(f), labels, cam)
    before = mem.features.clone()
    with torch.no_grad():
        mem(_t(xb), _t(targets), epoch=9)
    assert torch.equal(mem.features, before)
    twin = copy.deepcopy(mem)
    x = _t(xb).requires_grad_(True)
    mem(x, _t(targets), epoch=9).backward()
    twin.update(_t(xb), _t(targets))
    assert not torch.equal(mem.features, before)
    assert torch.equal(mem.features, twin.features)


def test_half_inputs_use_memory_dtype():
    f, labels, cam, targets, xb = _random_case(seed=8)
    mem = CameraProxyMemory.from_features(_t(f).float(), labels, cam)
    x32 = _t(xb).float()
    with torch.no_grad():
        ref = mem(x32, _t(targets), epoch=6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = mem(x32.bfloat16(), _t(targets), epoch=6)
    assert ref.dtype == low.dtype == torch.float32
    np.testing.assert_allclose(low.item(), ref.item(), rtol=2e-2)


# --------------------------------------------------------------------------------------------
# camera ids and bad inputs
# --------------------------------------------------------------------------------------------
def test_camera_ids_by_value(z):
    """Cameras are compared by value: renamed ids give the same step; the proxy order follows the ids."""
    feats, labels, cams = _t(z["train_features"]), z["all_pseudo_label"], z["all_img_cams"]
    t, bc = _t(z["batch_targets"]), z["batch_cams"]
    results = []
    for names in ([0, 1, 2], [3, 7, 11], [9, 2, 5]):
        names = np.asarray(names)
        mem = CameraProxyMemory.from_features(feats, labels, names[cams])
        order = np.argsort(names, kind="stable")  # proxies follow ascending camera id
        per_cam = np.bincount(z["proxy_cam"])[order]
        assert np.array_equal(mem.proxy_cam.numpy(), np.repeat(names[order], per_cam))
        x = _t(z["batch_features"]).requires_grad_(True)
        loss = mem(x, t, _t(names[bc]), epoch=5)
        loss.backward()
        perm = np.concatenate([np.flatnonzero(z["proxy_cam"] == c) for c in order])
        results.append((loss.item(), x.grad.numpy(), mem.features.numpy()[np.argsort(perm)]))
    for loss, grad, after in results[1:]:
        np.testing.assert_allclose(loss, results[0][0], rtol=1e-6)
        np.testing.assert_allclose(grad, results[0][1], atol=1e-6)
        np.testing.assert_allclose(after, results[0][2], atol=1e-7)
    np.testing.assert_allclose(results[0][0], z["cross_loss"].item(), rtol=RTOL, atol=ATOL)


def test_bad_inputs(z):
    feats, labels, cams = _t(z["train_features"]), z["all_pseudo_label"], z["all_img_cams"]
    mem = _golden_memory(z)
    x, t, bc = _t(z["batch_features"]), z["batch_targets"].copy(), z["batch_cams"].copy()
    outlier = int(np.flatnonzero(labels < 0)[0])
    with pytest.raises(ValueError, match="outliers"):
        mem(x, np.r_[t[:-1], outlier], None, epoch=0)
    wrong = bc.copy()
    wrong[0] = (wrong[0] + 1) % 3
    with pytest.raises(ValueError, match="batch row 0: camera"):
        mem(x, t, wrong, epoch=0)
    with pytest.raises(ValueError, match="1-based|image indices"):
        mem(x, np.r_[t[:-1], len(labels)], None, epoch=0)
    with pytest.raises(ValueError, match="targets for a batch"):
        mem(x, t[:-1], None, epoch=0)
    with pytest.raises(ValueError, match="camera ids for"):
        mem(x, t, bc[:-1], epoch=0)
    with pytest.raises(ValueError, match=r"inputs must be \(B, 32\)"):
        mem(x[:, :8], t, bc, epoch=0)
    with pytest.raises(ValueError, match="empty"):
        CameraProxyMemory(32)(x, t, bc, epoch=0)
    with pytest.raises(ValueError, match="no clustered image"):
        camera_proxies(feats, np.full(len(labels), -1), cams)
    with pytest.raises(ValueError, match="pseudo-labels but"):
        camera_proxies(feats, labels, cams[:-1])
    with pytest.raises(ValueError, match="pseudo-labels for"):
        camera_proxies(feats[:-1], labels, cams)
    with pytest.raises(ValueError, match="bg_knn"):
        CameraProxyMemory(32, bg_knn=0)


# --------------------------------------------------------------------------------------------
# composition with the HHCL memories
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["CM", "CMhybrid", "CMhybrid_v2"])
def test_composes_with_cluster_memory(z, mode):
    """HHCL loss + CAP loss, one backward: the gradient is the sum, both memories update."""
    feats, labels = _t(z["train_features"]), z["all_pseudo_label"]
    keep = np.flatnonzero(labels >= 0)
    relabel = np.unique(labels[keep], return_inverse=True)[1].reshape(-1)
    t = z["batch_targets"]
    y = _t(relabel[np.searchsorted(keep, t)])

    def build():
        cm = ClusterMemory.from_features(feats[keep], relabel, mode=mode, num_instances=2,
                                         generator=torch.Generator().manual_seed(0))
        return cm, _golden_memory(z)

    grads = []
    for use in ("cm", "cap", "both"):
        cm, cap = build()
        x = _t(z["batch_features"]).requires_grad_(True)
        loss = 0.0
        if use in ("cm", "both"):
            loss = loss + cm(x, y)
        if use in ("cap", "both"):
            loss = loss + cap(x, _t(t), _t(z["batch_cams"]), epoch=5)
        loss.backward()
        grads.append(x.grad.clone())
        if use == "both":
            np.testing.assert_allclose(cap.features.numpy(), z["cross_memory_after"], atol=ATOL)
            assert not torch.equal(cm.features, build()[0].features)
    torch.testing.assert_close(grads[2], grads[0] + grads[1], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# the sampler
# --------------------------------------------------------------------------------------------
def test_sampler_blocks_and_balance(z):
    labels, cams = z["all_pseudo_label"], z["all_img_cams"]
    s = CameraBalancedSampler(labels, cams, k=4, seed=0)
    idx = np.fromiter(iter(s), dtype=np.int64)
    n_proxy = len(z["proxy_label"])
    assert len(idx) == len(s) == 4 * n_proxy
    blocks = idx.reshape(-1, 4)
    image_proxy = proxy_index(labels, cams)[2]
    block_proxy = image_proxy[blocks]
    assert (block_proxy == block_proxy[:, :1]).all()  # k consecutive images of one (cluster, camera)
    assert sorted(block_proxy[:, 0]) == list(range(n_proxy))  # every proxy once per epoch
    assert not np.array_equal(block_proxy[:, 0], np.arange(n_proxy))  # shuffled
    assert (labels[idx] >= 0).all()
    # camera balance: each camera's share is k x its proxies; each cluster gets k rows per camera it is in
    np.testing.assert_array_equal(np.bincount(cams[idx]), 4 * np.bincount(z["proxy_cam"]))
    sizes = np.bincount(image_proxy[image_proxy >= 0])
    big = [b for b in blocks if sizes[image_proxy[b[0]]] >= 4]
    assert all(len(set(b.tolist())) == 4 for b in big)  # distinct images when the proxy has k
    assert (sizes < 4).any() and len(big) < len(blocks)  # the golden set has small proxies, duplicated
    batches = list(BatchSampler(s, 16, drop_last=True))
    assert all(len(set(image_proxy[b].tolist())) == 4 for b in batches)


def test_sampler_determinism(z):
    labels, cams = z["all_pseudo_label"], z["all_img_cams"]
    a = CameraBalancedSampler(labels, cams, seed=3)
    b = CameraBalancedSampler(labels, cams, seed=3)
    first = list(a)
    assert first == list(b)
    assert first != list(CameraBalancedSampler(labels, cams, seed=4))
    state = a.state_dict()
    second = list(a)
    assert second != first  # a new epoch, a new order
    a.load_state_dict(state)
    assert list(a) == second


def test_sampler_bad_inputs():
    with pytest.raises(ValueError, match="k must be"):
        CameraBalancedSampler([0, 0], [0, 1], k=0)
    with pytest.raises(ValueError, match="camera ids"):
        CameraBalancedSampler([0, 0], [0], k=2)

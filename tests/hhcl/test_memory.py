"""Tests for reidkit.hhcl.memory: golden parity with CC / HHCL one-step memories, plus independent
per-sample loop references (CM sequential update, CMhybrid, CMhybrid_v2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _golden import load_golden

from reidkit.hhcl.memory import ClusterMemory, cluster_centroids, init_memory_features, sample_instances

ATOL, RTOL = 1e-6, 1e-5


@pytest.fixture(scope="module")
def z():
    return load_golden("cm_memory")


def _cases(z):
    """Getters for every case in the file: the public one (plain keys) and any larger case whose
    keys carry a common prefix or suffix around ``targets``."""
    out = []
    for key in z:
        if key.endswith("targets"):
            pre, suf = key[: -len("targets")], ""
        elif key.startswith("targets"):
            pre, suf = "", key[len("targets"):]
        else:
            continue
        out.append(lambda name, pre=pre, suf=suf: z[pre + name + suf])
    assert out, "no case found in cm_memory.npz"
    return out


def _t(a):
    return torch.from_numpy(np.array(a))


def _run(mem, x, y):
    x = x.clone().requires_grad_()
    loss = mem(x, y)
    loss.backward()
    return loss.detach(), x.grad


# ------------------------------------------------------------------------------- golden parity
def test_golden_keys(z):
    # public case: K=12, B=48 (12 clusters x 4), d=64
    g = _cases(z)[0]
    assert g("cc_memory_init").shape == (12, 64)
    assert g("hhcl_memory_init").shape == (24, 64)
    assert g("targets").shape == (48,)
    for g in _cases(z):
        assert g("temp").item() == 0.05 and g("momentum").item() == 0.1
        assert g("hhcl_hard_weight").item() == 0.5


def test_golden_cc(z):
    for g in _cases(z):
        k, d = g("cc_memory_init").shape
        y = _t(g("targets"))
        mem = ClusterMemory(d, k, temp=g("temp").item(), momentum=g("momentum").item(), mode="CM")
        mem.features = _t(g("cc_memory_init")).clone()
        with torch.no_grad():
            sim = mem.similarities(_t(g("cc_inputs")), y)
        np.testing.assert_allclose(sim.numpy(), g("cc_sim"), atol=ATOL, rtol=RTOL)
        loss, grad = _run(mem, _t(g("cc_inputs")), y)
        assert loss.dtype == torch.float32
        np.testing.assert_allclose(loss.item(), g("cc_loss").item(), atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(grad.numpy(), g("cc_grad"), atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(mem.features.numpy(), g("cc_memory_after"), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("pre", ["hhcl_", "hhcl_epochstart_"])
def test_golden_hhcl(z, pre):
    for g in _cases(z):
        k = g("cc_memory_init").shape[0]
        d = g("hhcl_inputs").shape[1]
        y = _t(g("targets"))
        mem = ClusterMemory(d, k, temp=g("temp").item(), momentum=g("momentum").item(), mode="CMhybrid",
                            hard_weight=g("hhcl_hard_weight").item(), num_instances=16)
        init = _t(g(pre + "memory_init")).clone()
        mem.features = init.clone()
        with torch.no_grad():
            sim = mem.similarities(_t(g("hhcl_inputs")), y)
        np.testing.assert_allclose(sim.numpy(), g(pre + "sim"), atol=ATOL, rtol=RTOL)
        loss, grad = _run(mem, _t(g("hhcl_inputs")), y)
        np.testing.assert_allclose(loss.item(), g(pre + "loss").item(), atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(grad.numpy(), g(pre + "grad"), atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(mem.features.numpy(), g(pre + "memory_after"), atol=ATOL, rtol=RTOL)
        if pre == "hhcl_epochstart_":  # the epoch-start memory is the CC centres, twice
            np.testing.assert_array_equal(init.numpy(), np.tile(g("cc_memory_init"), (2, 1)))


def test_golden_update_happens_in_backward(z):
    g = _cases(z)[0]
    k, d = g("cc_memory_init").shape
    y = _t(g("targets"))
    mem = ClusterMemory(d, k, mode="CM")
    mem.features = _t(g("cc_memory_init")).clone()
    x = _t(g("cc_inputs")).requires_grad_()
    loss = mem(x, y)
    np.testing.assert_array_equal(mem.features.numpy(), g("cc_memory_init"))  # forward: untouched
    loss.backward()
    np.testing.assert_allclose(mem.features.numpy(), g("cc_memory_after"), atol=ATOL, rtol=RTOL)
    # a forward without autograd never updates
    with torch.no_grad():
        mem(x, y)
    np.testing.assert_allclose(mem.features.numpy(), g("cc_memory_after"), atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------- naive references
def _naive_cm_update(M, x, y, m):
    M = M.clone()
    xn = F.normalize(x, dim=1)
    for b in range(len(y)):
        k = int(y[b])
        M[k] = m * M[k] + (1.0 - m) * xn[b]
        M[k] = M[k] / M[k].norm()
    return M


def _naive_hybrid_update(M, x, y, m):
    M0, M = M.clone(), M.clone()
    K = M.shape[0] // 2
    for k in sorted(set(y.tolist())):
        members = [i for i in range(len(y)) if int(y[i]) == k]
        sims = np.array([float(x[i] @ M0[k]) for i in members])
        sel = members[int(np.argmin(sims))]
        M[k] = m * M0[k] + (1.0 - m) * x[sel]
        M[k] /= M[k].norm()
        M[K + k] = m * M0[K + k] + (1.0 - m) * x[members].mean(0)
        M[K + k] /= M[K + k].norm()
    return M


def _naive_v2(M, x, y, K, P, T, w, m):
    """Per-(sample, cluster) loop: loss and grad (autograd through explicit min/max), memory after."""
    x = x.clone().requires_grad_()
    B = len(y)
    z_rows, c_rows = [], []
    for i in range(B):
        zi, ci = [], []
        for k in range(K):
            ci.append(x[i] @ M[k])
            s = torch.stack([x[i] @ M[k + p * K] for p in range(1, P + 1)])
            zi.append(s.min() if k == int(y[i]) else s.max())
        z_rows.append(torch.stack(zi))
        c_rows.append(torch.stack(ci))
    zz, cc = torch.stack(z_rows) / T, torch.stack(c_rows) / T
    loss = w * F.cross_entropy(cc, y) + (1 - w) * F.cross_entropy(zz, y)
    loss.backward()
    M2 = M.clone()
    xd = x.detach()
    for k in sorted(set(y.tolist())):
        members = [i for i in range(B) if int(y[i]) == k]
        M2[k] = m * M[k] + (1.0 - m) * xd[members].mean(0)
        M2[k] /= M2[k].norm()
        for p, i in enumerate(members[:P], start=1):
            M2[k + p * K] = xd[i]
    return loss.detach(), x.grad, M2


def _interleaved_batch(gen, K, B, absent=()):
    """Uneven, interleaved labels (not contiguous groups); some clusters absent."""
    allowed = torch.tensor([k for k in range(K) if k not in absent])
    w = torch.rand(len(allowed), generator=gen) + 0.2
    y = allowed[torch.multinomial(w, B, replacement=True, generator=gen)]
    return y


def _rand_memory(gen, rows, d, dtype):
    return F.normalize(torch.randn(rows, d, generator=gen, dtype=dtype), dim=1)


# ------------------------------------------------------------------------------- CM
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cm_vectorised_equals_sequential_loop(dtype):
    gen = torch.Generator().manual_seed(0)
    K, B, d = 9, 61, 16
    y = _interleaved_batch(gen, K, B, absent=(3, 7))
    assert len(set(torch.bincount(y).tolist())) > 2  # uneven
    assert (y[1:] != y[:-1]).sum() > K  # interleaved, not contiguous groups
    M0 = _rand_memory(gen, K, d, dtype)
    x = torch.randn(B, d, generator=gen, dtype=dtype) * 2
    mem = ClusterMemory(d, K, mode="CM", momentum=0.1).to(dtype)
    mem.features = M0.clone()
    _run(mem, x, y)
    ref = _naive_cm_update(M0, x, y, 0.1)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(mem.features, ref, atol=tol, rtol=0)
    for k in (3, 7):
        assert torch.equal(mem.features[k], M0[k])
    # order matters: reversing the batch gives another result (so the test can see the order)
    mem.features = M0.clone()
    mem.update(x.flip(0), y.flip(0))
    assert (mem.features - ref).abs().max() > 1e-3


def test_cm_grad_equals_autograd_expression():
    gen = torch.Generator().manual_seed(1)
    K, B, d, T = 6, 20, 12, 0.05
    y = _interleaved_batch(gen, K, B)
    M0 = _rand_memory(gen, K, d, torch.float64)
    x = torch.randn(B, d, generator=gen, dtype=torch.float64)
    mem = ClusterMemory(d, K, mode="CM", temp=T).double()
    mem.features = M0.clone()
    loss, grad = _run(mem, x, y)
    xr = x.clone().requires_grad_()
    ref = F.cross_entropy(F.normalize(xr, dim=1) @ M0.t() / T, y)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, xr.grad, atol=1e-12, rtol=0)


def test_update_method_equals_backward_update():
    gen = torch.Generator().manual_seed(2)
    K, B, d = 5, 17, 8
    y = _interleaved_batch(gen, K, B)
    x = torch.randn(B, d, generator=gen)
    M0 = _rand_memory(gen, 2 * K, d, torch.float32)
    for mode in ("CM", "CMhybrid"):
        a = ClusterMemory(d, K, mode=mode)
        b = ClusterMemory(d, K, mode=mode)
        a.features = M0[: a.num_rows].clone()
        b.features = M0[: b.num_rows].clone()
        _run(a, x, y)
        b.update(x, y)
        assert torch.equal(a.features, b.features)


def test_second_backward_through_same_graph_raises():
    gen = torch.Generator().manual_seed(3)
    K, B, d = 4, 10, 8
    y = _interleaved_batch(gen, K, B)
    x = torch.randn(B, d, generator=gen, requires_grad=True)
    mem = ClusterMemory(d, K, mode="CM")
    mem.features = _rand_memory(gen, K, d, torch.float32)
    loss = mem(x, y)
    loss.backward(retain_graph=True)
    once = mem.features.clone()
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()  # the saved memory was updated in place: refuse a stale/updated gradient
    assert torch.equal(mem.features, once)  # and no second update


# ------------------------------------------------------------------------------- CMhybrid
def test_hybrid_equals_naive_loop_interleaved():
    gen = torch.Generator().manual_seed(4)
    K, B, d, T = 7, 40, 16, 0.05
    y = _interleaved_batch(gen, K, B, absent=(2,))
    M0 = _rand_memory(gen, 2 * K, d, torch.float64)
    x = F.normalize(torch.randn(B, d, generator=gen, dtype=torch.float64), dim=1)
    mem = ClusterMemory(d, K, mode="CMhybrid", temp=T).double()
    mem.features = M0.clone()
    loss, grad = _run(mem, x, y)
    xr = x.clone().requires_grad_()
    s = xr @ M0.t() / T
    ref = 0.5 * (F.cross_entropy(s[:, :K], y) + 0.5 * F.cross_entropy(s[:, K:], y))
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, xr.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(mem.features, _naive_hybrid_update(M0, x, y, 0.1), atol=1e-13, rtol=0)
    assert torch.equal(mem.features[2], M0[2]) and torch.equal(mem.features[K + 2], M0[K + 2])


def test_hybrid_argmin_tie_takes_first_member():
    K, d = 2, 4
    e = torch.eye(d)
    M0 = torch.stack([e[0], e[1], e[0], e[1]])  # hard rows, then mean rows
    # cluster 0: members 1 and 3 both have similarity 0 to h_0 = e0 (a tie); member 2 is closer
    x = torch.stack([e[1], e[2], e[0], e[3], e[0]])
    y = torch.tensor([1, 0, 0, 0, 1])
    mem = ClusterMemory(d, K, mode="CMhybrid")
    mem.features = M0.clone()
    mem.update(x, y)
    expected = F.normalize(0.1 * e[0] + 0.9 * e[2], dim=0)  # the first tied member (batch row 1)
    torch.testing.assert_close(mem.features[0], expected)
    torch.testing.assert_close(mem.features, _naive_hybrid_update(M0, x, y, 0.1))


# ------------------------------------------------------------------------------- CMhybrid_v2
@pytest.mark.parametrize("P", [3, 4])
def test_v2_equals_naive_loop(P):
    gen = torch.Generator().manual_seed(5 + P)
    K, B, d, T, w = 5, 14, 8, 0.05, 0.5
    y = _interleaved_batch(gen, K, B, absent=(1,))
    assert torch.bincount(y).max() > P  # exercises the overflow guard
    M0 = _rand_memory(gen, (P + 1) * K, d, torch.float64)
    x = F.normalize(torch.randn(B, d, generator=gen, dtype=torch.float64), dim=1)
    mem = ClusterMemory(d, K, mode="CMhybrid_v2", temp=T, hard_weight=w, num_instances=P).double()
    mem.features = M0.clone()
    loss, grad = _run(mem, x, y)
    ref_loss, ref_grad, ref_M = _naive_v2(M0, x, y, K, P, T, w, 0.1)
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(mem.features, ref_M, atol=1e-13, rtol=0)
    for p in range(P + 1):  # the absent cluster's rows are untouched
        assert torch.equal(mem.features[1 + p * K], M0[1 + p * K])


def test_v2_slots_layout_and_guard():
    K, P, d = 3, 2, 4
    mem = ClusterMemory(d, K, mode="CMhybrid_v2", num_instances=P)
    assert mem.features.shape == ((P + 1) * K, d)
    mem.features = F.normalize(torch.ones((P + 1) * K, d), dim=1)
    before = mem.features.clone()
    x = torch.arange(5 * d, dtype=torch.float32).reshape(5, d) + 1
    y = torch.tensor([2, 0, 2, 2, 2])  # cluster 2 has 4 members > P = 2
    mem.update(x, y)
    assert torch.equal(mem.features[2 + 1 * K], x[0]) and torch.equal(mem.features[2 + 2 * K], x[2])
    assert torch.equal(mem.features[0 + 1 * K], x[1])
    assert torch.equal(mem.features[0 + 2 * K], before[0 + 2 * K])  # only one member of cluster 0
    for p in range(P + 1):
        assert torch.equal(mem.features[1 + p * K], before[1 + p * K])  # cluster 1 absent
    torch.testing.assert_close(mem.features[2], F.normalize(0.1 * before[2] + 0.9 * x[[0, 2, 3, 4]].mean(0), dim=0))


# ------------------------------------------------------------------------------- initialisation
def _clustered(gen, n=60, d=8, K=4):
    labels = torch.randint(0, K, (n,), generator=gen)
    labels[:K] = torch.arange(K)
    labels[torch.randperm(n, generator=gen)[:7]] = -1
    labels[:K] = torch.arange(K)
    feats = F.normalize(torch.randn(n, d, generator=gen), dim=1)
    return feats, labels


def test_cluster_centroids_excludes_outliers():
    gen = torch.Generator().manual_seed(6)
    feats, labels = _clustered(gen)
    c = cluster_centroids(feats, labels)
    ref = torch.stack([F.normalize(feats[labels == k].double().mean(0), dim=0) for k in range(4)]).float()
    torch.testing.assert_close(c, ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        cluster_centroids(feats, torch.where(labels == 2, 3, labels))  # cluster 2 empty


def test_from_features_modes():
    gen = torch.Generator().manual_seed(7)
    feats, labels = _clustered(gen)
    c = cluster_centroids(feats, labels)
    cm = ClusterMemory.from_features(feats, labels, mode="CM")
    assert cm.num_clusters == 4 and torch.equal(cm.features, c)
    hy = ClusterMemory.from_features(feats, labels, mode="CMhybrid")
    assert hy.features.shape == (8, 8) and torch.equal(hy.features[:4], c) and torch.equal(hy.features[4:], c)
    P = 5
    v2a = ClusterMemory.from_features(feats, labels, mode="CMhybrid_v2", num_instances=P,
                                      generator=torch.Generator().manual_seed(0))
    v2b = ClusterMemory.from_features(feats, labels, mode="CMhybrid_v2", num_instances=P,
                                      generator=torch.Generator().manual_seed(0))
    assert v2a.features.shape == ((P + 1) * 4, 8) and v2a.features.dtype == torch.float32
    assert torch.equal(v2a.features, v2b.features)  # repeatable with a seeded generator
    assert torch.equal(v2a.features[:4], c)
    for k in range(4):
        members = feats[labels == k]
        for p in range(1, P + 1):
            row = v2a.features[k + p * 4]
            assert torch.isclose(members @ row, torch.tensor(1.0), atol=1e-6).any()  # a member of k


def test_sample_instances_uniform_with_replacement():
    feats = F.normalize(torch.eye(6)[:, :6], dim=1)
    labels = torch.tensor([0, 0, 0, 1, -1, 1])
    inst = sample_instances(feats, labels, 3000, generator=torch.Generator().manual_seed(1))
    picked = inst.argmax(1).reshape(3000, 2)  # (P, K) feature index picked per slot
    assert set(picked[:, 0].tolist()) == {0, 1, 2} and set(picked[:, 1].tolist()) == {3, 5}
    freq = torch.bincount(picked[:, 0], minlength=3).float() / 3000
    assert (freq - 1 / 3).abs().max() < 0.04
    rows = init_memory_features(feats, labels, "CMhybrid_v2", num_instances=2,
                                generator=torch.Generator().manual_seed(1))
    assert rows.shape == (6, 6)


def test_input_validation():
    mem = ClusterMemory(8, 3, mode="CMhybrid")
    with pytest.raises(ValueError):
        mem(torch.randn(4, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        mem(torch.randn(4, 8), torch.zeros(3, dtype=torch.long))
    mem.features = torch.zeros(3, 8)  # wrong number of rows for CMhybrid
    with pytest.raises(ValueError):
        mem(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        ClusterMemory(8, 3, mode="CMhard")


# ------------------------------------------------------------------------------- dtype / device
@pytest.mark.parametrize("mode", ["CM", "CMhybrid", "CMhybrid_v2"])
def test_autocast_low_precision_inputs(mode):
    gen = torch.Generator().manual_seed(8)
    K, B, d, P = 4, 12, 16, 3
    y = _interleaved_batch(gen, K, B)
    mem = ClusterMemory(d, K, mode=mode, num_instances=P)
    mem.features = _rand_memory(gen, mem.num_rows, d, torch.float32)
    ref = ClusterMemory(d, K, mode=mode, num_instances=P)
    ref.features = mem.features.clone()
    x16 = torch.randn(B, d, generator=gen).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mem(x16, y)
    loss.backward()
    assert loss.dtype == torch.float32 and mem.features.dtype == torch.float32
    assert x16.grad.dtype == torch.bfloat16
    loss_ref, grad_ref = _run(ref, x16.detach().float(), y)
    torch.testing.assert_close(loss.detach(), loss_ref)
    torch.testing.assert_close(mem.features, ref.features)
    torch.testing.assert_close(x16.grad, grad_ref.to(torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("mode", ["CM", "CMhybrid", "CMhybrid_v2"])
def test_cuda_matches_cpu(mode):
    gen = torch.Generator().manual_seed(9)
    K, B, d, P = 30, 64, 32, 4
    y = _interleaved_batch(gen, K, B, absent=(0, 5))
    x = torch.randn(B, d, generator=gen)
    cpu = ClusterMemory(d, K, mode=mode, num_instances=P)
    cpu.features = _rand_memory(gen, cpu.num_rows, d, torch.float32)
    gpu = ClusterMemory(d, K, mode=mode, num_instances=P).cuda()
    gpu.features = cpu.features.cuda()
    l1, g1 = _run(cpu, x, y)
    l2, g2 = _run(gpu, x.cuda(), y.cuda())
    torch.testing.assert_close(l2.cpu(), l1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g2.cpu(), g1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gpu.features.cpu(), cpu.features, atol=1e-5, rtol=1e-5)
    with torch.autocast("cuda", dtype=torch.float16):
        xh = x.cuda().half().requires_grad_()
        loss = gpu(xh, y.cuda())
    loss.backward()
    assert loss.dtype == torch.float32 and xh.grad.dtype == torch.float16

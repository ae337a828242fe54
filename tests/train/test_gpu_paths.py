"""The CUDA-only branches, checked on the CPU with mocked CUDA capabilities (the eight
known risks): native-bf16 choice, BN buffers across DDP ranks, the TF32 API guard, faiss-gpu resources /
fallback / k limit, re-ranking's device choice, ``--device cuda:1``, the NCCL timeout, and Adam's
step counters after a resume. No test needs a GPU."""

import inspect
import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from reidkit.config import get_profile
from reidkit.core import device as dv
from reidkit.retrieval import exact as ex
from reidkit.retrieval import knn as kn
from reidkit.retrieval import rerank as rr

pytestmark = pytest.mark.usefixtures("one_thread")  # torch at one thread (conftest)


def _unit(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# 1. bf16 only where native

def _mock_gpu(monkeypatch, capability, native: bool, old_signature: bool = False):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    if old_signature:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: native)
    else:
        # torch's default includes emulation: True on any GPU
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: True if including_emulation else native)


@pytest.mark.parametrize("capability,native,expect", [((7, 5), False, False), ((7, 0), False, False),
                                                      ((6, 0), False, False), ((8, 0), True, True),
                                                      ((9, 0), True, True), ((8, 6), False, False)])
def test_bf16_only_on_gpus_that_compute_it_natively(monkeypatch, capability, native, expect):
    from reidkit.core.device import amp_dtype
    from reidkit.nets.features import resolve_amp

    _mock_gpu(monkeypatch, capability, native)
    cuda = torch.device("cuda")
    assert dv.bf16_native(cuda) is expect
    prof = get_profile("smoke").replace(hhcl__amp=True)
    assert amp_dtype(prof, cuda) == (torch.bfloat16 if expect else None)
    assert amp_dtype(prof.replace(hhcl__amp=False), cuda) is None
    # feature extraction with amp=True/"auto": fp16 on GPUs that only emulate bf16
    assert resolve_amp("auto", cuda) == (torch.bfloat16 if expect else torch.float16)


def test_bf16_check_works_with_the_old_signature(monkeypatch):
    _mock_gpu(monkeypatch, (8, 0), True, old_signature=True)
    assert dv.bf16_native(torch.device("cuda")) is True
    _mock_gpu(monkeypatch, (7, 0), True, old_signature=True)  # capability < 8 decides
    assert dv.bf16_native(torch.device("cuda")) is False


def test_dgl_is_fp32_on_any_gpu_unless_the_profile_asks(monkeypatch):
    from reidkit.dgl.evaluate import dgl_amp_dtype, evaluate_sysu30k

    _mock_gpu(monkeypatch, (9, 0), True)
    for name in ("sysu30k", "smoke", "workshop"):
        assert dgl_amp_dtype(name, torch.device("cuda")) is None
    asks = SimpleNamespace(dgl=SimpleNamespace(amp=True))
    monkeypatch.setattr("reidkit.dgl.evaluate.get_profile", lambda p: p)
    assert dgl_amp_dtype(asks, torch.device("cuda")) is torch.bfloat16
    _mock_gpu(monkeypatch, (7, 5), False)
    assert dgl_amp_dtype(asks, torch.device("cuda")) is None
    # the SYSU-30k protocol extracts in fp32 by default
    assert inspect.signature(evaluate_sysu30k).parameters["amp"].default is False


# ---------------------------------------------------------------------------------------------
# 3. the new TF32 API

@pytest.fixture
def new_tf32_api():
    mm = torch.backends.cuda.matmul
    if not hasattr(mm, "fp32_precision"):
        pytest.skip("this torch has no per-backend fp32_precision API")
    prev = mm.fp32_precision
    mm.fp32_precision = "tf32"
    with pytest.raises(RuntimeError):
        torch.get_float32_matmul_precision()  # the crash of the old guard
    yield mm
    mm.fp32_precision = prev


def test_jaccard_and_distances_run_under_the_new_tf32_api(new_tf32_api):
    from reidkit.retrieval.distances import pairwise_distance
    from reidkit.retrieval.jaccard import jaccard_distance

    x, y = _unit(60, 16), _unit(30, 16, seed=1)
    mm = new_tf32_api
    mm.fp32_precision = "ieee"
    ref_j = jaccard_distance(x, k1=8, k2=3, device="cpu", dense=True)
    ref_d = pairwise_distance(x, y, device="cpu")
    mm.fp32_precision = "tf32"
    got_j = jaccard_distance(x, k1=8, k2=3, device="cpu", dense=True)
    got_d = pairwise_distance(x, y, device="cpu")
    np.testing.assert_array_equal(got_j, ref_j)
    np.testing.assert_array_equal(got_d, ref_d)
    assert mm.fp32_precision == "tf32"  # the caller's setting is restored


def test_exact_fp32_guard_restores_either_api(new_tf32_api):
    with dv.exact_fp32_matmul():
        assert new_tf32_api.fp32_precision == "ieee"
    assert new_tf32_api.fp32_precision == "tf32"


def test_exact_fp32_guard_with_the_legacy_api():
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with dv.exact_fp32_matmul():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(prev)


# ---------------------------------------------------------------------------------------------
# 4. faiss-gpu: cached resources, empty_cache, fallback, k limit

class _FakeFaiss:
    """Just enough of faiss-gpu to run ``_faiss_knn`` on the CPU."""

    def __init__(self, fail: bool = False):
        self.resources, self.searches, self.fail = 0, 0, fail
        fake = self

        class StandardGpuResources:
            def __init__(self):
                fake.resources += 1

        class GpuIndexFlatConfig:
            device = None

        class GpuIndexFlatL2:
            def __init__(self, res, d, cfg):
                self.x = None

            def add(self, x):
                self.x = x

            def search(self, q, k):
                fake.searches += 1
                if fake.fail:
                    raise RuntimeError("Error in virtual void* faiss::gpu::StandardGpuResourcesImpl: out of memory")
                d = ((q[:, None, :] - self.x[None]) ** 2).sum(-1)
                i = np.argsort(d, axis=1, kind="stable")[:, :k]
                return np.take_along_axis(d, i, 1).astype(np.float32), i

        self.StandardGpuResources = StandardGpuResources
        self.GpuIndexFlatConfig = GpuIndexFlatConfig
        self.GpuIndexFlatL2 = GpuIndexFlatL2

    def get_num_gpus(self):
        return 1


@pytest.fixture
def fake_gpu_faiss(monkeypatch):
    calls = {"empty_cache": 0}
    monkeypatch.setattr(kn, "_GPU_RESOURCES", {})
    monkeypatch.setattr(kn, "_FALLBACK_WARNED", set())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.__setitem__("empty_cache", calls["empty_cache"] + 1))
    # the torch fallback runs on the CPU tensors (the device string stays "cuda")
    to_t = ex._to_float_tensor
    for module in (ex, kn):  # defined in exact, imported by knn
        monkeypatch.setattr(module, "_to_float_tensor", lambda x, device: to_t(x, torch.device("cpu")))

    def install(fail=False):
        fake = _FakeFaiss(fail)
        monkeypatch.setattr(kn, "_faiss", lambda: fake)
        return fake

    return install, calls


def test_faiss_gpu_resources_are_created_once_per_device(fake_gpu_faiss):
    install, calls = fake_gpu_faiss
    fake = install()
    x, q = _unit(50, 8), _unit(7, 8, seed=3)
    ref = kn.knn(x, 5, queries=q, backend="torch", device="cpu")
    for _ in range(3):
        res = kn.knn(x, 5, queries=q, device="cuda")
        assert res.backend == "faiss-gpu"
        np.testing.assert_array_equal(res.indices, ref.indices)
    assert fake.resources == 1 and fake.searches == 3
    assert calls["empty_cache"] == 3


def test_faiss_error_falls_back_to_torch_and_warns_once(fake_gpu_faiss, caplog):
    install, _ = fake_gpu_faiss
    fake = install(fail=True)
    x, q = _unit(50, 8), _unit(7, 8, seed=3)
    ref = kn.knn(x, 5, queries=q, backend="torch", device="cpu")
    with caplog.at_level(logging.WARNING, logger="reidkit.retrieval.jaccard"):
        for _ in range(2):
            res = kn.knn(x, 5, queries=q, device="cuda")
            assert res.backend == "torch-cuda"
            np.testing.assert_array_equal(res.indices, ref.indices)
    assert fake.searches == 2
    assert len([r for r in caplog.records if "faiss failed" in r.getMessage()]) == 1


def test_k_above_the_faiss_gpu_limit_uses_torch(fake_gpu_faiss):
    install, _ = fake_gpu_faiss
    fake = install()
    x = _unit(kn.FAISS_GPU_MAX_K + 10, 4)
    res = kn.knn(x, kn.FAISS_GPU_MAX_K + 1, device="cuda")
    assert res.backend == "torch-cuda" and fake.searches == 0
    assert res.indices.shape == (len(x), kn.FAISS_GPU_MAX_K + 1)
    assert (res.indices[:, 0] == np.arange(len(x))).all()


# ---------------------------------------------------------------------------------------------
# 5. re-ranking's device from the free GPU memory

def _mock_free(monkeypatch, free):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free, 141 * 2**30))


def test_rerank_device_follows_the_free_gpu_memory(monkeypatch):
    nq, ng = 11_659, 82_161  # MSMT17: the gallery x gallery block alone is 27 GB
    need = rr._rerank_bytes(nq, ng)
    assert need > 27e9
    _mock_free(monkeypatch, 16 * 2**30)  # a 16 GB card
    assert rr._rerank_device("auto", nq, ng).type == "cpu"
    _mock_free(monkeypatch, 130 * 2**30)  # an H200
    assert rr._rerank_device("auto", nq, ng) == torch.device("cuda", 0)
    assert rr._rerank_device("cpu", nq, ng).type == "cpu"  # an explicit device is kept


def test_rerank_auto_runs_on_the_cpu_when_the_gpu_is_short(monkeypatch):
    from reidkit.retrieval.distances import pairwise_distance

    q, g = _unit(6, 8), _unit(40, 8, seed=2)
    qg, qq, gg = (pairwise_distance(a, b, device="cpu") for a, b in ((q, g), (q, q), (g, g)))
    ref = rr.re_ranking(qg, qq, gg, k1=6, k2=3, device="cpu")
    _mock_free(monkeypatch, 1024)
    out, info = rr.re_ranking(qg, qq, gg, k1=6, k2=3, device="auto", return_info=True)
    assert info["device"] == "cpu"
    np.testing.assert_array_equal(out, ref)


# ---------------------------------------------------------------------------------------------
# 6 and 7. --device cuda:1 in one process; the process group's timeout

@pytest.fixture
def mock_cuda_devices(monkeypatch):
    seen = []
    current = {"i": 0}

    def set_device(d):
        idx = d.index if isinstance(d, torch.device) else int(d)
        seen.append(idx)
        current["i"] = idx

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["i"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return seen


def test_indexed_cuda_device_becomes_current_in_one_process(mock_cuda_devices):
    from reidkit.train.distributed import init_distributed

    assert dv.activate_device("cpu").type == "cpu" and mock_cuda_devices == []
    assert init_distributed("cuda:1") == torch.device("cuda", 1)
    assert mock_cuda_devices == [1]
    assert dv.activate_device("cuda") == torch.device("cuda", 1)  # the current one, with its index


def test_process_group_gets_a_long_timeout(monkeypatch, mock_cuda_devices):
    import datetime

    import torch.distributed as dist

    from reidkit.train import distributed as train

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert train.init_distributed("cuda") == torch.device("cuda", 1)
    assert mock_cuda_devices == [1]
    (args, kwargs), = calls
    assert args == ("nccl",)
    assert kwargs["timeout"] == datetime.timedelta(hours=6)
    assert kwargs["timeout"] > datetime.timedelta(minutes=10)  # NCCL's default
    monkeypatch.setenv("REIDKIT_DIST_TIMEOUT", "90")
    train.init_distributed("cpu")
    assert calls[-1][0] == ("gloo",) and calls[-1][1]["timeout"] == datetime.timedelta(seconds=90)


def test_evaluation_gets_the_run_device(monkeypatch):
    from reidkit.retrieval import protocol as train

    seen = {}
    monkeypatch.setattr(train, "extract_records", lambda model, recs, prof, device, desc, amp=None: _unit(len(recs), 8))
    orig = train.evaluate_rank

    def spy(*a, **k):
        seen["device"] = k.get("device")
        return orig(*a, **k)

    monkeypatch.setattr(train, "evaluate_rank", spy)
    recs = [SimpleNamespace(pid=i % 3, camid=i % 2) for i in range(12)]
    train.evaluate_model(None, recs[:4], recs, get_profile("smoke"), torch.device("cpu"))
    assert seen["device"] == torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# 8. Adam's step counters after a resume with map_location=cuda

class _FakeCudaTensor(torch.Tensor):
    """A CPU tensor that reports a CUDA device, as a step counter loaded with map_location=cuda."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def test_resumed_adam_step_counters_go_back_to_the_cpu():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    state = opt.state_dict()
    for st in state["state"].values():  # what torch.load(map_location="cuda") gives
        st["step"] = st["step"].clone().as_subclass(_FakeCudaTensor)
    new = torch.optim.Adam(model.parameters(), lr=1e-2)
    new.load_state_dict(state)
    assert all(s["step"].device.type == "cuda" for s in new.state.values())  # torch keeps them there
    assert dv.optimizer_steps_to_cpu(new) == 2
    for s in new.state.values():
        assert type(s["step"]) is torch.Tensor and s["step"].device.type == "cpu"
        assert s["step"].dtype == torch.float32 and float(s["step"]) == 1.0
    model(torch.randn(5, 4)).sum().backward()
    new.step()  # the non-capturable Adam accepts them
    assert all(float(s["step"]) == 2.0 for s in new.state.values())


def test_capturable_adam_keeps_its_step_counters():
    model = nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), capturable=True)
    opt.state[model.weight]["step"] = torch.zeros(()).as_subclass(_FakeCudaTensor)
    assert dv.optimizer_steps_to_cpu(opt) == 0


# ---------------------------------------------------------------------------------------------
# 2. DDP: every rank extracts with rank 0's BN statistics (2 gloo processes, 2 epochs)

def test_ddp_ranks_extract_with_the_same_bn_buffers(tmp_path):
    import os
    import subprocess
    import sys

    from _tiny import tiny_dataset
    from trees import folder_tree

    root = folder_tree(tmp_path / "data", tiny_dataset())
    sets = ["data.flip=false", "data.pad=0", "data.erasing_p=0", "data.workers=0", "hhcl.amp=false",
            "hhcl.iters=2", "hhcl.batch_size=16", "hhcl.num_instances=4", "hhcl.epochs=2", "hhcl.eval_step=2",
            "hhcl.ghost_bn=null", "cluster.k1=10", "cluster.k2=3", "cluster.eps=0.6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REIDKIT_DIST_TIMEOUT": "600"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29531", "-m", "reidkit", "train", "--profile", "smoke",
                          "--dataset", "folder", "--data-root", str(root), "--selection", "last", "--device", "cpu",
                          "--out", str(tmp_path / "ddp"), *sum((["--set", s] for s in sets), [])],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    hist = json.loads((tmp_path / "ddp" / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [0, 1]
    assert hist[0]["buffer_spread_unsynced"] == 0.0  # same initial weights
    assert hist[0]["loss"] is not None  # epoch 0 trained: the ranks' BN statistics drifted apart ...
    assert hist[1]["buffer_spread_unsynced"] > 0.0
    assert hist[1]["buffer_spread"] == 0.0  # ... and rank 0's were broadcast before the extraction

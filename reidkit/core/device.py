"""Small shared helpers: device choice, seeding, atomic writes, progress bars."""

from __future__ import annotations

import ctypes
import os
import platform
import random
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def resolve_device(device: str | None = "auto"):
    """Return a ``torch.device``: "auto" picks CUDA when available, else CPU."""

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def activate_device(device: Any = "auto"):
    """Resolve ``device`` and make an indexed CUDA device (``cuda:1``) the current one, so that
    code which allocates on "cuda" (cuDNN workspaces, faiss, ``torch.cuda.mem_get_info``) uses the
    same GPU in a single process too, not GPU 0. Returns the device, with its index when CUDA."""

    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
#: free memory glibc keeps at the top of the heap instead of handing it back (a batch's activations)
CPU_TRIM_THRESHOLD = 512 * 2**20
_ALLOCATOR: dict[str, Any] = {}


def tune_cpu_allocator() -> dict[str, Any]:
    """Keep a CPU training or extraction loop's memory in the process between batches (glibc only;
    once per process; ``REIDKIT_MALLOC_TUNING=0`` turns it off). Returns what was done.

    PyTorch's CPU tensors come straight from ``malloc``. glibc serves a block of 32 MB or more (a
    batch's activations) with a fresh ``mmap`` and unmaps it when freed, and hands the heap's free
    top back to the kernel past its trim threshold, so every batch faults its activations' pages in
    again. Here no block is served by ``mmap`` (``M_MMAP_MAX = 0``: they come from the heap, reused
    from batch to batch) and up to :data:`CPU_TRIM_THRESHOLD` of free heap is kept. Measured on two
    cores (AMD EPYC, bf16 autocast, channels_last; ``bench_pipeline.py``'s ``allocator`` section):
    the workshop MobileNetV2's forward over 256 images 1.68 -> 0.88 s, its training step 0.69 ->
    0.67 s, ``make reproduce`` 7 min 28 s -> 6 min 36 s with identical results. The cost: freed
    memory stays with the process (up to 512 MB at the heap's top; the reproduction's peak RSS
    3.64 -> 3.98 GB)."""

    if _ALLOCATOR:
        return _ALLOCATOR
    if os.environ.get("REIDKIT_MALLOC_TUNING", "1") == "0":
        _ALLOCATOR.update(tuned=False, why="REIDKIT_MALLOC_TUNING=0")
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _ALLOCATOR.update(tuned=False, why=f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'libc'})")
    else:
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, CPU_TRIM_THRESHOLD))
        except (OSError, AttributeError) as exc:
            _ALLOCATOR.update(tuned=False, why=f"mallopt unavailable ({exc})")
        else:
            _ALLOCATOR.update(tuned=ok, why="mallopt" if ok else "mallopt refused")
    return _ALLOCATOR


def channels_last(device: Any) -> bool:
    """Whether convolutions on ``device`` run in the channels_last (NHWC) memory format: on CUDA
    (tensor cores under AMP) and on the CPU, where oneDNN's NHWC kernels measured 1.4-2.0x faster
    for extraction and 1.1-1.6x for a MobileNetV2 training step at 256 x 128 (ResNet-50 training
    about even), with AVX2 alone as with AVX-512 (benchmarks/bench_memory_format.py, docs/benchmarks.md
    section 6); not on MPS, whose NHWC support is partial."""

    return resolve_device(device).type in ("cuda", "cpu")


#: the CPU features that decide how fast a bf16 product runs, in the order cpu_description reports them
_BF16_UNITS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"))


def cpu_description(cpuinfo: str | None = None) -> dict[str, Any]:
    """The host CPU as benchmarks and run records state it: ``model`` (``/proc/cpuinfo``'s model
    name; ``platform.processor()`` where there is no such file), logical ``cores``, and ``bf16``:
    the unit a bf16 product runs on, ``"AMX"``, ``"AVX512-BF16"`` or ``None`` (emulated, slower
    than fp32). The unit moves figures a lot: the same 2048-d bf16 product ran at ~1.6 TFLOP/s on
    a two-core Xeon with AMX and at ~0.4 TFLOP/s on a two-core AMD EPYC with AVX512-BF16.
    ``cpuinfo``: the file's text (tests)."""

    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            cpuinfo = ""
    model, flags = None, set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    bf16 = next((name for flag, name in _BF16_UNITS if flag in flags), None)
    return {"model": model or platform.processor() or platform.machine() or "unknown",
            "cores": os.cpu_count(), "bf16": bf16}


def cpu_name(cpuinfo: str | None = None) -> str:
    """One line for :func:`cpu_description`: ``"AMD EPYC, 2 cores, bf16 on AVX512-BF16"``."""

    d = cpu_description(cpuinfo)
    return f"{d['model']}, {d['cores']} cores, " + (f"bf16 on {d['bf16']}" if d["bf16"] else "no native bf16")


def bf16_native(device: Any) -> bool:
    """True when ``device`` computes bf16 natively: a CUDA GPU of compute capability >= 8 (Ampere
    and later) whose bf16 support is not emulated (T4, V100 and P100 only emulate it, without cuDNN
    bf16 convolutions: slower than fp32), or a CPU with AVX512-BF16 / AMX."""

    dev = resolve_device(device)
    if dev.type == "cuda":
        try:
            major, _ = torch.cuda.get_device_capability(dev)
        except Exception:
            return False
        if major < 8:
            return False
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch < 2.4: no including_emulation argument (and no emulation check)
            return bool(torch.cuda.is_bf16_supported())
    if dev.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def _new_api_matmul_backends() -> list:
    """The matmul backends of torch's per-backend precision API (``fp32_precision``), if present."""

    out = []
    for mod in (getattr(torch.backends, "cuda", None), getattr(torch.backends, "mkldnn", None)):
        mm = getattr(mod, "matmul", None) if mod is not None else None
        if mm is not None and hasattr(mm, "fp32_precision"):
            out.append(mm)
    return out


@contextmanager
def exact_fp32_matmul():
    """Exact float32 matrix products inside the block (no TF32 / bf16 shortcuts a caller may have
    enabled), with either of torch's precision APIs, restoring the caller's setting afterwards.

    The legacy ``torch.set_float32_matmul_precision`` is used when the caller used it (or nothing);
    after the new ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` the legacy getter raises
    ("mix of the legacy and new APIs"), so the per-backend ``fp32_precision`` flags are set to
    ``"ieee"`` and restored instead."""

    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        legacy = None
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(legacy)
        return
    saved = [(mm, mm.fp32_precision) for mm in _new_api_matmul_backends()]
    for mm, _ in saved:
        mm.fp32_precision = "ieee"
    try:
        yield
    finally:
        for mm, prev in saved:
            mm.fp32_precision = prev


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) for repeatable runs."""

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def optimizer_steps_to_cpu(optimizer) -> int:
    """Put the ``step`` counters of a loaded optimizer state back on the CPU.

    ``torch.load(..., map_location=cuda)`` moves Adam's per-parameter ``step`` tensors to the GPU,
    and ``Optimizer.load_state_dict`` keeps them there unless the group is ``capturable`` or
    ``fused``; a non-capturable Adam then syncs on every parameter of every step. Returns the number
    of counters moved (float32 CPU scalars, as torch creates them)."""

    moved = 0
    for group in optimizer.param_groups:
        if group.get("capturable") or group.get("fused"):
            continue  # these expect the counters on the parameters' device
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            step = st.get("step")
            if torch.is_tensor(step) and step.device.type != "cpu":
                st["step"] = torch.tensor(float(step.item()), dtype=torch.float32)
                moved += 1
    return moved


def amp_dtype(profile: Any, device: Any) -> torch.dtype | None:
    """Autocast dtype of a run: None (fp32, as the papers) unless the profile asks for mixed precision;
    then bf16 where the device computes it natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX,
    where it roughly halves the workshop's training time), else fp32."""
    if not profile.hhcl.amp:
        return None
    # native only: GPUs of compute capability < 8 (T4, V100, P100) emulate bf16 without cuDNN
    # bf16 convolutions, slower than fp32
    return torch.bfloat16 if bf16_native(device) else None

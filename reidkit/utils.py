"""Small shared helpers: device choice, seeding, atomic writes, progress bars."""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import numpy as np


def resolve_device(device: str | None = "auto"):
    """Return a ``torch.device``: "auto" picks CUDA when available, else CPU."""
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def activate_device(device: Any = "auto"):
    """Resolve ``device`` and make an indexed CUDA device (``cuda:1``) the current one, so that
    code which allocates on "cuda" (cuDNN workspaces, faiss, ``torch.cuda.mem_get_info``) uses the
    same GPU in a single process too, not GPU 0. Returns the device, with its index when CUDA."""
    import torch

    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


def bf16_native(device: Any) -> bool:
    """True when ``device`` computes bf16 natively: a CUDA GPU of compute capability >= 8 (Ampere
    and later) whose bf16 support is not emulated (T4, V100 and P100 only emulate it, without cuDNN
    bf16 convolutions: slower than fp32), or a CPU with AVX512-BF16 / AMX."""
    import torch

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
    import torch

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
    import torch

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
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def current_umask() -> int:
    """The process umask, read without changing it where the OS tells (``/proc/self/status``,
    Linux >= 4.7); elsewhere set and restored at once (``os.umask`` has no read-only form)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_replace(path: Path, write) -> Path:
    """Write ``path`` through ``write(fh)`` on a temporary file in the same folder, then rename it
    into place. The temporary file is created 0600 (``mkstemp``); the result gets the mode a plain
    ``open(path, "w")`` would give, ``0666 & ~umask``, so group members can read shared results."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_file(path: str | Path, write) -> Path:
    """Atomically write ``path`` with ``write(fh)`` (a binary file object); mode ``0666 & ~umask``."""
    return _atomic_replace(Path(path), write)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    return _atomic_replace(Path(path), lambda fh: fh.write(data))


def _json_default(obj: Any):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically (numpy scalars and arrays allowed)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    return atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temporary file and an atomic rename."""
    import torch

    return _atomic_replace(Path(path), lambda fh: torch.save(obj, fh))


def torch_load(path: str | Path, map_location="cpu"):
    """``torch.load`` with ``weights_only=True`` (never unpickles arbitrary objects)."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=True)


def _interactive_output() -> bool:
    if os.environ.get("REIDKIT_PROGRESS") == "1":
        return True
    if os.environ.get("REIDKIT_PROGRESS") == "0":
        return False
    try:  # inside a Jupyter kernel
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell":
            return True
    except Exception:
        pass
    return sys.stderr.isatty()


def progress(iterable: Iterable | None = None, **kwargs):
    """A text tqdm progress bar, quiet when output is neither a terminal nor a notebook.

    In a notebook the bar is plain text on stderr, never an ipywidget: a widget bar leaves
    "Error displaying widget: model not found" behind once the notebook is saved and reopened.
    Set ``REIDKIT_PROGRESS=1`` (or ``0``) to force it on (or off)."""
    from tqdm.std import tqdm

    kwargs.setdefault("disable", not _interactive_output())
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def optimizer_steps_to_cpu(optimizer) -> int:
    """Put the ``step`` counters of a loaded optimizer state back on the CPU.

    ``torch.load(..., map_location=cuda)`` moves Adam's per-parameter ``step`` tensors to the GPU,
    and ``Optimizer.load_state_dict`` keeps them there unless the group is ``capturable`` or
    ``fused``; a non-capturable Adam then syncs on every parameter of every step. Returns the number
    of counters moved (float32 CPU scalars, as torch creates them)."""
    import torch

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

"""Small shared helpers: device choice, seeding, atomic writes, progress bars."""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np


def resolve_device(device: str | None = "auto"):
    """Return a ``torch.device``: "auto" picks CUDA when available, else CPU."""
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) for repeatable runs."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _atomic_replace(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


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

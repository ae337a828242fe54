"""Files written atomically and read safely: JSON, bytes, torch checkpoints, and the one error a damaged
or foreign checkpoint raises."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


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

    return _atomic_replace(Path(path), lambda fh: torch.save(obj, fh))


def torch_load(path: str | Path, map_location="cpu"):
    """``torch.load`` with ``weights_only=True`` (never unpickles arbitrary objects)."""

    return torch.load(path, map_location=map_location, weights_only=True)


__all__ = ['CheckpointError']


class CheckpointError(ValueError):
    """A file that is not a checkpoint of a known layout, or whose tensors do not fit its network."""


def read_train_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a training checkpoint (``weights_only=True``); an empty, truncated or damaged file is a
    one-line :class:`~reidkit.core.io.CheckpointError` naming the file."""

    path = Path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: damaged checkpoint: the file is empty (0 bytes); "
                              f"delete it or train with resume=False (--no-resume)")
    try:
        state = torch_load(path, map_location=map_location)
    except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:100] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: damaged checkpoint (truncated or not a torch file): "
                              f"{type(exc).__name__}: {first}; delete it or train with resume=False "
                              f"(--no-resume)") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a training checkpoint (no 'model' entry)")
    return state


def nbformat_read(path: str | Path):
    """The notebook at ``path`` as an nbformat version-4 node."""
    # a measured start-up cost: nbformat imports jsonschema and its format checkers, about 1.1 s of
    # every `reidkit` command's 5 s start on two cores, while only the reproduction reads notebooks
    import nbformat

    return nbformat.read(str(path), as_version=4)

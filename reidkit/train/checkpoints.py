"""Training checkpoints: read them safely, record the settings a run was written under, refuse to
resume under other settings, and move old files aside instead of overwriting them."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from reidkit.config import Profile, get_profile
from reidkit.core.io import CheckpointError

RESUMABLE_FIELDS = ("hhcl.epochs", "hhcl.eval_step", "dgl.epochs", "dgl.eval_step", "data.workers",
                    "data.test_batch_size")


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def profile_overrides(prof: Profile) -> dict[str, Any]:
    """The fields of ``prof`` that differ from its named profile (``{}`` for an unknown name),
    less :data:`RESUMABLE_FIELDS`, as plain JSON values."""
    try:
        base = _flat(dataclasses.asdict(get_profile(prof.name)))
    except Exception:  # noqa: BLE001  (a profile built in code, without a registered name)
        base = {}
    mine = _flat(dataclasses.asdict(prof))
    diff = {k: v for k, v in mine.items() if k not in RESUMABLE_FIELDS and base.get(k, object()) != v}
    return json.loads(json.dumps(diff, default=str))


def run_settings(prof: Profile, method: str, sections: Sequence[str] | None = None,
                 **extra: Any) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it (compared on resume): the method's
    choices and the overrides of ``sections``, the profile sections that shape its training (an
    HHCL checkpoint does not care about ``dgl.*``, nor DGL's about ``hhcl.*``); None: all of them."""
    overrides = {k: v for k, v in profile_overrides(prof).items()
                 if sections is None or k.split(".", 1)[0] in sections}
    return {"profile": prof.name, "method": method, **extra, "arch": prof.model.arch,
            "pooling": prof.model.pooling, "last_stride": prof.model.last_stride,
            "init": str(prof.model.pretrained), "overrides": overrides}


def check_resume_settings(path: Path, state: dict, settings: dict[str, Any]) -> None:
    """Refuse to resume ``state`` (read from ``path``) under ``settings`` that differ from the ones
    it was written under, naming both sides. Keys an older checkpoint lacks are not compared."""

    saved = state.get("settings")
    if not isinstance(saved, dict):
        saved = {k: state[k] for k in ("profile", "memory", "variant", "arch") if k in state}
    diffs = []
    for key, now in settings.items():
        if key not in saved or saved[key] == now:
            continue
        if key == "overrides":
            was = saved[key] or {}
            keys = sorted(set(was) | set(now))
            diffs += [f"{k}: checkpoint {was.get(k, '(profile default)')!r} vs now {now.get(k, '(profile default)')!r}"
                      for k in keys if was.get(k, None) != now.get(k, None)]
        else:
            diffs.append(f"{key}: checkpoint {saved[key]!r} vs now {now!r}")
    if diffs:
        raise CheckpointError(f"{path}: refusing to resume under different settings ({'; '.join(diffs)}); "
                              f"use the same settings, another out_dir, or resume=False (--no-resume)")


def move_aside(out_dir: Path, names: Sequence[str], log: Callable[[str], None]) -> list[Path]:
    """Rename the existing ``out_dir/<name>`` files to ``<name>.<UTC timestamp>.bak`` (never
    overwriting); returns the new paths."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    moved = []
    for name in names:
        src = out_dir / name
        if not src.exists():
            continue
        dst, i = out_dir / f"{name}.{stamp}.bak", 1
        while dst.exists():
            dst, i = out_dir / f"{name}.{stamp}.{i}.bak", i + 1
        src.rename(dst)
        moved.append(dst)
        log(f"resume=False: moved the existing {src} aside to {dst}")
    return moved

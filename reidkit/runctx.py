"""The run folder contract between notebooks.

Every notebook starts with ``ctx = RunContext.open(PROFILE, DATA_ROOT, RUN_DIR, DEVICE, SEED, name)``;
it reads what earlier notebooks left in ``ctx.run_dir`` and writes its own results under
``ctx.out`` (``RUN_DIR/<notebook>/``): ``metrics.json``, figures, arrays, checkpoints.
A notebook opened by hand with no RUN_DIR gets ``runs/<profile>-interactive``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reidkit.config import Profile, get_profile
from reidkit.utils import atomic_write_bytes, atomic_write_json, resolve_device, seed_everything


def project_root() -> Path:
    """The kit's checkout (parent of the ``reidkit`` package)."""
    return Path(__file__).resolve().parent.parent


def default_run_dir(profile: str) -> Path:
    base = Path(os.environ.get("REIDKIT_RUNS", project_root() / "runs"))
    return base / f"{profile}-interactive"


@dataclass
class RunContext:
    profile: Profile
    data_root: str | None
    run_dir: Path
    device: Any
    seed: int
    name: str
    started: float = field(default_factory=time.time)

    @classmethod
    def open(cls, profile: str = "workshop", data_root: str | None = None, run_dir: str | None = None,
             device: str = "auto", seed: int = 1, name: str = "notebook") -> "RunContext":
        prof = get_profile(profile)
        if run_dir in (None, ""):
            run_dir = default_run_dir(prof.name)
            print(f"RUN_DIR not given: using {run_dir} (results of earlier notebooks are read from there; "
                  f"what is missing is computed here)")
        ctx = cls(prof, data_root or None, Path(run_dir).resolve(), resolve_device(device), int(seed), name)
        ctx.out.mkdir(parents=True, exist_ok=True)
        seed_everything(ctx.seed)
        return ctx

    @property
    def out(self) -> Path:
        return self.run_dir / self.name

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    def dataset(self):
        from reidkit.data.datasets import load_dataset

        return load_dataset(self.profile.data.dataset, self.data_root)

    def write_metrics(self, metrics: dict) -> Path:
        metrics = dict(metrics)
        metrics.setdefault("profile", self.profile.name)
        metrics.setdefault("notebook", self.name)
        metrics.setdefault("seconds", round(time.time() - self.started, 2))
        return atomic_write_json(self.out / "metrics.json", metrics)

    def read_metrics(self, notebook: str) -> dict | None:
        p = self.run_dir / notebook / "metrics.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def savefig(self, fig, name: str) -> Path:
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return atomic_write_bytes(self.out / "figures" / f"{name}.png", buf.getvalue())

    def save_array(self, name: str, arr) -> Path:
        import io

        buf = io.BytesIO()
        np.save(buf, np.asarray(arr))
        return atomic_write_bytes(self.out / f"{name}.npy", buf.getvalue())

    def load_array(self, notebook: str, name: str):
        p = self.run_dir / notebook / f"{name}.npy"
        return np.load(p) if p.is_file() else None

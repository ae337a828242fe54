"""The run folder contract between notebooks.

Every notebook starts with ``ctx = RunContext.open(PROFILE, DATA_ROOT, RUN_DIR, DEVICE, SEED, name)``;
it reads what earlier notebooks left in ``ctx.run_dir`` and writes its own results under
``ctx.out`` (``RUN_DIR/<notebook>/``): ``metrics.json``, figures, arrays, checkpoints.
A notebook opened by hand with no RUN_DIR reads the latest complete ``make reproduce`` run of its
profile (``runs/<profile>-<stamp>/``, :func:`latest_complete_run`), so that it opens on results and
trains nothing; with none, ``runs/<profile>-interactive``.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reidkit.config import Profile, get_profile
from reidkit.core.device import seed_everything
from reidkit.core.io import atomic_write_bytes, atomic_write_json
from reidkit.data.subset import load_profile_dataset
from reidkit.hhcl.clustering import dbscan_labels
from reidkit.methods import resolve_run
from reidkit.nets.backbones import build_model
from reidkit.retrieval.jaccard import jaccard_distance
from reidkit.retrieval.protocol import extract_records
from reidkit.train.runspec import RunSpec


#: the untrained network with ImageNet weights, as the notebooks and report.md call it
IMAGENET = "ImageNet features"


def project_root() -> Path:
    """The kit's checkout (parent of the ``reidkit`` package)."""
    return Path(__file__).resolve().parents[2]


def runs_dir() -> Path:
    """Where ``reidkit reproduce`` puts its run folders: ``runs/`` in the checkout, or ``$REIDKIT_RUNS``."""
    return Path(os.environ.get("REIDKIT_RUNS", project_root() / "runs"))


def _ran_profile(run_dir: Path) -> str | None:
    try:
        return (json.loads((run_dir / "run.json").read_text()).get("parameters") or {}).get("PROFILE")
    except (OSError, json.JSONDecodeError):
        return None


def latest_complete_run(profile: str, base: Path | None = None) -> Path | None:
    """The newest run folder under ``base`` (default :func:`runs_dir`) that a reproduction of
    ``profile`` finished: its ``report.md`` is written (the last step of ``reidkit reproduce``) and
    its ``run.json`` names the profile. Newest by the report's time. None when there is none."""
    base = runs_dir() if base is None else Path(base)
    done = [d for d in base.glob(f"{profile}-*") if d.name != f"{profile}-interactive"
            and (d / "report.md").is_file() and _ran_profile(d) == profile]
    return max(done, key=lambda d: ((d / "report.md").stat().st_mtime, d.name), default=None)


def default_run_dir(profile: str) -> Path:
    """A notebook's run folder when RUN_DIR is not given: the latest complete reproduction of
    ``profile``, else ``runs/<profile>-interactive`` (filled by the notebooks themselves)."""
    return latest_complete_run(profile) or runs_dir() / f"{profile}-interactive"


def run_overrides(run_dir: str | Path, profile: str | None = None) -> dict:
    """The profile overrides recorded in ``RUN_DIR/run.json`` (``{"section.field": value}``);
    empty when there is none, or when the run used another profile than ``profile``."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        return {}
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    recorded = run.get("overrides") or {}
    ran_with = (run.get("parameters") or {}).get("PROFILE")
    if recorded and profile is not None and ran_with not in (None, profile):
        print(f"note: {path} records overrides for profile {ran_with!r}, not {profile!r}: not applied")
        return {}
    return dict(recorded)


@dataclass
class RunContext:
    profile: Profile
    data_root: str | None
    run_dir: Path
    device: Any
    seed: int
    name: str
    started: float = field(default_factory=time.time)
    key_figures: list = field(default_factory=list)
    spec: RunSpec | None = None      # the run resolved once (profile, device, AMP, dataset)

    @classmethod
    def open(cls, profile: str = "workshop", data_root: str | None = None, run_dir: str | None = None,
             device: str = "auto", seed: int = 1, name: str = "notebook",
             overrides: dict | None = None) -> "RunContext":
        """Open the run folder for notebook ``name``. The profile gets the overrides that
        ``reidkit reproduce --set/--subset-ids`` recorded in ``RUN_DIR/run.json`` (when that run
        used the same profile), then ``overrides`` (``{"section.field": value}``) if given, so a
        notebook opened by hand on a run folder sees the same subset and budgets as the run."""

        prof = get_profile(profile)
        if run_dir in (None, ""):
            run_dir = default_run_dir(prof.name)
            if run_dir.name == f"{prof.name}-interactive":
                print(f"RUN_DIR not given and no complete `make reproduce` run of profile {prof.name} in "
                      f"{run_dir.parent}: using {run_dir} (what earlier notebooks left there is read, the rest "
                      f"is computed here)")
            else:
                print(f"RUN_DIR not given: reading the latest complete run of profile {prof.name}, {run_dir} "
                      f"(set RUN_DIR in the parameters cell to choose another)")
        run_dir = Path(run_dir).resolve()
        recorded = run_overrides(run_dir, prof.name)
        merged = {**recorded, **(overrides or {})}
        if merged:
            print("profile overrides: " + ", ".join(f"{k}={v}" for k, v in merged.items())
                  + (" (from run.json)" if recorded else ""))
        spec = resolve_run(prof, data_root, device, merged)
        ctx = cls(spec.profile, spec.data_root, run_dir, spec.device, int(seed), name, spec=spec)
        ctx.out.mkdir(parents=True, exist_ok=True)
        seed_everything(ctx.seed)
        return ctx

    @property
    def out(self) -> Path:
        return self.run_dir / self.name

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    def dataset(self, **kwargs):
        """The profile's dataset under ``data_root``, cut to ``profile.data.subset_ids`` identities
        when the profile (or the run's overrides) sets it; ``kwargs`` go to the parser (e.g.
        ``load_train=False`` for SYSU-30k's test split alone). SYSU-30k's 29.6M training images are
        never listed: its training set is streamed by DGL, so ``train`` is empty unless
        ``load_train=True`` is asked for."""

        if self.profile.data.dataset in ("sysu30k", "sysu"):
            kwargs.setdefault("load_train", False)
        if not kwargs and self.spec is not None:  # read once per notebook
            return self.spec.dataset()
        return load_profile_dataset(self.profile, self.data_root, **kwargs)

    def write_metrics(self, metrics: dict) -> None:
        """Write ``<notebook>/metrics.json`` (atomically). The key figures saved so far are listed
        under ``figures`` (paths relative to the run folder), so that report.md can show them."""
        metrics = dict(metrics)
        metrics.setdefault("profile", self.profile.name)
        metrics.setdefault("notebook", self.name)
        metrics.setdefault("seconds", round(time.time() - self.started, 2))
        if self.key_figures:
            metrics.setdefault("figures", list(self.key_figures))
        atomic_write_json(self.out / "metrics.json", metrics)
        print(f"wrote {self.name}/metrics.json")

    def read_metrics(self, notebook: str) -> dict | None:
        p = self.run_dir / notebook / "metrics.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def savefig(self, fig, name: str, key: bool = False) -> None:
        """Save ``fig`` as ``<notebook>/figures/<name>.png``. ``key=True`` marks a figure that
        report.md shows beside the notebook's tables. Returns nothing, so a cell ending with it
        prints nothing but the figure."""

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        path = atomic_write_bytes(self.out / "figures" / f"{name}.png", buf.getvalue())
        rel = path.relative_to(self.run_dir).as_posix()
        if key and rel not in self.key_figures:
            self.key_figures.append(rel)

    def save_array(self, name: str, arr) -> Path:

        buf = io.BytesIO()
        np.save(buf, np.asarray(arr))
        return atomic_write_bytes(self.out / f"{name}.npy", buf.getvalue())

    def load_array(self, notebook: str, name: str):
        p = self.run_dir / notebook / f"{name}.npy"
        return np.load(p) if p.is_file() else None

    # -- what earlier notebooks left, or the same thing computed here ---------------------------

    def direct_transfer_model(self):
        """The profile's ImageNet-initialised network, with no re-ID training (the ImageNet features)."""

        m = self.profile.model
        return build_model(m.arch, m.pooling, m.pretrained, last_stride=m.last_stride, device=self.device)

    def features(self, split: str = "train", records=None) -> np.ndarray:
        """ImageNet features of ``split``: notebook 02's array when it ran in this run
        folder, otherwise extracted here with the profile's network (and said so)."""
        feats = self.load_array("02_backbone", f"features_{split}")
        if feats is not None:
            return feats

        print(f"notebook 02 has not run in {self.run_dir}: extracting the ImageNet features of {split} here")
        if records is None:
            records = getattr(self.dataset(), split)
        if getattr(self, "_dt_model", None) is None:
            self._dt_model = self.direct_transfer_model()
        return extract_records(self._dt_model, records, self.profile, self.device, f"{split} features")

    def pseudo_labels(self, feats: np.ndarray | None = None) -> np.ndarray:
        """DBSCAN pseudo-labels of the training set: notebook 03's when it ran in this run folder,
        otherwise clustered here from ``feats`` (default: :meth:`features`) with the profile's
        k1, k2, eps and min_samples."""
        labels = self.load_array("03_clustering", "pseudo_labels")
        if labels is not None:
            return labels

        print(f"notebook 03 has not run in {self.run_dir}: clustering the ImageNet features here")
        feats = self.features("train") if feats is None else feats
        c = self.profile.cluster
        jac = jaccard_distance(feats, k1=c.k1, k2=c.k2, device=self.device)
        return np.asarray(dbscan_labels(jac, eps=c.eps, min_samples=c.min_samples))

    def eval_features(self) -> dict[str, dict[str, np.ndarray]]:
        """Every model's test features left in the run folder, ``{name: {"qf", "gf"[, "tf"]}}``,
        from ``RUN_DIR/<notebook>/eval_<name>.npz`` in notebook order; when there is none, the
        ImageNet features computed here. Notebook 02's file keeps its old name,
        ``eval_direct_transfer.npz``; its model is called "ImageNet features"."""
        found = {}
        for path in sorted(self.run_dir.glob("*/eval_*.npz")):
            name = path.stem[len("eval_"):].replace("_", " ")
            with np.load(path) as z:
                found[IMAGENET if name == "direct transfer" else name] = {k: z[k] for k in z.files}
        if not found:
            print("no model features in the run folder: computing the ImageNet features here")
            found[IMAGENET] = {"qf": self.features("query"), "gf": self.features("gallery"),
                               "tf": self.features("train")}
        return found

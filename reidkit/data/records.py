"""What every dataset parser returns: image records, the dataset with its splits, and the layout errors."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

from PIL import Image

from reidkit.core.progress import progress

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class LayoutError(ValueError):
    """The folder does not hold the expected dataset layout."""


class CorruptImageError(OSError):
    """An image file could not be decoded; ``path`` names it."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        super().__init__(f"unreadable image {self.path}: {reason}")


class Record(NamedTuple):
    path: str
    pid: int
    camid: int
    tracklet: int = -1
    bag: int = -1


@dataclass
class SplitStats:
    ids: int
    images: int
    cameras: int


@dataclass
class ReIDDataset:
    """A parsed dataset: train / query / gallery record lists plus where it came from."""

    name: str
    root: Path
    train: list[Record]
    query: list[Record]
    gallery: list[Record]
    notes: list[str] = field(default_factory=list)

    def splits(self) -> dict[str, list[Record]]:
        return {"train": self.train, "query": self.query, "gallery": self.gallery}

    def stats(self) -> dict[str, SplitStats]:
        return {name: split_stats(recs) for name, recs in self.splits().items()}

    def stats_dict(self) -> dict:
        return {name: vars(st) for name, st in self.stats().items()}

    def table(self) -> str:
        rows = [("split", "identities", "images", "cameras")]
        for name, st in self.stats().items():
            rows.append((name, f"{st.ids:,}", f"{st.images:,}", f"{st.cameras:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"{self.name} at {self.root}"]
        for j, r in enumerate(rows):
            lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def split_stats(records: Sequence[Record]) -> SplitStats:
    return SplitStats(
        ids=len({r.pid for r in records}),
        images=len(records),
        cameras=len({r.camid for r in records if r.camid >= 0}),
    )


class BatchFillError(ValueError):
    """The training split cannot fill one batch of the profile (too few identities or images)."""


def check_batch_fill(records: Sequence[Record], ids_per_batch: int, images_per_id: int, what: str,
                     hint: str = "") -> None:
    """Raise :class:`BatchFillError` when ``records`` cannot fill one P x K batch: fewer than
    ``ids_per_batch`` identities, or fewer images than ``ids_per_batch * images_per_id`` (a PK
    sampler repeats the images of a small identity, but not identities). For HHCL the identities
    are an upper bound of the pseudo-identities clustering can find. ``what`` names the split,
    ``hint`` the settings to change."""
    n_ids, n_img = len({r.pid for r in records}), len(records)
    batch = ids_per_batch * images_per_id
    problems = []
    if n_ids < ids_per_batch:
        problems.append(f"{n_ids} identities, and a batch takes {ids_per_batch} ({ids_per_batch} x {images_per_id} "
                        f"= {batch} images)")
    if n_img < batch:
        problems.append(f"{n_img} images, fewer than one batch of {batch}")
    if problems:
        raise BatchFillError(f"{what} cannot fill a batch: " + "; ".join(problems) + (f". {hint}" if hint else ""))


def relabel(records: Sequence[Record]) -> tuple[list[int], dict[int, int]]:
    """Map pids to 0..C-1 in sorted pid order (deterministic, unlike a Python set's order)."""
    mapping = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    return [mapping[r.pid] for r in records], mapping


def _list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted; hidden files (``._x.jpg`` macOS forks) skipped."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def _list_subdirs(folder: Path) -> list[Path]:
    """Sub-folders of ``folder``, sorted; hidden ones (``.ipynb_checkpoints``) skipped."""
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _find_root(root: str | Path, candidates: Sequence[str], required: Sequence[str], dataset: str) -> Path:
    """Return the first of ``root/<candidate>`` (and ``root`` itself) that holds every ``required`` entry."""
    root = Path(root).expanduser()
    if not root.exists():
        raise LayoutError(f"{dataset}: data root {root} does not exist")
    tried = [root] + [root / c for c in candidates]
    for cand in tried:
        if all((cand / r).exists() for r in required):
            return cand
    # name what is missing in the most plausible candidate (the first that exists)
    best = next((c for c in tried if c.exists() and any((c / r).exists() for r in required)), root)
    missing = [r for r in required if not (best / r).exists()]
    where = ", ".join(str(c) for c in tried)
    raise LayoutError(
        f"{dataset}: expected {', '.join(r for r in required)} inside the dataset folder; "
        f"in {best} missing: {', '.join(missing)}. Looked in: {where}"
    )


def _is_empty_dir(folder: Path) -> bool:
    """True when ``folder`` is a directory with no visible entry (reads one entry, not the listing)."""
    if not folder.is_dir():
        return False
    with os.scandir(folder) as it:
        return not any(not e.name.startswith(".") for e in it)


def check_images(paths: Iterable[str | Path], progress_desc: str | None = None) -> list[CorruptImageError]:
    """Decode every image; return one error per unreadable file (empty list when all are fine)."""

    errors = []
    for p in progress(list(paths), desc=progress_desc or "checking images"):
        try:
            with Image.open(p) as im:
                im.load()
        except Exception as exc:  # PIL raises several types
            errors.append(CorruptImageError(p, f"{type(exc).__name__}: {exc}"))
    return errors

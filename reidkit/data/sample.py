"""The embedded real sample: a subset of mini-MARS that ships inside the kit.

``sample_root()`` is where it lives. ``build_sample`` is how it was made (every identity and
every tracklet of mini-MARS, a fixed number of evenly spaced frames per tracklet, the split
files rewritten to list the kept frames); it also turns a full MARS copy into a small subset.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

SAMPLE_NAME = "mini-mars"
FRAMES_PER_TRACKLET = 8


def sample_root() -> Path:
    """Folder of the embedded mini-MARS sample (MARS layout, read by the MARS parser)."""
    return Path(__file__).resolve().parent.parent / "sample_data" / SAMPLE_NAME


def evenly_spaced(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), first and last included (all of them when n <= k)."""
    if n <= k:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


def build_sample(src: str | Path, dst: str | Path, frames_per_tracklet: int = FRAMES_PER_TRACKLET) -> dict:
    """Copy ``frames_per_tracklet`` evenly spaced frames of every tracklet of the MARS-layout
    folder ``src`` (with ``splits/*.json``) into ``dst``, rewrite the split files, copy NOTICE.md.
    Returns counts per split."""
    src, dst = Path(src), Path(dst)
    counts = {}
    for split in ("train", "query", "gallery"):
        entries = json.loads((src / "splits" / f"{split}.json").read_text())
        kept_entries = []
        for entry in entries:
            paths = list(entry["img_paths"])
            keep = [paths[i] for i in evenly_spaced(len(paths), frames_per_tracklet)]
            for rel in keep:
                out = dst / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, out)
            kept_entries.append({**entry, "img_paths": keep, "tracklet_length": len(keep)})
        (dst / "splits").mkdir(parents=True, exist_ok=True)
        (dst / "splits" / f"{split}.json").write_text(json.dumps(kept_entries, indent=1) + "\n")
        counts[split] = {"tracklets": len(kept_entries), "images": sum(len(e["img_paths"]) for e in kept_entries)}
    if (src / "NOTICE.md").is_file():
        shutil.copyfile(src / "NOTICE.md", dst / "NOTICE.md")
    return counts

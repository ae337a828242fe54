"""Market-1501-layout trees made from the embedded sample's real crops.

Two uses: tests of the identity subset and of the ``laptop`` profile on a real layout without
downloading anything, and timing the ``laptop`` profile on a tree of realistic size.

- :func:`sample_as_market` renames the 32 sample identities into a Market tree
  (``PPPP_cCsS_FFFFFF_00.jpg`` in ``bounding_box_train/``, ``query/``, ``bounding_box_test/``),
  plus a few gallery distractors (pid 0000) and junk images (pid -1) made from the same crops.
  Real people, real cameras; tiny.
- :func:`synthetic_market_tree` builds a tree of the size a Market subset has (for 150 ids: about
  150 x 17 training images, 150 x 4.5 queries, 150 x 17.5 gallery images plus distractors). Its
  identities are **synthetic identities over real crops**: identity ``k`` is the sample person
  ``k mod 32`` seen through a fixed colour/brightness/crop jitter of variant ``k // 32``, with its
  cameras shifted by the variant. Several synthetic identities therefore share one real person,
  so accuracy on this tree means nothing; it is for timing (same image count, same image size).
"""

from __future__ import annotations

import argparse
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from reidkit.data.datasets import load_dataset, parse_mars_name

SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def _market_name(pid: int, camid: int, seq: int, frame: int, box: int = 0) -> str:
    pid_s = "-1" if pid == -1 else f"{pid:04d}"
    return f"{pid_s}_c{camid + 1}s{seq}_{frame:06d}_{box:02d}.jpg"


def sample_as_market(dest: str | Path, distractors: int = 16, junk: int = 4) -> Path:
    """The embedded sample as a Market-1501 tree under ``dest`` (created); returns ``dest``.

    Sample train identities go to ``bounding_box_train``, the query/gallery split stays as it is;
    the frame number encodes the tracklet and frame, so names are unique. ``distractors`` gallery
    images (pid 0000) and ``junk`` images (pid -1, in the gallery) are copies of training crops of
    people who are not in the test split."""

    dest = Path(dest)
    ds = load_dataset("mini-mars")
    for sub in SPLIT_DIRS.values():
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for split, recs in ds.splits().items():
        for r in recs:
            _, _, tnum, frame = parse_mars_name(Path(r.path).name)
            name = _market_name(r.pid, r.camid, 1, (r.tracklet + 1) * 1000 + frame)
            shutil.copyfile(r.path, dest / SPLIT_DIRS[split] / name)
    step = max(1, len(ds.train) // max(1, distractors + junk))
    extra = ds.train[::step][: distractors + junk]
    for i, r in enumerate(extra):
        pid = 0 if i < distractors else -1
        shutil.copyfile(r.path, dest / SPLIT_DIRS["gallery"] / _market_name(pid, r.camid, 2, 1000 + i))
    return dest


def _jitter(img, variant: int, rng: np.random.Generator):
    """A fixed look per variant (colour saturation, brightness, mirror) and a small random crop plus a little per-image noise."""

    vr = np.random.default_rng(1000 + variant)
    w, h = img.size
    if variant:
        img = ImageEnhance.Color(img).enhance(float(vr.uniform(0.6, 1.4)))
        img = ImageEnhance.Brightness(img).enhance(float(vr.uniform(0.75, 1.25)))
        if variant % 2:
            img = ImageOps.mirror(img)
    dx, dy = (int(v) for v in rng.integers(0, 6, size=2))
    img = img.crop((dx, dy, w - (5 - dx), h - (5 - dy))).resize((w, h), Image.BILINEAR)
    return ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.9, 1.1)))


def synthetic_market_tree(dest: str | Path, train_ids: int = 150, test_ids: int = 150,
                          train_per_id: int = 17, query_per_id: int = 5, gallery_per_id: int = 17,
                          distractors: int = 560, seed: int = 0, quality: int = 90) -> dict:
    """A Market-1501 tree of synthetic identities over the sample's real crops (see the module
    docstring). Defaults: the size of a 150-identity Market subset. Returns the image counts."""

    dest = Path(dest)
    for sub in SPLIT_DIRS.values():
        (dest / sub).mkdir(parents=True, exist_ok=True)
    ds = load_dataset("mini-mars")
    people: dict[int, list] = defaultdict(list)
    for recs in ds.splits().values():
        for r in recs:
            people[r.pid].append(r)
    bases = sorted(people)  # 32 real people
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "query": 0, "gallery": 0, "distractors": 0}

    def write(rec, pid, split, variant, k):
        img = _jitter(Image.open(rec.path).convert("RGB"), variant, rng)
        cam = (rec.camid + variant) % 6
        name = _market_name(pid, cam, 1 + variant % 6, (rec.tracklet + 1) * 1000 + k)
        img.save(dest / SPLIT_DIRS[split] / name, quality=quality)

    # train: pids 1..train_ids; test: pids train_ids+1 .. (disjoint, as in Market)
    for i in range(train_ids):
        base, variant = bases[i % len(bases)], i // len(bases)
        recs = people[base]
        pick = rng.choice(len(recs), size=train_per_id, replace=len(recs) < train_per_id)
        for k, j in enumerate(pick):
            write(recs[int(j)], 1 + i, "train", variant, k)
            counts["train"] += 1
    for i in range(test_ids):
        base = bases[(i + 7) % len(bases)]
        variant = 100 + i // len(bases)  # looks not used by any training identity
        recs = people[base]
        pick = rng.choice(len(recs), size=query_per_id + gallery_per_id,
                          replace=len(recs) < query_per_id + gallery_per_id)
        for k, j in enumerate(pick):
            split = "query" if k < query_per_id else "gallery"
            write(recs[int(j)], train_ids + 1 + i, split, variant, k)
            counts[split] += 1
    for k in range(distractors):
        base = bases[int(rng.integers(len(bases)))]
        rec = people[base][int(rng.integers(len(people[base])))]
        write(rec, 0, "gallery", 200 + k % 17, k)
        counts["distractors"] += 1
    return counts


def main(argv=None) -> int:
    """``python tests/market_trees.py DEST [--synthetic --ids 150]``: write a tree and print its counts."""

    ap = argparse.ArgumentParser(prog="python tests/market_trees.py", description=main.__doc__)
    ap.add_argument("dest", help="folder to create (the Market-1501-v15.09.15 folder itself)")
    ap.add_argument("--synthetic", action="store_true",
                    help="synthetic identities over the sample's crops, at the size of a Market subset")
    ap.add_argument("--ids", type=int, default=150, help="training and test identities of --synthetic (150)")
    args = ap.parse_args(argv)
    if args.synthetic:
        counts = synthetic_market_tree(args.dest, train_ids=args.ids, test_ids=args.ids,
                                       distractors=int(round(2793 * args.ids / 750)))
    else:
        sample_as_market(args.dest)
        counts = {s: len(list((Path(args.dest) / d).glob("*.jpg"))) for s, d in SPLIT_DIRS.items()}
    print(counts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark of the SYSU-30k training listing at full size: one pass of ``iter_sysu_bags`` over a
``meta/train.txt`` of SYSU-30k's size, without decoding; prints one JSON object to stdout.

It answers "does any step hold the 29.6M training records?" by measurement: the list is written
to a temporary folder (30,000 folders x 987 images = 29.61M lines, about 0.9 GB on disk; the
images themselves are not needed, the pass only groups paths into bags), then every bag of the
stream (1, 3 and 5 consecutive folders around each folder) is drawn, and the peak resident memory
of the process (``ru_maxrss``, the interpreter with torch imported included) is read at the end.
Writing the list is not timed. Not part of ``make bench`` (it takes about 4 minutes and 0.9 GB of
temporary disk). Usage::

    python benchmarks/bench_sysu_listing.py [--folders 30000] [--per-folder 987] [--bag-size 15]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path


def write_list(path: Path, folders: int, per_folder: int) -> int:
    """``meta/train.txt`` in the released layout: ``<folder>/<folder>_<k>.jpg``, sorted. Returns
    the number of lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for k in range(1, folders + 1):
            d = f"{k:010d}"
            f.write("".join(f"{d}/{d}_{i:04d}.jpg\n" for i in range(per_folder)))
    return folders * per_folder


def run(folders: int, per_folder: int, bag_size: int, tmp: Path) -> dict:
    from reidkit.data.sysu30k import iter_sysu_bags

    train_dir, train_list = tmp / "SYSU-30k" / "sysu_train_set_all", tmp / "SYSU-30k" / "meta" / "train.txt"
    lines = write_list(train_list, folders, per_folder)
    train_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bags = images = 0
    for bag in iter_sysu_bags(train_dir, train_list, bag_size=bag_size, seed=0):
        bags += 1
        images += len(bag.records)
    return {"lines": lines, "list_MB": round(train_list.stat().st_size / 2**20, 1),
            "bags": bags, "bag_images": images, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--folders", type=int, default=30_000)
    ap.add_argument("--per-folder", type=int, default=987)
    ap.add_argument("--bag-size", type=int, default=15)
    args = ap.parse_args(argv)
    if args.folders < 1 or args.per_folder < 1:
        sys.exit("error: --folders and --per-folder must be >= 1")
    with tempfile.TemporaryDirectory(prefix="reidkit-sysu-listing-") as tmp:
        report = run(args.folders, args.per_folder, args.bag_size, Path(tmp))
    print(json.dumps(report))


if __name__ == "__main__":
    main()

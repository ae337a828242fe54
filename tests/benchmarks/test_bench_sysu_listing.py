"""benchmarks/bench_sysu_listing.py: the full-size SYSU-30k listing benchmark counts what the bag
rule gives (three bags per folder, ``bag_size`` images each) and reports its peak memory."""

import json

from _modules import load_benchmark


def _bench():
    return load_benchmark("bench_sysu_listing")


def test_small_listing_gives_three_bags_per_folder(capsys):
    _bench().main(["--folders", "7", "--per-folder", "4", "--bag-size", "15"])
    out = json.loads(capsys.readouterr().out)
    assert out["lines"] == 28 and out["bags"] == 21 and out["bag_images"] == 21 * 15
    assert 0 < out["peak_rss_MB"] < 4096 and out["seconds"] >= 0


def test_written_list_is_the_released_layout(tmp_path):
    path = tmp_path / "meta" / "train.txt"
    assert _bench().write_list(path, 2, 2) == 4
    assert path.read_text().splitlines() == ["0000000001/0000000001_0000.jpg", "0000000001/0000000001_0001.jpg",
                                             "0000000002/0000000002_0000.jpg", "0000000002/0000000002_0001.jpg"]

"""benchmarks/results_cameras.py's bookkeeping: per-row means over seeds, and merging result files
(every row at one seed, some rows at more) into one table, with the first epoch's join share
read back from a run's history.json where an older result file lacks it."""

import json
import pytest
from _modules import load_benchmark


@pytest.fixture(scope="module")
def rc():
    return load_benchmark("results_cameras")


def _run(row, seed, m, join=None):
    out = {"row": row, "seed": seed, "mAP": m, "rank1": m / 2, "seconds": 10.0}
    if join is not None:
        out.update(cross_camera_join_rate=join, ids_joined_across_share=2 * join)
    return out


def test_merge_averages_over_seeds_and_backfills_the_first_epoch(rc, tmp_path, capsys):
    work = tmp_path / "work"
    (work / "hhcl-seed1").mkdir(parents=True)
    hist = [{"epoch": 0, "clusters": 5, "labels": {"ids_joined_across_share": 0.1, "ari": 0.2}},
            {"epoch": 1, "clusters": 6, "labels": {"ids_joined_across_share": 0.3, "cross_camera_join_rate": 0.15,
                                                   "ari": 0.4}}]
    (work / "hhcl-seed1" / "history.json").write_text(json.dumps(hist))
    a = {"meta": {"work_dir": str(work)}, "runs": [_run("hhcl", 1, 0.02, 0.15), _run("direct", 1, 0.01)]}
    b = {"meta": {"work_dir": str(work)}, "runs": [{**_run("hhcl", 2, 0.04, 0.25), "ids_joined_across_share_epoch0": 0.3}]}
    for name, doc in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(doc))
    assert rc.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out",
                    str(tmp_path / "m.json")]) == 0
    merged = json.loads((tmp_path / "m.json").read_text())
    s = merged["summary"]["hhcl"]
    assert s["n"] == 2 and s["mAP"] == pytest.approx(0.03) and s["mAP_std"] == pytest.approx(0.01)
    assert s["ids_joined_across_share_epoch0"] == pytest.approx(0.2)  # 0.1 from history.json, 0.3 given
    assert [r["row"] for r in merged["runs"]] == ["direct", "hhcl", "hhcl"]  # the table's row order
    table = capsys.readouterr().out
    assert "| HHCL (CMhybrid) | 2 | 3.0 ± 1.0 | 1.5 ± 0.5 | 20.0 ± 5.0 | 20.0 ± 10.0 -> 40.0 ± 10.0 |" in table
    assert "| ImageNet features (no training) | 1 | 1.0 ± 0.0 |" in table


def test_merge_refuses_a_repeated_run(rc, tmp_path):
    doc = {"meta": {}, "runs": [_run("hhcl", 1, 0.02, 0.1)]}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    with pytest.raises(SystemExit, match="repeat"):
        rc.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--out", str(tmp_path / "m.json")])


def test_a_merged_file_merges_again(rc, tmp_path):
    """Rows added later (other rows, same budget) join an earlier merge; meta stays one flat list."""
    for name, runs in (("a.json", [_run("hhcl", 1, 0.02, 0.1)]), ("b.json", [_run("hhcl", 2, 0.04, 0.2)]),
                       ("c.json", [_run("cc", 1, 0.03, 0.1)])):
        (tmp_path / name).write_text(json.dumps({"meta": {"work_dir": str(tmp_path / name)}, "runs": runs}))
    rc.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "ab.json")])
    assert rc.main(["--merge", str(tmp_path / "ab.json"), str(tmp_path / "c.json"), "--out",
                    str(tmp_path / "abc.json")]) == 0
    merged = json.loads((tmp_path / "abc.json").read_text())
    assert [m["work_dir"] for m in merged["meta"]] == [str(tmp_path / n) for n in ("a.json", "b.json", "c.json")]
    assert [(r["row"], r["seed"]) for r in merged["runs"]] == [("cc", 1), ("hhcl", 1), ("hhcl", 2)]
    assert merged["summary"]["hhcl"]["mAP"] == pytest.approx(0.03)

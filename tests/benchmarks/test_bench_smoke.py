"""`make bench` runs: the four benchmark scripts in their `--quick` sizes, through run_all.py, end
without an error and measure every ratio of the summary (the figures of a quick run mean nothing;
this guards the scripts against the code moving under them, as the package move of issue 18 once
did to bench_scaling.py)."""

import json
import subprocess
import sys

from _modules import BENCHMARKS, load_benchmark

ROOT = BENCHMARKS.parent


def test_every_benchmark_script_runs_in_its_quick_sizes(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "run_all.py"), "--quick", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    summary = json.loads(proc.stdout)
    assert proc.returncode == 0 and summary["errors"] == {}, proc.stderr[-3000:]
    for name in ("eval", "cluster", "pipeline", "scaling"):
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["quick"] is True and "error" not in report
    ratios = summary["ratios"]
    # every ratio has a figure, but the 100k-point memory (no 100k point in the quick sizes)
    assert {k for k, r in ratios.items() if r["measured"] is None} == {"cluster_100k_peak_rss_gb"}
    assert ratios["sysu30k_search_over_fp32_matmul"]["identical_to_fp32"] is True
    assert ratios["jaccard_over_bruteforce_knn_at_12936"]["bf16_identical_to_exact_fp32"] is True
    assert (tmp_path / "scaling.png").stat().st_size > 10_000


def test_the_scaling_curves_name_modules_that_exist():
    scaling = load_benchmark("bench_scaling")
    for path in scaling.KERNEL_FILES:
        assert (ROOT / path).is_file(), path
    assert set(scaling.code_version()) == set(scaling.KERNEL_FILES)

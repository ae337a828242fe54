"""Run the four benchmarks in one go and print the ratios of issue 12 side by side (``make bench``).

Each script runs as its own process, one after the other (never two at once: they measure
time); its JSON report is kept in ``benchmarks/out/<name>.json``, its progress lines go to the
terminal. At the end one JSON object lists every measured ratio next to its goal, and says
whether the goal is met. ``--quick`` passes ``--quick`` to every script (a smoke run of a few
minutes; its figures mean nothing; kept apart in ``benchmarks/out/quick/``). ``--summary-only`` rebuilds the summary from the saved
reports without measuring again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SCRIPTS = ("eval", "cluster", "pipeline", "scaling")
#: the Jaccard ratio is read at Market-1501's training size
MARKET_TRAIN = 12936
#: timed repeats per clustering step in a full run (the best is kept)
CLUSTER_REPEATS = 3


def run_one(name: str, quick: bool, out: Path) -> dict:
    cmd = [sys.executable, str(HERE / f"bench_{name}.py")] + (["--quick"] if quick else [])
    if name == "scaling":
        cmd += ["--png", str(out / "scaling.png")]
    if name == "cluster" and not quick:
        # best of 3 per step: one timing of the brute-force kNN at N = 12,936 ranged 4.3-7.1 s between
        # runs on this 2-core VM, and the Jaccard ratio is read against it
        cmd += ["--repeats", str(CLUSTER_REPEATS)]
    print(f"== bench_{name}.py", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr: straight to the terminal
    wall = time.perf_counter() - t0
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        report = {"error": f"exit {proc.returncode}, no JSON on stdout", "stdout_tail": proc.stdout[-2000:]}
    report["script_wall_s"] = round(wall, 1)
    if proc.returncode:
        report.setdefault("error", f"exit {proc.returncode}")
    return report


def _get(d: dict, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _round3(v) -> float | None:
    return None if v is None else round(float(v), 3)


def _row(measured, goal: str, met, **extra) -> dict:
    r = {"measured": None if measured is None else round(float(measured), 3), "goal": goal,
         "met": None if met is None or measured is None else bool(met)}
    r.update({k: v for k, v in extra.items() if v is not None})
    return r


def _cluster_entry(cluster: dict, n: int) -> dict:
    for e in cluster.get("results", []):
        if e.get("n") == n:
            return e
    res = cluster.get("results") or [{}]
    return res[-1]


def report_cpu(report: dict) -> str | None:
    """The CPU a report was measured on (``cpu_description``'s model and bf16 unit), or None when it
    does not say (reports from before the benchmarks recorded it)."""
    cpu = _get(report, "machine", "cpu") or report.get("cpu")
    if not isinstance(cpu, dict):
        return None
    return f"{cpu.get('model')} (bf16: {cpu.get('bf16') or 'none'})"


def summary(reports: dict, out: Path = OUT) -> dict:
    ev, cl, pl, sc = (reports.get(k, {}) for k in SCRIPTS)
    sysu = ev.get("sysu", {})
    wide = ev.get("sysu_wide", {})
    jac = _cluster_entry(cl, MARKET_TRAIN)
    verdicts = sc.get("verdicts", {})
    train, extract = pl.get("train_step", {}), pl.get("extract", {})
    backend = pl.get("default_backend", "tensor")
    transforms = pl.get("transforms", {})
    per_core = {k: {"pil": v.get("pil_imgs_per_s"), "tensor": v.get("tensor_imgs_per_s")}
                for k, v in transforms.items() if isinstance(v, dict) and "pil_imgs_per_s" in v}
    r_sysu = sysu.get("ratio_eval_auto_over_matmul")
    r_jac = jac.get("jaccard_over_bruteforce_knn")
    r_train = train.get(f"ratio_{backend}_end_to_end")
    r_ext = extract.get(f"ratio_{backend}_over_bare")
    wide_gb = (wide.get("peak_rss_mb") or 0) / 1024 or None
    peak100k = verdicts.get("cluster_peak_rss_mb_at_100k")
    rows = {
        "sysu30k_search_over_fp32_matmul": _row(
            r_sysu, "<= 0.5", r_sysu is not None and r_sysu <= 0.5,
            path=sysu.get("path_that_ran_auto"), identical_to_fp32=sysu.get("identical_results"),
            fp32_path_over_matmul=sysu.get("ratio_eval_fp32_over_matmul")),
        "jaccard_over_bruteforce_knn_at_12936": _row(
            r_jac, "<= 0.25", r_jac is not None and r_jac <= 0.25, n=jac.get("n"),
            knn_over_bruteforce=jac.get("knn_over_bruteforce_knn"),
            knn_bf16_over_bruteforce=jac.get("knn_bf16_over_bruteforce_knn"),
            jaccard_bf16_over_bruteforce=jac.get("jaccard_bf16_over_bruteforce_knn"),
            jaccard_exact_over_bruteforce=jac.get("jaccard_exact_over_bruteforce_knn"),
            bf16_identical_to_exact_fp32=jac.get("jaccard_bf16_identical_to_jaccard_exact"),
            best_of=cl.get("repeats")),
        "sysu30k_28310d_peak_rss_gb": _row(
            wide_gb, "<= 3", wide_gb is not None and wide_gb <= 3, wall_s=wide.get("wall_s"),
            path=wide.get("precision")),
        "train_iteration_over_bare_forward_backward": _row(
            r_train, "<= 1.15", r_train is not None and r_train <= 1.15, backend=backend),
        "feature_extraction_over_bare_forward": _row(
            r_ext, "<= 1.1", r_ext is not None and r_ext <= 1.1, backend=backend,
            from_parts=_round3(extract.get(f"ratio_{backend}_from_parts")),
            fold_speedup_fp32=_round3(extract.get("fold_speedup_fp32"))),
        "cluster_100k_peak_rss_gb": _row(
            None if peak100k is None else peak100k / 1024, "<= 6", verdicts.get("cluster_100k_within_6GB")),
        "cluster_time_exponent_minus_knn_product": _row(
            verdicts.get("cluster_exponent_minus_knn_product"), "<= 0 (0.05 fit noise)",
            verdicts.get("cluster_grows_no_faster_than_knn_product"),
            cluster=_get(sc, "curves", "cluster", "time_exponent"),
            knn_product=_get(sc, "curves", "knn_product", "time_exponent")),
        "sysu_time_exponent_minus_product": _row(
            verdicts.get("sysu_exponent_minus_sysu_product"), "<= 0 (0.05 fit noise)",
            verdicts.get("sysu_grows_no_faster_than_sysu_product")),
    }
    cpus = {k: report_cpu(reports.get(k, {})) for k in SCRIPTS if reports.get(k)}
    return {
        "benchmark": "reidkit: issue 12 ratios, measured in one run",
        "machine": ev.get("machine") or cl.get("cpu_count"),
        # the ratios set two reports against each other only where both ran on one CPU: a bf16
        # product runs ~4x faster on AMX than on AVX512-BF16, so a summary across hosts misleads
        "cpu_of_each_report": cpus,
        "one_cpu": len(set(cpus.values())) <= 1 and None not in cpus.values(),
        "ratios": rows,
        "decode_plus_augment_imgs_per_s_per_core": per_core,
        "scaling_png": sc.get("png"),
        "met": sum(1 for r in rows.values() if r["met"]),
        "not_met": [k for k, r in rows.items() if r["met"] is False],
        "not_measured": [k for k, r in rows.items() if r["met"] is None],
        "script_wall_s": {k: reports.get(k, {}).get("script_wall_s") for k in SCRIPTS},
        "errors": {k: reports[k]["error"] for k in SCRIPTS if "error" in reports.get(k, {})},
        "reports": {k: str(out / f"{k}.json") for k in SCRIPTS},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="every script with --quick (smoke run)")
    ap.add_argument("--only", nargs="+", choices=SCRIPTS, help="run these; read the others' saved reports")
    ap.add_argument("--summary-only", action="store_true", help="no measuring: summarise the saved reports")
    ap.add_argument("--out-dir", type=Path, help="where the reports go (default benchmarks/out, with "
                    "--quick benchmarks/out/quick)")
    args = ap.parse_args(argv)
    out_dir = args.out_dir or (OUT / "quick" if args.quick else OUT)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("REIDKIT_PROGRESS", "0")
    reports: dict = {}
    for name in SCRIPTS:
        path = out_dir / f"{name}.json"
        if args.summary_only or (args.only and name not in args.only):
            reports[name] = json.loads(path.read_text()) if path.exists() else {}
            continue
        reports[name] = run_one(name, args.quick, out_dir)
        path.write_text(json.dumps(reports[name], indent=1) + "\n")
    out = summary(reports, out_dir)
    (out_dir / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    if not out["one_cpu"]:
        print(f"warning: the reports were not all measured on one known CPU: {out['cpu_of_each_report']}; "
              "run them again together (make bench)", file=sys.stderr)
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

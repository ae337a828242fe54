"""`make bench`'s summary (benchmarks/run_all.py) reads each ratio from the right report field and
judges it against its goal; a missing report gives "not measured", never "met"."""

from _modules import load_benchmark


def _run_all():
    return load_benchmark("run_all")


REPORTS = {
    "eval": {"sysu": {"ratio_eval_auto_over_matmul": 0.77, "ratio_eval_fp32_over_matmul": 1.1,
                      "path_that_ran_auto": "bf16", "identical_results": True},
             "sysu_wide": {"peak_rss_mb": 1843.2, "wall_s": 173.5, "precision": "bf16"}},
    "cluster": {"results": [{"n": 3000, "jaccard_over_bruteforce_knn": 0.5},
                            {"n": 12936, "jaccard_over_bruteforce_knn": 0.99, "knn_over_bruteforce_knn": 0.87,
                             "jaccard_bf16_identical_to_jaccard_exact": True}]},
    "pipeline": {"default_backend": "tensor",
                 "train_step": {"ratio_tensor_end_to_end": 1.017, "ratio_pil_end_to_end": 1.4},
                 "extract": {"ratio_tensor_over_bare": 1.027, "ratio_tensor_from_parts": 1.0213,
                             "fold_speedup_fp32": 1.1734},
                 "transforms": {"hhcl_256x128": {"pil_imgs_per_s": 533.0, "tensor_imgs_per_s": 936.0}}},
    "scaling": {"verdicts": {"cluster_peak_rss_mb_at_100k": 2500.0, "cluster_100k_within_6GB": True,
                             "cluster_exponent_minus_knn_product": -0.3,
                             "cluster_grows_no_faster_than_knn_product": True},
                "curves": {"cluster": {"time_exponent": 1.6}, "knn_product": {"time_exponent": 1.9}},
                "png": "benchmarks/out/scaling.png"},
}


def test_summary_puts_each_ratio_beside_its_goal():
    s = _run_all().summary(REPORTS)
    r = s["ratios"]
    assert r["sysu30k_search_over_fp32_matmul"]["measured"] == 0.77
    assert r["sysu30k_search_over_fp32_matmul"]["met"] is False
    assert r["sysu30k_search_over_fp32_matmul"]["identical_to_fp32"] is True
    assert r["jaccard_over_bruteforce_knn_at_12936"]["measured"] == 0.99   # read at N = 12,936, not 3,000
    assert r["jaccard_over_bruteforce_knn_at_12936"]["met"] is False
    assert r["jaccard_over_bruteforce_knn_at_12936"]["bf16_identical_to_exact_fp32"] is True
    assert r["sysu30k_28310d_peak_rss_gb"]["measured"] == 1.8 and r["sysu30k_28310d_peak_rss_gb"]["met"]
    assert r["train_iteration_over_bare_forward_backward"]["measured"] == 1.017
    assert r["train_iteration_over_bare_forward_backward"]["met"] is True
    assert r["feature_extraction_over_bare_forward"]["met"] is True
    # beside it: the data path from the parts, and what folding BatchNorm gives an fp32 forward
    assert r["feature_extraction_over_bare_forward"]["from_parts"] == 1.021
    assert r["feature_extraction_over_bare_forward"]["fold_speedup_fp32"] == 1.173
    assert r["cluster_100k_peak_rss_gb"]["measured"] == 2.441 and r["cluster_100k_peak_rss_gb"]["met"]
    assert r["cluster_time_exponent_minus_knn_product"]["cluster"] == 1.6
    assert s["decode_plus_augment_imgs_per_s_per_core"]["hhcl_256x128"] == {"pil": 533.0, "tensor": 936.0}
    assert set(s["not_met"]) == {"sysu30k_search_over_fp32_matmul", "jaccard_over_bruteforce_knn_at_12936"}
    assert s["not_measured"] == ["sysu_time_exponent_minus_product"] and not s["errors"]


def test_summary_of_missing_reports_is_not_measured_not_met():
    s = _run_all().summary({"eval": {}, "cluster": {}, "pipeline": {}, "scaling": {"error": "exit 1"}})
    assert s["met"] == 0 and s["not_met"] == []
    assert len(s["not_measured"]) == len(s["ratios"])
    assert s["errors"] == {"scaling": "exit 1"}


def test_summary_says_which_cpu_each_report_came_from():
    epyc = {"model": "AMD EPYC", "cores": 2, "bf16": "AVX512-BF16"}
    xeon = {"model": "Intel(R) Xeon(R) Platinum 8481C", "cores": 2, "bf16": "AMX"}
    same = {"eval": {"machine": {"cpu": epyc}}, "cluster": {"cpu": epyc},
            "pipeline": {"machine": {"cpu": epyc}}, "scaling": {"machine": {"cpu": epyc}}}
    s = _run_all().summary(same)
    assert s["one_cpu"] is True
    assert set(s["cpu_of_each_report"].values()) == {"AMD EPYC (bf16: AVX512-BF16)"}
    mixed = {**same, "eval": {"machine": {"cpu": xeon}}}
    s = _run_all().summary(mixed)
    assert s["one_cpu"] is False and s["cpu_of_each_report"]["eval"] == "Intel(R) Xeon(R) Platinum 8481C (bf16: AMX)"
    # a report from before the CPU was recorded cannot vouch for one machine
    assert _run_all().summary({**same, "cluster": {"cpu_count": 2}})["one_cpu"] is False

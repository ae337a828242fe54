"""The GPU check (``benchmarks/gpu_check.py``) runs its whole code on the CPU at tiny sizes
(``--dry-run``), so that a broken check is found before device time is spent; and one item's
failure or spent budget never loses the others' results."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
from _gpu_image import LACKS, gpu_image_env  # noqa: E402

ENV_KEYS = {"device", "gpu", "driver", "cuda", "torch", "faiss", "numpy", "python"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    # as on the GPU machine: no notebook stack, no faiss (its workers and torchrun inherit that);
    # budgets stretched: a loaded two-core machine must not turn a working item into "partial"
    env = gpu_image_env(tmp_path_factory.mktemp("gpu-image"))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out-dir",
                           str(out), "--budget-scale", "4"], capture_output=True, text=True, cwd=ROOT, timeout=1500,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_check_dryrun.json").read_text())
    return report, (out / "gpu_check_dryrun.md").read_text(), proc.stdout


def test_every_item_ran_ok_on_the_cpu(dry_run):
    report, md, stdout = dry_run
    assert report["dry_run"] is True and report["env"]["device"] == "cpu"
    assert ENV_KEYS <= set(report["env"]) and report["env"]["torch"] == torch.__version__
    items = report["items"]
    assert list(items) == list("abcdefg")
    for key, it in items.items():
        # every measurement carries the versions it was read against
        assert ENV_KEYS <= set(it["env"]), key
        assert it["status"] == "ok", f"{key}: {it['status']}: {it['reason']}\n{it['error']}"
        assert it["checks"] and all(it["checks"].values()), (key, it["checks"])
        assert it["wall_s"] > 0 and it["summary"], key
        assert f"| {key} | ok |" in md
    assert json.loads(stdout.strip().splitlines()[-1])["status"] == {k: "ok" for k in "abcdefg"}


def test_it_ran_as_on_the_gpu_image(dry_run):
    """The dry run saw Python as the GPU machine has it (tests/_gpu_image.py): every item ran without
    the notebook stack and faiss, the training commands in torchrun's workers too."""
    report = dry_run[0]
    assert {"papermill", "faiss", "nbconvert", "mistune"} <= set(LACKS)
    assert report["faiss"]["version"] is None and "No module named 'faiss'" in report["faiss"]["why"]
    assert "reproduce skipped: papermill absent" in report["items"]["g"]["summary"]
    f = report["items"]["f"]["checks"]
    assert f["hhcl_default_clean_exit"] and f["dgl_default_clean_exit"], f


def test_item_contents(dry_run):
    items = dry_run[0]["items"]
    a = items["a"]
    for run in ("fp32", "amp"):
        r = a["measured"][run]
        assert len(r["losses"]) == gpu_check.DRY["a"]["iters"] and r["img_s"] > 0 and r["ghost_bn_layers"] > 50
    # the derived figures it is read against: the market1501 profile's ~21 GB fp32 and ~11 GB AMP
    assert 15 < a["reference"]["fp32"]["memory_gb"] < 30 and 5 < a["reference"]["amp"]["memory_gb"] < 15
    assert a["comparison"]["loss_agreement"]["tolerance"] == gpu_check.DRY["a"]["loss_tol"]
    assert gpu_check.DRY["a"]["loss_tol"]["first"] == gpu_check.LOSS_TOL["first"]   # the device's bound
    agree = a["measured"]["extract_vs_cpu"]   # on the CPU both sides are one path: the same features
    assert agree["images"] == gpu_check.DRY["a"]["agree_images"] and agree["min_cos"] >= 1 - 1e-6
    assert agree["max_abs_diff"] == 0 and a["checks"]["features_agree_with_cpu"]

    b = items["b"]["measured"]
    assert b["cpu_exact"]["clusters"] >= 2
    for prec in ("exact", "bf16"):  # device-independent canonical distances: identical to the CPU's
        assert b[f"device_{prec}"]["labels_identical"] and b[f"device_{prec}"]["jaccard_identical"]
        assert b["neighbours"][prec]["identical"]
    assert "backend" in b["faiss"] or "skipped" in b["faiss"]

    c = items["c"]
    assert c["measured"]["auto"]["device_chosen"] == "cpu" and c["comparison"]["max_abs_diff"] <= gpu_check.RERANK_ATOL

    d = items["d"]
    assert d["checks"]["ranks_equal_cpu"] and d["checks"]["bf16_equals_fp32_screen"]
    assert d["measured"]["eval_bf16"]["precision"] == "bf16" and d["measured"]["wide_eval_auto"]["num_gallery"] == \
        gpu_check.DRY["d"]["wide_ng"]
    assert "bf16_eval_at_most_half_of_bare_fp32" in d["goals"]

    e = items["e"]["measured"]
    assert e["loader_img_s"] > 0 and e["compute_img_s"] > 0 and e["streamed_img_s"] > 0
    assert e["setup"]["network"] == "mgn" and e["setup"]["classes"] == gpu_check.DRY["e"]["classes"]

    f = items["f"]["measured"]
    assert f["hhcl_default"]["resumed"]["killed_after_epochs"] == 1
    assert f["hhcl_default"]["resumed"]["resumed_from_checkpoint"]
    # on the CPU a resumed run is bit-exact (the engine re-seeds every epoch)
    assert f["hhcl_default"]["weights_vs_uninterrupted"]["bit_exact"]
    assert f["dgl_default"]["uninterrupted"]["group_destroyed_marker"]

    g = items["g"]["measured"]
    for key in gpu_check.DRY["g"]["trees"]:
        assert [s["rc"] for s in g[key].values()] == [0, 0, 0]
    assert g["sysu30k"]["resume_to_2"]["result"]["protocol"] == "sysu30k"


def _ctx(tmp_path):
    report = gpu_check.Report(tmp_path, True, gpu_check.environment(torch.device("cpu")))
    return gpu_check.Ctx(torch.device("cpu"), {k: {"budget": 5} for k in "ab"}, tmp_path, report, True)


def test_a_failing_item_keeps_what_was_measured_and_the_next_item_runs(tmp_path, monkeypatch):
    def broken(ctx, res):
        res["measured"]["first_step"] = 1.5
        ctx.report.save()
        raise ValueError("boom")

    def slow(ctx, res):
        res["measured"]["done"] = 1
        ctx.budget.require(60, "the second step")

    monkeypatch.setitem(gpu_check.ITEM_FUNCS, "a", broken)
    monkeypatch.setitem(gpu_check.ITEM_FUNCS, "b", slow)
    ctx = _ctx(tmp_path)
    gpu_check.run_item(ctx, "a", 1.0)
    gpu_check.run_item(ctx, "b", 1.0)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())["items"]
    assert saved["a"]["status"] == "error" and saved["a"]["reason"] == "ValueError: boom"
    assert saved["a"]["measured"] == {"first_step": 1.5} and "Traceback" in saved["a"]["error"]
    assert saved["b"]["status"] == "partial" and "the second step not started" in saved["b"]["reason"]
    assert saved["b"]["measured"] == {"done": 1}
    assert "| a | error |" in (tmp_path / "gpu_check.md").read_text()


def test_the_worker_splits_its_flags_from_the_train_arguments(monkeypatch):
    seen = []
    monkeypatch.setattr(gpu_check.reidkit_cli, "main", lambda argv: seen.append(argv) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert gpu_check.main(["--train-worker", "--", "train", "--profile", "smoke"]) == 0
    assert seen == [["train", "--profile", "smoke"]]


def test_a_failed_torchrun_keeps_the_workers_traceback():
    """torchrun's own report fills the end of a failed run's log and names no cause; the report keeps
    the worker's first traceback (a missing module on the device, say) and the last lines."""
    worker = "[rank0]: Traceback (most recent call last):\n" + "[rank0]:   File x\n" * 40 + \
        "[rank0]: ModuleNotFoundError: No module named 'mistune'\n"
    agent = "Traceback (most recent call last):\n" + "  File y\n" * 300 + "ChildFailedError: \n  exitcode  : 1\n"
    kept = gpu_check._failure_excerpt("gpu_check worker: gloo group of 1\n" + worker + agent)
    assert "No module named 'mistune'" in kept and kept.startswith("[rank0]: Traceback")
    assert kept.endswith("exitcode  : 1\n") and len(kept) < 3200
    assert gpu_check._failure_excerpt("short log, no traceback") == "short log, no traceback"


def test_the_md_holds_the_gpu_table_rows(dry_run):
    """The rows docs/reproduce.md's GPU table takes, measured beside derived, ready to paste."""
    report, md, _ = dry_run
    table = md.split("## For docs/reproduce.md's GPU table", 1)[1]
    market = next(line for line in table.splitlines() if line.startswith("| market1501 | cpu | ResNet-50, "))
    a = report["items"]["a"]
    assert f"{a['measured']['fp32']['img_s']:,.0f} / {a['reference']['fp32']['decode_img_s']:,.0f}" in market
    assert f"/ {a['reference']['amp']['memory_gb']:g} GB)" in market
    sysu = next(line for line in table.splitlines() if line.startswith("| sysu30k | cpu | MGN, "))
    assert f"{report['items']['e']['measured']['streamed_img_s']:,.0f} streamed" in sysu

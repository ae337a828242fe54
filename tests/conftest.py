import os
from pathlib import Path

import pytest
from _modules import load_module
from _tiny import QUIET, one_torch_thread, tiny_dataset, tiny_hhcl_profile

# tests never reach the network for weights, and show no progress bars
os.environ.setdefault("REIDKIT_OFFLINE", "1")
os.environ.setdefault("REIDKIT_PROGRESS", "0")

ROOT = Path(__file__).resolve().parent.parent

#: test files that train, run the papermill chain or drive the browser (each over about 30 s on two
#: cores in the full run's --durations), longest first: marked ``slow``, so ``make test-fast``
#: (``-m "not slow"``) skips them
SLOW_FILES = ("test_paper_dryrun.py", "test_browser.py", "test_gpu_check.py", "test_bench_smoke.py", "test_ddp.py",
              "test_engine.py", "test_hhcl_method.py", "test_reproduce.py", "test_c10d.py", "test_dgl_method.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
    # the longest files first, each a whole unit of pytest-xdist's --dist loadfile, which hands the
    # files out in collection order under --no-loadscope-reorder (make test): the two workers start
    # on the two longest (the paper dry runs, and the dress rehearsal's workshop reproduction) and
    # the short files fill in behind them, so neither worker is left alone with a long file at the end
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_configure(config):
    """A pytest-xdist worker shares the cores with the other workers: torch and the BLAS libraries
    get the worker's share of the threads, and so does every process a test starts (the workshop
    reproduction and its notebook kernels, the GPU check's dry run, the CLI runs), through
    ``OMP_NUM_THREADS`` unless it is set already. Without that each of them would take every core:
    on two cores, two workers and their subprocesses ran three to four OpenMP threads whose idle
    spinning made the whole suite two to three times slower than its work."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    if workers > 1:
        import torch
        from threadpoolctl import threadpool_limits

        share = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))
        torch.set_num_threads(share)
        threadpool_limits(share)


SOLUTIONS = ROOT / "notebooks" / "solutions"


@pytest.fixture
def one_thread():
    """torch at one thread for the test, restored after it (multi-process tests and exact timings)."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def smoke_ctx(tmp_path_factory):
    """A run folder on the smoke profile (embedded sample, CPU) whose notebook-02 arrays (the
    direct-transfer features of every split) are computed once for the whole session, so that
    ``ctx.features(split)`` and ``ctx.pseudo_labels()`` are cheap in every test that uses it."""
    from reidkit.course.runctx import RunContext

    run_dir = tmp_path_factory.mktemp("smoke-ctx")
    ctx = RunContext.open("smoke", None, str(run_dir), "cpu", 1, name="02_backbone")
    for split in ("train", "query", "gallery"):
        ctx.save_array(f"features_{split}", ctx.features(split))
    return RunContext.open("smoke", None, str(run_dir), "cpu", 1, name="tests")


@pytest.fixture(scope="session")
def tiny_hhcl_run(tmp_path_factory):
    """One finished 1-epoch HHCL run on the tiny set (``tests/_tiny.py``), trained once per session
    (per xdist worker): the tests that damage, resume or read a run copy its files."""
    from reidkit.hhcl.method import train_hhcl

    out = tmp_path_factory.mktemp("tiny-hhcl-run")
    with one_torch_thread():
        train_hhcl(tiny_hhcl_profile(hhcl__epochs=1), tiny_dataset(), out_dir=out, **QUIET)
    return out


#: the test suite's cut of the workshop reproduction: the same notebooks, code paths and sample, with
#: two short HHCL epochs (5 iterations each), two DGL epochs, one unary-only epoch and 128x64 images,
#: recorded in run.json as overrides that the notebooks opened in the browser apply in turn.
#: ``make rehearsal`` (REIDKIT_REHEARSAL_LIMIT set), the timed workshop day, reproduces the profile as it is.
WORKSHOP_CUTS = ("hhcl.epochs=2", "hhcl.iters=5", "dgl.epochs=2", "dgl.milestones=[1]", "dgl.uo_epochs=1",
                 "data.height=128", "data.width=64")


@pytest.fixture(scope="session")
def workshop_run(tmp_path_factory):
    """The dress rehearsal's first half, once per session: ``reidkit reproduce --profile workshop``
    as ``make reproduce`` runs it (a subprocess, its run folder under ``runs/``, here
    ``$REIDKIT_RUNS`` = a temporary folder). Returns ``(run_dir, runs base, stdout lines, stderr lines)``.
    test_browser.py checks the chain, then opens every notebook as the guide says, RUN_DIR unset
    (its tests are the only users, so that one worker makes the run and reads it)."""
    import json
    import subprocess
    import sys

    from filelock import FileLock

    # under pytest-xdist (make test) every worker has its own session: the first to ask makes the
    # reproduction in the folder the workers share, the others wait for it and read it
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    done = shared / "workshop_run.json"
    with FileLock(str(shared / "workshop_run.lock")):
        if not done.is_file():
            runs = shared / "workshop-runs"
            runs.mkdir()
            env = {**os.environ, "REIDKIT_RUNS": str(runs)}
            full = bool(os.environ.get("REIDKIT_REHEARSAL_LIMIT"))
            cuts = [] if full else sum((["--set", c] for c in WORKSHOP_CUTS), [])
            out = subprocess.run([sys.executable, "-m", "reidkit", "reproduce", "--profile", "workshop",
                                  *cuts],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
            (run_dir,) = runs.glob("workshop-*")
            done.write_text(json.dumps({"run_dir": str(run_dir), "runs": str(runs),
                                        "lines": out.stdout.splitlines(), "errors": out.stderr.splitlines()}))
    found = json.loads(done.read_text())
    return Path(found["run_dir"]), Path(found["runs"]), found["lines"], found["errors"]


@pytest.fixture(scope="module")
def sol(request):
    """The worked solutions named by the test module's ``SOLUTION`` (a notebook stem)."""
    return load_solution(request.module.SOLUTION)


def load_solution(stem: str):
    """The module ``notebooks/solutions/<stem>.py`` (the exercises' worked solutions)."""
    return load_module(SOLUTIONS / f"{stem}.py", f"solutions_{stem}")

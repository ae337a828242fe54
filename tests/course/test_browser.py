"""The workshop day, rehearsed in a real browser: JupyterLab on 127.0.0.1 with a token, driven by
headless Chromium (Debian's ``chromium`` + ``chromium-driver``, through selenium from PyPI).

The dress rehearsal: ``reidkit reproduce --profile workshop`` as ``make reproduce`` runs it (the
session's ``workshop_run``; the first tests of this file check that chain and its rerun; ``make test``
cuts its training budget and image size with ``--set``, conftest's ``WORKSHOP_CUTS``, and ``make
rehearsal`` runs it uncut), then EVERY
notebook opened as the guide says, as committed, RUN_DIR unset, so that it finds the reproduction by
itself. For each notebook the test runs all cells,
checks that no cell fails, that it read the reproduction's run folder, that no training happened
(no checkpoint or history changed) and how long it took (written to ``timings.json`` beside the
screenshots). For a notebook that shows widgets it also moves every slider on the page and checks
that the widget output next to it changed, then saves the notebook, reloads the page and checks
that no dead widget output ("Error displaying widget: model not found") is left behind. Last, it
opens the run's static web copy (``html/index.html``) and every page it links: every figure loads
and every link resolves.

Screenshots are kept in ``$REIDKIT_SCREENSHOTS`` or ``runs/browser-screenshots/``.

Skipped only when Chromium, its driver, selenium or JupyterLab is missing; with ``CI=true`` or
``REIDKIT_REQUIRE_BROWSER=1`` a missing piece fails the test instead. Optional knobs:
``REIDKIT_CHROMIUM`` / ``REIDKIT_CHROMEDRIVER`` (paths), ``REIDKIT_BROWSER_NOTEBOOKS`` (another
notebook folder), ``REIDKIT_BROWSER_RUN_DIR`` (a finished workshop run folder to copy instead of
reproducing first), ``REIDKIT_BROWSER_TIMEOUT`` (seconds a notebook may take to run all its cells;
default 1200), ``REIDKIT_REHEARSAL_LIMIT`` (seconds a notebook may take in the rehearsal: set by
``make rehearsal``, the timed benchmark of the workshop day; unset, the test records the times in
``timings.json`` and asserts none, as the kit's tests assert values and leave speed to the benchmarks).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from reidkit.course.reproduce import list_notebooks, run_notebooks
from reidkit.course.runctx import run_overrides

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = Path(os.environ.get("REIDKIT_BROWSER_NOTEBOOKS") or ROOT / "notebooks")
RUN_ALL_TIMEOUT = float(os.environ.get("REIDKIT_BROWSER_TIMEOUT", "1200"))
UPDATE_TIMEOUT = 180.0          # seconds a widget may take to redraw after a slider move
REHEARSAL_LIMIT = float(os.environ["REIDKIT_REHEARSAL_LIMIT"]) if os.environ.get("REIDKIT_REHEARSAL_LIMIT") else None
#: what training leaves in a run folder; the rehearsal must not touch any of them
TRAINING_FILES = ("checkpoint.pt", "model_best.pt", "history.json")
WIDGET_ERRORS = ("Error displaying widget", "model not found")

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- what is needed

def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _require_or_skip(reason: str):
    if _truthy("CI") or _truthy("REIDKIT_REQUIRE_BROWSER"):
        pytest.fail(f"browser test cannot run in CI: {reason} (see .ci/run)")
    pytest.skip(reason)


def _find_binary(env: str, *names: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env] if os.access(os.environ[env], os.X_OK) else None
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def _widget_notebooks() -> list[Path]:
    """The notebooks whose code shows widgets (mentions ipywidgets, a widget, or display())."""
    found = []
    for path in sorted(NOTEBOOKS.glob("[0-9]*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        if re.search(r"widget|ipywidgets|display\(", code):
            found.append(path)
    return found


def _expects_slider(path: Path) -> bool:
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    return bool(re.search(r"Slider|interact|_browser|_widget", code))


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tools():
    chromium = _find_binary("REIDKIT_CHROMIUM", "chromium", "chromium-browser")
    driver = _find_binary("REIDKIT_CHROMEDRIVER", "chromedriver")
    if chromium is None:
        _require_or_skip("Chromium not found (Debian: apt-get install chromium chromium-driver)")
    if driver is None:
        _require_or_skip("chromedriver not found (Debian: apt-get install chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        _require_or_skip("selenium is not installed (pip install -e '.[dev]', or make dev-venv)")
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        _require_or_skip("jupyterlab is not installed (pip install -e '.[lab]')")
    return {"chromium": chromium, "chromedriver": driver}


@pytest.fixture(scope="module")
def shots():
    folder = Path(os.environ.get("REIDKIT_SCREENSHOTS") or ROOT / "runs" / "browser-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    return folder


@pytest.fixture(scope="module")
def rehearsal(tools, tmp_path_factory, request):
    """``(run_dir, runs base)``: the session's workshop reproduction (``workshop_run``), or a copy of
    ``REIDKIT_BROWSER_RUN_DIR`` placed in a runs folder of its own."""
    given = os.environ.get("REIDKIT_BROWSER_RUN_DIR")
    if not given:
        run_dir, runs, _, _ = request.getfixturevalue("workshop_run")
        return run_dir, runs
    runs = tmp_path_factory.mktemp("runs")
    run = runs / Path(given).name
    shutil.copytree(given, run)
    return run, runs


def _training_files(run_dir: Path) -> dict[str, float]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for name in TRAINING_FILES
            for p in run_dir.rglob(name)}


@pytest.fixture(scope="module")
def lab(tools, rehearsal, tmp_path_factory):
    """JupyterLab on 127.0.0.1, a free port and a random token, serving a copy of the notebooks
    folder exactly as committed (parameters untouched: PROFILE workshop, RUN_DIR unset), with the
    reproduction's runs folder where a student's checkout has it (``$REIDKIT_RUNS`` for the kernels)."""
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    shutil.copytree(NOTEBOOKS, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))

    settings = base / "settings"
    _write_json(settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings",
                {"windowingMode": "none"})              # every cell in the DOM, so every slider is
    _write_json(settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings",
                {"fetchNews": "false", "checkForUpdates": False})
    env = dict(os.environ)
    env.pop("REIDKIT_PROGRESS", None)                   # the kernels behave as for a student
    env.update(REIDKIT_RUNS=str(rehearsal[1]),                  # every core, as on a student's laptop
               JUPYTER_CONFIG_DIR=str(base / "config"), JUPYTER_DATA_DIR=str(base / "data"),
               JUPYTER_RUNTIME_DIR=str(base / "runtime"), JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(base / "workspaces"))
    port, token = _free_port(), secrets.token_hex(16)
    log = open(base / "jupyter.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip", "127.0.0.1", "--port", str(port),
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True"]
        + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited ({proc.returncode}):\n{_tail(base / 'jupyter.log')}")
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"jupyter lab did not answer in 180 s:\n{_tail(base / 'jupyter.log')}")
            time.sleep(1)
        yield {"url": url, "token": token, "root": root, "log": base / "jupyter.log"}
    finally:
        proc.send_signal(signal.SIGTERM)               # the server shuts its kernels down
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def browser(tools):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")        # never let Selenium Manager download a browser
    opts = webdriver.ChromeOptions()
    opts.binary_location = tools["chromium"]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1400", "--hide-scrollbars", "--no-first-run",
                "--disable-background-networking"):
        opts.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(executable_path=tools["chromedriver"]), options=opts)
    except Exception as exc:                            # e.g. a driver that does not match the browser
        _require_or_skip(f"headless Chromium did not start: {exc}".splitlines()[0])
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


# ----------------------------------------------------------------------------- the test

WIDGET_NOTEBOOKS = _widget_notebooks()
ALL_NOTEBOOKS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


# ----------------------------------------------------------------------------- the first half: the reproduction
# (in this file, so that the worker that made the workshop run also opens it: tests/conftest.py)

def test_the_workshop_chain_runs_every_notebook(workshop_run):
    run_dir, _, logs, errors = workshop_run
    names = [p.stem for p in list_notebooks()]
    assert [line.split("]")[1].split(":")[0].strip() for line in logs if line.startswith("[")
            and line.endswith("running ...")] == names
    for name in names:
        assert (run_dir / name / "metrics.json").is_file(), name
        executed = nbformat.read(run_dir / "notebooks" / f"{name}.ipynb", as_version=4)
        injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and "INTERACTIVE = False" in injected[0].source and "workshop" in injected[0].source
    report = (run_dir / "report.md").read_text()
    assert "01_data_prep" in report and "| train | 16 | 256 | 6 |" in report
    assert "Slowest cells of each notebook" in report
    assert re.search(r"^\| 04_hybrid_contrast \| \d+ \| [\d.]+ \| `.+` \|$", report, re.M)
    assert any("done in" in line for line in logs)
    # what a teacher sees in the terminal carries no warning (the kernels listen on unix sockets, so
    # ipykernel has no unencrypted TCP port to warn about after every notebook)
    assert errors == [], errors[-20:]
    # what the run really has, and the static web copy of the executed notebooks
    assert json.loads((run_dir / "run.json").read_text())["identities"] == {"train": 16, "test": 16}
    assert "every identity of the dataset: 16 training, 16 test" in report
    assert "[html/index.html](html/index.html)" in report
    index = (run_dir / "html" / "index.html").read_text()
    for name in names:
        page = (run_dir / "html" / f"{name}.html").read_text()
        assert f'href="{name}.html"' in index and "data:image/png;base64," in page, name
        assert not re.search(r'href="[^"#:]*\.ipynb', page), name        # links between notebooks: pages
    assert "<table>" in index and "data:image/png;base64," in index      # report.md with its figures


def test_rerun_skips_completed_notebooks(workshop_run):
    """The same command again (with the overrides the run recorded) skips every notebook."""
    run_dir, _, _, _ = workshop_run
    logs = []
    _, again = run_notebooks("workshop", run_dir=run_dir, log=logs.append,
                             overrides=run_overrides(run_dir, "workshop"))
    assert all(r.status == "skipped" for r in again)
    assert all("skipped" in line for line in logs if line.startswith("["))


def test_run_json_records_the_environment(workshop_run):
    import torch

    run_dir, _, _, _ = workshop_run
    env = json.loads((run_dir / "run.json").read_text())["environment"]
    from reidkit.core.device import cpu_name

    assert env["torch"] == torch.__version__ and env["device"].startswith(f"cpu: CPU ({cpu_name()}, ")
    assert env["knn"] == "torch-cpu" and env["amp"] in ("fp32 (no autocast)", "bfloat16 autocast")
    text = (run_dir / "report.md").read_text()
    assert "## Environment\n" in text and "Beside the paper" not in text    # the sample: no paper table


# ----------------------------------------------------------------------------- the second half: the browser

def test_some_notebook_shows_widgets():
    assert WIDGET_NOTEBOOKS, "no notebook mentions ipywidgets / display(): the course lost its widgets"


@pytest.fixture(scope="module")
def timings(shots):
    found = {}
    yield found
    (shots / "timings.json").write_text(json.dumps(found, indent=1))


@pytest.mark.parametrize("nb_path", ALL_NOTEBOOKS, ids=[p.stem for p in ALL_NOTEBOOKS])
def test_dress_rehearsal_in_jupyterlab(nb_path, rehearsal, lab, browser, shots, timings):
    stem, problems = nb_path.stem, []
    run_dir = rehearsal[0]
    trained = _training_files(run_dir)
    assert trained, f"the reproduction in {run_dir} left no training run"
    try:
        seconds = _run_and_check(nb_path, stem, problems, lab, browser, shots)
    except Exception:
        browser.save_screenshot(str(shots / f"{stem}-failed.png"))
        raise
    finally:
        _shutdown_kernels(lab)                          # notebooks never share the 2 cores
    timings[stem] = round(seconds, 1)
    print(f"{stem}: run-all in {seconds:.1f} s")
    text = _page_text(browser)
    if f"latest complete run of profile workshop, {run_dir.resolve()}" not in text:
        problems.append(f"it did not say it read the reproduction {run_dir}")
    changed = {k for k, v in _training_files(run_dir).items() if trained.get(k) != v}
    if changed:
        problems.append("it trained: " + ", ".join(sorted(changed)))
    if REHEARSAL_LIMIT is not None and seconds > REHEARSAL_LIMIT:
        problems.append(f"run-all took {seconds:.0f} s (> {REHEARSAL_LIMIT:.0f} s)")
    assert not problems, f"{stem}:\n" + "\n".join(problems)


def _run_and_check(nb_path, stem, problems, lab, browser, shots):
    """Run all of the notebook; the widget checks where it has widgets. Returns run-all's seconds."""
    _open(browser, lab, nb_path.name)
    t0 = time.time()
    # not returned: selenium would wait on the promise, which settles only when the last cell ends
    browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells'); return null")
    _wait_all_ran(browser, stem)
    seconds = time.time() - t0
    _wait_widget_views(browser, stem, "after run-all")
    browser.save_screenshot(str(shots / f"{stem}-0-run-all.png"))

    errors = [f"cell {i} ({c['head']!r}): {e}" for i, c in enumerate(_state(browser)["cells"])
              for e in c["errors"]]
    assert not errors, f"{stem}: cells failed in JupyterLab:\n" + "\n".join(errors)
    if nb_path not in WIDGET_NOTEBOOKS:
        return seconds
    text = _page_text(browser)
    assert not any(w in text for w in WIDGET_ERRORS), f"{stem}: a widget shows an error after run-all"

    sliders = browser.find_elements("css selector", ".jp-Notebook .widget-slider")
    if _expects_slider(nb_path):
        assert sliders, f"{stem}: its code builds a slider, but none is on the page"
    for k in range(len(sliders)):
        problems += _move_slider(browser, stem, k, shots)

    # save, reload: nothing left behind that the widget manager cannot display
    browser.execute_script("window.jupyterapp.commands.execute('docmanager:save'); return null")
    _wait(lambda: not _state(browser).get("dirty", True), 60, f"{stem}: save")
    saved = (lab["root"] / nb_path.name).read_text()
    if any(w in saved for w in WIDGET_ERRORS):
        problems.append("the saved notebook contains a widget error text")
    _open(browser, lab, nb_path.name)
    # every saved widget view drawn from the live kernel, or shown as an error: only then can the
    # check below find a dead one (while they say "Loading widget..." it would pass unseen)
    views = _wait_widget_views(browser, stem, "after save and reload")
    print(f"{stem}: after save and reload {views['drawn']} of {views['expected']} widget views drawn, "
          f"{views['errors']} errors")
    if not views["expected"] and _expects_slider(nb_path):
        problems.append("after save and reload the notebook holds no widget view")
    browser.save_screenshot(str(shots / f"{stem}-9-reloaded.png"))
    dead = browser.execute_script(_DEAD_JS, list(WIDGET_ERRORS))
    for index, n, head in dead:
        problems.append(f"after save and reload, cell {index} ({head!r}) shows {n}x 'Error displaying widget'"
                        " (a widget output whose model is gone)")
        cell = browser.find_elements("css selector", ".jp-Notebook .jp-Cell")[index]
        _element_shot(browser, cell, shots / f"{stem}-9-reloaded-dead-widget-cell{index}.png")
    text = _page_text(browser)
    if not dead and any(w in text for w in WIDGET_ERRORS):
        problems.append("after save and reload the page shows 'Error displaying widget'")
    return seconds


_WIDGET_VIEWS_JS = """
const app = window.jupyterapp, panel = app && app.shell && app.shell.currentWidget;
if (!panel || !panel.context || !panel.context.model) return null;
let expected = 0;            // widget views the notebook's outputs hold (an empty model_id draws nothing)
for (const cell of panel.context.model.toJSON().cells) {
  for (const out of cell.outputs || []) {
    const view = out.data && out.data['application/vnd.jupyter.widget-view+json'];
    if (view && view.model_id) expected++;
  }
}
let loading = 0, drawn = 0, errors = 0;
document.querySelectorAll('.jp-Notebook .jp-OutputArea-output').forEach(o => {
  const text = o.textContent || '';
  if (text.startsWith('Loading widget')) { loading++; return; }
  if (o.parentElement.closest('.jupyter-widgets')) return;       // inside a widget (an Output widget's area)
  if (arguments[0].some(w => text.includes(w)) && o.classList.contains('jupyter-widgets')) errors++;
  else if (o.classList.contains('jupyter-widgets') || o.querySelector('.jupyter-widgets')) drawn++;
});
return {expected: expected, loading: loading, drawn: drawn, errors: errors};
"""


def _wait_widget_views(driver, stem: str, when: str, timeout: float = 90) -> dict:
    """Until no widget output says "Loading widget..." and the page draws (as a view or as an
    error) as many top-level widget views as the notebook's outputs hold."""
    def settled():
        v = driver.execute_script(_WIDGET_VIEWS_JS, list(WIDGET_ERRORS))
        return v if v and not v["loading"] and v["drawn"] + v["errors"] >= v["expected"] else None
    try:
        return _wait(settled, timeout, f"{stem}: its widget views to be drawn {when}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {driver.execute_script(_WIDGET_VIEWS_JS, list(WIDGET_ERRORS))}") from None


_PAGE_JS = """
const broken = Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))
  .map(i => (i.getAttribute('src') || '').slice(0, 80));
const links = Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href'))
  .filter(h => !h.startsWith('#') && !/^[a-z]+:/i.test(h));
const maths = Array.from(document.querySelectorAll('math'))
  .filter(m => !m.closest('details:not([open])'));
const raw = [];
document.querySelectorAll('.jp-MarkdownOutput').forEach(o => {
  const c = o.cloneNode(true);
  c.querySelectorAll('code, pre, math').forEach(e => e.remove());
  (c.textContent.match(/\\$[^$\\n]+\\$/g) || []).forEach(t => raw.push(t.slice(0, 60)));
});
return {broken: broken, links: links, images: document.images.length, title: document.title,
        maths: maths.length, maths_undrawn: maths.filter(m => !(m.getBoundingClientRect().width > 0)).length,
        raw_tex: raw};
"""


def test_the_html_copy_opens_with_every_figure_and_link(rehearsal, browser, shots):
    """The run's static web copy, as a laptop with no install reads it: index.html and every
    page it links, opened from disk; every image loads, every relative link names a file, and
    every formula is drawn (none left as its LaTeX source)."""
    html_dir = rehearsal[0] / "html"
    browser.get((html_dir / "index.html").as_uri())
    time.sleep(1)
    browser.save_screenshot(str(shots / "html-index.png"))
    index = browser.execute_script(_PAGE_JS)
    assert not index["broken"], f"index.html: images that do not load: {index['broken']}"
    assert index["images"] > 0, "index.html shows no figure of the report"
    pages = sorted({h for h in index["links"] if h.endswith(".html")})
    assert pages == sorted(f"{p.stem}.html" for p in ALL_NOTEBOOKS), pages
    for href in index["links"]:
        assert (html_dir / href.split("#")[0]).is_file(), f"index.html links {href}, which is not there"
    for page in pages:
        browser.get((html_dir / page).as_uri())
        time.sleep(1)
        # a long page (1.5 MB, its figures inline) on a busy machine: until its formulas are there
        found = _wait(lambda: (lambda f: f if f["maths"] else None)(browser.execute_script(_PAGE_JS)), 30,
                      f"{page}: its formulas (MathML) to be in the page")
        assert not found["broken"], f"{page}: images that do not load: {found['broken']}"
        assert found["images"] > 0, f"{page} shows no figure"
        # formulas typeset in the page (MathML, drawn by the browser with no script from the web)
        assert found["maths_undrawn"] == 0, f"{page}: formulas not drawn {found}"
        assert not found["raw_tex"], f"{page}: formulas left as LaTeX source: {found['raw_tex'][:5]}"
        for href in found["links"]:
            assert (html_dir / href.split("#")[0]).is_file(), f"{page} links {href}, which is not there"
    browser.save_screenshot(str(shots / "html-last-page.png"))


# ----------------------------------------------------------------------------- helpers

def _write_json(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def _wait(cond, timeout: float, what: str, every: float = 0.5):
    deadline = time.time() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


_STATE_JS = """
const app = window.jupyterapp;
if (!app || !app.shell) return {ready: false};
const panel = app.shell.currentWidget;
if (!panel || !panel.content || !panel.content.model || !panel.context || !panel.context.isReady)
  return {ready: false};
const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
const cells = [];
for (const cell of panel.content.widgets) {
  const m = cell.model;
  if (m.type !== 'code') continue;
  const src = m.sharedModel.getSource();
  const outs = m.outputs.toJSON();
  cells.push({count: m.executionCount, blank: !src.trim(), head: src.trim().slice(0, 60),
              errors: outs.filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)});
}
return {ready: true, status: kernel ? kernel.status : 'none', dirty: panel.context.model.dirty,
        path: panel.context.path, cells: cells};
"""


# the cells whose outputs show a widget error: (index among the cells, count, first source line)
_DEAD_JS = """
const words = arguments[0], found = [];
document.querySelectorAll('.jp-Notebook .jp-Cell').forEach((cell, i) => {
  const out = cell.querySelector('.jp-Cell-outputWrapper');
  const text = out ? out.innerText : '';
  if (words.some(w => text.includes(w))) {
    const src = cell.querySelector('.jp-InputArea-editor');
    const head = src ? src.innerText.trim().split('\\n')[0].slice(0, 70) : '';
    found.push([i, text.split(words[0]).length - 1, head]);
  }
});
return found;
"""


def _state(driver) -> dict:
    return driver.execute_script(_STATE_JS) or {"ready": False}


def _page_text(driver) -> str:
    return driver.execute_script("return document.body.innerText")


def _open(driver, lab, name: str):
    driver.get(f"{lab['url']}/lab/tree/{name}?token={lab['token']}&reset")
    _wait(lambda: (lambda s: s.get("ready") and s.get("path") == name and s.get("status") == "idle")(_state(driver)),
          180, f"{name} to open with an idle kernel", every=1)


def _wait_all_ran(driver, stem: str):
    """Until every non-blank code cell has an execution count and the kernel is idle (twice in a
    row); fails early as soon as a cell shows an error."""
    deadline, calm = time.time() + RUN_ALL_TIMEOUT, 0
    while True:
        s = _state(driver)
        cells = s.get("cells", [])
        failed = [f"{c['head']!r}: {e}" for c in cells for e in c["errors"]]
        assert not failed, f"{stem}: a cell failed during run-all:\n" + "\n".join(failed)
        done = s.get("ready") and cells and all(c["count"] is not None for c in cells if not c["blank"])
        calm = calm + 1 if done and s.get("status") == "idle" else 0
        if calm >= 2:
            return
        if time.time() > deadline:
            left = sum(c["count"] is None for c in cells if not c["blank"])
            raise AssertionError(f"{stem}: run-all not finished after {RUN_ALL_TIMEOUT:.0f} s "
                                 f"({left} cells not run, kernel {s.get('status')})")
        time.sleep(2)


# the HTML of the widget Output region nearest to a slider: the Output widgets of its closest
# ancestor (within its cell) that holds any, else the cell's outputs without the controls
_REGION_JS = """
const slider = arguments[0];
const cell = slider.closest('.jp-Cell');
let node = slider.parentElement, found = [];
while (node && node !== cell) {
  found = node.querySelectorAll('.widget-output');
  if (found.length) break;
  node = node.parentElement;
}
let html;
if (found.length) {
  html = Array.from(found).map(o => o.innerHTML).join('\\n');
} else {
  const area = (cell || slider.parentElement).querySelector('.jp-Cell-outputArea') || cell;
  const copy = area.cloneNode(true);
  copy.querySelectorAll('.widget-slider, .widget-readout, input, select').forEach(e => e.remove());
  html = copy.innerHTML;
}
const label = slider.querySelector('.widget-label');
const handle = slider.querySelector('.noUi-handle, .ui-slider-handle, [role=slider]');
return {html: html, label: label ? label.textContent.trim() : '',
        value: handle ? (handle.getAttribute('aria-valuenow') || '') : '',
        max: handle ? (handle.getAttribute('aria-valuemax') || '') : '',
        readout: (slider.querySelector('.widget-readout') || {}).textContent || '',
        error: !!(found.length ? node : cell).querySelector('[data-mime-type="application/vnd.jupyter.error"]')};
"""


def _move_slider(driver, stem: str, k: int, shots: Path) -> list[str]:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    slider = driver.find_elements("css selector", ".jp-Notebook .widget-slider")[k]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", slider)
    time.sleep(0.5)
    before = driver.execute_script(_REGION_JS, slider)
    name = f"{stem}-slider{k + 1}-{re.sub(r'[^A-Za-z0-9]+', '_', before['label']).strip('_') or 'unnamed'}"
    where = f"slider {k + 1} ({before['label'] or 'no label'}, at {before['readout'].strip()})"
    cell_out = _cell_output(driver, slider)
    _element_shot(driver, cell_out, shots / f"{name}-before.png")

    handle = slider.find_element("css selector", ".noUi-handle, .ui-slider-handle, [role=slider]")
    at_max = before["value"] and before["max"] and float(before["value"]) >= float(before["max"])
    key = Keys.ARROW_LEFT if at_max else Keys.ARROW_RIGHT
    driver.execute_script("arguments[0].focus()", handle)
    t0 = time.time()
    for _ in range(2):
        ActionChains(driver).send_keys(key).perform()
        time.sleep(0.3)
    moved = driver.execute_script(_REGION_JS, slider)
    if moved["readout"] == before["readout"]:           # keys did nothing: drag the handle instead
        ActionChains(driver).drag_and_drop_by_offset(handle, -40 if at_max else 40, 0).perform()
    try:
        after = _wait(lambda: (lambda r: r if r["html"] != before["html"] else None)(
            driver.execute_script(_REGION_JS, slider)), UPDATE_TIMEOUT, f"{stem} {where} to redraw")
    except AssertionError as exc:
        _element_shot(driver, cell_out, shots / f"{name}-after.png")
        return [f"{where}: moved to {driver.execute_script(_REGION_JS, slider)['readout'].strip()}, "
                f"but its output did not change ({exc})"]
    # settle: the same output twice, a second apart (several key presses queue several redraws)
    last = after["html"]
    for _ in range(int(UPDATE_TIMEOUT)):
        time.sleep(1)
        now = driver.execute_script(_REGION_JS, slider)
        if now["html"] == last and _state(driver).get("status") == "idle":
            after = now
            break
        last = now["html"]
    took = time.time() - t0
    _element_shot(driver, cell_out, shots / f"{name}-after.png")
    print(f"{stem} {where} -> {after['readout'].strip()}: output redrawn in {took:.1f} s")
    out = []
    if after["error"] or "Traceback" in after["html"]:
        out.append(f"{where}: the output shows an error after the move")
    if any(w in after["html"] for w in WIDGET_ERRORS):
        out.append(f"{where}: the output shows a widget error after the move")
    return out


def _cell_output(driver, slider):
    return driver.execute_script(
        "const c = arguments[0].closest('.jp-Cell');"
        "return (c && c.querySelector('.jp-Cell-outputWrapper')) || c || arguments[0];", slider)


def _element_shot(driver, element, path: Path):
    try:
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", element)
        time.sleep(0.3)
        element.screenshot(str(path))
    except Exception:                                   # e.g. an element taller than Chromium allows
        driver.save_screenshot(str(path))


def _shutdown_kernels(lab):
    """Close the notebook's kernel through the REST API, so notebooks do not share the 2 cores."""
    base, tok = lab["url"], lab["token"]
    try:
        with urllib.request.urlopen(f"{base}/api/sessions?token={tok}", timeout=10) as r:
            sessions = json.load(r)
        for s in sessions:
            req = urllib.request.Request(f"{base}/api/sessions/{s['id']}?token={tok}", method="DELETE")
            urllib.request.urlopen(req, timeout=30).close()
    except OSError:
        pass

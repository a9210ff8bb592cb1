# The two Quickstart commands: `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.13.0 pinned: on CPU machines pip takes the CPU build that lies on disk, not a multi-GB CUDA one
TORCH ?= torch==2.13.0

.PHONY: setup train test clean

$(BIN)/seqpar-train: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	# DS_BUILD_OPS=0: DeepSpeed's C++/CUDA ops are compiled on first use instead of at install
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/seqpar-train

train: setup
	$(BIN)/seqpar-train $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) runs

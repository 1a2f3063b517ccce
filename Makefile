# Two commands on a fresh machine:  `make demo`  (the main job)  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/hf-align: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first, so nothing below can pull a CUDA build or torchvision.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/hf-align

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/hf-align demo

test: install
	$(BIN)/lint-imports  # the layering and no-cycle contracts of pyproject.toml (docs/architecture.md)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-slow: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

.PHONY: install demo test test-slow lint

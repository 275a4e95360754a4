# Two commands on a new machine: `make run` (install + the default audit), `make test`.
VENV   ?= .venv
PYTHON ?= python3
CONFIG ?= configs/mnist1d.yaml
OUT    ?= runs/mnist1d
BIN     = $(VENV)/bin

.PHONY: run test lint install clean

run: $(VENV)/.installed
	$(BIN)/kdaudit run $(CONFIG) --out $(OUT)

test: $(VENV)/.installed
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check kdaudit tests benchmarks examples
	$(BIN)/ruff format --check kdaudit tests benchmarks examples

install: $(VENV)/.installed

# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml; pip (not uv) finds them.
$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# Two commands on a new machine: `make run` (install + the default audit), `make test`.
# `make run` installs what an audit needs; `make test` and `make lint` add the dev extras
# (pytest, ruff, Ray, scikit-learn, transformers). Each has its own stamp file, so `make test`
# after `make run` still installs the extras.
VENV   ?= .venv
PYTHON ?= python3
CONFIG ?= configs/mnist1d.yaml
OUT    ?= runs/mnist1d
BIN     = $(VENV)/bin
PIP     = $(BIN)/pip install --disable-pip-version-check -q

.PHONY: run test lint install install-dev clean

run: $(VENV)/.installed
	$(BIN)/kdaudit run $(CONFIG) --out $(OUT)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check kdaudit tests benchmarks examples
	$(BIN)/ruff format --check kdaudit tests benchmarks examples

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml; pip (not uv) finds them.
$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@
	@echo "kdaudit is installed in $(VENV): run '$(BIN)/kdaudit', or 'source $(BIN)/activate' to put it on your PATH"

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

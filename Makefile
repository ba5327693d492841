# Two entry points: `make run` (set up, then `dvc repro` on params.yaml) and `make test`.
# Set-up is idempotent: it creates .venv and installs the project once, again when pyproject.toml changes.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# The CPU build on these machines; on a GPU machine, `make TORCH=torch run` takes the CUDA build instead.
TORCH ?= torch==2.13.0

.PHONY: setup run smoke test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

run: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro

test: setup
	$(PY) -m pytest -q

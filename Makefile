# The two entry points of the project (see README): `make run` and `make test`.
# Both create .venv on first use and install torch FIRST (a pinned release that has a CPU build), so that no
# other package can pull a multi-GB CUDA build onto a CPU machine.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# GPU users: make TORCH_INDEX=--index-url=<your CUDA wheel index> (see README)
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: run test install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[pipeline,dev]"
	touch $(STAMP)

# The whole pipeline on the embedded defaults (dvc.yaml): bundled digits, in-process Ray, local MLflow.
run: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro
	@echo "samples at 1, 2, 4, 8 and 32 steps: runs/samples/grid.png"
	@echo "MLflow runs: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns.db"

test: $(STAMP)
	$(PY) -m pytest

clean-venv:
	rm -rf $(VENV)

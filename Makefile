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
TOOLS_VENV ?= infra/.tools-venv
TOOLS_STAMP := $(TOOLS_VENV)/.installed

.PHONY: run test install clean-venv tools image

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

test: $(STAMP) $(TOOLS_STAMP)
	$(PY) -m pytest

# Scanners for tests/infra (checkov, kubernetes-validate, hadolint, jsonschema) in a venv of their own: checkov
# pins versions that clash with the project's. Exact versions in infra/tools-requirements.txt.
tools: $(TOOLS_STAMP)

$(TOOLS_STAMP): infra/tools-requirements.txt
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TOOLS_VENV)/bin/python -m pip install --quiet -r infra/tools-requirements.txt
	touch $(TOOLS_STAMP)

# The image of the pipeline's tasks, Ray pods and MLflow server (infra/docker/Dockerfile, docs/deploy.md):
# make image [VARIANT=gpu|cpu] [IMAGE=registry/tim-pipeline] [IMAGE_TAG=0.1.0]  ->  $(IMAGE):$(IMAGE_TAG)-$(VARIANT)
IMAGE ?= tim-pipeline
IMAGE_TAG ?= 0.1.0
VARIANT ?= gpu

image:
	@command -v docker >/dev/null 2>&1 || { echo "make image: the docker command is not installed here; build the image on a machine with a Docker engine (docs/deploy.md)" >&2; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "make image: docker is installed but no Docker engine answers (docker info failed); start one or build elsewhere (docs/deploy.md)" >&2; exit 1; }
	docker build -f infra/docker/Dockerfile --build-arg VARIANT=$(VARIANT) -t $(IMAGE):$(IMAGE_TAG)-$(VARIANT) .

clean-venv:
	rm -rf $(VENV)

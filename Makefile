# radlens: `make serve` runs the agent, `make test` runs the whole suite. Both set up .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.radlens-runtime
DEV_STAMP := $(VENV)/.radlens-dev
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet

CLIP_VENV := .venv-clip
CLIP_STAMP := $(CLIP_VENV)/.radlens-clip

.PHONY: serve test lint demo bench tools viewer clip clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUNTIME_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -e .
	@touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[dev]'
	@touch $@ $(RUNTIME_STAMP)

## serve: install radlens in .venv and run the agent (AE RADLENS, port 11112, ./radlens-data)
serve: $(RUNTIME_STAMP)
	$(BIN)/radlens serve $(if $(CONFIG),--config $(CONFIG))

## tools: install the peers the tests talk to when missing (dcmtk, dicom3tools, Orthanc with
## DICOMweb, Chromium, Node.js): Debian packages
tools:
	@scripts/install-test-tools.sh

## viewer: OHIF's prebuilt viewer (npm @ohif/app) and playwright-core, for the browser test
viewer: $(RUNTIME_STAMP) tools
	@test -d tests/viewer/node_modules/playwright-core || (cd tests/viewer && npm ci --silent --no-audit --no-fund)
	@$(BIN)/python -m radlens.demo fetch-ohif >/dev/null

## clip: the venv the open_clip test runs in (a torch/torchvision pair open_clip can import;
## scripts/install-clip-venv.sh says why it is not .venv)
$(CLIP_STAMP): pyproject.toml scripts/install-clip-venv.sh
	PYTHON=$(PYTHON) scripts/install-clip-venv.sh $(CLIP_VENV)
	@touch $@

clip: $(CLIP_STAMP)

## test: install what the tests need, lint, and run the whole suite
test: $(DEV_STAMP) tools viewer $(CLIP_STAMP)
	$(BIN)/ruff check radlens tests benchmarks
	$(BIN)/python -m pytest

## lint: ruff over the package, tests and benchmarks
lint: $(DEV_STAMP)
	$(BIN)/ruff check radlens tests benchmarks

## demo: Orthanc + OHIF + the agent on loopback; push a phantom study, print the findings and
## the OHIF URL that shows them (Ctrl-C stops)
demo: $(RUNTIME_STAMP) tools viewer
	@scripts/demo.sh

## bench: ingest throughput (storescu to storescp vs radlens), inference speed, turnaround
## (last image sent to last result at a storescp destination, per stage) and cluster
## throughput (studies/hour with 1, 2, 4 workers on PostgreSQL), hostile input (the door, then
## 1,000 cases through the model) and re-sends after a crash, as tables
bench: $(DEV_STAMP) tools
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/infer.py
	$(BIN)/python benchmarks/turnaround.py
	$(BIN)/python benchmarks/cluster.py
	$(BIN)/python benchmarks/fuzz.py
	$(BIN)/python benchmarks/fuzz.py --model --datasets 1000 --pdus 0
	$(BIN)/python benchmarks/resend.py
	$(BIN)/python benchmarks/cam_layer.py

clean:
	rm -rf $(VENV) $(CLIP_VENV) .pytest_cache .ruff_cache *.egg-info

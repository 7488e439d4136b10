# lgemma: every target creates or reuses .venv and installs the pinned requirements first.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup train test clean-runs help

help:
	@echo "make demo    train the default tiny variants if not cached (~11 min the first time), then serve the Gradio demo on 127.0.0.1:7860"
	@echo "make train   data, stage 0, stage 1, stage 2 and eval of the default tiny variants (with and without stage 1)"
	@echo "make test    the test suite (unit, end-to-end training in fast mode)"
	@echo "make lab     JupyterLab on notebooks/ (the course, read in order)"
	@echo "make course  run every notebook (after make train's variants), HTML + timings in build/course/"
	@echo "make ablation  the paper's ablation grid, 2x2x2 cells x 3 seeds (hours on 2 cores; cached, resumable; writes results/ablation/)"
	@echo "make setup   only create .venv and install the pinned dependencies"

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	@touch $(STAMP)

train: $(STAMP)
	$(BIN)/lgemma train tiny tiny-noalign --jobs 2

.PHONY: demo
demo: $(STAMP)
	$(BIN)/lgemma demo tiny tiny-noalign --jobs 2

test: $(STAMP)
	$(BIN)/python -m pytest -q

.PHONY: lab course
lab: $(STAMP)
	LGEMMA_HOME=$(CURDIR) $(BIN)/jupyter lab --ServerApp.root_dir=notebooks --ServerApp.ip=127.0.0.1 \
		$(if $(filter 0,$(shell id -u)),--allow-root)

course: $(STAMP)
	$(BIN)/lgemma train tiny tiny-noalign --jobs 2
	$(BIN)/lgemma course run --out build/course

clean-runs:
	rm -rf runs runs-fast data/generated

.PHONY: ablation
ablation: $(STAMP)
	$(BIN)/lgemma ablate --jobs 2 --results results/ablation

# Set-up and entry points. Every target creates or reuses the virtual environment .venv.
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
SHARED    := ../shared
DATA      ?= $(if $(wildcard $(SHARED)/data/cifar10-subset),$(SHARED)/data/cifar10-subset,)
CHECKPOINT ?= $(if $(wildcard $(SHARED)/models/resnet20-12fca82f.th),$(SHARED)/models/resnet20-12fca82f.th,resnet20)
DATA_FLAG := $(if $(DATA),--data $(DATA),)
OUT       ?= runs/demo
DEMO_EVALS ?= 2000

.PHONY: install test test-slow demo bench lint

$(STAMP): pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/pytest

test-slow: install
	$(BIN)/pytest -m slow

demo: install
	rm -rf $(OUT)
	$(BIN)/hwq train --target accel_sim --checkpoint $(CHECKPOINT) $(DATA_FLAG) --wbits 4 --abits 8 \
		--budget-evals $(DEMO_EVALS) --seed 0 --out $(OUT)
	$(BIN)/hwq eval --ir $(OUT)/final.ir $(DATA_FLAG) --split val --json $(OUT)/eval.json

bench: install
	$(BIN)/python bench/bench_functional.py $(DATA_FLAG) --checkpoint $(CHECKPOINT)

lint: install
	$(BIN)/ruff check .

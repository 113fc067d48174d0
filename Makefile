# Set-up and everyday commands. `make run` and `make test` work on a fresh machine:
# they create .venv, install what they need, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test lint bench openblas

run: $(VENV)/.installed openblas
	$(BIN)/mlx-stack up

test: $(VENV)/.installed-test openblas
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

bench: $(VENV)/.installed-test openblas
	$(BIN)/python bench/one_node.py

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	touch $@ $(VENV)/.installed

# Linux only: MLX's CPU backend runs prompts ~13x faster with a real OpenBLAS than with
# its bundled reference BLAS (worker/blas.py loads it). macOS uses Metal: nothing to do.
openblas:
	@if [ "$$(uname)" = Linux ] && ! ldconfig -p | grep -q 'libopenblas\.so\.0'; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing libopenblas0-pthread (fast CPU inference)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null; \
	  else \
	    echo "note: no OpenBLAS found; CPU inference will be slow. Debian/Ubuntu: sudo apt-get install libopenblas0-pthread"; \
	  fi; \
	fi

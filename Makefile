# Set-up and everyday commands. `make run` and `make test` work on a fresh machine:
# they create .venv, install what they need, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test lint bench openblas chromium

run: $(VENV)/.installed openblas
	$(BIN)/mlx-stack up

test: $(VENV)/.installed-test openblas chromium
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

# The dashboard test (tests/test_dashboard.py) drives a real headless chromium through
# Playwright; it uses the distribution's browser, never `playwright install` downloads.
chromium:
	@if [ "$$(uname)" = Linux ] && ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium (headless browser for the dashboard test)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "note: no chromium found; the dashboard test will be skipped. Debian/Ubuntu: sudo apt-get install chromium"; \
	  fi; \
	fi

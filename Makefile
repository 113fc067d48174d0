# Set-up and everyday commands. `make run` and `make test` work on a fresh machine:
# they create .venv, install what they need, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CLIENTS := tests/clients
AIDER  := .venv-aider
# What a target needs is installed side by side (pip, apt, npm each wait on the network or
# the disk more than on a core): minutes off a fresh machine's `make test`. (Not
# --output-sync: it would hold back the output of the server and of pytest until they end.)
MAKEFLAGS += --jobs=4

.PHONY: run test lint bench run-packages test-packages

run: $(VENV)/.installed run-packages
	$(BIN)/mlx-stack up

test: $(VENV)/.installed-test test-packages $(CLIENTS)/node_modules/.installed \
      $(AIDER)/.installed
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

bench: $(VENV)/.installed-test run-packages
	$(BIN)/python -m bench.one_node

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	touch $@ $(VENV)/.installed

# Debian packages the product or the tests want, each "CHECK;PACKAGES;WHY;LOSS". Those
# missing are installed by one apt-get call (Linux, as root with apt-get: one index update
# on a fresh machine, not one per package), else a note says what is lost.
# MLX's CPU backend runs prompts ~13x faster with a real OpenBLAS than with its bundled
# reference BLAS (worker/blas.py loads it). macOS uses Metal: nothing to do there.
RUN_PACKAGES := \
  "ldconfig -p | grep -q libopenblas.so.0;libopenblas0-pthread;fast CPU inference;CPU inference will be slow"
# tests/test_dashboard.py drives the distribution's headless chromium through Playwright
# (never `playwright install` downloads); tests/test_install.py checks the rendered units
# with systemd-analyze; tests/test_links.py drops packets inside network namespaces with
# nftables (this kernel has no netem); the agent CLIs (below) come from npm.
TEST_PACKAGES := $(RUN_PACKAGES) \
  "command -v chromium;chromium;headless browser for the dashboard test;the dashboard test will be skipped" \
  "command -v systemd-analyze;systemd;systemd-analyze checks the rendered units;the unit check will be skipped" \
  "command -v nft;nftables;packet loss inside the test namespaces;the lossy-link tests will be skipped" \
  "command -v npm;nodejs npm;the agent CLIs the tests run;the Codex CLI and Claude Code tests will be skipped"

define install_packages
	@[ "$$(uname)" = Linux ] || exit 0; missing=""; notes=""; set -f; \
	for need in $(1); do \
	  IFS=';'; set -- $$need; unset IFS; \
	  if ! sh -c "$$1" >/dev/null 2>&1; then \
	    missing="$$missing $$2"; \
	    notes="$${notes}note: $$2 is missing ($$3): $$4. Debian/Ubuntu: sudo apt-get install $$2\n"; \
	  fi; \
	done; \
	[ -n "$$missing" ] || exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
	  printf "$$notes"; \
	fi
endef

run-packages:
	$(call install_packages,$(RUN_PACKAGES))

test-packages:
	$(call install_packages,$(TEST_PACKAGES))

# The agent CLIs the tests run unchanged (tests/test_agents.py): Codex CLI and Claude
# Code, npm packages that ship native binaries, pinned in tests/clients/package-lock.json.
$(CLIENTS)/node_modules/.installed: $(CLIENTS)/package.json $(CLIENTS)/package-lock.json | test-packages
	@if command -v npm >/dev/null; then \
	  npm ci --prefix $(CLIENTS) --no-audit --no-fund --loglevel=error && touch $@; fi

# aider pins its own versions of openai, litellm and more: it gets a virtual environment
# of its own, which tests/test_agents.py runs it from.
$(AIDER)/.installed:
	$(PYTHON) -m venv $(AIDER)
	$(AIDER)/bin/pip install -q --disable-pip-version-check aider-chat==0.86.2
	touch $@

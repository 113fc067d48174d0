# Set-up and everyday commands. `make run` and `make test` work on a fresh machine:
# they create .venv, install what they need, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CLIENTS := tests/clients
AIDER  := .venv-aider

.PHONY: run test lint bench openblas chromium systemd-analyze nftables

run: $(VENV)/.installed openblas
	$(BIN)/mlx-stack up

test: $(VENV)/.installed-test openblas chromium systemd-analyze nftables $(CLIENTS)/node_modules/.installed \
      $(AIDER)/.installed
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

bench: $(VENV)/.installed-test openblas
	$(BIN)/python -m bench.one_node

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	touch $@ $(VENV)/.installed

# A Debian package the product or the tests want, installed when missing (Linux, as root
# with apt-get), else a note saying what is lost: $(call apt_need,CHECK,PACKAGE,WHY,LOSS).
# No commas inside the arguments.
define apt_need
	@if [ "$$(uname)" = Linux ] && ! $(1) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $(2) ($(3))"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
	  else \
	    echo "note: $(2) is missing: $(4). Debian/Ubuntu: sudo apt-get install $(2)"; \
	  fi; \
	fi
endef

# The agent CLIs the tests run unchanged (tests/test_agents.py): Codex CLI and Claude
# Code, npm packages that ship native binaries, pinned in tests/clients/package-lock.json.
$(CLIENTS)/node_modules/.installed: $(CLIENTS)/package.json $(CLIENTS)/package-lock.json
	$(call apt_need,command -v npm,nodejs npm,the agent CLIs the tests run,the Codex CLI and Claude Code tests will be skipped)
	@if command -v npm >/dev/null; then \
	  npm ci --prefix $(CLIENTS) --no-audit --no-fund --loglevel=error && touch $@; fi

# aider pins its own versions of openai, litellm and more: it gets a virtual environment
# of its own, which tests/test_agents.py runs it from.
$(AIDER)/.installed:
	$(PYTHON) -m venv $(AIDER)
	$(AIDER)/bin/pip install -q --disable-pip-version-check aider-chat==0.86.2
	touch $@

# Linux only: MLX's CPU backend runs prompts ~13x faster with a real OpenBLAS than with
# its bundled reference BLAS (worker/blas.py loads it). macOS uses Metal: nothing to do.
openblas:
	$(call apt_need,sh -c "ldconfig -p | grep -q 'libopenblas\.so\.0'",libopenblas0-pthread,fast CPU inference,CPU inference will be slow)

# The dashboard test (tests/test_dashboard.py) drives a real headless chromium through
# Playwright; it uses the distribution's browser, never `playwright install` downloads.
chromium:
	$(call apt_need,command -v chromium,chromium,headless browser for the dashboard test,the dashboard test will be skipped)

# The unit-file test (tests/test_install.py) checks the systemd units `mlx-stack install`
# writes with `systemd-analyze verify`, from the distribution's systemd package.
systemd-analyze:
	$(call apt_need,command -v systemd-analyze,systemd,systemd-analyze checks the rendered units,the unit check will be skipped)

# The lossy-link tests (tests/test_links.py) drop packets inside network namespaces with
# nftables (this kernel has no netem).
nftables:
	$(call apt_need,command -v nft,nftables,packet loss inside the test namespaces,the lossy-link tests will be skipped)

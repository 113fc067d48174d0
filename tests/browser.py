"""A real headless browser for the dashboard's tests: Debian's chromium driven by
Playwright (never ``playwright install``), off the network, with a fresh profile."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HOSTILE = "<img src=x onerror=document.body.dataset.pwned=1>"
# Off the network: no sync, updates, field trials, first-run pings, proxies or QUIC.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-proxy-server", "--disable-features=MediaRouter,OptimizationHints"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                               "(pip install -e '.[test]')")
if not Path(CHROMIUM).exists():
    pytest.skip("chromium is not installed; `make test` installs it as root on Debian/Ubuntu "
                "(apt-get install chromium)", allow_module_level=True)


def open_page(tmp_path: Path) -> Iterator[Any]:
    """A page of a fresh headless chromium with its own temporary profile."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            chromium_sandbox=False, args=FLAGS, timeout=60_000)
        try:
            yield browser.pages[0] if browser.pages else browser.new_page()
        finally:
            browser.close()

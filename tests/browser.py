"""Debian's Chromium started headless through Playwright: the map's browser tests and
``benchmarks/bench_mapview.py``."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from typing import Any

#: Headless, and nothing started that would reach the network or the GPU.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_executable() -> str | None:
    """The installed Chromium (Debian package ``chromium``), or ``None``."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def headless_chromium(executable: str) -> Iterator[Any]:
    """A Playwright ``Browser`` of ``executable``, closed on the way out."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()

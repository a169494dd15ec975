"""The system's Chromium for the tests that open the dashboard in a headless browser (playwright)."""

from __future__ import annotations

import shutil
from pathlib import Path

from playwright.async_api import BrowserContext, Playwright

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    """The system's Chromium (Debian's chromium package, which scripts/install provides)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path is not None, "Chromium is missing: run scripts/install (it installs Debian's chromium)"
    return path


async def headless_chromium(playwright: Playwright, directory: Path) -> BrowserContext:
    """The system's Chromium, headless, with a fresh profile under `directory`."""
    return await playwright.chromium.launch_persistent_context(
        str(directory / "chromium-profile"), executable_path=chromium(), headless=True, args=CHROMIUM_ARGS
    )

"""Headless Chromium (Debian's `chromium` and `chromium-driver`): the unit's page and the fleet
page are checked in a real browser, by the host tests and by `invoke test-image`."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import preflight

# A phone's screen: the unit's page must fit it.
PHONE = (412, 915)


@contextlib.contextmanager
def chromium(size: tuple[int, int] = PHONE) -> Iterator[Any]:
    """A WebDriver session on a fresh headless Chromium, its console log kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    preflight.require_tools(preflight.BROWSER_TOOLS)
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-extensions", "--disable-background-networking",
                 f"--window-size={size[0]},{size[1]}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Any) -> list[str]:
    """What the page logged as errors (failed loads, script errors) since the last call."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry.get("level") == "SEVERE"]


def artifacts(target: str) -> Path:
    """Where a test keeps its screenshots: out/<target>/test/."""
    folder = Path(__file__).resolve().parents[3] / "out" / target / "test"
    folder.mkdir(parents=True, exist_ok=True)
    return folder

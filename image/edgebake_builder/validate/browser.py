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


def open_unit_page(driver: Any, base: str, token_path: str) -> None:
    """The unit's page as a technician opens it: first without its token (a 401 that shows no
    image and logs nothing but itself), then with it (the token leaves the address bar)."""
    driver.get(f"{base}/")
    assert "needs its token" in driver.page_source
    assert driver.find_elements("css selector", "img") == []
    errors = console_errors(driver)
    assert all("401" in e for e in errors), errors
    driver.get(base + token_path)
    assert driver.current_url == f"{base}/", "the token leaves the address bar"


def picture_shown(driver: Any, camera: str) -> bool:
    """Whether the page shows a loaded picture in that camera's tile."""
    return bool(driver.execute_script(
        "const i = document.querySelector(`[data-camera='${arguments[0]}'] img`);"
        "return i && i.complete && i.naturalWidth > 0;", camera))

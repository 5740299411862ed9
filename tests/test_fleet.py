"""`invoke fleet-status` lists real running services from a real mosquitto, including the one
that went away (its last will says offline)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from edgebake_builder.validate.broker import LocalBroker
from edgebake_builder.validate.browser import artifacts, chromium, console_errors
from edgebake_runtime.service import Service
from helpers import INVOKE, ROOT, invoke
from runtime_helpers import RunningApp, make_config, replay_folder, wait_for


def test_fleet_status_lists_units_with_model_health_and_last_result(
        default_model: Path, tmp_path: Path) -> None:
    broker = LocalBroker.start_if_available(tmp_path)
    assert broker is not None, "mosquitto is part of the test host's packages"
    try:
        units = []
        for name in ("pole-7", "gate-2"):
            folder = tmp_path / name
            folder.mkdir()
            config = make_config(folder, default_model, [
                {"name": "replay", "kind": "replay", "path": str(replay_folder(folder)),
                 "fps": 5}], mqtt={"enabled": True, "host": "127.0.0.1", "port": broker.port})
            raw = dict(config.raw, device_id=name)
            from edgebake_runtime.config import validate

            units.append(RunningApp(Service(validate(raw, "test config"))))
        with units[0] as first:
            with units[1] as second:
                for running in (first, second):
                    wait_for(lambda r=running: r.app.mqtt is not None and r.app.mqtt.published
                             > 0 and r.app.metrics.results > 0, 60, "results on MQTT")
                time.sleep(1.5)
            # gate-2 stopped cleanly: its status is now offline, its health stays retained
            result = invoke("fleet-status", "--broker", "127.0.0.1", "--port",
                            str(broker.port), "--wait", "1.5")
            check_fleet_pages(broker.port, tmp_path, first.app.card.version)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.strip().splitlines()
        assert lines[0].split()[:4] == ["device", "link", "health", "model"]
        rows = {line.split()[0]: line for line in lines[1:]}
        assert set(rows) == {"pole-7", "gate-2"}, result.stdout
        version = first.app.card.version
        sha = first.app.card.sha256[:12]
        for row in rows.values():
            assert version in row and sha in row, row
            assert "never" not in row, row
        assert rows["gate-2"].split()[1] == "offline", rows["gate-2"]
    finally:
        broker.stop()


def check_fleet_pages(port: int, tmp: Path, version: str) -> None:
    """The written page and the live one list both units; the live one in a real browser."""
    page = tmp / "fleet.html"
    result = invoke("fleet-status", "--broker", "127.0.0.1", "--port", str(port), "--wait",
                    "1.5", "--html", str(page))
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    for device in ("pole-7", "gate-2"):
        assert f'data-unit="{device}"' in text
    assert version in text and "offline" in text and "<script" not in text
    live = subprocess.Popen([*INVOKE, "fleet-status", "--broker", "127.0.0.1", "--port",
                             str(port), "--serve", "0"], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        assert live.stdout is not None
        line = live.stdout.readline()
        assert line.startswith("fleet page: http://127.0.0.1:"), line
        url = line.split()[2]
        with chromium((1200, 800)) as browser:
            browser.get(url)
            wait_for(lambda: len(browser.find_elements("css selector", "tr[data-unit]")) == 2,
                     60, "both units on the live page")
            gate = browser.find_element("css selector", "tr[data-unit=gate-2]").text
            assert "offline" in gate and version in gate, gate
            pole = browser.find_element("css selector", "tr[data-unit=pole-7]").text
            assert "online" in pole, pole
            link = browser.find_element("css selector", "tr[data-unit=pole-7] a")
            assert link.get_attribute("href").startswith("http://127.0.0.1:")
            browser.save_screenshot(str(artifacts("host") / "fleet-page.png"))
            assert console_errors(browser) == []
    finally:
        live.terminate()
        live.wait(30)


def test_fleet_status_names_an_unreachable_broker() -> None:
    result = invoke("fleet-status", "--broker", "127.0.0.1", "--port", "1", "--wait", "0.1")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "cannot reach the broker 127.0.0.1:1" in result.stderr


def test_the_fleet_page_shows_problems_and_stages_and_escapes_what_units_say() -> None:
    from edgebake_builder.fleet import UnitView
    from edgebake_builder.fleetpage import render
    from edgebake_builder.rollout.state import RolloutState, UnitRecord

    units = {"a": UnitView("a", "online", False, "v2", group="north",
                           problems=["camera <script>alert(1)</script> is down"],
                           os_version="1.4"),
             "b": UnitView("b", "offline", True, "v1", group="south")}
    state = RolloutState("0" * 64, "m.ebundle", "v2", "pi4", ["1", "100%"], [1, 2], 0, 60.0,
                         600.0, [UnitRecord("a", 0, "trial"), UnitRecord("b", 1)])
    page = render(units, state, now=1000.0)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "NOT HEALTHY" in page and "is down" in page
    assert "stage 1/2: trial" in page and "stage 2/2: waiting" in page
    assert "last seen" in page and "1.4" in page
    assert page.index("group north") < page.index("group south")

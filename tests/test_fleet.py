"""`invoke fleet-status` lists real running services from a real mosquitto, including the one
that went away (its last will says offline)."""

from __future__ import annotations

import time
from pathlib import Path

from edgebake_builder.validate.broker import LocalBroker
from edgebake_runtime.service import Service
from helpers import invoke
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


def test_fleet_status_names_an_unreachable_broker() -> None:
    result = invoke("fleet-status", "--broker", "127.0.0.1", "--port", "1", "--wait", "0.1")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "cannot reach the broker 127.0.0.1:1" in result.stderr

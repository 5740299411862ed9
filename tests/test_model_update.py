"""Model updates on a running service: a signed bundle is checked (signature, golden test,
latency), written to a slot, and served without a restart; a model that fails its health
window, or a reboot inside the window, goes back to the previous model by itself."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import invoke
from edgebake_runtime.app import App
from edgebake_runtime.bundle import BundleError
from edgebake_runtime.journal import read_lines
from edgebake_runtime.modelstore import ModelStore
from edgebake_runtime.update import apply, current_version
from runtime_helpers import RunningApp, make_config, replay_folder, wait_for

WINDOW_SEC = 3.0


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Version 2.0 carries BlazeFace full range (another input size: 192 instead of 128)."""
    from edgebake_builder.progress import Progress
    from edgebake_builder.steps.model import fetch_locked_model, read_models_lock

    folder = tmp_path_factory.mktemp("bundles")
    keys = folder / "keys"
    keys.mkdir()
    assert invoke("make-key", "--out", str(keys / "ops.key")).returncode == 0
    full = fetch_locked_model(read_models_lock()["face_detection_full_range"], Progress(1))
    made = invoke("make-bundle", "--model", str(full), "--key", str(keys / "ops.key"),
                  "--version", "2.0", "--out", str(folder / "v2.ebundle"))
    assert made.returncode == 0, made.stderr
    (keys / "ops.key").unlink()  # units hold only public keys
    return {"v2": folder / "v2.ebundle", "keys": keys}


def update_app(tmp: Path, model: Path, **sections: dict[str, Any]) -> App:
    return App(make_config(tmp, model, [{"name": "cam", "kind": "replay",
                                         "path": str(replay_folder(tmp)), "fps": 20}],
                           update={"dir": str(tmp / "models"), "window_sec": WINDOW_SEC,
                                   "poll_sec": 0.2},
                           **sections))


def install(app: App, bundle: Path, keys: Path, **settings: Any) -> str:
    baked = app.config.card_path or app.config.model_path.with_name(
        app.config.model_path.stem + ".card.json")
    return apply(bundle, app.store, keys, "pi4", current_version(app.store, baked),
                 {**app.config.section("update"), **settings}, allow_rollback=False)


def audit_steps(tmp: Path) -> list[str]:
    lines = (tmp / "models" / "audit.log").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_a_new_model_serves_without_a_restart_and_is_confirmed(
        tmp_path: Path, default_model: Path, bundles: dict[str, Path]) -> None:
    with RunningApp(update_app(tmp_path, default_model)) as running:
        wait_for(lambda: running.app.metrics.results >= 10, 30, "results from the image model")
        workers_before = {w.pid for w in running.app.workers}
        line = install(running.app, bundles["v2"], bundles["keys"])
        assert "model 2.0 installed and on trial" in line
        wait_for(lambda: running.health()["model"]["version"] == "2.0", 20, "the switch")
        served = running.app.metrics.results
        wait_for(lambda: running.app.metrics.results >= served + 10, 30, "results from 2.0")
        health = running.health()
        assert health["model"]["swaps"] == 1 and health["model"]["trial"]["version"] == "2.0"
        gap = health["model"]["last_switch_sec"]
        print(f"switch to 2.0: first result of the new model after {gap:.3f}s")
        assert {w.pid for w in running.app.workers}.isdisjoint(workers_before)
        wait_for(lambda: ModelStore(tmp_path / "models").state()["trial"] is None,
                 WINDOW_SEC + 10, "the trial to be confirmed")
        assert running.health()["healthy"]
    versions = [r["model"] for r in read_lines(tmp_path / "results")]
    assert versions[0] != "2.0" and versions[-1] == "2.0"
    steps = audit_steps(tmp_path)
    assert steps[:5] == ["received", "signature ok", "golden test ok", "latency ok",
                         "trial started"]
    assert "serving" in steps and steps[-1] == "confirmed"


def test_a_hung_new_model_is_rolled_back_by_itself(
        tmp_path: Path, default_model: Path, bundles: dict[str, Path]) -> None:
    app = update_app(tmp_path, default_model, watchdog={"stall_sec": 2.0})
    with RunningApp(app) as running:
        wait_for(lambda: running.app.metrics.results >= 5, 30, "first results")
        install(running.app, bundles["v2"], bundles["keys"])
        wait_for(lambda: running.app.card.version == "2.0", 20, "the switch")
        hung = running.app.workers[0].pid
        os.kill(hung, signal.SIGSTOP)
        try:
            wait_for(lambda: running.app.card.version != "2.0", 30, "the rollback")
        finally:
            os.kill(hung, signal.SIGCONT)
        served = running.app.metrics.results
        wait_for(lambda: running.app.metrics.results > served + 5, 30,
                 "results from the image model again")
    state = ModelStore(tmp_path / "models").state()
    assert state["current"] is None and state["trial"] is None
    assert "rollback" in audit_steps(tmp_path)


def test_a_reboot_inside_the_window_rolls_back(
        tmp_path: Path, default_model: Path, bundles: dict[str, Path]) -> None:
    app = update_app(tmp_path, default_model)
    install(app, bundles["v2"], bundles["keys"])
    app.stop()
    store = ModelStore(tmp_path / "models")
    state = store.state()
    state["trial"]["boot_id"] = "an-earlier-boot"
    (tmp_path / "models" / "state.json").write_text(json.dumps(state))
    again = update_app(tmp_path, default_model)
    try:
        assert again.card.version != "2.0" and store.state()["current"] is None
    finally:
        again.stop()
    assert audit_steps(tmp_path)[-1] == "rollback"


def test_refused_updates_change_nothing(tmp_path: Path, default_model: Path,
                                        bundles: dict[str, Path]) -> None:
    app = update_app(tmp_path, default_model)
    try:
        with pytest.raises(BundleError, match=r"exceeds update\.max_latency_ms"):
            install(app, bundles["v2"], bundles["keys"], max_latency_ms=0.001)
        empty = tmp_path / "no-keys"
        empty.mkdir()
        with pytest.raises(BundleError, match="accepts no updates"):
            install(app, bundles["v2"], empty)
        install(app, bundles["v2"], bundles["keys"])
        with pytest.raises(BundleError, match=r"not newer than the current 2\.0"):
            install(app, bundles["v2"], bundles["keys"])
    finally:
        app.stop()
    slots = sorted(p.name for p in (tmp_path / "models" / "slots").iterdir())
    assert slots == ["2.0"], slots  # the refused attempts left nothing behind

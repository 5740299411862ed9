"""Model updates on a running service: a signed bundle is checked (signature, golden test,
latency), written to a slot, and served without a restart; a model that fails its health
window, or a reboot inside the window, goes back to the previous model by itself."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from edgebake_runtime.bundle import BundleError
from edgebake_runtime.journal import read_lines
from edgebake_runtime.modelstore import ModelStore
from edgebake_runtime.service import Service
from helpers import BundleServer, invoke
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
    # units hold only public keys: the private one stays beside the keys folder
    assert invoke("make-key", "--out", str(folder / "ops.key")).returncode == 0
    (keys / "ops.pub").write_bytes((folder / "ops.key.pub").read_bytes())
    full = fetch_locked_model(read_models_lock()["face_detection_full_range"], Progress(1))
    made = invoke("make-bundle", "--model", str(full), "--key", str(folder / "ops.key"),
                  "--version", "2.0", "--out", str(folder / "v2.ebundle"))
    assert made.returncode == 0, made.stderr
    return {"v2": folder / "v2.ebundle", "keys": keys, "key": folder / "ops.key"}


def update_app(tmp: Path, model: Path, fps: float = 20, window_sec: float = WINDOW_SEC,
               **sections: dict[str, Any]) -> Service:
    update = {"dir": str(tmp / "models"), "window_sec": window_sec, "poll_sec": 0.2,
              "keys_dir": str(tmp / "update-keys"), "target_file": str(tmp / "target"),
              **sections.pop("update", {})}
    return Service(make_config(tmp, model, [{"name": "cam", "kind": "replay",
                                         "path": str(replay_folder(tmp)), "fps": fps}],
                           update=update, **sections))


def install(app: Service, bundle: Path, keys: Path, **settings: Any) -> str:
    """`edgebake-update apply` on this unit, which trusts the keys in `keys` (only) from now
    on."""
    shutil.rmtree(app.config.update.keys_dir, ignore_errors=True)
    shutil.copytree(keys, app.config.update.keys_dir)
    Path(app.config.update.target_file).write_text("pi4\n")
    updates = app.rollout.updates
    return dataclasses.replace(updates, settings=dataclasses.replace(
        updates.settings, **settings)).apply(bundle)


def audit_entries(tmp: Path, step: str | None = None) -> list[dict[str, Any]]:
    """The model audit log's entries, or only those of one step."""
    lines = (tmp / "models" / "audit.log").read_text().splitlines()
    return [e for e in map(json.loads, lines) if step is None or e["step"] == step]


def audit_steps(tmp: Path) -> list[str]:
    return [entry["step"] for entry in audit_entries(tmp)]


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
        # on a slow host the 3 s window may be over by now: on trial, or already confirmed
        trial = health["model"]["trial"]
        assert health["model"]["swaps"] == 1 and (trial is None or trial["version"] == "2.0")
        assert "trial started" in audit_steps(tmp_path)
        gap = health["model"]["last_switch_sec"]
        print(f"switch to 2.0: first result of the new model after {gap:.3f}s")
        # the camera processes switched in place, no restart
        assert {w.pid for w in running.app.workers} == workers_before
        wait_for(lambda: all(p["model"] == "2.0" for p in
                             running.health()["inference"]["processes"]), 5,
                 "every camera process to report 2.0")
        wait_for(lambda: ModelStore(tmp_path / "models").state()["trial"] is None,
                 WINDOW_SEC + 10, "the trial to be confirmed")
        assert running.health()["healthy"]
    versions = [r["model"] for r in read_lines(tmp_path / "results")]
    assert versions[0] != "2.0" and versions[-1] == "2.0"
    steps = audit_steps(tmp_path)
    assert steps[:5] == ["received", "signature ok", "golden test ok", "latency ok",
                         "trial started"]
    assert "serving" in steps and steps[-1] == "confirmed"


def test_a_model_is_confirmed_only_once_it_has_made_enough_inferences_to_judge(
        tmp_path: Path, default_model: Path, bundles: dict[str, Path]) -> None:
    """A slow camera (4 fps) ends the 3 s window with about 12 inferences, fewer than the 20
    update.min_trial_inferences asks for: the trial goes on until there are 20."""
    with RunningApp(update_app(tmp_path, default_model, fps=4)) as running:
        wait_for(lambda: running.app.metrics.results >= 2, 60, "first results")
        install(running.app, bundles["v2"], bundles["keys"])
        trials: list[dict[str, Any]] = []

        def confirmed() -> bool:
            trials.append(running.health()["model"]["trial"])
            return ModelStore(tmp_path / "models").state()["trial"] is None

        wait_for(confirmed, 180, "the trial to be confirmed")
    confirm = audit_entries(tmp_path, "confirmed")
    assert len(confirm) == 1 and confirm[0]["inferences"] >= 20, confirm
    shown = [t for t in trials if t]
    assert all(t["inferences_needed"] == 20 and t["inferences"] >= 0 for t in shown), shown


def test_a_model_that_never_shows_enough_inferences_is_rolled_back(
        tmp_path: Path, default_model: Path, bundles: dict[str, Path]) -> None:
    """Evidence that never comes (more inferences asked for than half a minute brings) is no
    reason to keep a model: it goes back half a minute after its (zero) window, with the
    reason."""
    from edgebake_runtime.rollout import EVIDENCE_WAIT_MIN_SEC

    app = update_app(tmp_path, default_model, fps=4, window_sec=0.0,
                     update={"min_trial_inferences": 100000})
    with RunningApp(app) as running:
        wait_for(lambda: running.app.metrics.results >= 2, 60, "first results")
        install(running.app, bundles["v2"], bundles["keys"])
        began = time.monotonic()
        wait_for(lambda: running.app.card.version == "2.0", 20, "the switch")
        wait_for(lambda: running.app.card.version != "2.0", EVIDENCE_WAIT_MIN_SEC + 120,
                 "the rollback")
        assert time.monotonic() - began >= EVIDENCE_WAIT_MIN_SEC
    rollback = audit_entries(tmp_path, "rollback")
    assert len(rollback) == 1 and "a model is kept after 100000" in rollback[0]["reason"]
    assert ModelStore(tmp_path / "models").state()["current"] is None


def test_a_hung_new_model_is_rolled_back_by_itself(
        tmp_path: Path, default_model: Path, bundles: dict[str, Path]) -> None:
    app = update_app(tmp_path, default_model, watchdog={"stall_sec": 2.0})
    with RunningApp(app) as running:
        wait_for(lambda: running.app.metrics.results >= 5, 30, "first results")
        install(running.app, bundles["v2"], bundles["keys"])
        wait_for(lambda: running.app.card.version == "2.0", 20, "the switch")
        hung = running.app.workers[0].pid
        os.kill(hung, signal.SIGSTOP)
        began = time.monotonic()
        try:
            wait_for(lambda: running.app.card.version != "2.0", 30, "the rollback")
        finally:
            with contextlib.suppress(ProcessLookupError):  # a camera process is replaced
                os.kill(hung, signal.SIGCONT)
        rolled_back = time.monotonic() - began
        served = running.app.metrics.results
        wait_for(lambda: running.app.metrics.results > served + 5, 30,
                 "results from the image model again")
        print(f"hung model: rolled back {rolled_back:.2f}s after it stopped (stall_sec 2.0), "
              f"results again {time.monotonic() - began:.2f}s after")
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
        # a second update while 2.0 is on trial would make 2.0, unproven, the fallback
        with pytest.raises(BundleError, match=r"model 2\.0 is on trial"):
            install(app, bundles["v2"], bundles["keys"])
        app.store.confirm()  # 2.0 passed its window: the unit's floor
        assert app.store.rollback() is None  # asked by hand: back to the image's model
        with pytest.raises(BundleError, match=r"not newer than the current 2\.0"):
            install(app, bundles["v2"], bundles["keys"])  # a replay of an older bundle
    finally:
        app.stop()
    slots = sorted(p.name for p in (tmp_path / "models" / "slots").iterdir())
    assert slots == ["2.0"], slots  # the refused attempts left nothing behind


def test_the_latency_check_is_bounded_in_time_and_never_under_its_minimum(
        default_model: Path) -> None:
    """A unit that takes a second a frame must not spend twenty on an update's latency
    check: past the budget it stops, but only after its minimum of invokes."""
    from edgebake_runtime.interp import load_interpreter
    from edgebake_runtime.update import LATENCY_MIN_RUNS, LATENCY_RUNS, invoke_times

    interpreter = load_interpreter(default_model, num_threads=1)
    assert len(invoke_times(interpreter, budget_sec=0.0)) == LATENCY_MIN_RUNS
    assert len(invoke_times(interpreter, budget_sec=3600.0)) == LATENCY_RUNS
    assert LATENCY_MIN_RUNS < LATENCY_RUNS


def test_http_pull_applies_a_new_bundle_once_and_then_asks_with_its_etag(
        tmp_path: Path, default_model: Path, bundles: dict[str, Path]) -> None:
    (tmp_path / "target").write_text("pi4\n")
    with BundleServer(bundles["v2"]) as server:
        app = update_app(tmp_path, default_model)
        raw = dict(app.config.raw)
        raw["update"] = {**raw["update"], "pull_url": server.url(), "pull_sec": 10.0,
                         "keys_dir": str(bundles["keys"]),
                         "target_file": str(tmp_path / "target")}
        from edgebake_runtime.config import validate

        with RunningApp(Service(validate(raw, "test config"))) as running:
            wait_for(lambda: running.health()["model"]["version"] == "2.0", 60,
                     "the pulled model to serve")
            pull = running.health()["update"]["pull"]
            assert "model 2.0 installed and on trial" in pull["last_result"], pull
            assert pull["downloads"] == 1 and server.served == 1
            wait_for(lambda: server.not_modified >= 1, 30, "the next poll with If-None-Match")
            assert server.served == 1
            assert running.health()["update"]["pull"]["not_modified"] >= 1
            assert running.health()["healthy"]
        assert "received" in audit_steps(tmp_path)
        assert not list((tmp_path / "models" / "incoming").glob("*")), "download left behind"


def test_http_pull_remembers_a_refused_bundle(tmp_path: Path, bundles: dict[str, Path]
                                              ) -> None:
    from edgebake_runtime.pull import BundlePuller

    store = ModelStore(tmp_path / "models")
    store.root.mkdir(parents=True)
    refusals: list[Path] = []

    def refuse(path: Path) -> str:
        refusals.append(path)
        raise BundleError(f"{path}: made for target 'pi4', this is 'pi5'")

    with BundleServer(bundles["v2"], etag='"other-target"') as server:
        puller = BundlePuller(server.url(), 60.0, store.root, refuse, "edgebake/test")
        assert puller.poll_once() == "refused"
        assert "this is 'pi5'" in puller.stats()["last_result"]
        assert puller.poll_once() == "not-modified"  # not fetched and refused again
        # a new unit process remembers it too (the ETag is kept on /data)
        again = BundlePuller(server.url(), 60.0, store.root, refuse, "edgebake/test")
        assert again.poll_once() == "not-modified"
    assert len(refusals) == 1 and server.served == 1
    assert not list((store.root / "incoming").glob("*"))


def test_mqtt_orders_for_a_group_and_for_one_unit(tmp_path: Path, default_model: Path,
                                                   bundles: dict[str, Path]) -> None:
    """Over TLS with a login: a signed URL order on the group's topic is fetched and applied;
    the same order again (a replay), an unsigned order and an order signed for another unit
    are refused before anything is fetched; a tampered bundle sent inline in a signed order
    to the unit's own topic is refused; each step is reported, retained."""
    import paho.mqtt.client as mqtt
    from edgebake_builder.signing import read_private_key, sign_order
    from edgebake_builder.validate.broker import LocalBroker
    from edgebake_runtime.config import validate
    from edgebake_runtime.pull import origin

    key = read_private_key(bundles["key"])
    broker = LocalBroker.start_tls()
    assert broker.tls is not None
    (tmp_path / "target").write_text("pi4\n")
    statuses: list[dict[str, Any]] = []
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)  # type: ignore[attr-defined]
    watcher.tls_set(ca_certs=str(broker.tls.ca_file))
    watcher.username_pw_set(broker.tls.username, broker.tls.password)
    watcher.on_message = lambda c, u, m: statuses.append(json.loads(m.payload))
    subscribed = threading.Event()
    watcher.on_subscribe = lambda *args: subscribed.set()
    try:
        with BundleServer(bundles["v2"]) as server:
            app = update_app(tmp_path, default_model)
            raw = dict(app.config.raw, device_id="pole-7")
            raw["mqtt"] = {**raw["mqtt"], "enabled": True, "host": "127.0.0.1",
                           "port": broker.port, "username": broker.tls.username,
                           "password": broker.tls.password,
                           "tls": {"enabled": True, "ca_file": str(broker.tls.ca_file)}}
            raw["update"] = {**raw["update"], "mqtt_commands": True, "mqtt_group": "north",
                             "keys_dir": str(bundles["keys"]),
                             "target_file": str(tmp_path / "target"),
                             "allowed_origins": [origin(server.url())]}
            with RunningApp(Service(validate(raw, "test config"))) as running:
                wait_for(lambda: running.app.mqtt is not None and
                         running.app.mqtt.connected.is_set(), 20, "the MQTT connection")
                watcher.connect("127.0.0.1", broker.port)
                watcher.subscribe("edgebake/pole-7/update/status", qos=1)
                watcher.loop_start()
                # no step report may go out before the watcher listens
                assert subscribed.wait(20), "the watcher's subscription was not acknowledged"
                ordered = sign_order(key, "group/north", url=server.url())
                watcher.publish("edgebake/group/north/update", ordered, qos=1)
                wait_for(lambda: running.health()["model"]["version"] == "2.0", 60,
                         "the ordered model to serve")
                wait_for(lambda: any(s["step"] == "applied" for s in statuses), 20,
                         "the applied report")
                # no update is taken while 2.0 is on trial: wait for its window to pass
                wait_for(lambda: running.health()["model"]["trial"] is None, WINDOW_SEC + 30,
                         "2.0 to be confirmed")
                for topic, payload in [
                        ("edgebake/group/north/update", ordered),  # a replay
                        ("edgebake/pole-7/update", json.dumps({"url": server.url()})),
                        ("edgebake/pole-7/update", sign_order(key, "pole-8", url=server.url()))]:
                    refusals = sum(s["step"] == "refused" for s in statuses)
                    watcher.publish(topic, payload, qos=1)
                    wait_for(lambda before=refusals: sum(  # type: ignore[misc]
                        s["step"] == "refused" for s in statuses) > before, 30,
                        f"the refusal of an order on {topic}")
                tampered = Path(__file__).parent / "corpus" / "bundles" / "tampered.ebundle"
                watcher.publish("edgebake/pole-7/update",
                                sign_order(key, "pole-7", bundle=tampered.read_bytes()), qos=1)
                wait_for(lambda: sum(s["step"] == "refused" for s in statuses) == 4, 30,
                         "the tampered bundle's refusal report")
                orders = running.health()["update"]["orders"]
                assert orders["applied"] == 1 and orders["refused"] == 4, orders
                assert running.health()["model"]["version"] == "2.0"
                wait_for(lambda: running.health()["healthy"], 30, "a healthy unit")
        steps = [s["step"] for s in statuses]
        assert steps == ["downloading", "checking", "applied", "confirmed", "refused",
                         "refused", "refused", "checking", "refused"], steps
        # the verdict answers the order that began the trial, by its number
        ordered_seq = json.loads(ordered.partition(b"\n")[2])["seq"]
        assert [s["seq"] for s in statuses[:4]] == [ordered_seq] * 4, statuses[:4]
        assert statuses[3]["version"] == "2.0", statuses[3]
        details = [s["detail"] for s in statuses if s["step"] == "refused"]
        assert "a replayed order" in details[0], details
        assert "not a signed order" in details[1], details
        assert "order for 'pole-8'" in details[2], details
        assert "an unknown key" in details[3] or "tampered" in details[3], details
    finally:
        watcher.loop_stop()
        broker.stop()


def test_orders_go_only_to_allowed_origins_never_elsewhere_and_are_rate_limited(
        tmp_path: Path) -> None:
    """An ordered URL outside update.allowed_origins, or one whose server redirects to
    another origin, is refused before anything is applied; past MAX_ORDERS an hour, orders
    are refused and counted."""
    import http.server

    from edgebake_runtime import commands
    from edgebake_runtime.pull import origin

    applied: list[Path] = []

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_port}/b")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    allowed = f"http://127.0.0.1:{server.server_port}"
    try:
        # orders taken as signed (the signature's own checks are the MQTT test's)
        orders = commands.UpdateCommands(tmp_path, lambda to, payload: json.loads(payload),
                                         lambda p, seq, window: applied.append(p) or "ok",
                                         "test", (allowed,))
        reports: list[tuple[str, str]] = []
        orders.publish = lambda step, detail, seq, version: reports.append((step, detail))
        assert orders.handle("t", json.dumps({"url": "https://evil.example/b"}).encode()) \
            == "refused"
        assert "not in update.allowed_origins" in reports[-1][1], reports
        # the allowed server points to another origin (localhost is not 127.0.0.1)
        assert orders.handle("t", json.dumps({"url": f"{allowed}/b"}).encode()) == "error"
        assert "redirect to another origin" in reports[-1][1], reports
        assert origin(f"{allowed}/b") == allowed and not applied
        for _ in range(commands.MAX_ORDERS):
            orders.handle("t", json.dumps({"url": "https://evil.example/b"}).encode())
        assert "orders in 60 min" in reports[-1][1] and orders.limited >= 1, reports[-1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def trial(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bundles `test-image` applies to the booted unit, with the key that signed them."""
    from edgebake_builder.progress import Progress
    from edgebake_builder.validate.trialbundles import make_trial_bundles

    folder = tmp_path_factory.mktemp("trial")
    made = make_trial_bundles(folder / "bundles", "pi4", Progress(1))
    keys = folder / "keys"
    keys.mkdir()
    (keys / "trial.pub").write_text(made.public_key + "\n")
    return {**made.paths, "keys": keys}


@pytest.mark.parametrize(("name", "refusal"), [
    ("tampered", "model.tflite does not match its signed sha256 (tampered)"),
    ("golden", "golden test failed with"),
])
def test_a_bad_bundle_is_refused_and_changes_nothing(tmp_path: Path, default_model: Path,
                                                     trial: dict[str, Path], name: str,
                                                     refusal: str) -> None:
    app = update_app(tmp_path, default_model)
    try:
        before = app.store.state()
        with pytest.raises(BundleError) as refused:
            install(app, trial[name], trial["keys"])
        assert refusal in str(refused.value), refused.value
        assert app.store.state() == before
        slots = tmp_path / "models" / "slots"
        assert not slots.exists() or not any(slots.iterdir())
        assert "trial started" not in audit_steps(tmp_path)
    finally:
        app.stop()


def test_a_model_whose_every_decode_fails_is_rolled_back_by_itself(
        tmp_path: Path, default_model: Path, trial: dict[str, Path]) -> None:
    """Signature, golden test and latency pass (they check the model, not the decoding); in
    service every frame fails to decode, and the health window takes the model back."""
    app = Service(make_config(tmp_path, default_model, [
        {"name": "cam", "kind": "replay", "path": str(replay_folder(tmp_path)), "fps": 20}],
        update={"dir": str(tmp_path / "models"), "window_sec": 600.0, "poll_sec": 0.2}))
    with RunningApp(app) as running:
        wait_for(lambda: running.app.metrics.results >= 5, 30, "first results")
        line = install(running.app, trial["undecodable"], trial["keys"])
        assert "1.7 installed and on trial" in line, line
        wait_for(lambda: running.app.card.version == "1.7", 20, "the switch to 1.7")
        began = time.monotonic()
        wait_for(lambda: running.app.card.version != "1.7", 60, "the rollback")
        print(f"undecodable model: rolled back {time.monotonic() - began:.2f}s after it "
              "started serving")
        served = running.app.metrics.results
        wait_for(lambda: running.app.metrics.results > served + 5, 30,
                 "results from the image model again")
        assert running.health()["model"]["trial"] is None
    rollback = audit_entries(tmp_path, "rollback")[0]
    assert "inference errors" in rollback["reason"] or "unhealthy" in rollback["reason"], rollback
    assert ModelStore(tmp_path / "models").state()["current"] is None


def test_root_follows_no_link_the_service_planted_in_its_model_folder(
        tmp_path: Path, default_model: Path, bundles: dict[str, Path]) -> None:
    """The USB update runs as root over /data/models, which the service account owns: links
    planted there (by a compromised service) must not make root write, truncate or chown
    anything outside it. Before, `incoming/usb-<name>` was written through such a link."""
    from edgebake_runtime.config import validate
    from edgebake_runtime.update import UnitUpdates
    from edgebake_runtime.usbupdate import apply_from

    victim = tmp_path / "cmdline.txt"
    victim.write_text("console=serial0 root=PARTUUID=x\n")
    victim_dir = tmp_path / "etc"
    victim_dir.mkdir()
    (victim_dir / "shadow").write_text("root:*:1::::::\n")
    store = tmp_path / "models"
    for folder in (store, store / "incoming", store / "slots"):
        folder.mkdir()
    (store / "incoming" / "usb-model-2.0.ebundle").symlink_to(victim)
    (store / "audit.log").symlink_to(victim)
    (store / "slots" / "9.9").symlink_to(victim_dir)
    for path in (store, store / "incoming", store / "slots"):
        os.chown(path, 4242, 4242)  # the service account's, as on a unit
    stick = tmp_path / "stick"
    (stick / "edgebake").mkdir(parents=True)
    (stick / "edgebake" / "model-2.0.ebundle").write_bytes(bundles["v2"].read_bytes())
    (tmp_path / "target").write_text("pi4\n")
    settings = validate({"update": {"dir": str(store), "keys_dir": str(bundles["keys"]),
                                    "target_file": str(tmp_path / "target"),
                                    "max_latency_ms": 60000}}, "test").update
    updates = UnitUpdates(settings, ModelStore(store),
                          default_model.with_name(default_model.stem + ".card.json"))
    lines = apply_from(stick, updates)
    assert "installed and on trial" in lines[0], lines
    assert victim.read_text() == "console=serial0 root=PARTUUID=x\n"
    assert (victim_dir / "shadow").stat().st_uid == 0, "root chowned through a link"
    assert (store / "slots" / "2.0" / "model.tflite").stat().st_uid == 4242
    assert ModelStore(store).state()["current"] == "2.0"


def test_threads_are_measured_at_start_kept_and_measured_again_for_a_new_model(
        tmp_path: Path, default_model: Path, bundles: dict[str, Path]) -> None:
    """inference.num_threads: 0 (the default): 1, 2 and all cores are measured before the
    cameras start, the choice is kept on /data and reused by the next start, and a new model
    is measured again at its switch; each camera process runs with the chosen threads."""
    from edgebake_runtime.cameras import cores
    from edgebake_runtime.threadtune import STORE_NAME, candidates

    store = tmp_path / "models" / STORE_NAME
    with RunningApp(update_app(tmp_path, default_model, inference={"num_threads": 0})
                    ) as running:
        wait_for(lambda: running.app.metrics.results >= 5, 30, "results")
        shown = running.health()["inference"]["threads"]
        assert shown["chosen_by"] == "measurement", shown
        assert sorted(int(n) for n in shown["results_per_sec"]) == candidates(cores())
        assert all(rate > 0 for rate in shown["results_per_sec"].values()), shown
        assert shown["threads"] in candidates(cores()) and not shown["measured_while_serving"]
        assert {p["threads"] for p in running.health()["inference"]["processes"]} == \
            {min(shown["threads"], cores())}
        first = json.loads(store.read_text())
    with RunningApp(update_app(tmp_path, default_model, inference={"num_threads": 0})
                    ) as running:  # the same model, cameras and cores: not measured again
        wait_for(lambda: running.app.metrics.results >= 5, 30, "results after a restart")
        assert json.loads(store.read_text()) == first
        install(running.app, bundles["v2"], bundles["keys"])
        wait_for(lambda: running.health()["model"]["version"] == "2.0", 30, "the switch")
        again = json.loads(store.read_text())
        assert again["model_sha256"] != first["model_sha256"]
        assert again["measured_while_serving"] is True
        shown = running.health()["inference"]["threads"]
        assert shown["model_sha256"] == again["model_sha256"][:16]
        wait_for(lambda: {p["threads"] for p in running.health()["inference"]["processes"]}
                 == {again["threads"]}, 10, "the camera processes on the new threads")
    with RunningApp(update_app(tmp_path, default_model, inference={"num_threads": 3})
                    ) as running:  # a number in the config wins and nothing is measured
        wait_for(lambda: running.app.metrics.results >= 5, 30, "results, threads fixed")
        assert running.health()["inference"]["threads"] == {
            "chosen_by": "inference.num_threads", "configured": 3}


def test_the_fastest_variant_that_passes_its_checks_is_run(tmp_path: Path) -> None:
    """An image's model with other precisions beside it (`<model>.variants/`): each variant
    that is the same model (version, task, labels) and passes its golden test with this
    runtime is measured with the model's thread counts, and the cameras run the fastest.
    Here the model is BlazeFace full range and a stand-in for a cheaper precision is the
    short-range network (a quarter of the pixels) under the same card identity; a variant
    with another version and one whose golden test fails are left out, and say why."""
    import shutil

    from edgebake_builder.convert.isolated import write_card
    from edgebake_builder.progress import Progress
    from edgebake_builder.steps.model import fetch_locked_model, read_models_lock
    from edgebake_runtime.threadtune import STORE_NAME

    lock = read_models_lock()
    full = fetch_locked_model(lock["face_detection_full_range"], Progress(1))
    short = fetch_locked_model(lock["face_detection_short_range"], Progress(1))
    folder = tmp_path / "model"
    variants = folder / "face.variants"
    variants.mkdir(parents=True)
    model = folder / "face.tflite"
    shutil.copyfile(full, model)
    write_card(model, folder / "face.card.json", "face", {"version": "1.0"})
    for name, version in (("short", "1.0"), ("other", "9.9")):
        shutil.copyfile(short, variants / f"{name}.tflite")
        write_card(variants / f"{name}.tflite", variants / f"{name}.card.json", "face",
                   {"version": version})
    # the full-range card and golden outputs beside the short-range network: golden fails
    shutil.copyfile(short, variants / "broken.tflite")
    shutil.copyfile(folder / "face.card.json", variants / "broken.card.json")
    shutil.copyfile(folder / "face.golden.npz", variants / "face.golden.npz")
    app = Service(make_config(tmp_path, model,
                              [{"name": "door", "kind": "replay",
                                "path": str(replay_folder(tmp_path)), "fps": 10}],
                              inference={"num_threads": 0}))
    with RunningApp(app) as running:
        wait_for(lambda: running.app.metrics.results >= 5, 60, "results")
        shown = running.health()["inference"]["threads"]
        assert shown["variant"] == "short", shown
        assert set(shown["variants"]) == {"short"}, shown
        assert "version differs" in shown["refused"]["other"], shown
        assert shown["refused"]["broken"].startswith("golden test"), shown
        assert running.app.cameras.processes[0].model == variants / "short.tflite"
        assert running.health()["model"]["version"] == "1.0"
        kept = json.loads((tmp_path / "models" / STORE_NAME).read_text())
        assert kept["variant_path"] == str(variants / "short.tflite"), kept
        assert max(kept["variants"]["short"].values()) > max(kept["results_per_sec"].values())
    records = list(read_lines(tmp_path / "results"))
    assert records and {r["model"] for r in records} == {"1.0"}


def test_an_images_model_variants_are_installed_beside_it_as_the_unit_finds_them(
        tmp_path: Path) -> None:
    """recipe `model.variants`: each is copied beside the model in `<stem>.variants/` with a
    card of the model's version, where the unit's measurement finds it; a variant that is
    another kind of model is refused in one line naming the file and the field."""
    from edgebake_builder.errors import BuildError
    from edgebake_builder.progress import Progress
    from edgebake_builder.steps.install import MODEL_DIR, install_model
    from edgebake_builder.steps.model import (
        fetch_locked_model,
        prepare_model,
        prepare_variants,
        read_models_lock,
    )
    from edgebake_builder.steps.rootfs import inside
    from edgebake_runtime.threadtune import tune, variants_of

    lock = read_models_lock()
    full = fetch_locked_model(lock["face_detection_full_range"], Progress(1))
    short = fetch_locked_model(lock["face_detection_short_range"], Progress(1))
    main = prepare_model(str(full), tmp_path / "work", Progress(1))
    prepared = prepare_variants([str(short)], main, Progress(1))
    rootfs = tmp_path / "rootfs"
    installed = inside(rootfs, install_model(prepared, rootfs))
    assert installed.parent == inside(rootfs, MODEL_DIR)
    found = variants_of(installed)
    assert [p.name for p in found] == [short.name]
    card = json.loads(found[0].with_name(f"{short.stem}.card.json").read_text())
    assert card["version"] == main.card["version"] and card["sha256"] != main.card["sha256"]
    tuning = tune(installed, 1, 1, None, seconds=0.2)
    assert set(tuning.variants) == {short.stem} and not tuning.refused, tuning
    # another kind of model under a card that says so
    other = tmp_path / "other" / "labels.tflite"
    other.parent.mkdir()
    shutil.copyfile(short, other)
    with_card = prepare_model(str(other), tmp_path / "work2", Progress(1))
    data = dict(with_card.card, labels=["cat", "dog"])
    (other.parent / "labels.card.json").write_text(json.dumps(data))
    with pytest.raises(BuildError, match=r"model.variants: .*labels.tflite: its card's labels"):
        prepare_variants([str(other)], main, Progress(1))

"""The runtime as a process: systemd notify protocol, watchdog under SIGSTOP, kill -9, MQTT."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from edgebake_builder.validate.qemu import free_port
from edgebake_runtime.journal import Journal, journal_files, read_lines, repair_tail
from runtime_helpers import make_config, replay_folder, wait_for, write_config

ROOT = Path(__file__).resolve().parents[1]


class NotifySocket:
    """A real AF_UNIX datagram socket playing systemd's part."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data))

    def times(self, key: str, after: float = 0.0) -> list[float]:
        return [t for t, m in self.messages if key in m.split("\n") and t >= after]

    def close(self) -> None:
        self.sock.close()


def start_runtime(config: Path, notify: Path | None, watchdog_usec: int | None
                  ) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify)
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return subprocess.Popen([sys.executable, "-m", "edgebake_runtime.main", "--config",
                             str(config), "--overrides", "/nonexistent"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_ready_watchdog_and_sigstop(tmp_path: Path, default_model: Path) -> None:
    folder = replay_folder(tmp_path)
    config = write_config(tmp_path, make_config(
        tmp_path, default_model, [{"name": "cam", "kind": "replay", "path": str(folder),
                                  "fps": 10, "max_age_sec": 2.0}],
        http={"enabled": False}, watchdog={"stall_sec": 2.0}))
    notify = NotifySocket(tmp_path / "notify.sock")
    watchdog_sec = 2.0
    proc = start_runtime(config, notify.path, int(watchdog_sec * 1e6))
    try:
        notify.pump(1.0)
        deadline = time.monotonic() + 30
        while not notify.times("READY=1") and time.monotonic() < deadline:
            notify.pump(0.5)
        assert notify.times("READY=1"), "no READY=1 within 30 s"
        ready_at = notify.times("READY=1")[0]
        assert any(m.startswith("STATUS=running") or "\nSTATUS=running" in m
                   for _, m in notify.messages), "STATUS= should say it is running"
        notify.pump(3.0)
        pings = notify.times("WATCHDOG=1", after=ready_at)
        assert len(pings) >= 3, f"expected pings every {watchdog_sec / 2}s, got {len(pings)}"
        # Freeze the whole process, as a hung worker would: the pings must stop.
        os.kill(proc.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        notify.pump(watchdog_sec * 1.5)
        late = notify.times("WATCHDOG=1", after=stopped_at + 0.3)
        assert late == [], "watchdog pings continued while the process was stopped"
        os.kill(proc.pid, signal.SIGCONT)
        notify.pump(3.0)
        # After SIGCONT the source is stale until a fresh frame arrives, then pings resume.
        assert notify.times("WATCHDOG=1", after=stopped_at + watchdog_sec * 1.5)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        code = proc.wait(20)
        notify.pump(0.5)  # what the runtime sent while stopping is still in the socket
        notify.close()
    assert code == 0, proc.stderr.read().decode() if proc.stderr else ""
    assert notify.times("STOPPING=1")


def test_gone_camera_degrades_but_keeps_the_pings(tmp_path: Path, default_model: Path) -> None:
    """A camera that is gone cannot be fixed by a restart: the unit says so in STATUS and
    /health, keeps pinging the watchdog, and the other camera keeps producing results."""
    folder = replay_folder(tmp_path)
    config = write_config(tmp_path, make_config(
        tmp_path, default_model,
        [{"name": "cam", "kind": "replay", "path": str(folder), "fps": 10, "loop": True},
         {"name": "gone", "kind": "v4l2", "device": str(tmp_path / "video9"),
          "max_age_sec": 1.0}],
        http={"enabled": False}))
    notify = NotifySocket(tmp_path / "notify.sock")
    proc = start_runtime(config, notify.path, 1_000_000)
    try:
        notify.pump(10.0)
        ready = notify.times("READY=1")
        assert ready, notify.messages[-5:]
        pings = notify.times("WATCHDOG=1", after=ready[0] + 2.0)
        assert len(pings) >= 6, f"pings stopped for a camera a restart cannot fix: {pings}"
        statuses = [m for _, m in notify.messages if "STATUS=degraded" in m]
        assert statuses and "gone" in statuses[-1], notify.messages[-3:]
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(20)
        notify.close()
    lines = sum(len(f.read_text().splitlines()) for f in (tmp_path / "results").glob("*.jsonl"))
    assert lines >= 20


def test_bad_model_exits_nonzero_with_status(tmp_path: Path, default_model: Path) -> None:
    model = tmp_path / "bad.tflite"
    model.write_bytes(b"\x00" * 64)
    config = write_config(tmp_path, make_config(tmp_path, model,
                                                [{"name": "s", "kind": "synthetic"}]))
    notify = NotifySocket(tmp_path / "notify.sock")
    proc = start_runtime(config, notify.path, None)
    code = proc.wait(30)
    notify.pump(0.5)
    notify.close()
    assert code == 3
    status = " ".join(m for _, m in notify.messages)
    assert "STATUS=failed" in status and "not a TFLite model" in status
    assert not (tmp_path / "results").exists()


JOURNAL_WRITER = """
import sys, time
sys.path.insert(0, {runtime!r})
from pathlib import Path
from edgebake_builder.validate.qemu import free_port
from edgebake_runtime.journal import Journal
j = Journal(Path(sys.argv[1]), fsync_interval_sec=0.01, rotate_bytes=20000)
j.open()
print("open", flush=True)
n = 0
while True:
    n += 1
    j.append({{"seq": n, "pad": "x" * (n % 97), "detections": [{{"box": [0.1, 0.2, 0.3, 0.4]}}]}})
"""


def test_kill_9_during_writes_leaves_no_torn_line(tmp_path: Path) -> None:
    folder = tmp_path / "results"
    code = JOURNAL_WRITER.format(runtime=str(ROOT / "runtime"))
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", code, str(folder)],
                                stdout=subprocess.PIPE)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"open"
        time.sleep(0.3 + 0.2 * round_)
        proc.kill()
        proc.wait()
        journal = Journal(folder, rotate_bytes=20000)
        journal.open()  # repairs a torn tail, as the service does at start
        journal.close()
        records = list(read_lines(folder))
        assert records, "the writer wrote nothing"
        for raw_file in journal_files(folder):
            content = raw_file.read_bytes()
            assert content == b"" or content.endswith(b"\n")


def test_power_cut_tail_is_cut_back(tmp_path: Path) -> None:
    """A power cut can persist half a line; opening the journal removes exactly that half."""
    folder = tmp_path / "results"
    journal = Journal(folder)
    journal.open()
    for seq in range(100):
        journal.append({"seq": seq})
    journal.close()
    path = journal_files(folder)[-1]
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) - 5])  # the last line lost its last 5 bytes
    assert repair_tail(path) == len(b'{"seq":99}\n') - 5
    assert [r["seq"] for r in read_lines(folder)] == list(range(99))


@pytest.fixture
def mosquitto(tmp_path: Path):  # type: ignore[no-untyped-def]
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto; .ci/bootstrap does)")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")

    class Broker:
        def __init__(self) -> None:
            self.port = port
            self.proc: subprocess.Popen[bytes] | None = None

        def start(self) -> None:
            self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for(self._listening, 10, "mosquitto to listen")

        def _listening(self) -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                return False
            return True

        def stop(self) -> None:
            if self.proc is not None:
                self.proc.terminate()
                self.proc.wait(10)
                self.proc = None

    broker = Broker()
    broker.start()
    yield broker
    broker.stop()


def test_mqtt_qos1_with_an_offline_period(tmp_path: Path, default_model: Path,
                                          mosquitto) -> None:  # type: ignore[no-untyped-def]
    import paho.mqtt.client as mqtt
    from edgebake_runtime.service import Service
    from runtime_helpers import RunningApp

    received: dict[tuple[str, int], bytes] = {}
    statuses: list[str] = []

    def on_connect(client, userdata, flags, reason, properties=None):  # type: ignore[no-untyped-def]
        client.subscribe([("edgebake/unit-1/results", 1), ("edgebake/unit-1/status", 1)])

    def on_message(client, userdata, message):  # type: ignore[no-untyped-def]
        if message.topic.endswith("/status"):
            statuses.append(message.payload.decode())
        else:
            import json

            record = json.loads(message.payload)
            received[(record["source"], record["seq"])] = message.payload

    listener = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-listener")
    listener.on_connect = on_connect
    listener.on_message = on_message
    listener.reconnect_delay_set(0.2, 1)
    listener.connect("127.0.0.1", mosquitto.port)
    listener.loop_start()
    config = make_config(tmp_path, default_model,
                         [{"name": "cam", "kind": "synthetic", "fps": 10}],
                         mqtt={"enabled": True, "host": "127.0.0.1", "port": mosquitto.port,
                               "keepalive_sec": 5},
                         http={"enabled": False})
    raw = dict(config.raw, device_id="unit-1")
    from edgebake_runtime.config import validate

    config = validate(raw, "test")
    try:
        with RunningApp(Service(config)) as running:
            wait_for(lambda: len(received) >= 5, 20, "results over MQTT")
            assert "online" in statuses
            mosquitto.stop()
            offline_from = running.app.metrics.results
            wait_for(lambda: running.app.metrics.results >= offline_from + 15, 20,
                     "results while the broker is down")
            mosquitto.start()
            wait_for(lambda: running.app.mqtt.connected.is_set(), 40, "reconnection")
            written = {(r["source"], r["seq"]) for r in read_lines(tmp_path / "results")}
            wait_for(lambda: written <= set(received), 40,
                     "every journaled result to reach the broker")
    finally:
        listener.loop_stop()
        listener.disconnect()

"""`invoke soak`: months of a unit's results path in minutes, with the broker going away.

The parts of the runtime that must hold for months, the journal (rotation, retention by free
space, recovery) and the MQTT sender (supervised, durable cursor, at-least-once), run
unchanged on a tiny filesystem made for the run (tmpfs with a size limit), fed far faster than
a camera would, while a local mosquitto is stopped and started again and again. A subscriber
with a persistent session counts what arrives. The records are synthetic: inference speed is
what `invoke bench-runtime` measures; this measures what happens to results afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BuildError
from ..hostcmd import die_with_parent
from ..progress import Progress
from ..validate.broker import KEEP_USER
from ..validate.qemu import free_port

CAMERA_FPS = 5.0
RECORD_PAD = "x" * 120  # a realistic record is ~200 bytes of JSON


@dataclass
class SoakResult:
    records: int
    received_unique: int
    duplicates: int
    dropped_undelivered: int
    lost: int
    broker_restarts: int
    seconds: float

    @property
    def simulated_days(self) -> float:
        return self.records / CAMERA_FPS / 86400

    def line(self) -> str:
        return (f"soak: {self.records} records, {self.lost} lost, {self.duplicates} duplicates, "
                f"{self.dropped_undelivered} dropped-undelivered (counted)")


@contextlib.contextmanager
def small_filesystem(folder: Path, size_mib: int) -> Iterator[Path]:
    """A size-limited tmpfs: a full disk is reached in seconds, not weeks."""
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755",
                             "tmpfs", str(folder)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"soak needs root to mount a small tmpfs at {folder}: "
                         f"{result.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


class Broker:
    """mosquitto on 127.0.0.1 with persistence, so a stop keeps what it acknowledged. It
    keeps the user it was started as (mosquitto would drop root for its own user, which
    clears the death signal) and is only ever started from the main thread (the kernel
    sends that signal when the starting thread ends): a killed soak leaves no broker."""

    def __init__(self, folder: Path) -> None:
        if shutil.which("mosquitto") is None:
            raise BuildError("soak needs mosquitto: apt-get install mosquitto")
        self.port = free_port()
        self.conf = folder / "mosquitto.conf"
        (folder / "db").mkdir()
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                             f"persistence true\npersistence_location {folder / 'db'}/\n"
                             "autosave_interval 1\nmax_queued_messages 0\n"
                             f"max_inflight_messages 1000\n{KEEP_USER}")
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=die_with_parent)
        time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)
            self.proc = None


class Receiver:
    """A QoS 1 subscriber with a persistent session: what the fleet's backend would see."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.ids: set[str] = set()
        self.total = 0
        self._lock = threading.Lock()
        api = mqtt.CallbackAPIVersion.VERSION2  # type: ignore[attr-defined]
        self.client = mqtt.Client(api, client_id="edgebake-soak-receiver", clean_session=False)
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        record_id = message.payload.split(b'"id":"', 1)[1].split(b'"', 1)[0].decode()
        with self._lock:
            self.total += 1
            self.ids.add(record_id)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_soak(minutes: float, progress: Progress, rate: float = 4000.0,
             fs_mib: int = 24) -> SoakResult:
    from edgebake_runtime.config import MqttSettings
    from edgebake_runtime.journal import Journal
    from edgebake_runtime.mqtt import MqttPublisher

    # retention logs every deleted file; at soak speed that is many lines a second
    logging.getLogger("edgebake.journal").setLevel(logging.ERROR)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgebake-soak-") as tmp_name:
        tmp = Path(tmp_name)
        broker = Broker(tmp)
        broker.start()
        with small_filesystem(tmp / "data", fs_mib) as data:
            journal = Journal(data / "results", fsync_interval_sec=1.0,
                              rotate_bytes=512 * 1024, min_free_percent=25.0)
            journal.open()
            settings = MqttSettings(enabled=True, host="127.0.0.1", port=broker.port,
                                    keepalive_sec=10)
            sender = MqttPublisher(settings, journal.folder, "soak-unit")
            journal.delivered = sender.cursor.position
            receiver = Receiver(broker.port, sender.topic)
            if not receiver.subscribed.wait(30):
                raise BuildError("soak: the receiver could not subscribe to the local broker")
            sender.start()
            number = _feed(journal, receiver, Chaos(broker), started + minutes * 60, rate,
                           started, progress)
            if broker.proc is None:
                broker.start()
            progress.say("      draining: waiting for the sender to catch up")
            _drain(sender, journal, receiver, number, progress)
            sender.stop()
            journal.close()
            time.sleep(1.0)
            receiver.stop()
            broker.stop()
            unique = len(receiver.ids)
            written = journal.written
            if written != number:
                raise BuildError(f"soak: {number - written} records could not be written "
                                 f"to the journal ({journal.failed})")
            lost = max(0, written - unique - journal.dropped_undelivered)
            return SoakResult(written, unique, receiver.total - unique,
                              journal.dropped_undelivered, lost, broker.restarts,
                              time.monotonic() - started)


def _feed(journal: Any, receiver: Receiver, chaos: Chaos, deadline: float, rate: float,
          started: float, progress: Progress) -> int:
    """Records into the journal at `rate` a second until `deadline`, the broker stopped
    and started as `chaos` says; returns how many."""
    broker = chaos.broker
    pad = json.dumps(RECORD_PAD)
    number = 0
    next_report = time.monotonic() + 30
    while time.monotonic() < deadline:
        tick = time.monotonic()
        for _ in range(int(rate / 10)):
            number += 1
            # encoded as a camera process encodes a result: one format
            stamp = number / CAMERA_FPS
            journal.append_line(f'{{"id":"soak-{number}","pad":{pad},'
                                f'"source":"synthetic","ts":{stamp!r}}}\n'.encode(), stamp)
        journal.sync_if_due()
        chaos.tick(time.monotonic())
        if time.monotonic() >= next_report:
            next_report += 30
            stats = journal.stats()
            progress.say(f"      {time.monotonic() - started:5.0f}s: {number} records "
                         f"({number / CAMERA_FPS / 86400:.1f} simulated days), received "
                         f"{len(receiver.ids)}, broker restarts {broker.restarts}, "
                         f"dropped-undelivered {stats['dropped_undelivered']}, "
                         f"free {stats['free_percent']}%")
        time.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
    return number


class Chaos:
    """The broker stopped for 2-8 s every 10-30 s, on a fixed random schedule, from the
    feeding loop's own thread."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._chance = random.Random(7)
        self._next = time.monotonic() + self._chance.uniform(10, 30)

    def tick(self, now: float) -> None:
        if now < self._next:
            return
        if self.broker.proc is not None:
            self.broker.stop()
            self.broker.restarts += 1
            self._next = now + self._chance.uniform(2, 8)
        else:
            self.broker.start()
            self._next = now + self._chance.uniform(10, 30)


def _drain(sender: Any, journal: Any, receiver: Receiver, expected: int,
           progress: Progress, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sender.backlog_bytes() == 0 and \
                len(receiver.ids) + journal.dropped_undelivered >= expected:
            return
        time.sleep(1.0)
    progress.say(f"      drain timed out: backlog {sender.backlog_bytes()} bytes")

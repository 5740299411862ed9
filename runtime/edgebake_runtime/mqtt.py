"""MQTT publishing from the journal: QoS 1, a last will, and nothing lost while offline.

The journal is the buffer. A cursor (file name and byte offset) marks what the broker has
acknowledged; after an outage the sender resumes from the cursor, so results written while
the broker was unreachable go out once it is back.

Guarantee: at-least-once. The cursor is saved durably about once a second, so after a crash or
power cut up to that second's records are sent again. Every record carries an `id` that is
unique across restarts and reboots (a random per-process run id plus a counter), so a receiver
removes duplicates by `id`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .config import MqttSettings
from .journal import journal_files
from .supervise import Supervised

log = logging.getLogger("edgebake.mqtt")
CURSOR_NAME = ".mqtt-cursor"


class Cursor:
    def __init__(self, folder: Path) -> None:
        self.path = folder / CURSOR_NAME
        self.file = ""
        self.offset = 0
        try:
            data = json.loads(self.path.read_text())
            self.file, self.offset = str(data["file"]), int(data["offset"])
        except (OSError, ValueError, KeyError):
            pass

    def save(self) -> None:
        write_atomic(self.path, json.dumps({"file": self.file, "offset": self.offset}).encode(),
                     0o640)

    def position(self) -> tuple[str, int] | None:
        return (self.file, self.offset) if self.file else None


class MqttPublisher:
    def __init__(self, settings: MqttSettings, journal_dir: Path, device_id: str) -> None:
        import paho.mqtt.client as mqtt  # optional dependency, imported only when enabled

        self.settings = settings
        self.journal_dir = journal_dir
        self.device = device_id or os.uname().nodename
        self.topic = settings.topic or f"edgebake/{self.device}/results"
        self.status_topic = f"edgebake/{self.device}/status"
        self.health_topic = f"edgebake/{self.device}/health"
        self.qos = settings.qos
        self.connected = threading.Event()
        self.published = 0
        self.last_error = ""
        self._stop = threading.Event()
        self.sender = Supervised("mqtt-sender", self._run, self._stop)
        self.cursor_error = ""
        client_id = settings.client_id or f"edgebake-{self.device}"
        api = mqtt.CallbackAPIVersion.VERSION2  # type: ignore[attr-defined]
        self.client = mqtt.Client(api, client_id=client_id, clean_session=False)
        if settings.username:
            self.client.username_pw_set(settings.username, settings.password or None)
        tls = settings.tls
        if tls.enabled:
            self.client.tls_set(ca_certs=tls.ca_file or None, certfile=tls.cert_file or None,
                                keyfile=tls.key_file or None)
        self.client.will_set(self.status_topic, "offline", qos=1, retain=True)
        # model update orders (see commands.py): subscribed on every connect
        self.command_topics: list[str] = []
        self.on_command: Callable[[str, bytes], None] | None = None
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.reconnect_delay_set(1, 30)
        self.client.max_inflight_messages_set(1000)
        self.cursor = Cursor(journal_dir)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            self.last_error = f"connect refused: {reason}"
            return
        client.publish(self.status_topic, "online", qos=1, retain=True)
        for topic in self.command_topics:
            client.subscribe(topic, qos=1)
        self.connected.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if self.on_command is not None and message.topic in self.command_topics:
            self.on_command(message.topic, bytes(message.payload))

    def local_address(self) -> str:
        """This unit's address on the way to the broker (where the fleet can reach it)."""
        try:
            sock: Any = self.client.socket()
            return str(sock.getsockname()[0]) if sock is not None else ""
        except OSError:
            return ""

    def publish_update_status(self, step: str, detail: str, seq: int, version: str) -> None:
        """Each step of an ordered update, retained, for whoever ordered it."""
        body = json.dumps({"at": round(time.time(), 3), "step": step, "detail": detail,
                           "seq": seq, "version": version})
        self.client.publish(f"edgebake/{self.device}/update/status", body, qos=1, retain=True)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                       properties: Any = None) -> None:
        self.connected.clear()
        self.last_error = f"disconnected: {reason}"

    def start(self) -> None:
        self.client.connect_async(self.settings.host, self.settings.port,
                                  keepalive=self.settings.keepalive_sec)
        self.client.loop_start()
        self.sender.start()

    def stop(self) -> None:
        self._stop.set()
        self.sender.thread.join(5)
        if self.connected.is_set():
            self.client.publish(self.status_topic, "offline", qos=1, retain=True)
        self.client.disconnect()
        self.client.loop_stop()
        self._save_cursor()

    def publish_health(self, snapshot: dict[str, Any]) -> None:
        """The health snapshot (drops, backlog, sources) as a retained message for the fleet."""
        if self.connected.is_set():
            stamped = {**snapshot, "published_at": round(time.time(), 3)}
            self.client.publish(self.health_topic, json.dumps(stamped, sort_keys=True),
                                qos=0, retain=True)

    def _save_cursor(self) -> None:
        """A cursor that cannot be saved (full disk) only means more re-sends after a restart."""
        try:
            self.cursor.save()
            self.cursor_error = ""
        except OSError as exc:
            self.cursor_error = f"cursor not saved: {exc.strerror or exc}"

    def backlog_bytes(self) -> int:
        """Journal bytes not yet acknowledged by the broker."""
        total = 0
        reached = not self.cursor.file
        for path in journal_files(self.journal_dir):
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if path.name == self.cursor.file:
                reached = True
                total += max(0, size - self.cursor.offset)
            elif reached or path.name > self.cursor.file:
                total += size
        return total

    def stats(self) -> dict[str, Any]:
        return {"connected": self.connected.is_set(), "published": self.published,
                "error": self.last_error or self.cursor_error,
                "backlog_bytes": self.backlog_bytes(), "sender_alive": self.sender.alive(),
                "sender_restarts": self.sender.restarts,
                "sender_error": self.sender.last_error}

    def _next_lines(self, limit: int = 1000) -> list[tuple[str, int, bytes]]:
        """Up to `limit` complete lines after the cursor, with where each one ends."""
        files = journal_files(self.journal_dir)
        names = [f.name for f in files]
        if self.cursor.file not in names:
            # a file deleted by retention: its undelivered records were counted by the journal
            # first run, or the cursor's file was rotated away: start at the oldest kept file
            if not files:
                return []
            self.cursor.file, self.cursor.offset = names[0], 0
        lines: list[tuple[str, int, bytes]] = []
        start = names.index(self.cursor.file)
        for name in names[start:]:
            offset = self.cursor.offset if name == self.cursor.file else 0
            try:
                handle = (self.journal_dir / name).open("rb")
            except FileNotFoundError:  # deleted by retention while we read: go on with the next
                continue
            with handle:
                handle.seek(offset)
                for raw in handle:
                    if not raw.endswith(b"\n"):
                        break
                    offset += len(raw)
                    lines.append((name, offset, raw.rstrip(b"\n")))
                    if len(lines) >= limit:
                        return lines
        return lines

    def _run(self) -> None:
        last_save = time.monotonic()
        while not self._stop.is_set():
            if not self.connected.wait(0.5):
                continue
            batch = self._next_lines()
            if not batch:
                self._stop.wait(0.2)
                continue
            # publish the whole batch, then take the acknowledgements in order: the cursor
            # only moves past records the broker has acknowledged
            sent = [(name, end, self.client.publish(self.topic, payload, qos=self.qos))
                    for name, end, payload in batch]
            for name, end, info in sent:
                try:
                    info.wait_for_publish(timeout=10)
                    acknowledged = info.is_published()
                except (RuntimeError, ValueError) as exc:  # published while disconnected
                    self.last_error = str(exc)
                    acknowledged = False
                if not acknowledged:
                    break  # broker gone: resume from the cursor after reconnecting
                self.published += 1
                self.cursor.file, self.cursor.offset = name, end
            if time.monotonic() - last_save > 1.0:
                self._save_cursor()
                last_save = time.monotonic()

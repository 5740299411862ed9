"""MQTT publishing from the journal: QoS 1, a last will, and nothing lost while offline.

The journal is the buffer. A cursor (file name and byte offset) marks what the broker has
acknowledged; after an outage the sender resumes from the cursor, so results written while
the broker was unreachable go out once it is back.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from .journal import journal_files

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
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"file": self.file, "offset": self.offset}))
        os.replace(tmp, self.path)


class MqttPublisher:
    def __init__(self, settings: dict[str, Any], journal_dir: Path, device_id: str) -> None:
        import paho.mqtt.client as mqtt  # optional dependency, imported only when enabled

        self.settings = settings
        self.journal_dir = journal_dir
        self.device = device_id or os.uname().nodename
        self.topic = settings["topic"] or f"edgebake/{self.device}/results"
        self.status_topic = f"edgebake/{self.device}/status"
        self.qos = int(settings["qos"])
        self.connected = threading.Event()
        self.published = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        client_id = settings["client_id"] or f"edgebake-{self.device}"
        api = mqtt.CallbackAPIVersion.VERSION2  # type: ignore[attr-defined]
        self.client = mqtt.Client(api, client_id=client_id, clean_session=False)
        self.client.will_set(self.status_topic, "offline", qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.reconnect_delay_set(1, 30)
        self.cursor = Cursor(journal_dir)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            self.last_error = f"connect refused: {reason}"
            return
        client.publish(self.status_topic, "online", qos=1, retain=True)
        self.connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                       properties: Any = None) -> None:
        self.connected.clear()
        self.last_error = f"disconnected: {reason}"

    def start(self) -> None:
        self.client.connect_async(self.settings["host"], int(self.settings["port"]),
                                  keepalive=int(self.settings["keepalive_sec"]))
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name="mqtt-sender", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.connected.is_set():
            self.client.publish(self.status_topic, "offline", qos=1, retain=True)
        self.client.disconnect()
        self.client.loop_stop()
        self.cursor.save()

    def _next_lines(self, limit: int = 200) -> list[tuple[str, int, bytes]]:
        """Up to `limit` complete lines after the cursor, with where each one ends."""
        files = journal_files(self.journal_dir)
        names = [f.name for f in files]
        if self.cursor.file not in names:
            # first run, or the cursor's file was rotated away: start at the oldest kept file
            if not files:
                return []
            self.cursor.file, self.cursor.offset = names[0], 0
        lines: list[tuple[str, int, bytes]] = []
        start = names.index(self.cursor.file)
        for name in names[start:]:
            offset = self.cursor.offset if name == self.cursor.file else 0
            with (self.journal_dir / name).open("rb") as handle:
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
            for name, end, payload in batch:
                info = self.client.publish(self.topic, payload, qos=self.qos)
                try:
                    info.wait_for_publish(timeout=10)
                except (RuntimeError, ValueError) as exc:
                    self.last_error = str(exc)
                if not info.is_published():
                    break  # broker gone: resume from the cursor after reconnecting
                self.published += 1
                self.cursor.file, self.cursor.offset = name, end
            if time.monotonic() - last_save > 1.0:
                self.cursor.save()
                last_save = time.monotonic()

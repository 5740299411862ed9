"""What the units say back during a rollout, from the broker: each unit's link (its retained
`status`, offline through its last will) and its update answers (`update/status`, retained,
each carrying the number of the order it answers). One subscription serves the whole fleet;
the MQTT thread only records, the rollout's loop reads."""

from __future__ import annotations

import json
import threading
from typing import Any

from ..fleet import Broker, connect

TOPICS = ("edgebake/+/status", "edgebake/+/update/status")
MAX_ANSWER_BYTES = 8192


class UnitAnswers:
    def __init__(self, broker: Broker) -> None:
        self._lock = threading.Lock()
        self._links: dict[str, str] = {}
        self._answers: dict[tuple[str, int], dict[str, Any]] = {}  # (device, seq) -> newest
        self.client = connect(broker, self._on_message, TOPICS)
        self._publish_lock = threading.Lock()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        parts = message.topic.split("/")
        payload = bytes(message.payload[:MAX_ANSWER_BYTES])
        with self._lock:
            if len(parts) == 3 and parts[2] == "status":
                self._links[parts[1]] = payload.decode(errors="replace")[:20]
            elif len(parts) == 4:
                try:
                    answer = json.loads(payload)
                except ValueError:
                    return
                if isinstance(answer, dict) and isinstance(answer.get("seq"), int):
                    self._answers[(parts[1], answer["seq"])] = answer

    def link(self, device: str) -> str:
        with self._lock:
            return self._links.get(device, "?")

    def answer(self, device: str, seq: int) -> dict[str, Any] | None:
        with self._lock:
            return self._answers.get((device, seq))

    def answering(self, seq: int) -> dict[str, dict[str, Any]]:
        """Every unit's newest answer to the order numbered `seq`, by device."""
        with self._lock:
            return {device: answer for (device, number), answer in self._answers.items()
                    if number == seq}

    def send(self, device: str, order: bytes, timeout: float = 30.0) -> bool:
        """Publish an order (QoS 1) to a unit's (or `group/<name>`) topic; True once the
        broker has it."""
        with self._publish_lock:
            sent = self.client.publish(f"edgebake/{device}/update", order, qos=1)
        sent.wait_for_publish(timeout)
        return bool(sent.is_published())

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

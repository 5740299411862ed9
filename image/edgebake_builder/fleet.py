"""`invoke fleet-status`: the units a broker has seen, from their retained MQTT topics.

Every unit keeps `edgebake/<device>/status` (online, or offline through its last will) and
`edgebake/<device>/health` (its /health snapshot, every 30 s) retained on the broker, so one
subscription lists the whole fleet at once, including units that are off.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import BuildError


@dataclass
class UnitView:
    device: str
    online: str = "?"
    healthy: bool | None = None
    model: str = ""
    sha256: str = ""
    registry: str = ""  # name/version of the registered model it runs
    group: str = ""
    trial: bool = False
    last_result_ts: float | None = None
    published_age_sec: float | None = None
    status: str = ""
    problems: list[str] = field(default_factory=list)
    os_version: str = ""
    page_url: str = ""  # the unit's own page, as the unit is reached from its broker


@dataclass(frozen=True)
class Broker:
    """Where the fleet's broker is and how to log in (TLS when a CA file is given)."""

    host: str
    port: int = 1883
    username: str = ""
    password: str = ""
    ca_file: str = ""


def broker_of(host: str, port: int, username: str, password: str, ca_file: str,
              tls_port: int = 8883) -> Broker:
    """The broker from a task's options, each left empty taken from the environment
    (EDGEBAKE_MQTT_PORT, _USERNAME, _PASSWORD, _CA_FILE): a password given there stays out
    of the process list. Port 0: the environment's, else 8883 with TLS and 1883 without."""
    import os

    env = os.environ.get
    ca_file = ca_file or env("EDGEBAKE_MQTT_CA_FILE", "")
    port = port or int(env("EDGEBAKE_MQTT_PORT", "0") or 0) or (tls_port if ca_file else 1883)
    return Broker(host, port, username or env("EDGEBAKE_MQTT_USERNAME", ""),
                  password or env("EDGEBAKE_MQTT_PASSWORD", ""), ca_file)


def _paho() -> Any:
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise BuildError("talking to the fleet's broker needs paho-mqtt on this host: pip "
                         "install 'edgebake[mqtt]'") from None
    return mqtt


def connect(broker: Broker, on_message: Any = None,
               topics: tuple[str, ...] = ()) -> Any:
    """A client with its network loop running, connected (and subscribed to `topics`);
    BuildError with one line when the broker is out of reach or refuses."""
    mqtt = _paho()
    connected = threading.Event()
    failure: list[str] = []
    where = f"{broker.host}:{broker.port}"

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            failure.append(f"broker {where} refused the connection: {reason}")
        elif topics:
            client.subscribe([(topic, 1) for topic in topics])
        connected.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"edgebake-fleet-{time.time_ns()}")
    if broker.username:
        client.username_pw_set(broker.username, broker.password or None)
    if broker.ca_file:
        client.tls_set(ca_certs=broker.ca_file)
    client.on_connect = on_connect
    client.on_message = on_message
    try:
        client.connect(broker.host, broker.port, keepalive=30)
    except OSError as exc:
        raise BuildError(f"cannot reach the broker {where}: {exc}") from None
    client.loop_start()
    if not connected.wait(10) or failure:
        client.loop_stop()
        raise BuildError(failure[0] if failure else f"broker {where} did not answer in 10 s")
    return client


FLEET_TOPICS = ("edgebake/+/status", "edgebake/+/health")


class FleetWatch:
    """The fleet as its units' retained and live messages describe it, kept up to date."""

    def __init__(self) -> None:
        self._units: dict[str, UnitView] = {}
        self._lock = threading.Lock()

    def on_message(self, client: Any, userdata: Any, message: Any) -> None:
        parts = message.topic.split("/")
        if len(parts) != 3:
            return
        with self._lock:
            view = self._units.setdefault(parts[1], UnitView(parts[1]))
            if parts[2] == "status":
                view.online = message.payload.decode(errors="replace")[:20]
            else:
                _read_health(view, message.payload)

    def units(self) -> dict[str, UnitView]:
        with self._lock:
            return {name: dataclasses.replace(view) for name, view in self._units.items()}


def collect(broker: Broker, wait_sec: float) -> dict[str, UnitView]:
    """Subscribe to every unit's retained topics and gather what arrives within wait_sec."""
    watch = FleetWatch()
    client = connect(broker, watch.on_message, FLEET_TOPICS)
    try:
        time.sleep(wait_sec)  # retained messages come at once; live ones within the wait
    finally:
        client.loop_stop()
        client.disconnect()
    return watch.units()


def send_order(broker: Broker, to: str, order: bytes, system: bool = False) -> str:
    """Publish a signed order (QoS 1) on the topic of a unit or `group/<name>` (its
    `os-update` topic for a system bundle); returns the topic once the broker has it."""
    topic = f"edgebake/{to}/{'os-update' if system else 'update'}"
    client = connect(broker)
    try:
        sent = client.publish(topic, order, qos=1)
        sent.wait_for_publish(30)
        if not sent.is_published():
            raise BuildError(f"broker {broker.host}:{broker.port} did not take the order "
                             "in 30 s")
    finally:
        client.loop_stop()
        client.disconnect()
    return topic


def _read_health(view: UnitView, payload: bytes) -> None:
    try:
        snap = json.loads(payload)
    except ValueError:
        view.status = "unreadable health message"
        return
    if not isinstance(snap, dict):
        view.status = "unreadable health message"
        return
    view.healthy = bool(snap.get("healthy"))
    model = snap.get("model") or {}
    view.model = str(model.get("version", ""))
    view.sha256 = str(model.get("sha256", ""))[:12]
    registry = model.get("registry")
    if isinstance(registry, dict):
        view.registry = f"{registry.get('name', '?')}/{registry.get('version', '?')}"
    view.trial = bool(model.get("trial"))
    view.group = str(snap.get("group") or "")
    journal = snap.get("journal") or {}
    stamp = journal.get("last_written_ts")
    view.last_result_ts = float(stamp) if isinstance(stamp, (int, float)) else None
    published = snap.get("published_at")
    if isinstance(published, (int, float)):
        view.published_age_sec = max(0.0, time.time() - float(published))
    view.status = str(snap.get("status", ""))[:80]
    problems = snap.get("problems")
    view.problems = [str(p)[:300] for p in problems[:20]] if isinstance(problems, list) else []
    system = snap.get("system")
    view.os_version = str(system.get("version", ""))[:64] if isinstance(system, dict) else ""
    page = snap.get("page")
    url = str(page.get("url", "")) if isinstance(page, dict) else ""
    view.page_url = url if re.fullmatch(r"https?://[A-Za-z0-9.:\[\]_-]{1,300}/", url) else ""


def table(units: dict[str, UnitView]) -> str:
    rows = [("device", "link", "health", "model", "sha256", "registry", "last result",
             "status")]
    now = time.time()
    for name in sorted(units):
        u = units[name]
        health = "?" if u.healthy is None else ("healthy" if u.healthy else "UNHEALTHY")
        last = "never" if u.last_result_ts is None else \
            f"{age_text(now - u.last_result_ts)} ago"
        rows.append((name, u.online, health, u.model or "?", u.sha256 or "?",
                     u.registry or "-", last, u.status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  "
             + r[-1] for r in rows]
    return "\n".join(lines)


def age_text(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"

"""The runtime's configuration: defaults, seed overrides, and validation with clear errors."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .merge import deep_merge
from .yamlfile import TextFileError, read_yaml

DEVICE_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
TOPIC = r"[^$+#\x00-\x1f\x7f][^+#\x00-\x1f\x7f]{0,200}"
ABSOLUTE_PATH = r"/[^\x00-\x1f\x7f]*"
PULL_URL = r"(https?://[^\s\x00-\x1f\x7f]+)?"
# v4l2-auto: every V4L2 capture device present, found at start and while running
# rpicam: a CSI camera module through the base's rpicam-vid (Raspberry Pi OS bases)
SOURCE_KINDS = ("v4l2-auto", "v4l2", "rpicam", "rtsp", "http", "replay", "synthetic")

DEFAULTS: dict[str, Any] = {
    "device_id": "",
    "model": {"path": "/opt/edgebake/model/model.tflite", "card": ""},
    # processes + per_camera: each camera in its own process with its own interpreter (scales
    # with cores); per_camera off: a pool of `workers` processes fed by the service
    "inference": {"workers": 1, "num_threads": 2, "processes": True, "per_camera": True,
                  "score_threshold": None, "top_k": 3},
    "queue": {"depth": 1},
    "sources": [],
    "journal": {"dir": "/data/results", "fsync_interval_sec": 1.0,
                "rotate_bytes": 16 * 1024 * 1024, "min_free_percent": 10.0},
    "mqtt": {"enabled": False, "host": "127.0.0.1", "port": 1883, "topic": "",
             "qos": 1, "keepalive_sec": 30, "client_id": "", "username": "", "password": "",
             "tls": {"enabled": False, "ca_file": "", "cert_file": "", "key_file": ""}},
    "http": {"enabled": True, "bind": "0.0.0.0", "port": 8080, "allow": [],
             "max_connections": 8, "timeout_sec": 5.0},
    "watchdog": {"stall_sec": 15.0},
    # model updates: slots on /data, a health window after each, a latency budget to pass
    "update": {"dir": "/data/models", "window_sec": 600.0, "max_latency_ms": 500.0,
               "poll_sec": 2.0, "max_error_rate": 0.05,
               # where trusted keys and this unit's target name are (the image puts them there)
               "keys_dir": "/etc/edgebake/update-keys", "target_file": "/etc/edgebake/target",
               # HTTP pull: a URL polled with If-None-Match every pull_sec ("" = off)
               "pull_url": "", "pull_sec": 300.0,
               # MQTT orders on edgebake/<device>/update (and a group's topic), off by default
               "mqtt_commands": False, "mqtt_group": ""},
}

MAX_CAMERA_FPS = 1000.0
MAX_REPLAY_FPS = 100000.0
SOURCE_DEFAULTS: dict[str, Any] = {"fps": 5.0, "max_age_sec": 10.0, "width": 640, "height": 480,
                                   "device": "", "url": "", "path": "", "loop": True,
                                   "enabled": True}


class ConfigError(Exception):
    """A bad configuration value: the message names the file, the field and what was expected."""


@dataclass(frozen=True)
class SourceConfig:
    name: str
    kind: str
    fps: float
    max_age_sec: float
    width: int
    height: int
    device: str
    url: str
    path: str
    loop: bool
    enabled: bool


@dataclass(frozen=True)
class AppConfig:
    raw: dict[str, Any]
    sources: tuple[SourceConfig, ...]

    def section(self, name: str) -> dict[str, Any]:
        value = self.raw[name]
        assert isinstance(value, dict)
        return value

    @property
    def model_path(self) -> Path:
        return Path(self.raw["model"]["path"])

    @property
    def card_path(self) -> Path | None:
        card = self.raw["model"]["card"]
        return Path(card) if card else None


class _Checker:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field: str, expected: str, found: Any) -> ConfigError:
        return ConfigError(f"{self.source}: {field}: expected {expected}, found {found!r}")

    def number(self, data: dict[str, Any], key: str, field: str, minimum: float,
               maximum: float | None = None, integer: bool = False,
               optional: bool = False) -> None:
        value = data.get(key)
        if value is None and optional:
            return
        kinds: tuple[type, ...] = (int,) if integer else (int, float)
        kind = "an integer" if integer else "a number"
        bound = f" between {minimum} and {maximum}" if maximum is not None else f" >= {minimum}"
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise self.fail(field, kind + bound, value)
        assert isinstance(value, (int, float))
        if value < minimum or (maximum is not None and value > maximum):
            raise self.fail(field, kind + bound, value)

    def string(self, data: dict[str, Any], key: str, field: str, allow_empty: bool = True) -> None:
        value = data.get(key)
        if not isinstance(value, str) or (not allow_empty and not value):
            raise self.fail(field, "a non-empty string" if not allow_empty else "a string", value)

    def pattern(self, data: dict[str, Any], key: str, field: str, regex: str,
                expected: str) -> None:
        value = data.get(key)
        if not isinstance(value, str) or (value and not re.fullmatch(regex, value)):
            raise self.fail(field, expected, value)

    def boolean(self, data: dict[str, Any], key: str, field: str) -> None:
        if not isinstance(data.get(key), bool):
            raise self.fail(field, "true or false", data.get(key))

    def mapping(self, data: Any, field: str, known: set[str]) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise self.fail(field, "a mapping", data)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{self.source}: {field}.{unknown[0]}: unknown setting; "
                              f"known: {', '.join(sorted(known))}")
        return data


def validate(data: dict[str, Any], source: str) -> AppConfig:
    """Merge `data` over the defaults, check every field, and return the typed config."""
    check = _Checker(source)
    check.mapping(data, "(top level)", set(DEFAULTS))
    merged = deep_merge(DEFAULTS, data)
    check.string(merged, "device_id", "device_id")
    check.pattern(merged, "device_id", "device_id", DEVICE_ID, "letters, digits, '.', '_' or "
                  "'-' (at most 64; it becomes part of MQTT topics and file names)")
    for name in ("model", "inference", "queue", "journal", "mqtt", "http", "watchdog",
                 "update"):
        check.mapping(merged[name], name, set(DEFAULTS[name]))
    check.string(merged["model"], "path", "model.path", allow_empty=False)
    check.string(merged["model"], "card", "model.card")
    inf = merged["inference"]
    check.number(inf, "workers", "inference.workers", 1, 16, integer=True)
    check.number(inf, "num_threads", "inference.num_threads", 1, 16, integer=True)
    check.boolean(inf, "processes", "inference.processes")
    check.boolean(inf, "per_camera", "inference.per_camera")
    check.number(inf, "score_threshold", "inference.score_threshold", 0.0, 1.0, optional=True)
    check.number(inf, "top_k", "inference.top_k", 1, 100, integer=True)
    check.number(merged["queue"], "depth", "queue.depth", 1, 64, integer=True)
    up = merged["update"]
    check.pattern(up, "dir", "update.dir", ABSOLUTE_PATH, "an absolute path")
    check.number(up, "window_sec", "update.window_sec", 0.0, 86400.0)
    check.number(up, "max_latency_ms", "update.max_latency_ms", 1.0, 60000.0)
    check.number(up, "poll_sec", "update.poll_sec", 0.2, 60.0)
    check.number(up, "max_error_rate", "update.max_error_rate", 0.0, 1.0)
    check.pattern(up, "keys_dir", "update.keys_dir", ABSOLUTE_PATH, "an absolute path")
    check.pattern(up, "target_file", "update.target_file", ABSOLUTE_PATH, "an absolute path")
    check.pattern(up, "pull_url", "update.pull_url", PULL_URL,
                  "an http:// or https:// URL without spaces, or empty (no pulling)")
    check.number(up, "pull_sec", "update.pull_sec", 10.0, 86400.0)
    check.boolean(up, "mqtt_commands", "update.mqtt_commands")
    check.string(up, "mqtt_group", "update.mqtt_group")
    check.pattern(up, "mqtt_group", "update.mqtt_group", DEVICE_ID,
                  "letters, digits, '.', '_' or '-' (it becomes part of an MQTT topic)")
    jr = merged["journal"]
    check.string(jr, "dir", "journal.dir", allow_empty=False)
    check.number(jr, "fsync_interval_sec", "journal.fsync_interval_sec", 0.0, 60.0)
    check.number(jr, "rotate_bytes", "journal.rotate_bytes", 4096, integer=True)
    check.number(jr, "min_free_percent", "journal.min_free_percent", 1.0, 90.0)
    mq = merged["mqtt"]
    check.boolean(mq, "enabled", "mqtt.enabled")
    check.string(mq, "host", "mqtt.host", allow_empty=False)
    check.number(mq, "port", "mqtt.port", 1, 65535, integer=True)
    check.string(mq, "topic", "mqtt.topic")
    check.pattern(mq, "topic", "mqtt.topic", TOPIC, "an MQTT topic without '+', '#', control "
                  "characters or a leading '$'")
    check.number(mq, "qos", "mqtt.qos", 0, 2, integer=True)
    check.number(mq, "keepalive_sec", "mqtt.keepalive_sec", 5, 3600, integer=True)
    check.string(mq, "client_id", "mqtt.client_id")
    check.pattern(mq, "client_id", "mqtt.client_id", DEVICE_ID, "letters, digits, '.', '_' "
                  "or '-'")
    check.string(mq, "username", "mqtt.username")
    check.string(mq, "password", "mqtt.password")
    tls = check.mapping(mq["tls"], "mqtt.tls", set(DEFAULTS["mqtt"]["tls"]))
    check.boolean(tls, "enabled", "mqtt.tls.enabled")
    for key in ("ca_file", "cert_file", "key_file"):
        check.pattern(tls, key, f"mqtt.tls.{key}", ABSOLUTE_PATH, "an absolute path or ''")
    if bool(tls["cert_file"]) != bool(tls["key_file"]):
        raise check.fail("mqtt.tls.key_file", "cert_file and key_file given together",
                         tls["key_file"])
    ht = merged["http"]
    check.boolean(ht, "enabled", "http.enabled")
    check.string(ht, "bind", "http.bind", allow_empty=False)
    check.number(ht, "port", "http.port", 0, 65535, integer=True)
    check.number(ht, "max_connections", "http.max_connections", 1, 256, integer=True)
    check.number(ht, "timeout_sec", "http.timeout_sec", 0.5, 120.0)
    if not isinstance(ht["allow"], list) or not all(isinstance(a, str) for a in ht["allow"]):
        raise check.fail("http.allow", "a list of client networks like 10.0.0.0/8",
                         ht["allow"])
    for i, network in enumerate(ht["allow"]):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise check.fail(f"http.allow[{i}]", "a network like 10.0.0.0/8 or an address",
                             network) from None
    check.number(merged["watchdog"], "stall_sec", "watchdog.stall_sec", 1.0, 3600.0)
    sources = _validate_sources(check, merged["sources"])
    return AppConfig(raw=merged, sources=sources)


def _validate_sources(check: _Checker, raw: Any) -> tuple[SourceConfig, ...]:
    if not isinstance(raw, list):
        raise check.fail("sources", "a list of sources", raw)
    result = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        field = f"sources[{i}]"
        check.mapping(item, field, {"name", "kind", *SOURCE_DEFAULTS})
        entry = {**SOURCE_DEFAULTS, **item}
        check.string(entry, "name", f"{field}.name", allow_empty=False)
        if entry["name"] in seen:
            raise check.fail(f"{field}.name", "a name no other source uses", entry["name"])
        seen.add(entry["name"])
        if entry.get("kind") not in SOURCE_KINDS:
            raise check.fail(f"{field}.kind", "one of " + ", ".join(SOURCE_KINDS),
                             entry.get("kind"))
        # a recording may be read faster than any camera delivers: as fast as inference
        # takes its frames (a replay waits for room instead of dropping)
        check.number(entry, "fps", f"{field}.fps", 0.1,
                     MAX_REPLAY_FPS if entry["kind"] == "replay" else MAX_CAMERA_FPS)
        check.number(entry, "max_age_sec", f"{field}.max_age_sec", 0.5, 3600.0)
        check.number(entry, "width", f"{field}.width", 16, 8192, integer=True)
        check.number(entry, "height", f"{field}.height", 16, 8192, integer=True)
        for key in ("device", "url", "path"):
            check.string(entry, key, f"{field}.{key}")
        check.boolean(entry, "loop", f"{field}.loop")
        check.boolean(entry, "enabled", f"{field}.enabled")
        needs = {"v4l2": "device", "rtsp": "url", "http": "url", "replay": "path"}
        key = needs.get(str(entry["kind"]), "")
        if key and not entry[key]:
            raise check.fail(f"{field}.{key}", f"a value for a {entry['kind']} source", "")
        result.append(SourceConfig(**{k: entry[k] for k in SourceConfig.__dataclass_fields__}))
    if sum(1 for s in result if s.kind == "v4l2-auto") > 1:
        raise check.fail("sources", "at most one v4l2-auto entry (it finds every camera)",
                         [s.name for s in result if s.kind == "v4l2-auto"])
    return tuple(result)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        data = read_yaml(path)
    except TextFileError as exc:
        raise ConfigError(str(exc)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: (top level): expected a mapping, found {type(data).__name__}")
    return data


def load_config(path: Path, overrides: Path | None = None) -> AppConfig:
    """Read app.yaml, merge the seed's overrides (if that file exists), validate the result."""
    data = read_yaml_mapping(path)
    source = str(path)
    if overrides is not None and overrides.is_file():
        extra = read_yaml_mapping(overrides)
        check = _Checker(str(overrides))
        check.mapping(extra, "(top level)", set(DEFAULTS))
        data = deep_merge(data, extra)
        source = f"{path} + {overrides}"
    return validate(data, source)

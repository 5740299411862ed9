"""The unit's settings, declared once: each field's type, default, validator and help.

`/etc/edgebake/app.yaml`, with the seed's overrides merged over it, is checked against these
declarations and read as typed objects. The same check runs on the host (`invoke flash`,
`edgebake-firstboot --check`) and on the unit, so a seed that passes on the host starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .merge import deep_merge
from .validators import (
    Address,
    Band,
    Bool,
    Enum,
    Float,
    Int,
    Invalid,
    Networks,
    Optional,
    Origins,
    Str,
    Url,
    Validator,
    WritablePath,
)
from .yamlfile import TextFileError, read_yaml

DEVICE_ID = Str(r"([A-Za-z0-9][A-Za-z0-9._-]{0,63})?",
                "of letters, digits, '.', '_' or '-' (at most 64; it becomes part of MQTT topics "
                "and file names)")
TOPIC = Str(r"([^$+#\x00-\x1f\x7f][^+#\x00-\x1f\x7f]{0,200})?",
            "that is an MQTT topic without '+', '#', control characters or a leading '$'")
ABSOLUTE_PATH = Str(r"/[^\x00-\x1f\x7f]*", "that is an absolute path")
OPTIONAL_PATH = Str(r"(/[^\x00-\x1f\x7f]*)?", "that is an absolute path, or empty")
PAGE_TOKEN = Str(r"([A-Za-z0-9_-]{16,128})?",
                 "of 16 to 128 letters, digits, '_' or '-' (it is typed into URLs), or empty")
HOST = Str(r"[A-Za-z0-9.:_-]{1,253}", "that is a host name or address")
# v4l2-auto: every V4L2 capture device present, found at start and while running
# rpicam: a CSI camera module through the base's rpicam-vid (Raspberry Pi OS bases)
SOURCE_KINDS = ("v4l2-auto", "v4l2", "rpicam", "rtsp", "http", "replay", "synthetic")
# which URL schemes each kind of stream source can open (PyAV/FFmpeg)
URL_SCHEMES = {"rtsp": Url(("rtsp", "rtsps")), "http": Url(("http", "https"))}
MAX_CAMERA_FPS = 1000.0
MAX_REPLAY_FPS = 100000.0
# Settings that no longer exist, with what to use instead.
GONE = {
    "inference.workers": "every camera runs in its own process; use inference.num_threads "
                         "for each camera's interpreter threads",
    "inference.processes": "every camera runs in its own process; remove it",
    "inference.per_camera": "every camera runs in its own process; remove it",
}


class ConfigError(Exception):
    """A bad configuration value: the message names the file, the field and what was expected."""


def setting(default: Any, validator: Validator, help: str) -> Any:
    """A field declared with its default, its validator and its help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default.copy(),
                     metadata={"validator": validator, "help": help})
    return field(default=default, metadata={"validator": validator, "help": help})


def section(kind: type[Any], help: str) -> Any:
    """A nested group of settings."""
    return field(default_factory=kind, metadata={"section": kind, "help": help})


@dataclass(frozen=True)
class ModelSettings:
    path: str = setting("/opt/edgebake/model/model.tflite", ABSOLUTE_PATH,
                        "The model the image ships (a model update on /data wins over it).")
    card: str = setting("", OPTIONAL_PATH, "Its card; empty: next to the model.")


@dataclass(frozen=True)
class InferenceSettings:
    num_threads: int = setting(0, Int(0, 16), "Interpreter threads of each camera process "
                               "(at most its share of the cores); 0: measured on the unit "
                               "(1, 2 or all cores, for all cameras at once) at start and "
                               "at each model switch.")
    score_threshold: float | None = setting(None, Optional(Float(0.0, 1.0)),
                                            "Detections below it are dropped; null: the card's.")
    top_k: int = setting(3, Int(1, 100), "Classes reported per frame by classifiers.")


@dataclass(frozen=True)
class QueueSettings:
    depth: int = setting(1, Int(1, 64), "Frames a camera keeps waiting; newer ones push out "
                         "older ones, and the drops are counted.")


@dataclass(frozen=True)
class JournalSettings:
    dir: str = setting("/data/results", WritablePath(), "Where results are journaled.")
    fsync_interval_sec: float = setting(1.0, Float(0.0, 60.0),
                                        "At most this much is lost at a power cut.")
    rotate_bytes: int = setting(16 * 1024 * 1024, Int(4096), "Size of one journal file.")
    min_free_percent: float = setting(10.0, Float(1.0, 90.0),
                                      "Oldest files go when free space falls below this.")


@dataclass(frozen=True)
class TlsSettings:
    enabled: bool = setting(False, Bool(), "TLS to the broker.")
    ca_file: str = setting("", OPTIONAL_PATH, "CA certificate; empty: the system's.")
    cert_file: str = setting("", OPTIONAL_PATH, "Client certificate (with key_file).")
    key_file: str = setting("", OPTIONAL_PATH, "Client key (with cert_file).")


@dataclass(frozen=True)
class MqttSettings:
    enabled: bool = setting(False, Bool(), "Publish results and health over MQTT.")
    host: str = setting("127.0.0.1", HOST, "Broker host.")
    port: int = setting(1883, Int(1, 65535), "Broker port.")
    topic: str = setting("", TOPIC, "Results topic; empty: edgebake/<device_id>/results.")
    qos: int = setting(1, Int(0, 2), "QoS of results (1: at least once, from the journal).")
    keepalive_sec: int = setting(30, Int(5, 3600), "MQTT keepalive.")
    client_id: str = setting("", DEVICE_ID, "Client id; empty: edgebake-<device_id>.")
    username: str = setting("", Str(), "Broker user.")
    password: str = setting("", Str(), "Broker password.")
    tls: TlsSettings = section(TlsSettings, "TLS to the broker.")


@dataclass(frozen=True)
class HttpSettings:
    enabled: bool = setting(True, Bool(), "Serve /health and /metrics.")
    bind: str = setting("0.0.0.0", Address(), "Address to listen on.")
    port: int = setting(8080, Int(0, 65535), "Port to listen on (0: any free one).")
    allow: tuple[str, ...] = setting([], Networks(), "Client networks let in; empty: all.")
    max_connections: int = setting(8, Int(1, 256), "Connections served at once.")
    timeout_sec: float = setting(5.0, Float(0.5, 120.0), "Per-connection timeout.")
    token: str = setting("", PAGE_TOKEN, "Token for the unit's page and camera pictures "
                         "(everything but /health and /metrics); empty: made at first start "
                         "and kept in token_file.")
    token_file: str = setting("/data/web/token", WritablePath(),
                              "Where a token made on the unit is kept.")
    max_viewers: int = setting(2, Int(0, 16), "Live camera streams served at once; 0: none.")


@dataclass(frozen=True)
class WatchdogSettings:
    stall_sec: float = setting(15.0, Float(1.0, 3600.0),
                               "No inference for this long with frames waiting is stuck.")


@dataclass(frozen=True)
class UpdateSettings:
    dir: str = setting("/data/models", WritablePath(), "Model slots and update state.")
    window_sec: float = setting(600.0, Float(0.0, 86400.0),
                                "Health window of a new model before it is confirmed.")
    max_latency_ms: float = setting(500.0, Float(1.0, 60000.0),
                                    "A new model slower than this on the unit is refused.")
    poll_sec: float = setting(2.0, Float(0.2, 60.0), "How often the slots are looked at.")
    max_error_rate: float = setting(0.05, Float(0.0, 1.0),
                                    "Inference errors in the window that roll a model back.")
    min_trial_inferences: int = setting(20, Int(1, 100000),
                                        "Inferences a new model must make before its error "
                                        "rate is judged or it is confirmed.")
    keys_dir: str = setting("/etc/edgebake/update-keys", ABSOLUTE_PATH,
                            "Trusted bundle keys (the image puts them there).")
    target_file: str = setting("/etc/edgebake/target", ABSOLUTE_PATH,
                               "This unit's target name (the image puts it there).")
    fleet_file: str = setting("/etc/edgebake/fleet", ABSOLUTE_PATH,
                              "This unit's fleet (the image puts it there).")
    pull_url: str = setting("", Url(("http", "https"), optional=True),
                            "A bundle URL polled with If-None-Match; empty: no pulling.")
    pull_sec: float = setting(300.0, Float(10.0, 86400.0), "How often pull_url is asked.")
    mqtt_commands: bool = setting(False, Bool(), "Take update orders over MQTT (needs the "
                                  "broker over TLS with a user and password).")
    allowed_origins: tuple[str, ...] = setting([], Origins(), "Where ordered bundle URLs may "
                                               "point (pull_url's own origin is allowed).")
    mqtt_group: str = setting("", DEVICE_ID, "Also take the orders of this group.")
    os_pull_url: str = setting("", Url(("http", "https"), optional=True),
                               "A system bundle (.raucb) URL polled with If-None-Match (A/B "
                               "units); empty: no pulling.")
    os_pull_sec: float = setting(3600.0, Float(10.0, 604800.0), "How often os_pull_url is "
                                 "asked.")


@dataclass(frozen=True)
class SourceConfig:
    name: str = setting("", Str(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}",
                                "of letters, digits, '.', '_' or '-'"), "Unique name.")
    kind: str = setting("", Enum(SOURCE_KINDS), "What kind of camera or stream.")
    fps: float = setting(5.0, Float(0.1, MAX_REPLAY_FPS), "Frames per second wanted.")
    max_age_sec: float = setting(10.0, Float(0.5, 3600.0), "Older than this, it is stale.")
    width: int = setting(640, Int(16, 8192), "Capture width.")
    height: int = setting(480, Int(16, 8192), "Capture height.")
    device: str = setting("", OPTIONAL_PATH, "v4l2: the device.")
    url: str = setting("", Str(), "rtsp, http: the stream's URL.")
    path: str = setting("", OPTIONAL_PATH, "replay: a folder of images or a video file.")
    loop: bool = setting(True, Bool(), "replay: start over at the end.")
    enabled: bool = setting(True, Bool(), "false: kept in the file, not run.")


@dataclass(frozen=True)
class SampleSettings:
    enabled: bool = setting(False, Bool(), "Keep field samples (images may be private).")
    dir: str = setting("/data/samples", WritablePath(), "Where samples are kept.")
    low_confidence: tuple[float, float] = setting([0.3, 0.6], Band(),
                                                  "Keep frames whose best score is in here.")
    every_sec: float = setting(3600.0, Float(0.0, 604800.0),
                               "Also keep one frame this often (0: never).")
    min_gap_sec: float = setting(10.0, Float(0.0, 86400.0),
                                 "At most one uncertain frame per camera this often.")
    max_files: int = setting(2000, Int(1, 1000000), "Oldest samples go past this many.")
    max_mb: float = setting(200.0, Float(1.0, 1000000.0), "Oldest samples go past this size.")


@dataclass(frozen=True)
class AppConfig:
    device_id: str = setting("", DEVICE_ID, "This unit's name (from the seed).")
    model: ModelSettings = section(ModelSettings, "The model the image ships.")
    inference: InferenceSettings = section(InferenceSettings, "Inference in each camera.")
    queue: QueueSettings = section(QueueSettings, "Each camera's frame queue.")
    sources: tuple[SourceConfig, ...] = setting([], Str(), "Cameras and streams (a list).")
    journal: JournalSettings = section(JournalSettings, "The results journal on /data.")
    mqtt: MqttSettings = section(MqttSettings, "The fleet's broker.")
    http: HttpSettings = section(HttpSettings, "/health and /metrics.")
    watchdog: WatchdogSettings = section(WatchdogSettings, "What counts as stuck.")
    update: UpdateSettings = section(UpdateSettings, "Signed model updates.")
    samples: SampleSettings = section(SampleSettings, "Field samples for retraining.")
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def model_path(self) -> Path:
        return Path(self.model.path)

    @property
    def card_path(self) -> Path | None:
        return Path(self.model.card) if self.model.card else None


def _declared(kind: type[Any]) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(kind) if f.name != "raw"]


def _defaults_of(kind: type[Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for f in _declared(kind):
        if "section" in f.metadata:
            result[f.name] = _defaults_of(f.metadata["section"])
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                else f.default
            result[f.name] = list(default) if isinstance(default, tuple) else default
    return result


DEFAULTS: dict[str, Any] = _defaults_of(AppConfig)


def _read(kind: type[Any], data: Any, where: str, source: str) -> Any:
    """`data` checked field by field against `kind`'s declarations, as a `kind`."""
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or '(top level)'}: expected a mapping, found "
                          f"{data!r}")
    fields = {f.name: f for f in _declared(kind)}
    for key in data:
        if f"{prefix}{key}" in GONE:
            raise ConfigError(f"{source}: {prefix}{key}: no longer a setting: "
                              f"{GONE[f'{prefix}{key}']}")
        if key not in fields or (kind is AppConfig and key == "raw"):
            raise ConfigError(f"{source}: {prefix}{key}: unknown setting; known: "
                              f"{', '.join(sorted(fields))}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if "section" in f.metadata:
            values[name] = _read(f.metadata["section"], data.get(name, {}), prefix + name,
                                 source)
        elif name == "sources" and kind is AppConfig:
            values[name] = _read_sources(data.get(name, []), source)
        else:
            value = data.get(name, _defaults_of(kind)[name])
            try:
                values[name] = f.metadata["validator"].validate(value)
            except Invalid as exc:
                raise ConfigError(f"{source}: {prefix}{name}: expected {exc}, found "
                                  f"{value!r}") from None
    return kind(**values)


def _read_sources(raw: Any, source: str) -> tuple[SourceConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: sources: expected a list of sources, found {raw!r}")
    result: list[SourceConfig] = []
    for i, item in enumerate(raw):
        where = f"sources[{i}]"
        if isinstance(item, dict) and "name" not in item:
            raise ConfigError(f"{source}: {where}.name: expected a non-empty string, found None")
        entry = _read(SourceConfig, item, where, source)
        _check_source(entry, where, source, {s.name for s in result})
        result.append(entry)
    auto = [s.name for s in result if s.kind == "v4l2-auto"]
    if len(auto) > 1:
        raise ConfigError(f"{source}: sources: expected at most one v4l2-auto entry (it finds "
                          f"every camera), found {auto!r}")
    return tuple(result)


def _check_source(entry: SourceConfig, where: str, source: str, names: set[str]) -> None:
    """What one field cannot say alone: a unique name, the value each kind needs, a URL its
    kind can open, and a camera's frame rate."""
    def fail(key: str, expected: str, found: Any) -> ConfigError:
        return ConfigError(f"{source}: {where}.{key}: expected {expected}, found {found!r}")

    if entry.name in names:
        raise fail("name", "a name no other source uses", entry.name)
    needs = {"v4l2": "device", "rtsp": "url", "http": "url", "replay": "path"}
    key = needs.get(entry.kind, "")
    if key and not getattr(entry, key):
        raise fail(key, f"a value for a {entry.kind} source", "")
    if entry.kind in URL_SCHEMES:
        try:
            URL_SCHEMES[entry.kind].validate(entry.url)
        except Invalid as exc:
            raise fail("url", f"{exc} (a {entry.kind} source)", entry.url) from None
    # a recording may be read faster than any camera delivers: as fast as inference takes
    if entry.kind != "replay" and entry.fps > MAX_CAMERA_FPS:
        raise fail("fps", f"a number between 0.1 and {MAX_CAMERA_FPS!r}", entry.fps)


def validate(data: dict[str, Any], source: str) -> AppConfig:
    """Merge `data` over the defaults, check every field, and return the typed config."""
    config: AppConfig = _read(AppConfig, data, "", source)
    tls = config.mqtt.tls
    if bool(tls.cert_file) != bool(tls.key_file):
        raise ConfigError(f"{source}: mqtt.tls.key_file: expected cert_file and key_file "
                          f"given together, found {tls.key_file!r}")
    mqtt = config.mqtt
    if config.update.mqtt_commands and not (mqtt.enabled and tls.enabled and mqtt.username
                                            and mqtt.password):
        raise ConfigError(f"{source}: update.mqtt_commands: expected mqtt.enabled with "
                          "mqtt.tls.enabled and a mqtt.username and password (anyone who can "
                          "publish on a plaintext or anonymous broker could order updates), "
                          "found true")
    return dataclasses.replace(config, raw=deep_merge(DEFAULTS, data))


def describe_all() -> str:
    """Every setting with its type, default and help, for `--print-config-schema`."""
    lines: list[str] = []

    def walk(kind: type[Any], prefix: str) -> None:
        defaults = _defaults_of(kind)
        for f in _declared(kind):
            if "section" in f.metadata:
                walk(f.metadata["section"], f"{prefix}{f.name}.")
            elif f.name == "sources" and kind is AppConfig:
                lines.append(f"{'sources':32} a list of sources, each:")
                walk(SourceConfig, "sources[].")
            else:
                lines.append(f"{prefix + f.name:32} {f.metadata['validator'].describe()}; "
                             f"default {defaults[f.name]!r}\n{'':32} {f.metadata['help']}")
    walk(AppConfig, "")
    return "\n".join(lines)


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
        for key in extra:
            if key not in DEFAULTS:
                raise ConfigError(f"{overrides}: {key}: unknown setting; known: "
                                  f"{', '.join(sorted(DEFAULTS))}")
        data = deep_merge(data, extra)
        source = f"{path} + {overrides}"
    return validate(data, source)

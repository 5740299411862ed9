"""`invoke flash --units units.csv`: one card per row, each with its own seed, and a log.

Columns: hostname, device_id, ssh_authorized_keys (several separated by `;`), optional
wifi_ssid, wifi_psk, wifi_country, and `app.<setting>` columns such as `app.mqtt.host`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from edgebake_runtime.seedcheck import SeedError, check_seed
from edgebake_runtime.yamlfile import TextFileError, decode_text

from ..atomicfile import append_line
from ..cache import sha256_file
from ..errors import BuildError
from .write import Confirm, flash

REQUIRED = ("hostname",)
KNOWN = {"hostname", "device_id", "ssh_authorized_keys", "wifi_ssid", "wifi_psk",
         "wifi_country"}


def _value(text: str) -> Any:
    """An app value as YAML would read it (numbers, booleans), else the text."""
    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text


def seed_for_row(row: dict[str, str], where: str) -> dict[str, Any]:
    seed: dict[str, Any] = {"hostname": row.get("hostname", "").strip()}
    if row.get("device_id"):
        seed["device_id"] = row["device_id"].strip()
    keys = [k.strip() for k in row.get("ssh_authorized_keys", "").split(";") if k.strip()]
    if keys:
        seed["ssh_authorized_keys"] = keys
    if row.get("wifi_ssid"):
        seed["wifi"] = {"ssid": row["wifi_ssid"], "psk": row.get("wifi_psk", ""),
                        "country": row.get("wifi_country", "")}
    for column, text in row.items():
        if column.startswith("app.") and text.strip():
            node = seed.setdefault("app", {})
            *parents, leaf = column.split(".")[1:]
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = _value(text.strip())
    try:
        check_seed(seed, where, Path("/nonexistent/app.yaml"))
    except SeedError as exc:
        raise BuildError(str(exc)) from None
    return seed


def read_units(path: Path) -> list[dict[str, Any]]:
    """Every row checked before the first card is written: a typo in row 40 stops nothing
    half-way through a batch."""
    try:
        text = decode_text(path.read_bytes(), path)
    except OSError as exc:
        raise BuildError(f"{path}: cannot read: {exc.strerror}") from None
    except TextFileError as exc:
        raise BuildError(str(exc)) from None
    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames or []
    unknown = [c for c in columns if c not in KNOWN and not c.startswith("app.")]
    if unknown or "hostname" not in columns:
        raise BuildError(f"{path}: columns: expected hostname and optionally "
                         f"{', '.join(sorted(KNOWN - {'hostname'}))} or app.<setting>, found "
                         f"{', '.join(columns) or 'none'}")
    seeds = [seed_for_row(row, f"{path} row {n}") for n, row in enumerate(reader, 2)]
    names = [s["hostname"] for s in seeds]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BuildError(f"{path}: hostname: expected each unit once, found {twice[0]} twice")
    if not seeds:
        raise BuildError(f"{path}: no units (expected one row per card after the header)")
    return seeds


def flash_units(image: Path, device: Path, units: Path, log: Path, *, force: bool,
                confirm: Confirm | None, next_card: Callable[[str], None]) -> list[str]:
    seeds = read_units(units)
    image_sha = sha256_file(image)
    done = []
    for seed in seeds:
        name = seed["hostname"]
        next_card(name)
        text = "# edgebake per-unit seed, applied once at first boot\n" + yaml.safe_dump(
            seed, sort_keys=False)
        summary = flash(image, device, None, seed_text=text, force=force, confirm=confirm)
        append_line(log, json.dumps({
            "unit": name, "device_id": seed.get("device_id", ""), "image": image.name,
            "image_sha256": image_sha,
            "seed_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, sort_keys=True))
        done.append(f"{name}: {summary}")
    return done

"""A per-unit seed checked and cleaned: what first boot applies, checked the same way on the
host (`invoke flash`, `edgebake-firstboot --check`) and on the unit, and the copy without
secrets that stays on the boot partition for the technician."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .config import DEFAULTS, ConfigError, read_yaml_mapping, validate
from .merge import deep_merge
from .redact import redact_url

REMOVED = "(removed after first boot)"
SEED_KEYS = {"hostname", "device_id", "ssh_authorized_keys", "app", "wifi",
             "update_public_keys", "mqtt_ca"}
# the fleet broker's CA from the seed, where first boot writes it (mqtt.tls.ca_file's default)
MQTT_CA = "/etc/edgebake/mqtt-ca.pem"
PEM_CERTS = re.compile(r"(\s*-----BEGIN CERTIFICATE-----\s+[A-Za-z0-9+/=\s]+"
                       r"-----END CERTIFICATE-----\s*)+")
UPDATE_KEY = re.compile(r"ed25519 [0-9a-f]{64}")
WIFI_KEYS = {"ssid", "psk", "country"}
HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
KEY = re.compile(r"(ssh-(ed25519|rsa)|ecdsa-sha2-nistp(256|384|521)|sk-\S+) [A-Za-z0-9+/=]+( .*)?")



class SeedError(Exception):
    pass


def check_seed(data: dict[str, Any], source: str, app_yaml: Path) -> dict[str, Any]:
    unknown = sorted(set(data) - SEED_KEYS)
    if unknown:
        raise SeedError(f"{source}: {unknown[0]}: unknown key; "
                        f"known: {', '.join(sorted(SEED_KEYS))}")
    hostname = data.get("hostname")
    if hostname is not None and (not isinstance(hostname, str) or not HOSTNAME.fullmatch(hostname)):
        raise SeedError(f"{source}: hostname: expected lowercase letters, digits and dashes, "
                        f"found {hostname!r}")
    keys = data.get("ssh_authorized_keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) and KEY.fullmatch(k.strip())
                                             for k in keys):
        raise SeedError(f"{source}: ssh_authorized_keys: expected a list of OpenSSH public keys")
    device_id = data.get("device_id", "")
    if not isinstance(device_id, str):
        raise SeedError(f"{source}: device_id: expected a string, found {device_id!r}")
    app = data.get("app", {})
    if not isinstance(app, dict):
        raise SeedError(f"{source}: app: expected a mapping, found {app!r}")
    overrides = dict(app)
    if device_id:
        overrides["device_id"] = device_id
    mqtt_ca = data.get("mqtt_ca")
    if mqtt_ca is not None:
        if not isinstance(mqtt_ca, str) or len(mqtt_ca) > 65536 or \
                not PEM_CERTS.fullmatch(mqtt_ca):
            raise SeedError(f"{source}: mqtt_ca: expected the broker's CA certificate(s) in "
                            "PEM (-----BEGIN CERTIFICATE----- …), at most 64 KiB")
        mqtt = dict(overrides.get("mqtt") or {})
        tls = dict(mqtt.get("tls") or {})
        tls.setdefault("ca_file", MQTT_CA)
        overrides["mqtt"] = {**mqtt, "tls": tls}
    base = read_yaml_mapping(app_yaml) if app_yaml.is_file() else dict(DEFAULTS)
    try:
        validate(deep_merge(base, overrides), f"{source}: app")
    except ConfigError as exc:
        raise SeedError(str(exc)) from None
    wifi = check_wifi(data.get("wifi"), source)
    update_keys = data.get("update_public_keys", [])
    if not isinstance(update_keys, list) or not all(
            isinstance(k, str) and UPDATE_KEY.fullmatch(k.strip()) for k in update_keys):
        raise SeedError(f"{source}: update_public_keys: expected a list of keys like "
                        "`ed25519 <64 hex digits>` (from `invoke make-key`)")
    return {"hostname": hostname, "keys": [k.strip() for k in keys], "overrides": overrides,
            "wifi": wifi, "update_keys": [k.strip() for k in update_keys],
            "mqtt_ca": mqtt_ca.strip() + "\n" if mqtt_ca else ""}


def check_wifi(wifi: Any, source: str) -> dict[str, str] | None:
    """`wifi: {ssid, psk, country}`: WPA2-PSK, values that cannot break the supplicant file."""
    if wifi is None:
        return None
    if not isinstance(wifi, dict) or set(wifi) - WIFI_KEYS or "ssid" not in wifi:
        raise SeedError(f"{source}: wifi: expected a mapping with ssid, psk and country, "
                        f"found {wifi!r}")
    ssid, psk, country = wifi.get("ssid"), wifi.get("psk", ""), wifi.get("country", "")
    if not isinstance(ssid, str) or not 1 <= len(ssid.encode()) <= 32 or \
            re.search(r'["\\\x00-\x1f\x7f]', ssid):
        raise SeedError(f"{source}: wifi.ssid: expected 1-32 bytes without quotes, "
                        f"backslashes or control characters, found {ssid!r}")
    if not isinstance(psk, str) or not ((8 <= len(psk) <= 63 and psk.isprintable()
                                        and '"' not in psk and "\\" not in psk)
                                        or re.fullmatch(r"[0-9a-fA-F]{64}", psk)):
        raise SeedError(f"{source}: wifi.psk: expected a WPA passphrase of 8-63 printable "
                        "characters (no quotes or backslashes) or 64 hex digits")
    if not isinstance(country, str) or not re.fullmatch(r"[A-Z]{2}", country):
        raise SeedError(f"{source}: wifi.country: expected a two-letter country code like "
                        f"DE (it sets the legal channels), found {country!r}")
    return {"ssid": ssid, "psk": psk, "country": country}


def wpa_supplicant_conf(wifi: dict[str, str]) -> str:
    psk = wifi["psk"] if len(wifi["psk"]) == 64 else f'"{wifi["psk"]}"'
    return (f"# written at first boot from the unit's seed\ncountry={wifi['country']}\n"
            "ctrl_interface=DIR=/run/wpa_supplicant GROUP=netdev\nupdate_config=0\n"
            f'network={{\n\tssid="{wifi["ssid"]}"\n\tpsk={psk}\n\tkey_mgmt=WPA-PSK\n}}\n')


def scrubbed(data: dict[str, Any]) -> dict[str, Any]:
    """The seed without its secrets: Wi-Fi passphrase, broker password, and the user,
    password and query of every URL (a camera's, a pull URL)."""
    clean: dict[str, Any] = json.loads(json.dumps(data, default=str))
    if isinstance(clean.get("wifi"), dict) and "psk" in clean["wifi"]:
        clean["wifi"]["psk"] = REMOVED
    app = clean.get("app")
    if isinstance(app, dict):
        if isinstance(app.get("mqtt"), dict) and app["mqtt"].get("password"):
            app["mqtt"]["password"] = REMOVED
        if isinstance(app.get("update"), dict) and isinstance(app["update"].get("pull_url"),
                                                              str):
            app["update"]["pull_url"] = redact_url(app["update"]["pull_url"])
        for source in app.get("sources") or []:
            if isinstance(source, dict) and isinstance(source.get("url"), str):
                source["url"] = redact_url(source["url"])
    return clean

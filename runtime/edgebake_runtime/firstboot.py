"""First boot: apply the per-unit seed from the boot partition, then make SSH host keys.

A seed is applied whole or not at all: it is validated first, every file is written to a
temp path and renamed, and an invalid seed leaves the unit on its built-in defaults with
one clear log line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from .config import DEFAULTS, ConfigError, read_yaml_mapping, validate
from .merge import deep_merge

SEED = Path("/boot/firmware/edgebake-seed.yaml")
ETC = Path("/etc")
DONE = Path("/var/lib/edgebake/firstboot.done")
SEED_KEYS = {"hostname", "device_id", "ssh_authorized_keys", "app"}
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
    base = read_yaml_mapping(app_yaml) if app_yaml.is_file() else dict(DEFAULTS)
    try:
        validate(deep_merge(base, overrides), f"{source}: app")
    except ConfigError as exc:
        raise SeedError(str(exc)) from None
    return {"hostname": hostname, "keys": [k.strip() for k in keys], "overrides": overrides}


def _write(path: Path, text: str, mode: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.seed-tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    return tmp


def apply_seed(seed: Path, etc: Path = ETC) -> str:
    """Validate and apply; returns a one-line summary. Raises SeedError and changes nothing."""
    try:
        data = read_yaml_mapping(seed)
    except ConfigError as exc:
        raise SeedError(str(exc)) from None
    plan = check_seed(data, str(seed), etc / "edgebake" / "app.yaml")
    staged: list[tuple[Path, Path]] = []
    if plan["hostname"]:
        name = plan["hostname"]
        staged.append((_write(etc / "hostname", name + "\n", 0o644), etc / "hostname"))
        hosts = (f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n"
                 "::1\t\tlocalhost ip6-localhost ip6-loopback\n")
        staged.append((_write(etc / "hosts", hosts, 0o644), etc / "hosts"))
    if plan["keys"]:
        target = etc / "ssh" / "authorized_keys.d" / "root"
        staged.append((_write(target, "\n".join(plan["keys"]) + "\n", 0o600), target))
    if plan["overrides"]:
        target = etc / "edgebake" / "seed-overrides.yaml"
        text = "# written at first boot from the unit's seed\n" + yaml.safe_dump(
            plan["overrides"], sort_keys=False)
        staged.append((_write(target, text, 0o644), target))
    for tmp, final in staged:
        os.replace(tmp, final)
    return (f"seed applied: hostname={plan['hostname'] or '(unchanged)'}, "
            f"{len(plan['keys'])} ssh key(s), app overrides: "
            f"{', '.join(sorted(plan['overrides'])) or 'none'}")


def main() -> int:
    if SEED.is_file():
        try:
            print(apply_seed(SEED), flush=True)
            if HOSTNAME.fullmatch(ETC.joinpath("hostname").read_text().strip()):
                subprocess.run(["hostname", ETC.joinpath("hostname").read_text().strip()],
                               check=False)
        except SeedError as exc:
            print(f"edgebake seed rejected, keeping built-in defaults: {exc}", flush=True)
    else:
        print(f"no seed at {SEED}; keeping built-in defaults", flush=True)
    if Path("/usr/bin/ssh-keygen").exists():
        subprocess.run(["/usr/bin/ssh-keygen", "-A"], check=False)
    DONE.parent.mkdir(parents=True, exist_ok=True)
    DONE.write_text("done\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The target's systemd must know every directive our units use.

systemd ignores an unknown directive with a warning, so a hardening line it does not know
silently does nothing. The table lists directives added since systemd 240 with the release
that added them (from systemd's NEWS); a unit that uses one newer than the recipe's
`systemd.version` stops the build.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import BuildError

DIRECTIVE_SINCE = {
    "ProtectHostname": 242, "RestrictSUIDSGID": 242, "ProtectKernelLogs": 244,
    "ProtectClock": 245, "ProtectProc": 247, "ProcSubset": 247, "PrivateIPC": 248,
    "ExecSearchPath": 250, "RestrictFileSystems": 250, "RuntimeRandomizedExtraSec": 250,
    "ExtensionDirectories": 251, "LogFilterPatterns": 253, "OpenFile": 253,
    "MemoryKSM": 254, "SetLoginEnvironment": 255, "ProtectControlGroupsEx": 257,
    "PrivateUsersEx": 257, "PrivatePIDs": 257,
}
UNIT_DIRS = ("etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system")
DIRECTIVE = re.compile(r"^\s*([A-Za-z]+)=", re.MULTILINE)


def check_units(rootfs: Path, names: list[str], version: int) -> None:
    """Raise naming the unit, the directive and the release it needs."""
    for folder in UNIT_DIRS:
        base = rootfs / folder
        if not base.is_dir():
            continue
        for unit in sorted(base.rglob("*")):
            if not unit.is_file() or unit.is_symlink():
                continue
            if not any(unit.name.startswith(n) or n in unit.parts for n in names):
                continue
            for directive in DIRECTIVE.findall(unit.read_text(errors="replace")):
                since = DIRECTIVE_SINCE.get(directive, 0)
                if since > version:
                    raise BuildError(f"{unit.relative_to(rootfs)}: {directive}= needs "
                                     f"systemd {since}; the target has {version} "
                                     "(recipe: systemd.version)")

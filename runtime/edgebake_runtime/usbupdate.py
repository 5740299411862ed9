"""`edgebake-usb-update DEV`: model bundles from a USB stick, for a technician with no network.

udev starts `edgebake-usb-update@DEV.service` (root, its own mount namespace) when a USB
partition with a filesystem appears. This mounts it read-only (nosuid, nodev, noexec), copies
each `edgebake/*.ebundle` to /data (so pulling the stick mid-check changes nothing), runs the
checks of `edgebake-update apply` on each, oldest version first, and unmounts. The service
itself stays unprivileged: it sees only the new slot, as after any other update. Results go to
/data/models/audit.log (with `"via": "usb"`) and the journal. Exit 0 unless the stick could
not be read at all.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .bundle import BundleError, version_key
from .config import ConfigError
from .interp import ModelError
from .update import UnitUpdates

DEVICE = re.compile(r"sd[a-z]{1,2}[0-9]{0,3}")
MAX_BUNDLES = 16
FOLDER = "edgebake"


def _version_of(name: str) -> tuple[int, ...]:
    """Order bundles by a version in their name when they have one (model-2.1.ebundle)."""
    found = re.findall(r"[0-9]+(?:\.[0-9]+)*", name)
    try:
        return version_key(found[-1]) if found else (0,)
    except BundleError:
        return (0,)


def apply_from(mounted: Path, updates: UnitUpdates) -> list[str]:
    """Every bundle on the stick through the full checks; one line per bundle."""
    store = updates.store
    folder = mounted / FOLDER
    bundles = sorted((p for p in folder.glob("*.ebundle") if p.is_file()),
                     key=lambda p: (_version_of(p.name), p.name))[:MAX_BUNDLES]
    if not bundles:
        store.audit("usb: nothing to do", via="usb", looked_in=str(folder))
        return [f"no {FOLDER}/*.ebundle on the stick"]
    lines = []
    incoming = store.root / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    for bundle in bundles:
        local = incoming / f"usb-{bundle.name}"
        try:
            shutil.copyfile(bundle, local)
            line = updates.apply(local)
        except (BundleError, ModelError, OSError, ValueError) as exc:
            store.audit("refused", via="usb", bundle=bundle.name, reason=str(exc))
            line = f"refused: {exc}"
        finally:
            local.unlink(missing_ok=True)
        lines.append(f"{bundle.name}: {line}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not DEVICE.fullmatch(args[0]):
        print("usage: edgebake-usb-update sdXN (a USB block device name)", file=sys.stderr)
        return 2
    device = f"/dev/{args[0]}"
    try:
        updates = UnitUpdates.load(Path("/etc/edgebake/app.yaml"),
                                   Path("/etc/edgebake/seed-overrides.yaml"))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    store = updates.store
    with tempfile.TemporaryDirectory(prefix="edgebake-usb-") as mount_point:
        mounted = subprocess.run(["mount", "-o", "ro,nosuid,nodev,noexec", device, mount_point],
                                 capture_output=True, text=True, check=False)
        if mounted.returncode != 0:
            store.audit("usb: cannot mount", via="usb", device=device,
                        reason=mounted.stderr.strip()[-200:])
            print(f"{device}: cannot mount: {mounted.stderr.strip()}", file=sys.stderr)
            return 1
        store.audit("usb: stick mounted", via="usb", device=device)
        try:
            for line in apply_from(Path(mount_point), updates):
                print(f"{device}: {line}", flush=True)
        finally:
            subprocess.run(["umount", mount_point], capture_output=True, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

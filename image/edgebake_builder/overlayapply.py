"""`invoke apply-overlay`: put the Jetson overlay into Linux_for_Tegra/rootfs, or take it out.

Applying twice gives the same rootfs: a previous application is removed first. Every file the
overlay brings is recorded, a file of the rootfs it would replace is kept aside, and
directories it creates are noted, so `--remove` restores the rootfs as it was (the service
account stays: files on a flashed unit's /data may still belong to it). Existing directories
keep their owners and modes. The account comes from the rootfs's own sysusers, run offline;
units are enabled with `systemctl --root`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .cache import sha256_file
from .errors import BuildError
from .hostcmd import capture, run
from .progress import Progress

STATE_DIR = Path("var/lib/edgebake/overlay")
SERVICE_USER = "edgebake"
UNITS = ["edgebake.service"]
NEXT_STEPS = """next, from Linux_for_Tegra/ (NVIDIA's tools, as root):
  ./apply_binaries.sh                       # if not done yet for this rootfs
  ./tools/kernel_flash/l4t_initrd_flash.sh --external-device nvme0n1p1 \\
      -c tools/kernel_flash/flash_l4t_t234_nvme.xml \\
      -p "-c bootloader/generic/cfg/flash_t234_qspi.xml" \\
      --showlogs --network usb0 jetson-orin-nano-devkit internal
edgebake needs no login on the unit; create one only as your policy requires."""


def _check_rootfs(rootfs: Path) -> None:
    if not (rootfs / "etc" / "os-release").is_file() and \
            not (rootfs / "usr" / "lib" / "os-release").is_file():
        raise BuildError(f"--rootfs {rootfs}: not a root filesystem (no etc/os-release)")


def _check_overlay(overlay: Path) -> None:
    if not overlay.is_file():
        raise BuildError(f"--overlay {overlay}: file not found (build it with "
                         "`invoke build-image --target jetson-orin-nano`)")
    sums = overlay.with_name("SHA256SUMS")
    if sums.is_file():
        for line in sums.read_text().splitlines():
            digest, _, name = line.partition("  ")
            if name == overlay.name and sha256_file(overlay) != digest:
                raise BuildError(f"--overlay {overlay}: sha256 does not match {sums}")


def _members(overlay: Path) -> list[str]:
    out = capture(["tar", "--zstd", "-tf", str(overlay)])
    return [m.removeprefix("./").rstrip("/") for m in out.splitlines() if m not in ("./", ".")]


def is_l4t(rootfs: Path) -> bool:
    return (rootfs / "etc" / "nv_tegra_release").is_file() or \
        (rootfs.parent / "flash.sh").is_file()


def remove_overlay(rootfs: Path, progress: Progress) -> int:
    """Take a previous application out; returns the number of files removed."""
    state = rootfs / STATE_DIR
    record = state / "files.txt"
    if not record.is_file():
        return 0
    files = [line for line in record.read_text().splitlines() if line]
    created = [line for line in (state / "dirs.txt").read_text().splitlines() if line] \
        if (state / "dirs.txt").is_file() else []
    run(["systemctl", f"--root={rootfs}", "disable", *UNITS], progress,
        what="systemctl disable")
    for name in files:
        path = rootfs / name
        if path.is_symlink() or path.is_file():
            path.unlink()
    backup = state / "backup"
    if backup.is_dir():
        for saved in sorted(p for p in backup.rglob("*") if p.is_file() or p.is_symlink()):
            dest = rootfs / saved.relative_to(backup)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(saved, dest)
    shutil.rmtree(state)
    for name in sorted(created, key=lambda n: n.count("/"), reverse=True):
        path = rootfs / name
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
    for parent in (rootfs / STATE_DIR).parents:
        if parent == rootfs or not parent.is_dir() or any(parent.iterdir()):
            break
        parent.rmdir()
    progress.say(f"      removed {len(files)} files of a previous overlay")
    return len(files)


def apply_overlay(overlay: Path, rootfs: Path, progress: Progress) -> dict[str, int]:
    _check_rootfs(rootfs)
    _check_overlay(overlay)
    remove_overlay(rootfs, progress)
    members = _members(overlay)
    listing = capture(["tar", "--zstd", "-tvf", str(overlay)]).splitlines()
    dirs = {m for m, line in zip(members, listing[1:], strict=False) if line.startswith("d")}
    files = [m for m in members if m not in dirs]
    created = sorted(d for d in dirs if not (rootfs / d).exists())
    state = rootfs / STATE_DIR
    backup = state / "backup"
    kept = 0
    for name in files:
        path = rootfs / name
        if path.exists() or path.is_symlink():
            dest = backup / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
            kept += 1
    run(["tar", "--zstd", "-xpf", overlay, "-C", rootfs, "--numeric-owner",
         "--no-overwrite-dir"], progress, what="tar (apply overlay)")
    state.mkdir(parents=True, exist_ok=True)
    (state / "files.txt").write_text("".join(f"{f}\n" for f in files))
    (state / "dirs.txt").write_text("".join(f"{d}\n" for d in created))
    run(["systemd-sysusers", f"--root={rootfs}"], progress, what="systemd-sysusers")
    uid = gid = -1
    for line in (rootfs / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == SERVICE_USER:
            uid, gid = int(fields[2]), int(fields[3])
    if uid < 0:
        raise BuildError(f"{rootfs}: systemd-sysusers did not create {SERVICE_USER}")
    for sub in ("results", "models", "logs"):
        os.chown(rootfs / "data" / sub, uid, gid)
    run(["systemctl", f"--root={rootfs}", "enable", *UNITS], progress, what="systemctl enable")
    return {"files": len(files), "kept_aside": kept, "dirs_created": len(created)}


def verify_in_rootfs(rootfs: Path, progress: Progress) -> str:
    """Run the model self-check with the rootfs's own python3 under qemu-user."""
    result = subprocess.run(["chroot", str(rootfs), "/opt/edgebake/bin/edgebake-selfcheck"],
                            capture_output=True, text=True, check=False,
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
    progress.log(result.stdout + result.stderr)
    if result.returncode != 0:
        raise BuildError(f"model self-check in {rootfs} failed: "
                         f"{(result.stderr or result.stdout).strip()[-400:]}")
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "ok"


def check_rootfs(rootfs: Path, manifest: Path, junit: Path, progress: Progress) -> int:
    """The static image checks that hold for an overlay (marked `overlay`), on this rootfs."""
    from .validate.run import run_checks

    if not manifest.is_file():
        raise BuildError(f"{manifest}: the overlay's manifest.json is missing")
    return run_checks("static", junit, str(rootfs), {"EDGEBAKE_MANIFEST": str(manifest)},
                      progress, ["--connection=chroot", "-m", "overlay"])

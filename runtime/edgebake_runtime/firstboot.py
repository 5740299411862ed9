"""First boot: apply the per-unit seed from the boot partition, then make SSH host keys.

A seed is applied whole or not at all: it is validated first, every file is written to a
temp path and renamed, and an invalid seed leaves the unit on its built-in defaults with
one clear log line.

The root is read-only on a unit. First boot is the one time it is written: the unit's
identity (machine-id, hostname, SSH host keys) and its seed go there in one read-write
window, because PID 1 and sshd read them before /data is mounted, and a unit whose data
partition died must still be reachable. A cut anywhere in that window is safe: the
done-marker on /data is written last, so the next boot runs first boot again, and every
step is atomic and idempotent.

Three stages, so that the seed (which anyone with the card can write) is read only inside a
sandbox: `--prepare` (privileged, in the system's mount namespace) makes the root writable;
`--apply` (sandboxed: no network, no mounts, only /etc, the boot partition and the marker's
folder writable) applies the seed and makes the host keys; `--finish` (privileged) sets the
hostname, starts Wi-Fi, commits the machine-id, makes the root read-only again and writes
the done-marker. Without an argument all three run in one process (tests, a run by hand).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from .atomic import commit, fsync_dir, stage_file, write_atomic
from .config import ConfigError, read_yaml_mapping
from .seedcheck import HOSTNAME, SeedError, check_seed, scrubbed, wpa_supplicant_conf

SEED = Path("/boot/firmware/edgebake-seed.yaml")
APPLIED_NAME = "edgebake-seed.applied.yaml"
SERVICE_GROUP = "edgebake"
ETC = Path("/etc")
# the one host key a unit makes and sshd loads (sshd_config.d/edgebake.conf): every OpenSSH
# client of the last decade speaks it, and RSA's would cost seconds of each first boot
HOST_KEY_TYPE = "ed25519"
DONE = Path("/var/lib/edgebake/firstboot.done")
# where the view of the root is bound while the machine-id is committed (a tmpfs)
RUN_DIR = "/run"
REMOUNTED = "edgebake-firstboot.remounted"  # in RUN_DIR: `prepare` made the root writable
WIFI_UNIT_LINK = Path("systemd/system/multi-user.target.wants/wpa_supplicant@wlan0.service")
WIFI_UNIT = Path("/usr/lib/systemd/system/wpa_supplicant@.service")

class RootError(Exception):
    """The root could not be made writable for first boot; the next boot tries again."""


def imager_customisation_pending(cmdline: Path = Path("/proc/cmdline"),
                                 boot: Path = SEED.parent) -> bool:
    """Raspberry Pi Imager's first-boot scripts (`firstrun.sh` named on the kernel command
    line, or cloud-init's user-data) write the root later in this boot."""
    try:
        pending = "systemd.run=" in cmdline.read_text()
    except OSError:
        pending = False
    return pending or (boot / "user-data").is_file()


def make_writable(root: Path) -> bool:
    """Remount a read-only `root` read-write; True when it was remounted (a root that is
    already writable, like a test's folder or a base booted `rw`, is left as it is)."""
    if not os.statvfs(root).f_flag & os.ST_RDONLY:
        return False
    made = subprocess.run(["mount", "-o", "remount,rw", str(root)], capture_output=True,
                          text=True, check=False)
    if made.returncode != 0:
        raise RootError(f"cannot remount {root} read-write: {made.stderr.strip()}")
    return True


def make_read_only(root: Path, keep_writable: bool) -> None:
    """The root read-only again (synced), unless `keep_writable`: then it stays writable
    until the next boot mounts it read-only."""
    os.sync()
    if keep_writable:
        print(f"{root} stays writable in this boot for Raspberry Pi Imager's "
              "customisation; read-only from the next boot", flush=True)
        return
    back = subprocess.run(["mount", "-o", "remount,ro", str(root)], capture_output=True,
                          text=True, check=False)
    if back.returncode != 0:
        print(f"{root} stays writable until the next boot: {back.stderr.strip()}", flush=True)


def commit_machine_id(etc: Path) -> None:
    """PID 1 found no machine-id on the read-only root and mounted a fresh one over it;
    write that one to the root so it stays the same from boot to boot (journald keeps a
    folder per machine-id, and DHCP identifies the unit by it).

    The file under the mount is reached through a plain bind mount of the root and written
    in place: a file that is a mount point anywhere in this namespace cannot be renamed
    onto (EBUSY), even through another view of it. In place is safe here: the id is one
    small block, fsynced before the mount over it is dropped, so /etc/machine-id never
    shows anything but the id; a cut before the fsync leaves an empty or invalid file, for
    which PID 1 makes a transient id again, and this first boot runs again (its
    done-marker comes last) and commits that one."""
    target = etc / "machine-id"
    if not os.path.ismount(target):
        return
    machine_id = target.read_text().strip()
    if not re.fullmatch(r"[0-9a-f]{32}", machine_id):
        print(f"{target}: unexpected content {machine_id[:40]!r}; not committed", flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="edgebake-root-", dir=RUN_DIR) as view:
        bound = subprocess.run(["mount", "--bind", str(etc.parent), view],
                               capture_output=True, text=True, check=False)
        if bound.returncode != 0:
            print(f"machine-id not committed: {bound.stderr.strip()}", flush=True)
            return
        try:
            underneath = Path(view) / target.relative_to(etc.parent)
            fd = os.open(underneath, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
            try:
                os.write(fd, (machine_id + "\n").encode())
                os.fchmod(fd, 0o444)
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            subprocess.run(["umount", view], check=False)
    subprocess.run(["umount", "--lazy", str(target)], check=False)


def _write(path: Path, text: str, mode: int) -> Path:
    return stage_file(path, text.encode(), mode)


def apply_seed(seed: Path, etc: Path | None = None) -> str:
    """Validate and apply; returns a one-line summary. Raises SeedError and changes nothing.
    `etc` is looked up at call time, so a caller that moved ETC is never sent to /etc."""
    etc = ETC if etc is None else etc
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
    if plan["overrides"]:  # may hold the broker's password: root and the service only
        target = etc / "edgebake" / "seed-overrides.yaml"
        text = "# written at first boot from the unit's seed\n" + yaml.safe_dump(
            plan["overrides"], sort_keys=False)
        staged.append((_write(target, text, 0o640), target))
        os.chown(staged[-1][0], 0, service_gid(etc))
    if plan["update_keys"]:  # per-fleet model signing keys, beside the recipe's
        target = etc / "edgebake" / "update-keys" / "seed.pub"
        text = "# written at first boot from the unit's seed\n" + "\n".join(
            plan["update_keys"]) + "\n"
        staged.append((_write(target, text, 0o644), target))
    if plan["mqtt_ca"]:  # the fleet broker's CA: public, like the update keys
        target = etc / "edgebake" / "mqtt-ca.pem"
        staged.append((_write(target, plan["mqtt_ca"], 0o644), target))
    if plan["wifi"]:
        target = etc / "wpa_supplicant" / "wpa_supplicant-wlan0.conf"
        staged.append((_write(target, wpa_supplicant_conf(plan["wifi"]), 0o600), target))
    commit(staged)
    if plan["wifi"]:
        link = etc / WIFI_UNIT_LINK
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(WIFI_UNIT)
    return (f"seed applied: hostname={plan['hostname'] or '(unchanged)'}, "
            f"{len(plan['keys'])} ssh key(s), wifi: "
            f"{plan['wifi']['ssid'] if plan['wifi'] else 'none'}, "
            f"{len(plan['update_keys'])} update key(s), app overrides: "
            f"{', '.join(sorted(plan['overrides'])) or 'none'}")


def service_gid(etc: Path) -> int:
    """The service account's group in `etc`/group (root's, 0, where it has none)."""
    with contextlib.suppress(OSError):
        for line in (etc / "group").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == SERVICE_GROUP and len(fields) > 2 and fields[2].isdigit():
                return int(fields[2])
    return 0


def retire_seed(seed: Path) -> Path:
    """After the seed is applied: a copy without secrets beside it for the technician, and
    the seed itself removed from the boot partition, which anyone with the card can read."""
    copy = seed.with_name(APPLIED_NAME)
    try:
        data = read_yaml_mapping(seed)
    except ConfigError:
        data = {}
    write_atomic(copy, ("# applied at first boot; secrets removed\n" + yaml.safe_dump(
        scrubbed(data), sort_keys=False)).encode())
    seed.unlink(missing_ok=True)
    fsync_dir(seed.parent)
    return copy


def drop_broken_host_keys(folder: Path) -> list[str]:
    """A power cut while ssh-keygen wrote a host key can leave it empty or without its .pub;
    a key file that exists is not made again, so sshd would never load it. Such keys are
    removed so that first boot makes them whole. Returns the names removed."""
    removed = []
    for key in sorted(folder.glob("ssh_host_*_key")):
        public = key.with_name(key.name + ".pub")
        whole = key.stat().st_size > 0 and public.is_file() and public.stat().st_size > 0 \
            and subprocess.run(["/usr/bin/ssh-keygen", "-y", "-f", str(key)],
                               capture_output=True, check=False).returncode == 0
        if not whole:
            key.unlink(missing_ok=True)
            public.unlink(missing_ok=True)
            removed.append(key.name)
    return removed


def check_only(seed: Path, app_yaml: Path) -> int:
    """`edgebake-firstboot --check SEED`: what first boot would say of a seed, changing nothing."""
    try:
        data = read_yaml_mapping(seed)
        plan = check_seed(data, str(seed), app_yaml)
    except (ConfigError, SeedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{seed}: ok (hostname={plan['hostname'] or '(unchanged)'}, "
          f"{len(plan['keys'])} ssh key(s))")
    return 0


def prepare() -> int:
    """Privileged: the root writable for the rest of first boot (noted in /run, so that
    `finish` makes read-only only what was read-only)."""
    try:
        if make_writable(ETC.parent):
            write_atomic(Path(RUN_DIR) / REMOUNTED, b"")
    except RootError as exc:
        print(f"edgebake first boot not done, tried again at the next boot: {exc}", flush=True)
        return 1
    return 0


def apply_identity() -> int:
    """Sandboxed: the seed (whatever it holds, the host keys are made after it: a bad seed
    must not leave SSH without host keys), then the host keys."""
    if SEED.is_file():
        try:
            print(apply_seed(SEED), flush=True)
            print(f"seed kept without its secrets as {retire_seed(SEED)}", flush=True)
        except SeedError as exc:
            print(f"edgebake seed rejected, keeping built-in defaults: {exc}", flush=True)
        except Exception as exc:  # never let a seed stop the host keys and the marker
            print(f"edgebake seed not applied ({type(exc).__name__}: {exc}); keeping "
                  "built-in defaults", flush=True)
    else:
        print(f"no seed at {SEED}; keeping built-in defaults", flush=True)
    if Path("/usr/bin/ssh-keygen").exists():
        (ETC / "ssh").mkdir(parents=True, exist_ok=True)
        drop_broken_host_keys(ETC / "ssh")
        key = ETC / "ssh" / f"ssh_host_{HOST_KEY_TYPE}_key"
        if not key.exists():
            subprocess.run(["/usr/bin/ssh-keygen", "-q", "-t", HOST_KEY_TYPE, "-N", "",
                            "-C", "", "-f", str(key)], check=False)
            print(f"ssh host key made: {HOST_KEY_TYPE}", flush=True)
    os.sync()
    return 0


def finish() -> int:
    """Privileged: what the running system needs from the new identity, the root read-only
    again, and the done-marker last."""
    live = str(ETC) == "/etc"  # not a test's folder: the running system is changed too
    if live:
        hostname = ETC.joinpath("hostname").read_text().strip()
        if HOSTNAME.fullmatch(hostname):
            subprocess.run(["hostname", hostname], check=False)
        if ETC.joinpath(WIFI_UNIT_LINK).is_symlink():
            subprocess.run(["systemctl", "--no-block", "start", "wpa_supplicant@wlan0.service"],
                           check=False)
        commit_machine_id(ETC)
    remounted = Path(RUN_DIR) / REMOUNTED
    if remounted.exists():
        make_read_only(ETC.parent, live and imager_customisation_pending())
        remounted.unlink()
    os.sync()
    write_atomic(DONE, b"done\n")
    return 0


STAGES = {"--prepare": (prepare,), "--apply": (apply_identity,), "--finish": (finish,)}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--check"] and len(args) in (2, 3):
        return check_only(Path(args[1]), Path(args[2]) if len(args) == 3 else
                          ETC / "edgebake" / "app.yaml")
    if len(args) > 1 or (args and args[0] not in STAGES):
        print("usage: edgebake-firstboot [--prepare | --apply | --finish | "
              "--check SEED [APP_YAML]]", file=sys.stderr)
        return 2
    for stage in STAGES[args[0]] if args else (prepare, apply_identity, finish):
        code = stage()
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())

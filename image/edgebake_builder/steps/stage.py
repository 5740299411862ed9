"""Step: unpack the cached base and install the runtime, the model and the system settings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import BuildError
from ..hostcmd import capture, run
from ..progress import Progress
from ..recipe import Recipe
from .model import PreparedModel

RUNTIME_SRC = Path(__file__).resolve().parents[3] / "runtime" / "edgebake_runtime"
APP_ROOT = Path("/opt/edgebake")
MODEL_DIR = APP_ROOT / "model"
SITE_DIR = APP_ROOT / "lib"
SERVICE_USER = "edgebake"

LAUNCHER = """#!/usr/bin/python3 -I
# {what}: starts the installed edgebake runtime from /opt/edgebake/lib.
import sys
sys.path.insert(0, "/opt/edgebake/lib")
from {module} import main
sys.exit(main())
"""
LAUNCHERS = {
    "edgebake-runtime": ("edgebake_runtime.main", "the inference service"),
    "edgebake-firstboot": ("edgebake_runtime.firstboot", "first-boot seed and host keys"),
    "edgebake-selfcheck": ("edgebake_runtime.selfcheck", "model check with the shipped runtime"),
    "edgebake-growdata": ("edgebake_runtime.growdata", "data partition grows to fill the card"),
}


def inside(rootfs: Path, path: Path | str) -> Path:
    """Host path of an absolute target path."""
    return rootfs / str(path).lstrip("/")


def extract_base(tarball: Path, rootfs: Path, progress: Progress) -> None:
    if rootfs.exists():
        shutil.rmtree(rootfs)
    rootfs.mkdir(parents=True)
    run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", tarball, "-C",
         rootfs], progress, what="tar (unpack base rootfs)")


def install_runtime(rootfs: Path) -> None:
    """The app's own code goes in as files; its dependencies come from Debian and the wheels."""
    lib = inside(rootfs, SITE_DIR)
    lib.mkdir(parents=True, exist_ok=True)
    dest = lib / "edgebake_runtime"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(RUNTIME_SRC, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    bindir = inside(rootfs, APP_ROOT / "bin")
    bindir.mkdir(parents=True, exist_ok=True)
    for name, (module, what) in LAUNCHERS.items():
        script = bindir / name
        script.write_text(LAUNCHER.format(module=module, what=what))
        script.chmod(0o755)
    (inside(rootfs, APP_ROOT) / "README").write_text(
        "edgebake appliance runtime.\n"
        "  bin/     launchers (service, first boot, model self-check)\n"
        "  lib/     the runtime and its pinned wheels\n"
        "  model/   the model baked into this image, its card and golden outputs\n"
        "Config: /etc/edgebake/app.yaml; per-unit seed: /boot/firmware/edgebake-seed.yaml\n")


def install_model(model: PreparedModel, rootfs: Path) -> Path:
    """Copy model, card and golden file into the image; return the model's target path."""
    target_dir = inside(rootfs, MODEL_DIR)
    shutil.rmtree(target_dir, ignore_errors=True)
    target_dir.mkdir(parents=True)
    for path in (model.model, model.card_path, model.golden_path):
        shutil.copyfile(path, target_dir / path.name)
        (target_dir / path.name).chmod(0o644)
    return MODEL_DIR / model.model.name


def create_users(rootfs: Path, progress: Progress) -> tuple[int, int]:
    """Apply sysusers.d on the host (no emulation); return the service account's uid and gid."""
    run(["systemd-sysusers", f"--root={rootfs}"], progress, what="systemd-sysusers")
    for line in inside(rootfs, "/etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == SERVICE_USER:
            return int(fields[2]), int(fields[3])
    raise BuildError(f"systemd-sysusers did not create the {SERVICE_USER} account; is the "
                     "app overlay listed in the recipe's overlays?")


def lock_passwords(rootfs: Path) -> list[str]:
    """Make sure no account can log in with a password; return the accounts changed."""
    shadow = inside(rootfs, "/etc/shadow")
    changed = []
    lines = []
    for line in shadow.read_text().splitlines():
        fields = line.split(":")
        if len(fields) > 1 and not fields[1].startswith(("!", "*")):
            changed.append(fields[0])
            fields[1] = "!*"
        lines.append(":".join(fields))
    shadow.write_text("\n".join(lines) + "\n")
    return changed


def configure_services(recipe: Recipe, rootfs: Path, progress: Progress) -> None:
    enable = [u for u in recipe["services.enable"] if u not in recipe["services.disable"]]
    for unit in enable:
        if not _unit_exists(rootfs, unit):
            raise BuildError(f"recipe: services.enable: unit {unit} is not in the image "
                             "(missing package or overlay?)")
    if enable:
        run(["systemctl", f"--root={rootfs}", "enable", *enable], progress,
            what="systemctl enable")
    present = [u for u in recipe["services.disable"] if _unit_exists(rootfs, u)]
    if present:
        run(["systemctl", f"--root={rootfs}", "disable", *present], progress,
            what="systemctl disable")


def _unit_exists(rootfs: Path, unit: str) -> bool:
    return any(inside(rootfs, d).joinpath(unit).exists()
               for d in ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"))


def prepare_first_boot(recipe: Recipe, rootfs: Path) -> None:
    """Identity is per unit: no machine-id or SSH host keys may be baked into the image."""
    inside(rootfs, "/etc/machine-id").write_text("uninitialized\n")
    # Nobody is at the console of a field unit: never ask for a timezone or root password.
    firstboot = inside(rootfs, "/etc/systemd/system/systemd-firstboot.service")
    if firstboot.exists() or firstboot.is_symlink():
        firstboot.unlink()
    firstboot.symlink_to("/dev/null")
    dbus_id = inside(rootfs, "/var/lib/dbus/machine-id")
    if dbus_id.exists() or dbus_id.is_symlink():
        dbus_id.unlink()
    for key in inside(rootfs, "/etc/ssh").glob("ssh_host_*"):
        key.unlink()
    keys_dir = inside(rootfs, "/etc/ssh/authorized_keys.d")
    if inside(rootfs, "/etc/ssh").is_dir():
        keys_dir.mkdir(mode=0o755, exist_ok=True)
        if recipe["ssh.authorized_keys"]:
            root_keys = keys_dir / "root"
            root_keys.write_text("\n".join(recipe["ssh.authorized_keys"]) + "\n")
            root_keys.chmod(0o600)
    for junk in ("/var/cache/apt/pkgcache.bin", "/var/cache/apt/srcpkgcache.bin",
                 "/var/cache/debconf/templates.dat-old", "/var/cache/debconf/config.dat-old"):
        path = inside(rootfs, junk)
        if path.exists():
            path.unlink()


def make_data_tree(rootfs: Path, uid: int, gid: int) -> Path:
    """The data partition's first contents, owned by the service account."""
    data = inside(rootfs, "/data")
    data.mkdir(exist_ok=True)
    data.chmod(0o755)
    for name in ("results", "models", "logs"):
        sub = data / name
        sub.mkdir(exist_ok=True)
        sub.chmod(0o750)
        os.chown(sub, uid, gid)
    return data


def write_boot_config(recipe: Recipe, rootfs: Path) -> None:
    """cmdline.txt and config.txt on the boot partition, as raspi-firmware would write them."""
    firmware = inside(rootfs, "/boot/firmware")
    if not (firmware / "config.txt").is_file():
        raise BuildError("the base rootfs has no /boot/firmware/config.txt; the recipe must "
                         "install raspi-firmware (components: non-free-firmware)")
    console = recipe["kernel.console"]
    cmdline = ["console=tty0", f"console={console}", f"root={recipe['kernel.root']}", "rw",
               *recipe["kernel.cmdline"]]
    (firmware / "cmdline.txt").write_text(" ".join(cmdline) + "\n")
    config = (firmware / "config.txt").read_text()
    marker = "# edgebake recipe settings\n"
    config = config.split(marker)[0].rstrip("\n") + "\n\n" + marker
    config += "".join(line + "\n" for line in recipe["firmware.config_txt"])
    (firmware / "config.txt").write_text(config)


def compile_python(rootfs: Path, source_date_epoch: int, progress: Progress) -> None:
    """Hash-checked .pyc (deterministic, valid on a read-only system) for our own code."""
    if sys.version_info[:2] != (3, 11):
        progress.say("      host Python is not 3.11; leaving .pyc generation to the target")
        return
    env = {"SOURCE_DATE_EPOCH": str(source_date_epoch), "PYTHONHASHSEED": "0"}
    run([sys.executable, "-m", "compileall", "-q", "-f", "-j", "0", "--invalidation-mode",
         "checked-hash", "-d", str(SITE_DIR), inside(rootfs, SITE_DIR)], progress, env=env,
        what="compileall")


def clamp_mtimes(rootfs: Path, source_date_epoch: int) -> None:
    """Nothing in the image is newer than SOURCE_DATE_EPOCH, so rebuilds give the same bytes."""
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_mtime > source_date_epoch:
                os.utime(path, (source_date_epoch, source_date_epoch), follow_symlinks=False)
    os.utime(rootfs, (source_date_epoch, source_date_epoch))


def installed_packages(rootfs: Path) -> list[dict[str, str]]:
    out = capture(["dpkg-query", f"--admindir={inside(rootfs, '/var/lib/dpkg')}", "-W",
                   "-f", "${Package}\t${Version}\t${Architecture}\t${db:Status-Abbrev}\n"])
    packages = []
    for line in out.splitlines():
        name, version, arch, status = line.split("\t")
        if status.startswith("ii"):
            packages.append({"name": name, "version": version, "arch": arch})
    return sorted(packages, key=lambda p: p["name"])


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_size
    return total


def run_in_target(rootfs: Path, argv: list[str], progress: Progress,
                  what: str) -> subprocess.CompletedProcess[str]:
    """Run an aarch64 program inside the rootfs (qemu-user via binfmt); capture its output."""
    progress.log("$ chroot " + str(rootfs) + " " + " ".join(argv))
    result = subprocess.run(["chroot", str(rootfs), *argv], capture_output=True, text=True,
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                                 "HOME": "/root", "PYTHONDONTWRITEBYTECODE": "1"},
                            check=False)
    progress.log(result.stdout + result.stderr)
    return result

"""Step: copy overlay trees onto the rootfs (rendering `.j2` files with Jinja2), then the
system settings: the service account, locked passwords, enabled units, first-boot state,
boot configuration and the /data layout."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jinja2
import yaml

from ..errors import BuildError
from ..hostcmd import run
from ..progress import Progress
from ..recipe import Recipe
from .rootfs import inside

SERVICE_USER = "edgebake"

OVERLAYS_DIR = Path(__file__).resolve().parents[3] / "overlays"

# The root is read-only on a unit; these trees change while it runs, so they live on /data
# under state/ and are bind-mounted over their places (fstab.j2): (name under state/, path).
STATE_BINDS = (("log", "/var/log"), ("systemd", "/var/lib/systemd"),
               ("edgebake", "/var/lib/edgebake"))
# and these where the base has them (Raspberry Pi OS: NetworkManager, cloud-init on trixie)
OPTIONAL_STATE_BINDS = (("NetworkManager", "/var/lib/NetworkManager"),
                        ("cloud", "/var/lib/cloud"))


def state_binds(rootfs: Path) -> list[tuple[str, str]]:
    return [*STATE_BINDS, *((name, target) for name, target in OPTIONAL_STATE_BINDS
                            if inside(rootfs, target).is_dir())]


def _to_yaml(value: Any) -> str:
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=False).rstrip("\n")


def make_environment(overlay_root: Path) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(overlay_root)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    env.filters["to_yaml"] = _to_yaml
    return env


def apply_overlays(names: list[str], rootfs: Path, context: dict[str, Any],
                   overlays_dir: Path = OVERLAYS_DIR) -> list[str]:
    """Copy each overlay in order; return the target paths written (for the manifest/log)."""
    written: list[str] = []
    env = make_environment(overlays_dir)
    for name in names:
        tree = overlays_dir / name
        if not tree.is_dir():
            raise BuildError(f"recipe: overlays: no folder {tree}")
        for source in sorted(p for p in tree.rglob("*") if p.is_file() or p.is_symlink()):
            relative = source.relative_to(tree)
            if relative.name == "README.md" and len(relative.parts) == 1:
                continue
            target_rel = relative.with_suffix("") if source.suffix == ".j2" else relative
            target = rootfs / target_rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or target.exists():
                target.unlink()
            if source.is_symlink():
                os.symlink(os.readlink(source), target)
            elif source.suffix == ".j2":
                template_name = source.relative_to(overlays_dir).as_posix()
                try:
                    text = env.get_template(template_name).render(**context)
                except jinja2.TemplateError as exc:
                    raise BuildError(f"{source}: template error: {exc}") from None
                target.write_text(text, encoding="utf-8")
                shutil.copymode(source, target)
            else:
                shutil.copy2(source, target)
            os.chown(target, 0, 0, follow_symlinks=False)
            written.append("/" + target_rel.as_posix())
    return written


def create_users(rootfs: Path, progress: Progress) -> tuple[int, int]:
    """Apply sysusers.d on the host (no emulation); return the service account's uid and gid."""
    run(["systemd-sysusers", f"--root={rootfs}"], progress, what="systemd-sysusers")
    for line in inside(rootfs, "/etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == SERVICE_USER:
            return int(fields[2]), int(fields[3])
    raise BuildError(f"systemd-sysusers did not create the {SERVICE_USER} account; is the "
                     "app overlay listed in the recipe's overlays?")


def protect_config(rootfs: Path, gid: int) -> None:
    """app.yaml may hold the broker's password and camera URLs with credentials: readable by
    root and the service's group only."""
    config = inside(rootfs, "/etc/edgebake/app.yaml")
    os.chown(config, 0, gid, follow_symlinks=False)
    config.chmod(0o640)


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
    if dbus_id.parent.is_dir():  # what dbus's tmpfiles line would make on the read-only root
        dbus_id.symlink_to("/etc/machine-id")
    for key in inside(rootfs, "/etc/ssh").glob("ssh_host_*"):
        key.unlink()
    keys_dir = inside(rootfs, "/etc/ssh/authorized_keys.d")
    if inside(rootfs, "/etc/ssh").is_dir():
        keys_dir.mkdir(mode=0o755, exist_ok=True)
        if recipe["ssh.authorized_keys"]:
            root_keys = keys_dir / "root"
            root_keys.write_text("\n".join(recipe["ssh.authorized_keys"]) + "\n")
            root_keys.chmod(0o600)
    # the build host's resolv.conf must not reach a unit; DNS comes from DHCP via resolved
    if inside(rootfs, "/usr/lib/systemd/systemd-resolved").exists() or \
            inside(rootfs, "/lib/systemd/systemd-resolved").exists():
        resolv = inside(rootfs, "/etc/resolv.conf")
        if resolv.exists() or resolv.is_symlink():
            resolv.unlink()
        resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")
    for junk in ("/var/cache/apt/pkgcache.bin", "/var/cache/apt/srcpkgcache.bin",
                 "/var/cache/debconf/templates.dat-old", "/var/cache/debconf/config.dat-old"):
        path = inside(rootfs, junk)
        if path.exists():
            path.unlink()


def make_data_tree(rootfs: Path, uid: int, gid: int, state: bool = True) -> Path:
    """The data partition's first contents, owned by the service account, and (for a disk
    image) the system state trees that are bound over the read-only root, seeded with what
    the build put there so the journal and systemd find their directories as installed."""
    data = inside(rootfs, "/data")
    data.mkdir(exist_ok=True)
    data.chmod(0o755)
    for name in ("results", "models", "logs"):
        sub = data / name
        sub.mkdir(exist_ok=True)
        sub.chmod(0o750)
        os.chown(sub, uid, gid)
    if state:
        state_dir = data / "state"
        state_dir.mkdir(mode=0o755, exist_ok=True)
        for name, target in state_binds(rootfs):
            source = inside(rootfs, target)
            source.mkdir(mode=0o755, parents=True, exist_ok=True)
            if not (state_dir / name).exists():  # cp -a keeps owners, modes and links
                copied = subprocess.run(["cp", "-a", str(source), str(state_dir / name)],
                                        capture_output=True, text=True, check=False)
                if copied.returncode != 0:
                    raise BuildError(f"copying {target} to /data/state/{name} failed: "
                                     f"{copied.stderr.strip()}")
    return data


def write_boot_config(recipe: Recipe, rootfs: Path, root: str) -> None:
    """cmdline.txt and config.txt on the boot partition, as raspi-firmware would write them."""
    firmware = inside(rootfs, "/boot/firmware")
    if not (firmware / "config.txt").is_file():
        raise BuildError("the base rootfs has no /boot/firmware/config.txt; the recipe must "
                         "install raspi-firmware (components: non-free-firmware)")
    console = recipe["kernel.console"]
    cmdline = ["console=tty0", f"console={console}", f"root={root}",
               *recipe["kernel.cmdline"]]
    (firmware / "cmdline.txt").write_text(" ".join(cmdline) + "\n")
    config = (firmware / "config.txt").read_text()
    marker = "# edgebake recipe settings\n"
    config = config.split(marker)[0].rstrip("\n") + "\n\n" + marker
    config += "".join(line + "\n" for line in recipe["firmware.config_txt"])
    (firmware / "config.txt").write_text(config)

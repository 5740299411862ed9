"""Step (vendor bases only): make a Raspberry Pi OS image boot edgebake's layout.

Kept from the base: kernel, firmware, device trees, config.txt (our lines go after a marker,
as for our own base) and every kernel argument we do not own. Changed: `root=` names our root
filesystem by label; the vendor's first-boot resize (`init=.../firstboot` or
`init_resize.sh`) is removed, since our data partition follows the root and grows instead
(edgebake-growdata); `userconfig.service`, which waits at the console for a user name, is
masked: a field unit has nobody at its console, and SSH takes keys from the seed; so is
`regenerate_ssh_host_keys.service`, since edgebake's first boot makes the unit's host key. When the
base runs NetworkManager (Raspberry Pi OS bookworm), it keeps the network and systemd-networkd
stays off, so there is one network manager.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BuildError
from ..hostcmd import run
from ..progress import Progress
from ..recipe import Recipe
from .baseimage import VendorInfo
from .rootfs import inside

DROPPED_PREFIXES = ("root=", "rootfstype=")
DROPPED_ARGS = ("init=/usr/lib/raspberrypi-sys-mods/firstboot",
                "init=/usr/lib/raspi-config/init_resize.sh", "resize", "rw")
# the vendor's first-boot units that edgebake's first boot replaces, and why
MASKED_UNITS = {
    "userconfig.service": "it waits for a user at the console",
    "regenerate_ssh_host_keys.service": "edgebake's first boot makes the unit's one host key",
}
MARKER = "# edgebake recipe settings\n"


def cmdline_for(base_cmdline: str, recipe: Recipe, root: str) -> str:
    kept = [arg for arg in base_cmdline.split()
            if arg not in DROPPED_ARGS and not arg.startswith(DROPPED_PREFIXES)]
    ours = [f"root={root}", "rootfstype=ext4"]
    extra = [arg for arg in recipe["kernel.cmdline"] if arg not in kept]
    return " ".join([*kept[:1], *ours, *kept[1:], *extra]) + "\n"


def adapt(recipe: Recipe, rootfs: Path, base: VendorInfo, root: str, progress: Progress
          ) -> None:
    firmware = inside(rootfs, "/boot/firmware")
    config = firmware / "config.txt"
    if not config.is_file() or not (firmware / "cmdline.txt").is_file():
        raise BuildError(f"--base {base.name}: the boot partition has no config.txt and "
                         "cmdline.txt; expected a Raspberry Pi OS image")
    missing = [name for name in recipe["firmware.requires"] if not (firmware / name).is_file()]
    if missing:
        raise BuildError(f"--base {base.name}: the boot partition lacks "
                         f"{', '.join(missing)}, which target {recipe.target} needs "
                         "(firmware.requires); is it an image for this board?")
    (firmware / "cmdline.txt").write_text(cmdline_for(base.cmdline, recipe, root))
    text = config.read_text().split(MARKER)[0].rstrip("\n")
    # our lines apply to every board: close any [section] the vendor left open
    sections = [line.strip() for line in text.splitlines() if line.strip().startswith("[")]
    if sections and sections[-1] != "[all]":
        text += "\n\n[all]"
    text += "\n" + MARKER + "".join(line + "\n" for line in recipe["firmware.config_txt"])
    config.write_text(text)
    for unit, why in MASKED_UNITS.items():
        link = inside(rootfs, f"/etc/systemd/system/{unit}")
        if any(inside(rootfs, d).joinpath(unit).exists()
               for d in ("/usr/lib/systemd/system", "/lib/systemd/system")):
            if link.exists() or link.is_symlink():
                link.unlink()
            link.symlink_to("/dev/null")
            progress.say(f"      masked {unit} ({why})")
    if any(inside(rootfs, d).joinpath("NetworkManager.service").exists()
           for d in ("/usr/lib/systemd/system", "/lib/systemd/system")):
        run(["systemctl", f"--root={rootfs}", "disable", "systemd-networkd.service"], progress,
            what="systemctl disable systemd-networkd")
        progress.say("      the base's NetworkManager keeps the network; systemd-networkd off")

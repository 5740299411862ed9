"""A Raspberry Pi OS Lite look-alike, to test `--base` where the real image cannot be fetched.

It has the vendor image's shape, which is what the import step depends on: an MBR disk with a
FAT32 `bootfs` and an ext4 `rootfs` addressed by PARTUUID, `kernel8.img`/`kernel_2712.img` and
`initramfs8` chosen by `auto_initramfs=1`, a `cmdline.txt` whose `init=` resizes the root on
first boot, `/etc/rpi-issue`, the unit that makes every kind of SSH host key at first boot,
Imager's `firstrun.sh` or cloud-init files when asked, and an
`rpicam-vid` that writes YUV420 frames. Inside is a Debian bookworm arm64 system (the pi4
target's cached base) with Debian's generic kernel as `kernel8.img`, so the result boots
under QEMU's `virt` machine like any edgebake image; a real Raspberry Pi OS kernel would not.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from ..hostcmd import run
from ..progress import Progress

DISK_SIGNATURE = 0x5A7E0B0B
CMDLINE = ("console=serial0,115200 console=tty1 root=PARTUUID={sig:08x}-02 rootfstype=ext4 "
           "fsck.repair=yes rootwait quiet init=/usr/lib/raspberrypi-sys-mods/firstboot\n")
CONFIG_TXT = """# For more options and information see
# http://rptl.io/configtxt
dtparam=audio=on
camera_auto_detect=1
display_auto_detect=1
auto_initramfs=1
dtoverlay=vc4-kms-v3d
max_framebuffers=2
disable_fw_kms_setup=1
arm_64bit=1
disable_overscan=1
arm_boost=1

[cm4]
otg_mode=1

[all]
"""
FSTAB = """proc            /proc           proc    defaults          0       0
PARTUUID={sig:08x}-01  /boot/firmware  vfat    defaults          0       2
PARTUUID={sig:08x}-02  /               ext4    defaults,noatime  0       1
"""
FIRSTBOOT = """#!/bin/sh
# look-alike of raspberrypi-sys-mods' firstboot: grows the root partition, then boots on
echo "firstboot: would resize the root partition to fill the card" > /dev/kmsg
exec /sbin/init
"""
# raspberrypi-sys-mods makes every host key type at first boot with this unit
REGENERATE_KEYS_UNIT = """[Unit]
Description=Regenerate SSH host keys (look-alike)
Before=ssh.service
ConditionFileIsExecutable=/usr/bin/ssh-keygen

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A -v
ExecStartPost=/bin/systemctl disable regenerate_ssh_host_keys

[Install]
WantedBy=multi-user.target
"""
# The real tool streams camera frames; this one streams a moving gradient in the same format
# (raw YUV420 planes, --width/--height/--framerate, -o - to stdout, -t 0 for ever).
RPICAM_VID = r"""#!/usr/bin/python3
import argparse, sys, time
p = argparse.ArgumentParser()
p.add_argument("--width", type=int, default=640)
p.add_argument("--height", type=int, default=480)
p.add_argument("--framerate", type=float, default=30)
p.add_argument("--codec", default="h264")
p.add_argument("-t", "--timeout", type=int, default=5000)
p.add_argument("-o", "--output", default="-")
p.add_argument("-n", "--nopreview", action="store_true")
p.add_argument("--flush", action="store_true")
a, _ = p.parse_known_args()
if a.codec != "yuv420":
    sys.exit("look-alike rpicam-vid: only --codec yuv420 is implemented")
w, h = a.width, a.height
out = sys.stdout.buffer
end = time.monotonic() + a.timeout / 1000 if a.timeout else None
n = 0
while end is None or time.monotonic() < end:
    luma = bytes((x + n) & 255 for x in range(w)) * h
    out.write(luma + bytes([128]) * (w // 2 * h // 2 * 2))
    out.flush()
    n += 8
    time.sleep(1 / a.framerate)
"""


def make_raspios_lookalike(base_tar: Path, out: Path, progress: Progress,
                           firstrun: bool = False, cloud_init: bool = False,
                           pi5: bool = True, root_mib: int = 1600) -> Path:
    """Write `out` (.img, or .img.xz as published) from a Debian arm64 base tarball that has
    raspi-firmware."""
    with tempfile.TemporaryDirectory(prefix="edgebake-lookalike-", dir=out.parent) as tmp:
        work = Path(tmp)
        root = work / "rootfs"
        root.mkdir()
        with tarfile.open(base_tar) as tar:
            tar.extractall(root, numeric_owner=True, filter="fully_trusted")
        boot = work / "bootfs"
        shutil.move(str(root / "boot" / "firmware"), boot)
        (root / "boot" / "firmware").mkdir()
        _vendor_boot(boot, pi5)
        _imager_files(boot, firstrun, cloud_init)
        _vendor_root(root)
        _genimage(work, boot, root, out, root_mib, progress)
    return out


def _vendor_boot(boot: Path, pi5: bool) -> None:
    """The boot partition as Raspberry Pi OS names its files."""
    kernel = sorted(boot.glob("vmlinuz-*"))[-1]
    initrd = sorted(boot.glob("initrd.img-*"))[-1]
    for name in ("kernel8.img", *(["kernel_2712.img"] if pi5 else [])):
        shutil.copy(kernel, boot / name)
    for name in ("initramfs8", *(["initramfs_2712"] if pi5 else [])):
        shutil.copy(initrd, boot / name)
    kernel.unlink()
    initrd.unlink()
    if pi5:  # the Pi 5's device tree, as the vendor ships it beside the Pi 4's
        shutil.copy(boot / "bcm2711-rpi-4-b.dtb", boot / "bcm2712-rpi-5-b.dtb")
    (boot / "config.txt").write_text(CONFIG_TXT)
    (boot / "cmdline.txt").write_text(CMDLINE.format(sig=DISK_SIGNATURE))
    (boot / "issue.txt").write_text("Raspberry Pi reference (edgebake look-alike)\n")


def _imager_files(boot: Path, firstrun: bool, cloud_init: bool) -> None:
    """What Raspberry Pi Imager adds to the boot partition when it writes the card."""
    if cloud_init:  # what Imager writes for trixie images instead of firstrun.sh
        (boot / "user-data").write_text("#cloud-config\nhostname: from-imager\n"
                                        "manage_etc_hosts: true\n")
        (boot / "meta-data").write_text("instance-id: edgebake-lookalike\n")
        (boot / "network-config").write_text("network:\n  version: 2\n")
    if firstrun:
        (boot / "firstrun.sh").write_text("#!/bin/bash\n# written by Imager\n"
                                          "hostnamectl set-hostname from-imager\n"
                                          "rm -f /boot/firmware/firstrun.sh\nexit 0\n")
        (boot / "cmdline.txt").write_text(
            CMDLINE.format(sig=DISK_SIGNATURE).rstrip("\n")
            + " systemd.run=/boot/firmware/firstrun.sh systemd.run_success_action=reboot"
            " systemd.unit=kernel-command-line.target\n")


def _vendor_root(root: Path) -> None:
    """The root filesystem's vendor names and hooks."""
    (root / "etc" / "fstab").write_text(FSTAB.format(sig=DISK_SIGNATURE))
    (root / "etc" / "rpi-issue").write_text(
        "Raspberry Pi reference (edgebake look-alike of Raspberry Pi OS Lite)\n")
    sysmods = root / "usr" / "lib" / "raspberrypi-sys-mods"
    sysmods.mkdir(parents=True)
    (sysmods / "firstboot").write_text(FIRSTBOOT)
    (sysmods / "firstboot").chmod(0o755)
    units = root / "usr" / "lib" / "systemd" / "system"
    (units / "regenerate_ssh_host_keys.service").write_text(REGENERATE_KEYS_UNIT)
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "regenerate_ssh_host_keys.service").symlink_to(
        "/usr/lib/systemd/system/regenerate_ssh_host_keys.service")
    rpicam = root / "usr" / "bin" / "rpicam-vid"
    rpicam.write_text(RPICAM_VID)
    rpicam.chmod(0o755)


def _genimage(work: Path, boot: Path, root: Path, out: Path, root_mib: int,
              progress: Progress) -> None:
    raw_name = out.name.removesuffix(".xz")
    config = work / "genimage.cfg"
    config.write_text(f"""image bootfs.vfat {{
    vfat {{ label = "bootfs" extraargs = "-F 32" }}
    srcpath = "{boot}"
    size = 512M
}}
image rootfs.ext4 {{
    ext4 {{ label = "rootfs" use-mke2fs = true }}
    srcpath = "{root}"
    size = {root_mib}M
}}
image {raw_name} {{
    hdimage {{ partition-table-type = "mbr" disk-signature = 0x{DISK_SIGNATURE:08x} }}
    partition boot {{ partition-type = 0x0C bootable = true offset = 4M
                      image = "bootfs.vfat" }}
    partition root {{ partition-type = 0x83 image = "rootfs.ext4" }}
}}
""")
    empty = work / "empty"
    empty.mkdir()
    began = time.monotonic()
    run(["genimage", "--config", config, "--rootpath", empty, "--tmppath", work / "gtmp",
         "--inputpath", work / "parts", "--outputpath", work / "parts"], progress,
        what="genimage (look-alike)")
    if out.suffix == ".xz":
        run(["xz", "-T0", "-1", "-f", work / "parts" / raw_name], progress,
            what="xz (look-alike)")
        raw_name += ".xz"
    shutil.move(str(work / "parts" / raw_name), out)
    progress.say(f"      look-alike Raspberry Pi OS Lite: {out} "
                 f"({out.stat().st_size / 2**20:.0f} MiB, {time.monotonic() - began:.0f}s)")

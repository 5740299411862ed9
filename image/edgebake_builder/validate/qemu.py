"""Boots the image under qemu-system-aarch64 (-M virt) through a throwaway qcow2 overlay.

Only what a real unit gets at flash time differs: its seed (written into the overlay) and
the console on the kernel command line: the rest of the line is the image's own cmdline.txt,
so the root is mounted as a unit mounts it. QEMU and the overlay are always cleaned up.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BuildError
from ..hostcmd import die_with_parent
from ..steps import abboot
from . import diskimage
from .seed import seed_overlay

UBOOT_QEMU = "/usr/lib/u-boot/qemu_arm64/u-boot.bin"  # Debian's u-boot-qemu


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def console_tail(console: Path, lines: int = 50) -> str:
    try:
        text = console.read_text(errors="replace")
    except FileNotFoundError:
        return "(no console output)"
    return "\n".join(text.splitlines()[-lines:])


@functools.cache
def virt_machine() -> str:
    """`virt` without a KASLR seed in its device tree. With one, the kernel randomises its
    base and so forces page-table isolation, whose switch at every syscall and interrupt
    flushes QEMU's emulated TLB: without it the unit runs ~15 % faster under emulation. Only
    the kernel's base address differs from a unit's boot; the image is the same. QEMU 7.2
    renamed the property; a QEMU with neither name boots with the seed."""
    try:
        known = subprocess.run(["qemu-system-aarch64", "-M", "virt,help"], capture_output=True,
                               text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        known = ""
    for name in ("dtb-randomness", "dtb-kaslr-seed"):
        if f"{name}=" in known:
            return f"virt,{name}=off"
    return "virt"


IMAGER_ONE_SHOT = ("systemd.run=", "systemd.run_success_action=",
                   "systemd.run_failure_action=", "systemd.unit=kernel-command-line.target")

@dataclass
class QemuMachine:
    image: Path
    workdir: Path
    console: Path
    memory_mib: int = 1024
    cpus: int = 2
    extra_cmdline: list[str] = field(default_factory=list)
    disk_bytes: int = 0  # 0: the size of the image
    ssh_port: int = 0
    http_port: int = 0
    # raw images plugged in as USB mass-storage devices
    usb_sticks: list[Path] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.overlay = self.workdir / "overlay.qcow2"
        self.kernel = self.workdir / "vmlinuz"
        self.initrd = self.workdir / "initrd.img"
        self.cmdline_txt = self.workdir / "cmdline.txt"
        self.boot = diskimage.boot_partition(self.image)
        self.uboot = diskimage.has_fat_file(self.image, self.boot, "boot.scr")
        self.ssh_port = self.ssh_port or free_port()
        self.http_port = self.http_port or free_port()

    @property
    def boot_files(self) -> dict[str, bytes]:
        """What QEMU adds to the boot partition (with the seed, when there is one): for an
        A/B image, U-Boot's extra kernel arguments."""
        if not self.uboot:
            return {}
        return {abboot.EXTRA_FILE: f"eb_extra={' '.join(self.extra_cmdline)}\n".encode()}

    def prepare(self) -> None:
        """Overlay backed by the image, plus the kernel and initrd the image itself carries
        (an A/B image: U-Boot as the firmware, which boots the slot's own)."""
        for tool, package in (("qemu-system-aarch64", "qemu-system-arm"),
                              ("qemu-img", "qemu-utils"), ("qemu-io", "qemu-utils"),
                              ("mcopy", "mtools"), ("ssh", "openssh-client")):
            if shutil.which(tool) is None:
                raise BuildError(f"missing host tool {tool}; apt-get install {package}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.uboot:
            kernel, initrd = diskimage.kernel_and_initrd_names(self.image, self.boot)
            diskimage.copy_fat_file(self.image, self.boot, kernel, self.kernel)
            diskimage.copy_fat_file(self.image, self.boot, initrd, self.initrd)
            diskimage.copy_fat_file(self.image, self.boot, "cmdline.txt", self.cmdline_txt)
        elif not Path(UBOOT_QEMU).is_file():
            raise BuildError(f"missing {UBOOT_QEMU} (an A/B image boots through U-Boot); "
                             "apt-get install u-boot-qemu")
        # the overlay may be larger than the image, like a card larger than the image
        size = [str(self.disk_bytes)] if self.disk_bytes else []
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b",
                        str(self.image.resolve()), "-F", "raw", str(self.overlay), *size],
                       check=True)
        if self.boot_files:
            seed_overlay(self.image, self.overlay, self.boot, None, self.boot_files)

    def imager_one_shot_args(self) -> list[str]:
        """Raspberry Pi Imager's first-boot arguments in the image's cmdline.txt. On a Pi,
        firstrun.sh deletes them from cmdline.txt before it reboots, and the firmware reads
        the file again at the next boot; QEMU passes the same -append at every boot of the
        guest, so they would run a script that is gone and power the unit off. They are
        left out here (`test-image` says so): Imager's own script is not run under QEMU."""
        if self.uboot:
            return []
        return [arg for arg in self.cmdline_txt.read_text().split()
                if arg.startswith(IMAGER_ONE_SHOT)]

    def firmware_args(self) -> list[str]:
        if self.uboot:  # the same boot.scr a Pi runs after its firmware
            return ["-bios", UBOOT_QEMU]
        dropped = self.imager_one_shot_args()
        own = [arg for arg in self.cmdline_txt.read_text().split()
               if not arg.startswith("console=") and arg not in dropped]
        cmdline = [*own, "net.ifnames=0", "console=ttyAMA0", *self.extra_cmdline]
        return ["-kernel", str(self.kernel), "-initrd", str(self.initrd),
                "-append", " ".join(cmdline)]

    def command(self) -> list[str]:
        forwards = (f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22,"
                    f"hostfwd=tcp:127.0.0.1:{self.http_port}-:8080")
        return ["qemu-system-aarch64", "-M", virt_machine(), "-cpu", "cortex-a72",
                "-smp", str(self.cpus), "-m", str(self.memory_mib), *self.firmware_args(),
                # cache=unsafe: a guest flush still writes QEMU's own caches to the host's
                # page cache (so a killed QEMU, the power-cut bench's plug, loses nothing the
                # guest synced) but does not wait for the host's disk, whose flush on a busy
                # build machine takes seconds and would be charged to the unit's fsync
                "-drive", f"if=none,file={self.overlay},format=qcow2,id=hd0,cache=unsafe",
                "-device", "virtio-blk-pci,drive=hd0",
                "-netdev", f"user,id=n0,{forwards}", "-device", "virtio-net-pci,netdev=n0",
                "-device", "i6300esb", "-action", "watchdog=reset",
                "-object", "rng-random,filename=/dev/urandom,id=rng0",
                "-device", "virtio-rng-pci,rng=rng0",
                "-display", "none", "-monitor", "none", "-nodefaults",
                "-serial", f"file:{self.console}", *self._usb()]

    def _usb(self) -> list[str]:
        if not self.usb_sticks:
            return []
        args = ["-device", "qemu-xhci,id=xhci"]
        for number, stick in enumerate(self.usb_sticks):
            args += ["-drive", f"if=none,id=stick{number},format=raw,readonly=on,file={stick}",
                     "-device", f"usb-storage,bus=xhci.0,drive=stick{number}"]
        return args

    def start(self) -> None:
        self.console.parent.mkdir(parents=True, exist_ok=True)
        self.console.write_text("")
        # started from the main thread: it ends with the run (even a killed one) that
        # started it, and never keeps a core busy after a test
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True,
                                     preexec_fn=die_with_parent)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_for_ssh(self, key: Path, timeout: float) -> float:
        """Seconds until `ssh root@` answers; on timeout or a dead QEMU, fail with the
        console's tail."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if not self.alive():
                err = self.proc.stderr.read().decode() if self.proc and self.proc.stderr else ""
                raise BuildError(f"QEMU exited early ({err.strip()[-300:]}); console tail:\n"
                                 + console_tail(self.console))
            if "Kernel panic - not syncing" in self.console.read_text(errors="replace"):
                raise BuildError("the kernel panicked; last 50 console lines:\n"
                                 + console_tail(self.console))
            if self.ssh(key, "true", timeout=20).returncode == 0:
                return time.monotonic() - started
            time.sleep(3)
        raise BuildError(f"no SSH after {timeout:.0f}s; last 50 console lines:\n"
                         + console_tail(self.console))

    def ssh_args(self, key: Path) -> list[str]:
        return ["ssh", "-i", str(key), "-p", str(self.ssh_port), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", "root@127.0.0.1"]

    def ssh(self, key: Path, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([*self.ssh_args(key), command], capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess([], 255, "", "ssh timed out")

    def stop(self) -> None:
        """Power off QEMU (whole process group) and delete the overlay, whatever happened."""
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
            self.proc = None
        for path in (self.overlay, self.kernel, self.initrd):
            path.unlink(missing_ok=True)

    def __enter__(self) -> QemuMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

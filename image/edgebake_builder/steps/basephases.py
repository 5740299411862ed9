"""Where a base rootfs build spends its time: mmdebstrap's phases, read from its output.

mmdebstrap announces each phase with an `I: ` line; dpkg's initramfs trigger shows as
`update-initramfs: Generating`. The seconds per phase are kept beside the cached base, so
`invoke bench-build` can print them after the fact."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from edgebake_runtime.atomic import write_atomic

# (start of an output line, the phase it begins); None ends the timing
MARKERS: list[tuple[str, str | None]] = [
    ("I: running apt-get update", "package lists"),
    ("I: downloading packages with apt", "download"),
    ("I: extracting archives", "unpack"),
    ("I: installing essential packages", "configure essential (qemu-user)"),
    ("I: installing remaining packages", "install and configure the rest (qemu-user)"),
    ("update-initramfs: Generating", "initramfs (qemu-user)"),
    ("I: running --customize-hook", "customize hooks"),
    ("I: running special hook", "customize hooks"),
    ("I: cleaning", "cleanup"),
    ("I: creating tarball", "tarball"),
    ("I: success", None),
    ("I: done", None),
]
# dpkg lines that follow an initramfs run: the install phase goes on
SLOWEST_PACKAGES = 8
RESUMES_INSTALL = ("Setting up ", "Processing triggers for ", "Unpacking ", "Selecting ")


class PhaseClock:
    """Feed it output lines; it adds up the seconds spent in each phase."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._phase: str | None = "setup"
        self._began = clock()
        self._install_phase: str | None = None
        self.packages: dict[str, float] = {}  # seconds from `Setting up X` to the next line
        self._package: tuple[str, float] | None = None

    def _switch(self, phase: str | None) -> None:
        now = self._clock()
        if self._phase is not None:
            self.seconds[self._phase] = self.seconds.get(self._phase, 0.0) + now - self._began
        if phase is not None and phase != self._phase:
            self.counts[phase] = self.counts.get(phase, 0) + 1
        self._phase, self._began = phase, now

    def _package_line(self, text: str) -> None:
        """Time each package's configuration: from its `Setting up` to the next dpkg line."""
        if not text.startswith((*RESUMES_INSTALL, "I: ", "update-initramfs")):
            return
        now = self._clock()
        if self._package is not None:
            name, began = self._package
            self.packages[name] = self.packages.get(name, 0.0) + now - began
        self._package = None
        if text.startswith("Setting up "):
            self._package = (text.split()[2].split(":")[0], now)

    def feed(self, line: str) -> None:
        text = line.strip()
        self._package_line(text)
        for prefix, phase in MARKERS:
            if text.startswith(prefix):
                if phase is not None and phase.startswith("install"):
                    self._install_phase = phase
                self._switch(phase)
                return
        if (self._phase is not None and self._phase.startswith("initramfs")
                and text.startswith(RESUMES_INSTALL) and self._install_phase is not None):
            self._switch(self._install_phase)

    def finish(self) -> dict[str, float]:
        self._switch(None)
        return {name: round(seconds, 1) for name, seconds in self.seconds.items()}


def phases_file(tarball: Path) -> Path:
    return tarball.with_suffix(".phases.json")


def save(tarball: Path, clock: PhaseClock) -> dict[str, float]:
    seconds = clock.finish()
    slowest = dict(sorted(((name, round(value, 1)) for name, value in clock.packages.items()),
                          key=lambda item: -item[1])[:SLOWEST_PACKAGES])
    write_atomic(phases_file(tarball), (json.dumps(
        {"seconds": seconds, "runs": clock.counts, "slowest_packages": slowest}, indent=1,
        sort_keys=True) + "\n").encode())
    return seconds


def load(tarball: Path, part: str = "seconds") -> dict[str, float]:
    """The phases (or `slowest_packages`) of the build that made this base, or {} when none
    were recorded."""
    try:
        data = json.loads(phases_file(tarball).read_text())
        return {str(k): float(v) for k, v in data[part].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def describe(seconds: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.0f}s" for name, value in
                     sorted(seconds.items(), key=lambda item: -item[1]))

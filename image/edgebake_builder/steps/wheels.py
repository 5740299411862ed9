"""Step: the locked aarch64 wheels, downloaded on the host by hash and installed with --no-index."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from ..cache import atomic_path, cache_root
from ..errors import BuildError
from ..hostcmd import run
from ..progress import Progress
from .rootfs import is_elf

WHEELS_LOCK = Path(__file__).resolve().parents[3] / "recipes" / "wheels.lock"
LOCK_LINE = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)==(?P<version>\S+)\s+"
                       r"(?:;\s*python_version\s*==\s*\"(?P<python>3\.[0-9]+)\"\s+)?"
                       r"--hash=sha256:(?P<sha256>[0-9a-f]{64})\s*")


@dataclass(frozen=True)
class Target:
    """The target's Python and glibc: which wheels fit it."""

    python: str
    glibc: str

    @property
    def tag(self) -> str:
        return "cp" + self.python.replace(".", "")

    def pip_args(self) -> list[str]:
        """pip does not widen a manylinux tag to older glibcs by itself: list them all."""
        newest = int(self.glibc.split(".")[1])
        platforms = [f"manylinux_2_{minor}_aarch64" for minor in range(newest, 16, -1)]
        args = [arg for p in [*platforms, "manylinux2014_aarch64"] for arg in ("--platform", p)]
        return [*args, "--python-version", self.python, "--implementation", "cp",
                "--abi", self.tag, "--abi", "abi3", "--abi", "none", "--only-binary=:all:"]


@dataclass(frozen=True)
class LockedWheel:
    name: str
    version: str
    sha256: str
    python: str | None = None

    @property
    def requirement_line(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


WheelLock = dict[str, list[LockedWheel]]


def read_wheels_lock(path: Path = WHEELS_LOCK) -> WheelLock:
    """Normalised name -> its locked wheels (one per Python, or one for all)."""
    wheels: WheelLock = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = LOCK_LINE.fullmatch(line)
        if not match:
            raise BuildError(f"{path}:{number}: expected `name==version "
                             '[; python_version == "3.X"] --hash=sha256:HEX`')
        wheel = LockedWheel(match["name"], match["version"], match["sha256"], match["python"])
        wheels.setdefault(normalise(wheel.name), []).append(wheel)
    return wheels


def wheel_for(name: str, lock: WheelLock, target: Target) -> LockedWheel | None:
    """The locked wheel of `name` that fits the target's Python, if there is one."""
    return next((w for w in lock.get(normalise(name), [])
                 if w.python in (None, target.python)), None)


def select_wheels(names: list[str], lock: WheelLock, target: Target) -> list[LockedWheel]:
    chosen = []
    for name in names:
        wheel = wheel_for(name, lock, target)
        if wheel is None:
            where = "is not pinned" if normalise(name) not in lock else \
                f"has no wheel for Python {target.python}"
            raise BuildError(f"recipe: wheels: {name!r} {where} in {WHEELS_LOCK}; "
                             f"pinned: {', '.join(sorted(lock))}")
        chosen.append(wheel)
    return chosen


def download_wheels(wheels: list[LockedWheel], target: Target, progress: Progress) -> Path:
    """Fetch (or reuse) the wheels into the cache; pip verifies every hash."""
    folder = cache_root() / "wheels" / f"aarch64-{target.tag}"
    folder.mkdir(parents=True, exist_ok=True)
    if not wheels:
        return folder
    run(["python3", "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
         "--require-hashes", "-r", requirements_file(wheels, folder), "-d", folder,
         *target.pip_args()], progress, what="pip download (target wheels)")
    return folder


def requirements_file(wheels: list[LockedWheel], folder: Path) -> Path:
    """The pip requirements for exactly these wheels, named by their content: builds running
    at once with different wheel sets share the cache folder but never one file."""
    text = "".join(w.requirement_line + "\n" for w in sorted(wheels, key=lambda w: w.name))
    path = folder / f"requirements-{hashlib.sha256(text.encode()).hexdigest()[:16]}.txt"
    if not path.is_file():
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return path


def install_wheels(wheels: list[LockedWheel], wheel_dir: Path, site_dir: Path,
                   target: Target, progress: Progress) -> None:
    if not wheels:
        return
    site_dir.mkdir(parents=True, exist_ok=True)
    run(["python3", "-m", "pip", "install", "--disable-pip-version-check", "--no-index",
         "--no-deps", "--no-compile", "--find-links", wheel_dir, "--target", site_dir,
         "--require-hashes", "-r", requirements_file(wheels, wheel_dir), *target.pip_args()],
        progress,
        what="pip install --no-index (target wheels)")
    strip_debug_info(site_dir, progress)


# binutils for the target's architecture (every target is aarch64)
TARGET_STRIP = "aarch64-linux-gnu-strip"


def strip_debug_info(site_dir: Path, progress: Progress) -> int:
    """Drop the debug sections some wheels ship in their shared objects (PyAV's extension
    modules: 40 of its 96 MiB); symbols stay, so tracebacks and `ldd` are unchanged. Returns
    the bytes saved."""
    objects = sorted(p for p in site_dir.rglob("*.so*")
                     if p.is_file() and not p.is_symlink() and is_elf(p))
    if not objects:
        return 0
    before = sum(p.stat().st_size for p in objects)
    for start in range(0, len(objects), 200):  # a bounded command line
        run([TARGET_STRIP, "--strip-debug", *objects[start:start + 200]], progress,
            what=f"{TARGET_STRIP} (wheels' debug sections)")
    saved = before - sum(p.stat().st_size for p in objects)
    progress.say(f"      stripped debug sections from {len(objects)} shared objects in the "
                 f"wheels: {saved / 2**20:.1f} MiB")
    return saved

"""Step: the locked aarch64 wheels, downloaded on the host by hash and installed with --no-index."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..cache import cache_root
from ..errors import BuildError
from ..hostcmd import run
from ..progress import Progress

WHEELS_LOCK = Path(__file__).resolve().parents[3] / "recipes" / "wheels.lock"
TARGET_PLATFORM = ["--platform", "manylinux_2_34_aarch64", "--platform", "manylinux2014_aarch64",
                   "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
                   "--only-binary=:all:"]
LOCK_LINE = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)==(?P<version>\S+)\s+"
                       r"--hash=sha256:(?P<sha256>[0-9a-f]{64})\s*")


@dataclass(frozen=True)
class LockedWheel:
    name: str
    version: str
    sha256: str

    @property
    def requirement_line(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_wheels_lock(path: Path = WHEELS_LOCK) -> dict[str, LockedWheel]:
    wheels = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = LOCK_LINE.fullmatch(line)
        if not match:
            raise BuildError(f"{path}:{number}: expected `name==version --hash=sha256:HEX`")
        wheel = LockedWheel(match["name"], match["version"], match["sha256"])
        wheels[normalise(wheel.name)] = wheel
    return wheels


def select_wheels(names: list[str], lock: dict[str, LockedWheel]) -> list[LockedWheel]:
    chosen = []
    for name in names:
        wheel = lock.get(normalise(name))
        if wheel is None:
            raise BuildError(f"recipe: wheels: {name!r} is not pinned in {WHEELS_LOCK}; "
                             f"pinned: {', '.join(sorted(lock))}")
        chosen.append(wheel)
    return chosen


def download_wheels(wheels: list[LockedWheel], progress: Progress) -> Path:
    """Fetch (or reuse) the wheels into the cache; pip verifies every hash."""
    folder = cache_root() / "wheels" / "aarch64-cp311"
    folder.mkdir(parents=True, exist_ok=True)
    if not wheels:
        return folder
    requirements = folder / "requirements.txt"
    requirements.write_text("".join(w.requirement_line + "\n" for w in wheels))
    run(["python3", "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
         "--require-hashes", "-r", requirements, "-d", folder, *TARGET_PLATFORM], progress,
        what="pip download (target wheels)")
    return folder


def install_wheels(wheels: list[LockedWheel], wheel_dir: Path, site_dir: Path,
                   progress: Progress) -> None:
    if not wheels:
        return
    site_dir.mkdir(parents=True, exist_ok=True)
    run(["python3", "-m", "pip", "install", "--disable-pip-version-check", "--no-index",
         "--no-deps", "--no-compile", "--find-links", wheel_dir, "--target", site_dir,
         "--require-hashes", "-r", wheel_dir / "requirements.txt", *TARGET_PLATFORM], progress,
        what="pip install --no-index (target wheels)")

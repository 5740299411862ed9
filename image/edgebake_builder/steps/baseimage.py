"""Step (instead of bootstrap): a vendor image, such as Raspberry Pi OS Lite, as the base.

The image is checked against the sha256 the user gave, then read without loop devices or
mounts: the partition table with sfdisk, the FAT boot partition with mtools, the ext4 root with
debugfs (`ext4tree`). The result is a base tarball like the bootstrap step's, with the boot
partition's files under /boot/firmware, cached by the image's sha256; every later step is
shared. A JSON file beside it says what the base was: its name, sha256, release, packages,
and the kernel command line it came with.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..cache import atomic_path, cache_root, sha256_file
from ..errors import BuildError
from ..ext4tree import copy_out
from ..hostcmd import run
from ..progress import Progress
from ..validate import diskimage
from .bootstrap import prune_bases

IMPORT_FORMAT = 2  # bumped when the import changes what it makes


@dataclass(frozen=True)
class BaseImage:
    path: Path
    sha256: str

    def check_args(self) -> None:
        if not self.path.is_file():
            raise BuildError(f"--base {self.path}: file not found")
        if self.path.suffix not in (".img", ".xz"):
            raise BuildError(f"--base {self.path}: expected a disk image (.img or .img.xz)")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise BuildError(f"--base-sha256 {self.sha256!r}: expected 64 lowercase hex digits "
                             f"(the sha256 of {self.path.name}, as published with it)")


@dataclass(frozen=True)
class VendorInfo:
    """What an imported vendor image is, kept beside its cached tarball."""

    name: str
    sha256: str
    release: str
    rpi_issue: str
    cmdline: str  # the kernel command line it came with
    entries: int
    packages: list[str]
    boot_files: list[str]

    @classmethod
    def read(cls, path: Path) -> VendorInfo:
        return cls(**json.loads(path.read_text()))


KEEP_IMPORTS = 2


def cached_paths(base: BaseImage) -> tuple[Path, Path]:
    stem = f"image-{base.sha256[:20]}-f{IMPORT_FORMAT}"
    folder = cache_root() / "imports"  # apart from the bases: each folder keeps its own few
    return folder / f"{stem}.tar", folder / f"{stem}.json"


def _disk_image(base: BaseImage, work: Path, progress: Progress) -> Path:
    if base.path.suffix != ".xz":
        return base.path
    raw = work / "base.img"
    progress.say(f"      decompressing {base.path.name}")
    with raw.open("wb") as out:
        result = subprocess.run(["xz", "-dc", str(base.path)], stdout=out,
                                stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"--base {base.path}: not a readable .xz file: "
                         f"{result.stderr.strip()}")
    return raw


def _packages(tree: Path) -> list[str]:
    status = tree / "var" / "lib" / "dpkg" / "status"
    if not status.is_file():
        return []
    out = subprocess.run(["dpkg-query", f"--admindir={status.parent}", "-W", "-f",
                          "${Package}\t${db:Status-Abbrev}\n"], capture_output=True, text=True,
                         check=False).stdout
    return sorted(line.split("\t")[0] for line in out.splitlines()
                  if line.endswith("\tii "))


def _release(tree: Path) -> str:
    for line in (tree / "etc" / "os-release").read_text(errors="replace").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return "unknown"


def import_base(base: BaseImage, progress: Progress, no_cache: bool = False
                ) -> tuple[Path, VendorInfo]:
    """Return (base tarball, what the base is), importing the image if it is not cached."""
    base.check_args()
    tarball, info_path = cached_paths(base)
    if tarball.is_file() and info_path.is_file() and not no_cache:
        tarball.touch()
        progress.say(f"      cached import of {base.path.name} ({tarball.name})")
        return tarball, VendorInfo.read(info_path)
    progress.say(f"      checking the sha256 of {base.path.name} "
                 f"({base.path.stat().st_size / 2**20:.0f} MiB)")
    actual = sha256_file(base.path)
    if actual != base.sha256:
        raise BuildError(f"--base {base.path}: sha256 is {actual}, --base-sha256 says "
                         f"{base.sha256}; refusing an image that is not the one you named")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".import-", dir=tarball.parent) as tmp:
        work = Path(tmp)
        image = _disk_image(base, work, progress)
        try:
            boot = diskimage.boot_partition(image)
            root = diskimage.root_partition(image)
        except BuildError as exc:
            raise BuildError(f"--base {base.path}: {exc}; expected a Raspberry Pi OS layout "
                             "(FAT32 boot partition, ext4 root)") from None
        tree = work / "tree"
        root_fs = diskimage.extract(image, root, work / "root.ext4")
        progress.say(f"      reading the root filesystem ({root.size / 2**20:.0f} MiB) "
                     "with debugfs")
        entries = copy_out(root_fs, tree, work, progress)
        root_fs.unlink()
        firmware = tree / "boot" / "firmware"
        if not firmware.is_dir():
            raise BuildError(f"--base {base.path}: the root filesystem has no /boot/firmware "
                             "(Raspberry Pi OS bookworm or newer is expected)")
        run(["mcopy", "-s", "-p", "-m", "-n", "-i", diskimage.fat_target(image, boot), "::/*",
             firmware], progress, what="mcopy (boot partition)")
        cmdline = (firmware / "cmdline.txt").read_text(errors="replace").strip() \
            if (firmware / "cmdline.txt").is_file() else ""
        packages = _packages(tree)
        issue = tree / "etc" / "rpi-issue"
        info = VendorInfo(
            name=base.path.name, sha256=base.sha256, release=_release(tree),
            rpi_issue=issue.read_text(errors="replace").splitlines()[0]
            if issue.is_file() else "",
            cmdline=cmdline, entries=entries, packages=packages,
            boot_files=sorted(p.name for p in firmware.iterdir()))
        with atomic_path(tarball) as tmp_tar:
            run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-cf", tmp_tar,
                 "-C", tree, "."], progress, what="tar (imported base)")
            with atomic_path(info_path) as tmp_info:
                tmp_info.write_text(json.dumps(dataclasses.asdict(info), indent=1) + "\n")
        shutil.rmtree(tree, ignore_errors=True)
    progress.say(f"      imported {info.release} ({entries} files, "
                 f"{len(packages)} packages)")
    for old in prune_bases(tarball, KEEP_IMPORTS):
        progress.say(f"      removed an old cached import: {old.name}")
    return tarball, info

"""Helpers for a staged target rootfs on the host: paths, emulated commands, contents."""

from __future__ import annotations

import fnmatch
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from ..hostcmd import capture
from ..progress import Progress


def inside(rootfs: Path, path: Path | str) -> Path:
    """Host path of an absolute target path."""
    return rootfs / str(path).lstrip("/")


ELF_MAGIC = b"\x7fELF"


def is_elf(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == ELF_MAGIC


def matching_files(rootfs: Path, patterns: list[str],
                   keep: list[str] | tuple[str, ...] = ()) -> Iterator[tuple[Path, str]]:
    """Each file or link in the rootfs (host path, absolute target path) whose target path
    matches a glob of `patterns` and none of `keep`; recipe globs, so `*` crosses `/`."""
    for folder, _dirs, files in os.walk(rootfs):
        for name in files:
            path = os.path.join(folder, name)
            absolute = "/" + os.path.relpath(path, rootfs)
            if any(fnmatch.fnmatch(absolute, p) for p in patterns) and \
                    not any(fnmatch.fnmatch(absolute, k) for k in keep):
                yield Path(path), absolute


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

"""Where a root filesystem's bytes go: a size table by component for the manifest, so that
each decision to drop or keep something can cite its figure.

Components are folders that mean one thing on a unit (kernel modules, firmware, Python's
standard library, FFmpeg's libraries, perl, gconv, the model), plus each installed wheel by
its RECORD and each Debian package by its list, both as the files are in the finished root.
A file counts once, in the first component whose pattern matches it; what no component
matches is "other".
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from pathlib import Path
from stat import S_ISREG

from .steps.install import MODEL_DIR, SITE_DIR

# (component, glob patterns relative to the root); first match wins
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kernel modules", ("usr/lib/modules/*", "lib/modules/*")),
    ("firmware", ("usr/lib/firmware/*", "lib/firmware/*")),
    ("boot partition files", ("boot/*",)),
    ("model", (f"{MODEL_DIR.as_posix().lstrip('/')}/*",)),
    # PyAV's wheel brings its own FFmpeg build and codec libraries
    ("ffmpeg and codecs", (f"{SITE_DIR.as_posix().lstrip('/')}/av.libs/*",
                           "usr/lib/*/libav*", "usr/lib/*/libsw*", "usr/lib/*/libx26*",
                           "usr/lib/*/libvpx*", "usr/lib/*/libdav1d*", "usr/lib/*/libaom*")),
    ("python wheels", (f"{SITE_DIR.as_posix().lstrip('/')}/*",)),
    ("python stdlib", ("usr/lib/python3*/*",)),
    ("perl", ("usr/lib/*/perl*/*", "usr/share/perl*/*", "usr/bin/perl*")),
    ("gconv", ("usr/lib/*/gconv/*",)),
    ("shared libraries", ("usr/lib/*/*.so*",)),
    ("documentation and locales", ("usr/share/doc/*", "usr/share/man/*",
                                   "usr/share/locale/*", "usr/share/i18n/*")),
    ("dpkg and apt state", ("var/lib/dpkg/*", "var/lib/apt/*", "var/cache/*")),
    ("programs", ("usr/bin/*", "usr/sbin/*", "usr/libexec/*")),
)


def component_sizes(rootfs: Path) -> dict[str, int]:
    """Bytes on disk (file sizes, links counted once) per component, largest first."""
    sizes = {name: 0 for name, _ in COMPONENTS} | {"other": 0}
    seen: set[tuple[int, int]] = set()
    for folder, _dirs, files in os.walk(rootfs):
        for name in files:
            path = os.path.join(folder, name)
            stat = os.lstat(path)
            if (stat.st_dev, stat.st_ino) in seen:
                continue
            seen.add((stat.st_dev, stat.st_ino))
            relative = os.path.relpath(path, rootfs)
            sizes[_component(relative)] += stat.st_size
    return dict(sorted(sizes.items(), key=lambda item: -item[1]))


def _component(relative: str) -> str:
    for name, patterns in COMPONENTS:
        if any(fnmatch.fnmatch(relative, pattern) for pattern in patterns):
            return name
    return "other"


def package_sizes(rootfs: Path) -> dict[str, int]:
    """Debian packages by the bytes of their files left in the finished root (dpkg's lists;
    pruned files no longer count), largest first."""
    found: dict[str, int] = {}
    for listing in sorted((rootfs / "var/lib/dpkg/info").glob("*.list")):
        found[listing.stem.split(":")[0]] = _bytes_of(
            rootfs, (line.strip() for line in listing.read_text(errors="replace").splitlines()))
    return dict(sorted(((k, v) for k, v in found.items() if v), key=lambda item: -item[1]))


def wheel_sizes(rootfs: Path) -> dict[str, int]:
    """Installed wheels by the bytes of the files their RECORD lists, as installed (shared
    objects are stripped at install), largest first."""
    site = rootfs / SITE_DIR.as_posix().lstrip("/")
    found: dict[str, int] = {}
    for record in sorted(site.glob("*.dist-info/RECORD")):
        names = (line.rsplit(",", 2)[0]
                 for line in record.read_text(errors="replace").splitlines())
        found[record.parent.name.split("-")[0]] = _bytes_of(
            rootfs, (f"{SITE_DIR.as_posix()}/{name}" for name in names if name))
    return dict(sorted(found.items(), key=lambda item: -item[1]))


def _bytes_of(rootfs: Path, absolute_paths: Iterable[str]) -> int:
    """Sizes of the regular files among the paths, each inode once."""
    total = 0
    seen: set[int] = set()
    for absolute in absolute_paths:
        try:
            stat = os.lstat(rootfs / absolute.lstrip("/"))
        except OSError:
            continue
        if S_ISREG(stat.st_mode) and stat.st_ino not in seen:
            seen.add(stat.st_ino)
            total += stat.st_size
    return total


def size_table(rootfs: Path, top: int = 25) -> dict[str, dict[str, int]]:
    """The manifest's `sizes`: components, and the largest packages and wheels."""
    return {"components": component_sizes(rootfs),
            "packages": dict(list(package_sizes(rootfs).items())[:top]),
            "wheels": wheel_sizes(rootfs)}


def largest(table: dict[str, dict[str, int]], count: int = 10) -> list[tuple[str, int]]:
    """The `count` largest entries across components, packages and wheels, labelled."""
    entries = [(f"{kind[:-1]} {name}", size)
               for kind, items in table.items() for name, size in items.items()]
    return sorted(entries, key=lambda item: -item[1])[:count]

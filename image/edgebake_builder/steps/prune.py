"""Files a finished appliance root carries but never uses at run time, removed before it is
assembled (recipe `prune`, with `prune_keep` for exceptions). The root is read-only on a unit
and replaced whole by an update, so no package's maintainer script ever runs there: what only
those scripts need (perl beyond perl-base, say) can go."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from .. import kmods
from ..errors import BuildError
from ..progress import Progress
from .rootfs import inside, matching_files, run_in_target

HWDB = "/usr/lib/udev/hwdb.bin"
HWDB_SOURCES = ("/usr/lib/udev/hwdb.d", "/etc/udev/hwdb.d")


def prune(rootfs: Path, patterns: list[str], keep: list[str], progress: Progress) -> int:
    """Remove the files and links whose absolute path matches a pattern and no keep pattern;
    returns the bytes removed."""
    if not patterns:
        return 0
    removed = count = 0
    for path, _absolute in list(matching_files(rootfs, patterns, keep)):
        removed += path.lstat().st_size
        count += 1
        path.unlink()
    progress.say(f"      pruned {count} files, {removed / 2**20:.1f} MiB (recipe: prune)")
    return removed


def prune_modules(rootfs: Path, exclude: list[str], keep: list[str], progress: Progress) -> int:
    """Kernel modules a unit never loads (recipe `kernel.modules_exclude`/`_keep`), with the
    dependency closure of the kept ones; returns the bytes removed."""
    if not exclude:
        return 0
    freed = 0
    for version, report in kmods.prune(rootfs, exclude, keep).items():
        freed += report.removed_bytes
        progress.say(f"      kernel {version}: {report.kept} modules kept, {report.removed} "
                     f"pruned ({report.removed_bytes / 2**20:.1f} MiB), dependencies complete")
    return freed


def prune_hwdb(rootfs: Path, exclude: list[str], progress: Progress) -> int:
    """udev's hardware database compiled again without the sources matching `exclude`
    (recipe `hwdb_exclude`). The vendor and model names of every PCI, USB and Bluetooth
    device and every MAC prefix are 12 of its 13 MiB; udev only copies them into device
    properties, and nothing on a unit reads those. Returns the bytes saved."""
    database = inside(rootfs, HWDB)
    if not exclude or not database.is_file():
        return 0
    sources = sorted(p for folder in HWDB_SOURCES for p in inside(rootfs, folder).glob("*.hwdb"))
    if not sources:
        progress.say(f"      {HWDB}: no sources left to compile it from; kept as it is")
        return 0
    before = database.stat().st_size
    dropped = [p for p in sources if any(fnmatch.fnmatch(p.name, g) for g in exclude)]
    for path in dropped:
        path.unlink()
    result = run_in_target(rootfs, ["systemd-hwdb", "update", "--usr", "--strict"], progress,
                           "systemd-hwdb")
    if result.returncode != 0 or not database.is_file():
        raise BuildError(f"systemd-hwdb update failed in the target: "
                         f"{(result.stdout + result.stderr).strip()[-300:]}")
    after = database.stat().st_size
    progress.say(f"      udev hwdb: {len(dropped)} of {len(sources)} sources left out "
                 f"(recipe: hwdb_exclude), {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
    return before - after

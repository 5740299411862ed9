"""Files a finished appliance root carries but never uses at run time, removed before it is
assembled (recipe `prune`, with `prune_keep` for exceptions). The root is read-only on a unit
and replaced whole by an update, so no package's maintainer script ever runs there: what only
those scripts need (perl beyond perl-base, say) can go."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from .. import kmods
from ..progress import Progress


def prune(rootfs: Path, patterns: list[str], keep: list[str], progress: Progress) -> int:
    """Remove the files and links whose absolute path matches a pattern and no keep pattern;
    returns the bytes removed."""
    if not patterns:
        return 0
    removed = count = 0
    for folder, _dirs, files in os.walk(rootfs):
        for name in files:
            path = os.path.join(folder, name)
            absolute = "/" + os.path.relpath(path, rootfs)
            if any(fnmatch.fnmatch(absolute, p) for p in patterns) and \
                    not any(fnmatch.fnmatch(absolute, k) for k in keep):
                removed += os.lstat(path).st_size
                count += 1
                os.unlink(path)
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

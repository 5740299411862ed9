"""Step (overlay targets, instead of assemble): the staged tree as a .tar.zst overlay.

The tarball holds only what edgebake adds: /opt/edgebake (runtime, wheels, model), our units,
sysusers and tmpfiles entries, journald and watchdog settings, app.yaml and the /data layout.
Owners are root (the service user does not exist until `apply-overlay` runs sysusers on the
real rootfs), times are SOURCE_DATE_EPOCH and entries are sorted, so the same inputs give the
same bytes.
"""

from __future__ import annotations

from pathlib import Path

from ..hostcmd import run
from ..progress import Progress

OVERLAY_NAME = "edgebake-overlay.tar.zst"


def write_overlay(tree: Path, out_dir: Path, epoch: int, progress: Progress) -> Path:
    out = out_dir / OVERLAY_NAME
    run(["tar", "--sort=name", f"--mtime=@{epoch}", "--owner=0", "--group=0",
         "--numeric-owner", "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,"
         "delete=ctime", "--zstd", "-cf", out, "-C", tree, "."], progress,
        what="tar (overlay)", env={"ZSTD_CLEVEL": "12", "ZSTD_NBTHREADS": "2"})
    return out

"""Step: compress, map and checksum the image, write the manifest, and move it all into place."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..cache import sha256_file
from ..hostcmd import run
from ..progress import Progress

# zstd -10 with a 128 MiB window: as small as xz -1 in under half the time. The pi4 image of
# 2026-12-04 on 2 cores: -9 100.2 MB in 3.5 s, -10 98.9 MB in 4.5 s, -11 98.8 MB in 6.2 s,
# -13 in 14.6 s is larger than -12. A 2^27 window is the most any zstd decoder (bmaptool's,
# Raspberry Pi Imager's libarchive) reads without being told; the output does not depend on
# the thread count.
ZSTD_ARGS = ("-10", "--long=27", "-T0")


def compress(image: Path, compression: str, xz_level: int, progress: Progress) -> Path:
    """`image`.zst (the default) or `image`.xz beside it; `compression` is "zst" or "xz"."""
    if compression == "xz":
        run(["xz", "-T0", f"-{xz_level}", "--keep", "--force", image], progress, what="xz")
    else:
        run(["zstd", "-q", *ZSTD_ARGS, "--force", "-o", image.with_name(image.name + ".zst"),
             image], progress, what="zstd")
    return image.with_name(f"{image.name}.{compression}")


def make_bmap(image: Path, progress: Progress) -> Path:
    bmap = image.with_name(image.name + ".bmap")
    run(["bmaptool", "create", "-o", bmap, image], progress, what="bmaptool create")
    return bmap


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_sums(folder: Path, names: list[str], known: dict[str, str] | None = None) -> Path:
    """SHA256SUMS for `names`; `known` holds digests already computed (the image's)."""
    known = known or {}
    sums = folder / "SHA256SUMS"
    sums.write_text("".join(f"{known.get(n) or sha256_file(folder / n)}  {n}\n" for n in names))
    return sums


def move_into_place(staging: Path, out_dir: Path, names: list[str]) -> None:
    """Rename each finished file over the old one; SHA256SUMS goes last, so it never lists a
    file from another build."""
    out_dir.mkdir(parents=True, exist_ok=True)
    old_sums = out_dir / "SHA256SUMS"
    if old_sums.exists():
        old_sums.unlink()
    ordered = [n for n in names if n != "SHA256SUMS"] + ["SHA256SUMS"]
    for name in ordered:
        os.replace(staging / name, out_dir / name)
    shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out_dir: Path, artifacts: list[Path], manifest: dict[str, Any],
            known: dict[str, str] | None = None) -> None:
    """The artifacts, their manifest and SHA256SUMS, moved into out_dir together."""
    write_json(staging / "manifest.json", manifest)
    names = [a.name for a in artifacts] + ["manifest.json"]
    write_sums(staging, names, known=known)
    move_into_place(staging, out_dir, [*names, "SHA256SUMS"])

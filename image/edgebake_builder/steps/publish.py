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


def compress(image: Path, level: int, progress: Progress) -> Path:
    run(["xz", "-T0", f"-{level}", "--keep", "--force", image], progress, what="xz")
    return image.with_name(image.name + ".xz")


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

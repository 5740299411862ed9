"""What a rollout is made of, checked before any unit is touched: the stages, the bundle
(signed by the key that signs the orders, for the units' target), and which units."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgebake_runtime.bundle import BundleError, signed_json

from ..errors import BuildError

STAGE = re.compile(r"(?P<count>[1-9][0-9]{0,5})|(?P<percent>[1-9][0-9]?(?:\.[0-9]+)?|100)%")
DEVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Stage:
    """`count` units in all by the end of the stage, or `percent` of the rollout's units."""

    text: str
    count: int = 0
    percent: float = 0.0

    def reach(self, total: int) -> int:
        wanted = self.count if self.count else math.ceil(total * self.percent / 100)
        return min(total, wanted)


def parse_stages(text: str) -> list[Stage]:
    """`1,10%,50%,100%`: each stage reaches more units than the one before, none past all."""
    stages = []
    for part in text.split(","):
        match = STAGE.fullmatch(part.strip())
        if match is None:
            raise BuildError(f"--stages {text!r}: {part.strip()!r}: expected a number of units "
                             "or a percentage up to 100%, like 1,10%,50%,100%")
        stages.append(Stage(part.strip(), int(match["count"] or 0),
                            float(match["percent"] or 0)))
    for before, after in itertools.pairwise(stages):
        grows = after.count > before.count if before.count and after.count else \
            after.percent > before.percent if before.percent and after.percent else \
            bool(before.count and after.percent)
        if not grows:
            raise BuildError(f"--stages {text!r}: {after.text} after {before.text}: expected "
                             "every stage to reach more units than the one before")
    return stages


def stage_ends(stages: list[Stage], total: int) -> list[int]:
    """How many units have been ordered by the end of each stage; a stage that would add
    nobody (1 then 10% of 8) takes one more unit, so every stage is seen to work."""
    ends: list[int] = []
    for stage in stages:
        previous = ends[-1] if ends else 0
        if previous >= total:
            break
        ends.append(min(total, max(stage.reach(total), previous + 1)))
    return ends


@dataclass(frozen=True)
class BundleFacts:
    path: Path
    sha256: str
    version: str
    target: str
    fleet: str
    data: bytes


def read_bundle(path: Path, target: str, public_key: Any, key_id: str) -> BundleFacts:
    """The bundle's manifest, once it checks out against the ordering key, for `target`."""
    try:
        data = path.read_bytes()
        with tarfile.open(path) as tar:
            manifest_text = _member(tar, "manifest.json")
            signature = _member(tar, "manifest.sig")
    except (OSError, tarfile.TarError) as exc:
        raise BuildError(f"--bundle {path}: not a readable bundle: {exc}") from None
    try:
        manifest = signed_json(manifest_text, signature, {key_id: public_key}, "manifest")
    except BundleError as exc:
        raise BuildError(f"--bundle {path}: {exc}; the bundle and the orders must be signed by "
                         "the same key (--key)") from None
    if manifest.get("target") != target:
        raise BuildError(f"--bundle {path}: made for target {manifest.get('target')!r}, the "
                         f"rollout is for {target!r} (--target)")
    return BundleFacts(path, hashlib.sha256(data).hexdigest(), str(manifest["version"]),
                       str(manifest.get("target")), str(manifest.get("fleet")), data)


def find_key(bundle: Path, folder: Path) -> Path:
    """The private key in `folder` (`*.key`) that signed `bundle`, for a rollout given no
    --key: its orders must be signed by a key the units trust, and that one is."""
    from ..signing import public_key_of, read_private_key

    try:
        with tarfile.open(bundle) as tar:
            wanted = json.loads(_member(tar, "manifest.json")).get("key_id")
    except (OSError, tarfile.TarError, ValueError) as exc:
        raise BuildError(f"--bundle {bundle}: not a readable bundle: {exc}") from None
    for candidate in sorted(folder.glob("*.key")):
        try:
            if public_key_of(read_private_key(candidate))[1] == wanted:
                return candidate
        except BundleError:
            continue
    raise BuildError(f"--key: no *.key in {folder} signed {bundle} (key id {wanted}); give "
                     "--key with the key that did")


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    handle = tar.extractfile(name)
    if handle is None:
        raise tarfile.TarError(f"{name} is not a file")
    return handle.read(1 << 20)


def unit_list(text: str) -> list[str]:
    units = [u.strip() for u in text.split(",") if u.strip()]
    bad = [u for u in units if not DEVICE.fullmatch(u)]
    if bad or not units:
        raise BuildError(f"--units {text!r}: expected device ids separated by commas")
    if len(set(units)) != len(units):
        raise BuildError(f"--units {text!r}: a unit is named twice")
    return units

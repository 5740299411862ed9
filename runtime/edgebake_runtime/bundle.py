"""Signed model bundles (.ebundle): one file with a model, its card and golden outputs.

The same code checks a bundle on the host (`invoke verify-bundle`) and on the unit. A bundle
is an uncompressed tar with exactly these members, regular files only:

    manifest.json   format, version, target, created, min_runtime, key id, and the sha256
                    and size of every other member
    manifest.sig    ed25519 signature of manifest.json's bytes
    model.tflite, model.card.json, model.golden.npz

Checks, in this order, each refusing with one line: size, member names and kinds (no paths,
links or devices), signature present, key known, signature valid, every member's sha256 and
size, target, version newer than the current one (unless a rollback is allowed). Nothing is
extracted before every check has passed.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUNDLE_FORMAT = 1
MEMBERS = ("model.tflite", "model.card.json", "model.golden.npz")
MAX_BUNDLE_BYTES = 64 * 2**20
VERSION = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6}){0,3}")


class BundleError(Exception):
    """A bundle that must not be applied; the message is one line naming the reason."""


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]
    members: dict[str, bytes]

    @property
    def version(self) -> str:
        return str(self.manifest["version"])


def version_key(version: str) -> tuple[int, ...]:
    if not VERSION.fullmatch(version):
        raise BundleError(f"version {version!r}: expected numbers separated by dots, like 1.4.2")
    return tuple(int(part) for part in version.split("."))


def crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise BundleError("python3-cryptography is not installed: bundles cannot be "
                          "signed or checked") from None
    return ed25519


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def load_public_key(text: str, source: str) -> tuple[str, Any]:
    """A public key file: one line `ed25519 <hex of the 32 raw bytes>`; returns (id, key)."""
    ed25519 = crypto()
    parts = text.split()
    if len(parts) != 2 or parts[0] != "ed25519" or not re.fullmatch(r"[0-9a-f]{64}", parts[1]):
        raise BundleError(f"{source}: expected `ed25519 <64 hex digits>`")
    raw = bytes.fromhex(parts[1])
    return key_id(raw), ed25519.Ed25519PublicKey.from_public_bytes(raw)


def _read_members(path: Path, max_bytes: int) -> dict[str, bytes]:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BundleError(f"{path}: {exc.strerror}") from None
    if size > max_bytes:
        raise BundleError(f"{path}: {size} bytes is too big (limit {max_bytes})")
    allowed = {"manifest.json", "manifest.sig", *MEMBERS}
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if info.name not in allowed:
                    raise BundleError(f"{path}: member {info.name!r} is not allowed "
                                      f"(only {', '.join(sorted(allowed))}, no paths)")
                if not info.isreg():
                    raise BundleError(f"{path}: member {info.name!r} is not a regular file")
                if info.name in members:
                    raise BundleError(f"{path}: member {info.name!r} appears twice")
                handle = tar.extractfile(info)
                assert handle is not None
                members[info.name] = handle.read()
    except (tarfile.TarError, EOFError) as exc:
        raise BundleError(f"{path}: not a bundle (unreadable tar: {exc})") from None
    return members


def check_bundle(path: Path, public_keys: dict[str, Any], target: str,
                 current_version: str | None = None, allow_rollback: bool = False,
                 max_bytes: int = MAX_BUNDLE_BYTES) -> Bundle:
    """Every check, or BundleError with the first that fails."""
    members = _read_members(path, max_bytes)
    if "manifest.json" not in members:
        raise BundleError(f"{path}: no manifest.json (not a bundle)")
    if "manifest.sig" not in members:
        raise BundleError(f"{path}: unsigned (no manifest.sig)")
    try:
        manifest = json.loads(members["manifest.json"])
        signer = str(manifest["key_id"])
    except (ValueError, KeyError, TypeError):
        raise BundleError(f"{path}: manifest.json is not a bundle manifest") from None
    key = public_keys.get(signer)
    if key is None:
        raise BundleError(f"{path}: signed by an unknown key {signer} (trusted: "
                          f"{', '.join(sorted(public_keys)) or 'none'})")
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(members["manifest.sig"], members["manifest.json"])
    except InvalidSignature:
        raise BundleError(f"{path}: the signature does not match the manifest "
                          "(tampered)") from None
    listed = manifest.get("members", {})
    for name in MEMBERS:
        data = members.get(name)
        entry = listed.get(name) if isinstance(listed, dict) else None
        if data is None or not isinstance(entry, dict):
            raise BundleError(f"{path}: {name} missing")
        if len(data) != entry.get("size") or \
                hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise BundleError(f"{path}: {name} does not match its signed sha256 (tampered)")
    if manifest.get("target") != target:
        raise BundleError(f"{path}: made for target {manifest.get('target')!r}, this is "
                          f"{target!r}")
    version = str(manifest.get("version"))
    new = version_key(version)
    if current_version is not None and not allow_rollback and \
            new <= version_key(current_version):
        raise BundleError(f"{path}: version {version} is not newer than the current "
                          f"{current_version} (a downgrade needs an explicit rollback)")
    return Bundle(path, manifest, {n: members[n] for n in MEMBERS})

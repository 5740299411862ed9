"""Signed model bundles (.ebundle): one file with a model, its card and golden outputs.

The same code checks a bundle on the host (`invoke verify-bundle`) and on the unit. A bundle
is an uncompressed tar with exactly these members, regular files only:

    manifest.json   format, version, target, created, min_runtime, key id, and the sha256
                    and size of every other member
    manifest.sig    ed25519 signature of manifest.json's bytes
    model.tflite, model.card.json, model.golden.npz

Checks, in this order, each refusing with one line: size, member headers (known names, plain
regular files: no paths, links, devices or sparse files, each within its size limit),
signature present and valid for a trusted key (before anything is parsed), every member's
signed size (before it is read) and sha256, target, version newer than the current one
(unless a rollback is allowed). Nothing is extracted before every check has passed.
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


# The most each member may hold: nothing is read into memory beyond these, whatever a
# member's header declares.
MEMBER_LIMITS = {"manifest.json": 64 * 1024, "manifest.sig": 64, "model.tflite": 60 * 2**20,
                 "model.card.json": 2**20, "model.golden.npz": 16 * 2**20}


def _headers(path: Path, tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """The members' headers, each checked before any member's data is read: a known name,
    a plain regular file (no link, device or sparse file), once, within its size limit."""
    found: dict[str, tarfile.TarInfo] = {}
    for info in tar:
        if info.name not in MEMBER_LIMITS:
            raise BundleError(f"{path}: member {info.name!r} is not allowed "
                              f"(only {', '.join(sorted(MEMBER_LIMITS))}, no paths)")
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.sparse is not None:
            raise BundleError(f"{path}: member {info.name!r} is not a plain regular file")
        if info.name in found:
            raise BundleError(f"{path}: member {info.name!r} appears twice")
        if info.size > MEMBER_LIMITS[info.name]:
            raise BundleError(f"{path}: member {info.name!r} declares {info.size} bytes "
                              f"(limit {MEMBER_LIMITS[info.name]})")
        found[info.name] = info
    return found


def _read(path: Path, tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(info)
    data = handle.read(info.size + 1) if handle is not None else b""
    if len(data) != info.size:
        raise BundleError(f"{path}: member {info.name!r} is cut short")
    return data


def _signed_manifest(path: Path, tar: tarfile.TarFile, headers: dict[str, tarfile.TarInfo],
                     public_keys: dict[str, Any]) -> dict[str, Any]:
    """manifest.json, once its signature checks out: nothing is parsed before that."""
    if "manifest.json" not in headers:
        raise BundleError(f"{path}: no manifest.json (not a bundle)")
    if "manifest.sig" not in headers:
        raise BundleError(f"{path}: unsigned (no manifest.sig)")
    text = _read(path, tar, headers["manifest.json"])
    signature = _read(path, tar, headers["manifest.sig"])
    from cryptography.exceptions import InvalidSignature

    signer = ""
    for name, key in public_keys.items():
        try:
            key.verify(signature, text)
            signer = name
            break
        except InvalidSignature:
            continue
    if not signer:
        raise BundleError(f"{path}: the signature does not match the manifest for any trusted "
                          f"key (an unknown key, or tampered; trusted: "
                          f"{', '.join(sorted(public_keys)) or 'none'})")
    try:
        manifest = json.loads(text)
        if not isinstance(manifest, dict):
            raise TypeError("not a mapping")
    except (ValueError, TypeError, RecursionError):
        raise BundleError(f"{path}: manifest.json is not a bundle manifest") from None
    if manifest.get("key_id") != signer:
        raise BundleError(f"{path}: manifest names key {manifest.get('key_id')!r}, signed by "
                          f"{signer}")
    return manifest


def check_bundle(path: Path, public_keys: dict[str, Any], target: str,
                 current_version: str | None = None, allow_rollback: bool = False,
                 max_bytes: int = MAX_BUNDLE_BYTES) -> Bundle:
    """Every check, or BundleError with the first that fails. The signature is checked
    before anything in the bundle is parsed, and no member is read beyond its limit."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BundleError(f"{path}: {exc.strerror}") from None
    if size > max_bytes:
        raise BundleError(f"{path}: {size} bytes is too big (limit {max_bytes})")
    try:
        with tarfile.open(path, mode="r:") as tar:
            headers = _headers(path, tar)
            manifest = _signed_manifest(path, tar, headers, public_keys)
            members = _signed_members(path, tar, headers, manifest)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(f"{path}: not a bundle (unreadable tar: {exc})") from None
    return _check_manifest(path, manifest, members, target, current_version, allow_rollback)


def _signed_members(path: Path, tar: tarfile.TarFile, headers: dict[str, tarfile.TarInfo],
                    manifest: dict[str, Any]) -> dict[str, bytes]:
    """Each model member, read only when its header has the size the manifest signed."""
    listed = manifest.get("members", {})
    members: dict[str, bytes] = {}
    for name in MEMBERS:
        info = headers.get(name)
        entry = listed.get(name) if isinstance(listed, dict) else None
        if info is None or not isinstance(entry, dict):
            raise BundleError(f"{path}: {name} missing")
        if info.size != entry.get("size"):
            raise BundleError(f"{path}: {name} does not match its signed size (tampered)")
        data = _read(path, tar, info)
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise BundleError(f"{path}: {name} does not match its signed sha256 (tampered)")
        members[name] = data
    return members


def _check_manifest(path: Path, manifest: dict[str, Any], members: dict[str, bytes],
                    target: str, current_version: str | None, allow_rollback: bool) -> Bundle:
    if manifest.get("target") != target:
        raise BundleError(f"{path}: made for target {manifest.get('target')!r}, this is "
                          f"{target!r}")
    version = str(manifest.get("version"))
    new = version_key(version)
    if current_version is not None and not allow_rollback and \
            new <= version_key(current_version):
        raise BundleError(f"{path}: version {version} is not newer than the current "
                          f"{current_version} (a downgrade needs an explicit rollback)")
    return Bundle(path, manifest, members)

"""Signed model bundles (.ebundle): one file with a model, its card and golden outputs.

The same code checks a bundle on the host (`invoke verify-bundle`) and on the unit. A bundle
is an uncompressed tar with exactly these members, regular files only:

    manifest.json   format, version, target, fleet, created, min_runtime, key id, revoked
                    key ids, and the sha256 and size of every other member
    manifest.sig    ed25519 signature of manifest.json's bytes
    model.tflite, model.card.json, model.golden.npz

Checks, in this order, each refusing with one line: size, member headers (known names, plain
regular files: no paths, links, devices or sparse files, each within its size limit),
signature present and valid for a trusted key (before anything is parsed), every member's
signed size (before it is read) and sha256, target and fleet, the runtime it needs, version
newer than the current one (unless a rollback is allowed). Nothing is extracted before every
check has passed. The manifest and its signature stay beside the model in its slot, so the
model is checked against them again each time it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__

BUNDLE_FORMAT = 1
DEFAULT_FLEET = "default"
KEY_ID = re.compile(r"[0-9a-f]{16}")
ORDER_TAG = b"EBORDER1 "  # an MQTT update order: this, its signature in hex, a newline, JSON
MEMBERS = ("model.tflite", "model.card.json", "model.golden.npz")
MAX_BUNDLE_BYTES = 64 * 2**20
VERSION = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6}){0,3}")


class BundleError(Exception):
    """A bundle that must not be applied; the message is one line naming the reason."""


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]
    members: dict[str, bytes]  # every member, the manifest and its signature included

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
                     public_keys: dict[str, Any]) -> tuple[dict[str, Any], bytes, bytes]:
    """manifest.json, once its signature checks out: nothing is parsed before that."""
    if "manifest.json" not in headers:
        raise BundleError(f"{path}: no manifest.json (not a bundle)")
    if "manifest.sig" not in headers:
        raise BundleError(f"{path}: unsigned (no manifest.sig)")
    text = _read(path, tar, headers["manifest.json"])
    signature = _read(path, tar, headers["manifest.sig"])
    return signed_json(text, signature, public_keys, str(path)), text, signature


def signed_json(text: bytes, signature: bytes, public_keys: dict[str, Any],
                source: str) -> dict[str, Any]:
    """The JSON object in `text` once `signature` is a trusted key's over exactly these
    bytes and the object names that key (`key_id`); bundles, slots and orders alike."""
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
        raise BundleError(f"{source}: the signature does not match for any trusted key (an "
                          f"unknown key, a revoked one, or tampered; trusted: "
                          f"{', '.join(sorted(public_keys)) or 'none'})")
    try:
        found = json.loads(text)
        if not isinstance(found, dict):
            raise TypeError("not a mapping")
    except (ValueError, TypeError, RecursionError):
        raise BundleError(f"{source}: signed text is not a JSON object") from None
    if found.get("key_id") != signer:
        raise BundleError(f"{source}: names key {found.get('key_id')!r}, signed by {signer}")
    return found


def check_bundle(path: Path, public_keys: dict[str, Any], target: str,
                 current_version: str | None = None, allow_rollback: bool = False,
                 max_bytes: int = MAX_BUNDLE_BYTES, fleet: str = DEFAULT_FLEET) -> Bundle:
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
            manifest, text, signature = _signed_manifest(path, tar, headers, public_keys)
            members = _signed_members(path, tar, headers, manifest)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(f"{path}: not a bundle (unreadable tar: {exc})") from None
    check_made_for(str(path), manifest, target, fleet)
    version = str(manifest.get("version"))
    if current_version is not None and not allow_rollback and \
            version_key(version) <= version_key(current_version):
        raise BundleError(f"{path}: version {version} is not newer than the current "
                          f"{current_version} (a downgrade needs an explicit rollback)")
    members.update({"manifest.json": text, "manifest.sig": signature})
    return Bundle(path, manifest, members)


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


def check_made_for(source: str, manifest: dict[str, Any], target: str, fleet: str) -> None:
    """The signed claims a unit checks before a bundle's model may run on it: its target
    and fleet, a runtime at least as new as the bundle needs, and revocations that do not
    revoke their own signer."""
    for field, mine in (("target", target), ("fleet", fleet)):
        if manifest.get(field) != mine:
            raise BundleError(f"{source}: made for {field} {manifest.get(field)!r}, this unit "
                              f"is {mine!r}")
    needs = manifest.get("min_runtime") or "0"
    if version_key(str(needs)) > version_key(__version__):
        raise BundleError(f"{source}: needs edgebake runtime {needs}, this unit has "
                          f"{__version__}")
    if not isinstance(manifest.get("created"), int) or manifest["created"] < 0:
        raise BundleError(f"{source}: created: expected seconds since 1970")
    revoked = manifest.get("revokes", [])
    if not isinstance(revoked, list) or not all(isinstance(k, str) and KEY_ID.fullmatch(k)
                                                for k in revoked):
        raise BundleError(f"{source}: revokes: expected a list of 16-hex-digit key ids")
    if manifest.get("key_id") in revoked:
        raise BundleError(f"{source}: revokes the key that signed it")
    version_key(str(manifest.get("version")))


def check_slot(folder: Path, public_keys: dict[str, Any], target: str, fleet: str) -> None:
    """A model slot against the signed manifest it was installed with: signature (by a key
    still trusted), target and fleet, and the model's and card's sha256."""
    text = read_plain(folder / "manifest.json", MEMBER_LIMITS["manifest.json"])
    manifest = signed_json(text, read_plain(folder / "manifest.sig",
                                            MEMBER_LIMITS["manifest.sig"]),
                           public_keys, str(folder))
    check_made_for(str(folder), manifest, target, fleet)
    listed = manifest.get("members")
    for name in ("model.tflite", "model.card.json"):
        entry = listed.get(name) if isinstance(listed, dict) else None
        data = read_plain(folder / name, MEMBER_LIMITS[name])
        if not isinstance(entry, dict) or hashlib.sha256(data).hexdigest() != \
                entry.get("sha256"):
            raise BundleError(f"{folder / name}: does not match its signed sha256 (changed "
                              "after it was installed)")


def read_plain(path: Path, limit: int) -> bytes:
    """A regular file's bytes, never through a link, at most `limit` of them."""
    import os

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise BundleError(f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{path}: more than {limit} bytes")
    return data

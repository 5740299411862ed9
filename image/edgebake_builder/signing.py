"""Signing model bundles, on the host only: keypairs, the private key's file, and the
signed bundle itself. A unit only verifies (`edgebake_runtime.bundle`), so no signing code
ships on it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time
from pathlib import Path

from edgebake_runtime.bundle import (
    BUNDLE_FORMAT,
    MEMBERS,
    BundleError,
    crypto,
    key_id,
    version_key,
)


def make_keypair() -> tuple[bytes, str]:
    """(private key as 32 raw bytes, the public key file's text)."""
    from cryptography.hazmat.primitives import serialization

    ed25519 = crypto()
    private = ed25519.Ed25519PrivateKey.generate()
    raw_private = private.private_bytes(serialization.Encoding.Raw,
                                        serialization.PrivateFormat.Raw,
                                        serialization.NoEncryption())
    raw_public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw)
    return raw_private, f"ed25519 {raw_public.hex()}\n"


PRIVATE_KEY_TAG = "ed25519-private"


def write_private_key(path: Path) -> str:
    """A new keypair: the private key in `path` (mode 0600, never over an existing file),
    the public key's text returned (for `<path>.pub` and recipes' update.public_keys)."""
    if path.exists():
        raise BundleError(f"{path} exists; refusing to replace a signing key")
    private, public_text = make_keypair()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{PRIVATE_KEY_TAG} {private.hex()}\n")
    return public_text


def read_private_key(path: Path) -> bytes:
    """The raw private key from a file `write_private_key` wrote."""
    try:
        fields = path.read_text().split()
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: cannot read the signing key: {exc}") from None
    if len(fields) != 2 or fields[0] != PRIVATE_KEY_TAG or \
            not re.fullmatch(r"[0-9a-f]{64}", fields[1]):
        raise BundleError(f"{path}: expected a private key written by `invoke make-key`")
    return bytes.fromhex(fields[1])


def build_bundle(files: dict[str, bytes], private_raw: bytes, version: str, target: str,
                 min_runtime: str = "") -> bytes:
    """The bundle's bytes, signed with the 32-byte private key."""
    from cryptography.hazmat.primitives import serialization

    ed25519 = crypto()
    version_key(version)
    if sorted(files) != sorted(MEMBERS):
        raise BundleError(f"a bundle holds exactly {', '.join(MEMBERS)}")
    private = ed25519.Ed25519PrivateKey.from_private_bytes(private_raw)
    public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    created = int(time.time())
    manifest = {"format": BUNDLE_FORMAT, "version": version, "target": target,
                "created": created, "min_runtime": min_runtime,
                "key_id": key_id(public),
                "members": {name: {"sha256": hashlib.sha256(data).hexdigest(),
                                   "size": len(data)} for name, data in sorted(files.items())}}
    manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("manifest.json", manifest_bytes),
                           ("manifest.sig", private.sign(manifest_bytes)),
                           *sorted(files.items())]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, created
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()

"""Signing model bundles, on the host only: keypairs, the private key's file, and the
signed bundle itself. A unit only verifies (`edgebake_runtime.bundle`), so no signing code
ships on it."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgebake_runtime.bundle import (
    BUNDLE_FORMAT,
    DEFAULT_FLEET,
    KEY_ID,
    MEMBERS,
    ORDER_TAG,
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


def _signer(private_raw: bytes) -> tuple[Any, str]:
    """The private key object and its key id."""
    from cryptography.hazmat.primitives import serialization

    private = crypto().Ed25519PrivateKey.from_private_bytes(private_raw)
    public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    return private, key_id(public)


def public_key_of(private_raw: bytes) -> tuple[Any, str]:
    """The public key object and key id that go with a private key."""
    private, signer = _signer(private_raw)
    return private.public_key(), signer


def build_bundle(files: dict[str, bytes], private_raw: bytes, version: str, target: str,
                 min_runtime: str = "", fleet: str = DEFAULT_FLEET,
                 revokes: Sequence[str] = (), registry: dict[str, str] | None = None) -> bytes:
    """The bundle's bytes, signed with the 32-byte private key. `revokes`: key ids the
    units stop trusting once they take this bundle (not the key signing it). `registry`:
    the registered model version it was made from."""
    version_key(version)
    if min_runtime:
        version_key(min_runtime)
    if sorted(files) != sorted(MEMBERS):
        raise BundleError(f"a bundle holds exactly {', '.join(MEMBERS)}")
    private, signer = _signer(private_raw)
    bad = [k for k in revokes if not KEY_ID.fullmatch(k) or k == signer]
    if bad:
        raise BundleError(f"revoke {bad[0]!r}: expected the 16-hex-digit id of another key")
    created = int(time.time())
    manifest = {"format": BUNDLE_FORMAT, "version": version, "target": target,
                "fleet": fleet, "created": created, "min_runtime": min_runtime,
                "revokes": sorted(revokes), "key_id": signer,
                **({"registry": registry} if registry else {}),
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



def order_seq(order: bytes) -> int:
    """The number of an order `sign_order` made (unit answers carry it)."""
    return int(json.loads(order.partition(b"\n")[2])["seq"])


def sign_order(private_raw: bytes, to: str, fleet: str = DEFAULT_FLEET, url: str = "",
               bundle: bytes = b"", seq: int | None = None, window_sec: float | None = None,
               rollback: str = "", samples: int = 0,
               share: dict[str, Any] | None = None, system: bool = False) -> bytes:
    """An MQTT update order for one unit (`to` = its device id) or a group (`group/<name>`):
    a bundle's URL or the bundle itself (with the trial's health window, if given), or the
    version to roll back from, how many frames to keep as samples, or a samples share;
    numbered (by default
    microseconds since 1970, so each order is above the last) and signed, as
    `edgebake_runtime.update` checks it. `system`: the url is a system bundle (.raucb), for
    the unit's `os-update` topic."""
    if sum(map(bool, (url, bundle, rollback, samples, share))) != 1:
        raise BundleError("an order holds one of a url, a bundle, a rollback, samples or a "
                          "share")
    if system and not url:
        raise BundleError("a system update order holds the url of a .raucb bundle")
    private, signer = _signer(private_raw)
    order: dict[str, Any] = {"key_id": signer, "to": to, "fleet": fleet,
                             "seq": time.time_ns() // 1000 if seq is None else seq}
    if rollback:
        order["rollback"] = rollback
    elif samples:
        order["samples"] = samples
    elif share:
        order["share_samples"] = share
    elif url:
        order["url"] = url
        if system:
            order["system"] = True
    else:
        order["bundle"] = base64.b64encode(bundle).decode("ascii")
    if window_sec is not None and (url or bundle):
        order["window_sec"] = window_sec
    text = json.dumps(order, sort_keys=True).encode()
    signature: bytes = private.sign(text)
    return ORDER_TAG + signature.hex().encode("ascii") + b"\n" + text

"""Writes the binary members of the bad-input corpus (frames, models, bundles).

The text members (recipes, seeds, configs) are written by hand. Run from the repository root:
`.venv/bin/python tests/corpus/make_corpus.py`. The bundles are signed with a key
made here for the corpus only; `bundles/trusted.pub` is what the checks trust.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def jpeg(size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (120, 80, 40)).save(out, "JPEG", quality=90)
    return out.getvalue()


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", optimize=True)
    return out.getvalue()


def frames(folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    good = jpeg()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_bytes(b"this is not a picture\n")
    # 12000x12000 one-bit pixels: a few tens of KB that would decode to 432 MB of RGB
    (folder / "bomb.png").write_bytes(png(Image.new("1", (12000, 12000))))
    damaged = bytearray(png(Image.new("RGB", (32, 32), (10, 200, 30))))
    damaged[60:80] = b"\x00" * 20  # inside the compressed pixel data
    (folder / "damaged.png").write_bytes(bytes(damaged))
    (folder / "short.yuyv").write_bytes(b"\x80\x10" * 500)  # 1000 bytes of a 640x480 frame


def models(folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "empty.tflite").write_bytes(b"")
    (folder / "picture.tflite").write_bytes(png(Image.new("RGB", (8, 8))))
    # a FlatBuffer header with the TFLite identifier, and nothing behind it
    (folder / "header-only.tflite").write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 24)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()  # type: ignore
                if m.isfile()]


def bundles(folder: Path) -> None:
    from edgebake_builder.signing import build_bundle, make_keypair

    folder.mkdir(exist_ok=True)
    private, public = make_keypair()
    other, _ = make_keypair()
    (folder / "trusted.pub").write_text(public)
    files = {"model.tflite": b"\x1c\x00\x00\x00TFL3" + b"\x00" * 64,
             "model.card.json": b"{}", "model.golden.npz": b""}
    good = build_bundle(files, private, "2.0", "pi4")
    tampered = [(n, d + b"\x00" if n == "model.tflite" else d) for n, d in _members(good)]
    (folder / "tampered.ebundle").write_bytes(_tar(tampered))
    (folder / "unsigned.ebundle").write_bytes(
        _tar([(n, d) for n, d in _members(good) if n != "manifest.sig"]))
    (folder / "unknown-key.ebundle").write_bytes(build_bundle(files, other, "2.0", "pi4"))
    (folder / "other-target.ebundle").write_bytes(
        build_bundle(files, private, "2.0", "jetson-orin-nano"))
    (folder / "downgrade.ebundle").write_bytes(build_bundle(files, private, "0.5", "pi4"))
    (folder / "traversal.ebundle").write_bytes(
        _tar([*_members(good), ("../../etc/cron.d/evil", b"* * * * * root sh\n")]))
    (folder / "not-a-tar.ebundle").write_bytes(b"PK\x03\x04 a zip, not a bundle" * 10)
    (folder / "other-fleet.ebundle").write_bytes(
        build_bundle(files, private, "2.0", "pi4", fleet="north"))
    (folder / "needs-newer-runtime.ebundle").write_bytes(
        build_bundle(files, private, "2.0", "pi4", min_runtime="99.0"))
    (folder / "revokes-own-key.ebundle").write_bytes(_resigned(good, private, revoke_own=True))
    hostile_bundles(folder, _members(good))


def _resigned(bundle: bytes, private_raw: bytes, revoke_own: bool) -> bytes:
    """The bundle with its manifest changed and signed again by the same key: what
    `build_bundle` refuses to make."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    members = dict(_members(bundle))
    manifest = json.loads(members["manifest.json"])
    if revoke_own:
        manifest["revokes"] = [manifest["key_id"]]
    members["manifest.json"] = json.dumps(manifest, indent=1, sort_keys=True).encode()
    members["manifest.sig"] = ed25519.Ed25519PrivateKey.from_private_bytes(
        private_raw).sign(members["manifest.json"])
    return _tar(list(members.items()))


def _raw_member(name: str, data: bytes, declared: int | None = None) -> bytes:
    """One tar member as bytes, its header free to declare another size than it holds."""
    info = tarfile.TarInfo(name)
    info.size = len(data) if declared is None else declared
    info.mtime = 1735689600
    return info.tobuf(tarfile.PAX_FORMAT) + data + b"\0" * (-len(data) % 512)


def hostile_bundles(folder: Path, members: list[tuple[str, bytes]]) -> None:
    """Bundles made to exhaust memory or a parser before the signature is checked."""
    others = [(n, d) for n, d in members if n != "model.tflite"]
    # a PAX 1.0 sparse member: a block in the file, 3 GB of zeros once read
    sparse = tarfile.TarInfo("GNUSparseFile.0/model.tflite")
    block = b"1\n0\n0\n".ljust(512, b"\0")
    sparse.size, sparse.mtime = len(block), 1735689600
    sparse.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                          "GNU.sparse.name": "model.tflite",
                          "GNU.sparse.realsize": str(3 * 10**9)}
    (folder / "sparse-member.ebundle").write_bytes(
        b"".join(_raw_member(n, d) for n, d in others)
        + sparse.tobuf(tarfile.PAX_FORMAT) + block + b"\0" * 1024)
    # a header that declares 3 GB with four bytes behind it
    (folder / "huge-declared-size.ebundle").write_bytes(
        b"".join(_raw_member(n, d) for n, d in others)
        + _raw_member("model.tflite", b"TFL3", declared=3 * 10**9) + b"\0" * 1024)
    # a manifest nested deeper than a parser allows, with a made-up signature
    (folder / "nested-manifest.ebundle").write_bytes(_tar(
        [("manifest.json", b"[" * 30000 + b"]" * 30000), ("manifest.sig", b"\x01" * 64),
         *[(n, d) for n, d in members if n not in ("manifest.json", "manifest.sig")]]))


if __name__ == "__main__":
    frames(HERE / "frames")
    models(HERE / "models")
    bundles(HERE / "bundles")

"""Signed model bundles on the host: `make-key`, `make-bundle`, `verify-bundle`. Every bad
bundle is refused with one line naming the reason, by the code the unit will use."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from edgebake_runtime.bundle import BundleError, check_bundle, load_public_key
from edgebake_runtime.modelstore import ModelStore
from edgebake_runtime.update import UnitUpdates
from helpers import invoke


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, default_model: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bundle")
    for name in ("signing.key", "other.key"):
        made = invoke("make-key", "--out", str(folder / name))
        assert made.returncode == 0, made.stderr
    bundle = folder / "m.ebundle"
    made = invoke("make-bundle", "--model", str(default_model), "--key",
                  str(folder / "signing.key"), "--version", "1.2.0", "--target", "pi4",
                  "--out", str(bundle))
    assert made.returncode == 0, made.stderr
    return {"bundle": bundle, "pub": folder / "signing.key.pub",
            "other": folder / "other.key.pub", "folder": folder}


def verify(bundle: Path, pub: Path, *extra: str) -> tuple[int, str]:
    result = invoke("verify-bundle", "--bundle", str(bundle), "--public-key", str(pub), *extra)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout + result.stderr


def rewrite(source: Path, dest: Path, change: dict[str, bytes | None],
            extra: tuple[str, bytes] | None = None) -> Path:
    """Copy a bundle, replacing (bytes) or dropping (None) members, maybe adding one."""
    out = io.BytesIO()
    with tarfile.open(source) as old, tarfile.open(fileobj=out, mode="w") as new:
        for info in old:
            handle = old.extractfile(info)
            assert handle is not None
            data = change.get(info.name, handle.read())
            if info.name in change and change[info.name] is None:
                continue
            assert data is not None
            info.size = len(data)
            new.addfile(info, io.BytesIO(data))
        if extra is not None:
            info = tarfile.TarInfo(extra[0])
            info.size = len(extra[1])
            new.addfile(info, io.BytesIO(extra[1]))
    dest.write_bytes(out.getvalue())
    return dest


def test_a_good_bundle_verifies(signed: dict[str, Path]) -> None:
    code, text = verify(signed["bundle"], signed["pub"], "--current", "1.1.9")
    assert code == 0 and "ok, version 1.2.0 for pi4" in text, text
    assert (signed["folder"] / "signing.key").stat().st_mode & 0o077 == 0


def test_every_bad_bundle_is_refused_in_one_line(signed: dict[str, Path]) -> None:
    folder, bundle = signed["folder"], signed["bundle"]
    with tarfile.open(bundle) as tar:
        handle = tar.extractfile("model.tflite")
        assert handle is not None
        model = bytearray(handle.read())
    model[100] ^= 0xFF
    cases = [
        (rewrite(bundle, folder / "t.ebundle", {"model.tflite": bytes(model)}), [],
         "model.tflite does not match its signed sha256 (tampered)"),
        (rewrite(bundle, folder / "u.ebundle", {"manifest.sig": None}), [], "unsigned"),
        (bundle, ["--public-key", str(signed["other"])], "unknown key"),
        (bundle, ["--current", "1.2.0"], "not newer than the current 1.2.0"),
        (bundle, ["--target", "jetson-orin-nano"], "made for target 'pi4'"),
        (rewrite(bundle, folder / "p.ebundle", {}, ("../evil", b"x")), [],
         "member '../evil' is not allowed"),
        (rewrite(bundle, folder / "s.ebundle", {"manifest.json": b'{"key_id": "x"}'}), [],
         "an unknown key, a revoked one, or tampered"),
    ]
    for path, extra, expected in cases:
        pub = signed["other"] if "--public-key" in extra else signed["pub"]
        rest = [a for a in extra if a not in ("--public-key", str(signed["other"]))]
        code, text = verify(path, pub, *rest)
        assert code != 0 and expected in text, (path.name, expected, text)
        assert len(text.strip().splitlines()) == 1, text
    # the signature covers the manifest: editing it (a new version) breaks the signature
    with tarfile.open(bundle) as tar:
        handle = tar.extractfile("manifest.json")
        assert handle is not None
        manifest = handle.read().replace(b'"version": "1.2.0"', b'"version": "9.0.0"')
    forged = rewrite(bundle, folder / "f.ebundle", {"manifest.json": manifest})
    code, text = verify(forged, signed["pub"])
    assert code != 0 and "signature does not match" in text, text


def test_size_limit_and_rollback(signed: dict[str, Path]) -> None:
    keys = dict([load_public_key(signed["pub"].read_text(), "pub")])
    with pytest.raises(BundleError, match="too big"):
        check_bundle(signed["bundle"], keys, "pi4", max_bytes=1000)
    found = check_bundle(signed["bundle"], keys, "pi4", current_version="2.0",
                         allow_rollback=True)
    assert found.version == "1.2.0" and set(found.members) == {
        "model.tflite", "model.card.json", "model.golden.npz", "manifest.json", "manifest.sig"}


def test_a_signed_manifest_no_parser_can_read_is_refused_in_one_line(tmp_path: Path) -> None:
    """Nesting deeper than Python's parser allows, even under a valid signature, is one
    BundleError (it was a RecursionError out of the USB update before)."""

    from edgebake_builder.signing import make_keypair
    from edgebake_runtime.bundle import crypto

    private, public = make_keypair()
    text = b"[" * 30000 + b"]" * 30000
    signature = crypto().Ed25519PrivateKey.from_private_bytes(private).sign(text)
    path = tmp_path / "nested.ebundle"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("manifest.json", text), ("manifest.sig", signature)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    keys = dict([load_public_key(public, "pub")])
    with pytest.raises(BundleError, match="signed text is not a JSON object"):
        check_bundle(path, keys, "pi4")


def unit_updates(tmp_path: Path, keys: dict[str, Path]) -> UnitUpdates:
    """A unit's update side in a folder: target pi4, the default fleet, these public keys."""
    from edgebake_runtime.config import UpdateSettings

    (tmp_path / "keys").mkdir()
    for name, pub in keys.items():
        (tmp_path / "keys" / f"{name}.pub").write_bytes(pub.read_bytes())
    (tmp_path / "target").write_text("pi4\n")
    settings = UpdateSettings(dir=str(tmp_path / "models"), keys_dir=str(tmp_path / "keys"),
                              target_file=str(tmp_path / "target"),
                              fleet_file=str(tmp_path / "no-fleet-file"))
    return UnitUpdates(settings, ModelStore(tmp_path / "models"), tmp_path / "none.card.json")


def test_a_model_slot_is_checked_against_its_signed_manifest_at_every_load(
        tmp_path: Path, signed: dict[str, Path]) -> None:
    """A slot written from a good bundle loads; once its model or card changes on /data, or
    its manifest is replaced, or the key that signed it is revoked, it is refused."""
    keys = dict([load_public_key(signed["pub"].read_text(), "pub")])
    updates = unit_updates(tmp_path, {"ops": signed["pub"]})
    slot = updates.store.write_slot(check_bundle(signed["bundle"], keys, "pi4"))
    updates.check_slot(slot)
    model = slot.model.read_bytes()
    slot.model.write_bytes(model[:-1] + bytes([model[-1] ^ 1]))
    with pytest.raises(BundleError, match="does not match its signed sha256"):
        updates.check_slot(slot)
    slot.model.write_bytes(model)
    (slot.model.parent / "manifest.sig").write_bytes(b"\x00" * 64)
    with pytest.raises(BundleError, match="signature does not match"):
        updates.check_slot(slot)
    slot = updates.store.write_slot(check_bundle(signed["bundle"], keys, "pi4"))
    updates.store.remember(revoked=list(keys))
    with pytest.raises(BundleError, match="no public keys"):
        updates.check_slot(slot)


def test_a_signed_revocation_holds_and_a_revoked_key_is_refused(
        tmp_path: Path, signed: dict[str, Path], default_model: Path) -> None:
    """A bundle signed by one trusted key revokes another: the unit remembers it even when the
    bundle's model then fails its own checks, and refuses the revoked key's bundles since."""
    folder = signed["folder"]
    revoked_id = load_public_key(signed["pub"].read_text(), "pub")[0]
    revoking = tmp_path / "revoking.ebundle"
    made = invoke("make-bundle", "--model", str(default_model), "--key",
                  str(folder / "other.key"), "--version", "3.0", "--revoke", revoked_id,
                  "--out", str(revoking))
    assert made.returncode == 0, made.stderr
    updates = unit_updates(tmp_path, {"ops": signed["pub"], "spare": signed["other"]})
    assert updates.apply(signed["bundle"]).startswith("model 1.2.0 installed")
    updates.store.confirm()
    updates.apply(revoking)
    assert updates.store.state()["revoked"] == [revoked_id]
    updates.store.rollback()  # back to 1.2.0, signed by the revoked key: no longer loads
    current = updates.store.current()
    assert current is not None
    with pytest.raises(BundleError, match="an unknown key, a revoked one"):
        updates.check_slot(current)
    newer = tmp_path / "newer.ebundle"
    made = invoke("make-bundle", "--model", str(default_model), "--key",
                  str(folder / "signing.key"), "--version", "4.0", "--out", str(newer))
    assert made.returncode == 0, made.stderr
    with pytest.raises(BundleError, match="an unknown key, a revoked one"):
        updates.apply(newer)

"""The model bundles that updates are tested with: one good, and one for each way a bundle
that reaches a unit must be turned away or taken back.

- good: BlazeFace full range as 2.0 (another input size than the image's model);
- tampered: a signed bundle whose model was changed afterwards (refused, nothing changes);
- golden: a correct signature over golden outputs the model does not give (refused by the
  golden test on the unit);
- undecodable: passes every check, but its card's anchors do not fit the model, so every
  frame's decoding fails once it serves (rolled back by the health window on its own).

`test-image` applies them to the booted unit and the host tests to a running service.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..progress import Progress

VERSIONS = {"tampered": "1.5", "golden": "1.6", "undecodable": "1.7", "good": "2.0"}


@dataclass(frozen=True)
class TrialBundles:
    public_key: str  # the line a unit's update-keys file (or a seed) holds
    paths: dict[str, Path]  # by the names in VERSIONS
    private_key: Path  # the key file that signed them, for orders to the unit


def _members(model: Path, card: Path, golden: Path) -> dict[str, bytes]:
    return {"model.tflite": model.read_bytes(), "model.card.json": card.read_bytes(),
            "model.golden.npz": golden.read_bytes()}


def _shifted_golden(golden: Path) -> bytes:
    """The same golden file with every expected output moved far past any tolerance."""
    with np.load(golden) as arrays:
        changed = {name: (arrays[name] + 10).astype(arrays[name].dtype)
                   if name.startswith("output_") else arrays[name] for name in arrays.files}
    out = io.BytesIO()
    np.savez(out, **changed)
    return out.getvalue()


def _with_golden(members: dict[str, bytes], card: Path, golden: bytes) -> dict[str, bytes]:
    """Members with another golden file, which the card names by its sha256."""
    data = json.loads(card.read_text())
    data["golden"]["sha256"] = hashlib.sha256(golden).hexdigest()
    return {**members, "model.golden.npz": golden,
            "model.card.json": json.dumps(data, indent=1).encode()}


def _undecodable_card(card: Path) -> bytes:
    data = json.loads(card.read_text())
    options = data["postprocessing"]["blazeface"]
    options["strides"] = [int(options["strides"][0])]  # far fewer anchors than outputs
    return json.dumps(data, indent=1).encode()


def _tampered(bundle: bytes) -> bytes:
    """Flip one byte of the model after signing."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(bundle)) as old, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as new:
        for info in old:
            handle = old.extractfile(info)
            assert handle is not None
            data = bytearray(handle.read())
            if info.name == "model.tflite":
                data[len(data) // 2] ^= 0xFF
            new.addfile(info, io.BytesIO(bytes(data)))
    return out.getvalue()


def make_trial_bundles(folder: Path, target: str, progress: Progress) -> TrialBundles:
    """Sign the four bundles with a key made here, for a unit of `target`."""
    from edgebake_builder.signing import build_bundle, read_private_key, write_private_key

    from ..steps.model import DEFAULT_MODEL, fetch_locked_model, prepare_model, read_models_lock

    folder.mkdir(parents=True, exist_ok=True)
    key_file = folder / "trial.key"
    key_file.unlink(missing_ok=True)
    public = write_private_key(key_file)
    key_file.with_name("trial.key.pub").write_text(public)
    private = read_private_key(key_file)
    lock = read_models_lock()
    full = prepare_model(str(fetch_locked_model(lock["face_detection_full_range"], progress)),
                         folder / "full", progress)
    short = prepare_model(str(fetch_locked_model(lock[DEFAULT_MODEL], progress)),
                          folder / "short", progress)
    plain = _members(short.model, short.card_path, short.golden_path)
    contents = {
        "good": _members(full.model, full.card_path, full.golden_path),
        "tampered": plain,
        "golden": _with_golden(plain, short.card_path, _shifted_golden(short.golden_path)),
        "undecodable": {**plain, "model.card.json": _undecodable_card(short.card_path)},
    }
    paths = {}
    for name, members in contents.items():
        data = build_bundle(members, private, VERSIONS[name], target)
        if name == "tampered":
            data = _tampered(data)
        paths[name] = folder / f"{name}-{VERSIONS[name]}.ebundle"
        paths[name].write_bytes(data)
    return TrialBundles(public.strip(), paths, key_file)


def make_rollout_bundles(folder: Path, private: bytes, target: str, progress: Progress,
                         good: str = "2.0", bad: str = "2.1") -> dict[str, Path]:
    """A good bundle (BlazeFace full range) and a newer bad one (golden outputs its model
    does not give, refused on every unit), signed with `private`."""
    from edgebake_builder.signing import build_bundle

    from ..steps.model import fetch_locked_model, prepare_model, read_models_lock

    full = prepare_model(str(fetch_locked_model(read_models_lock()["face_detection_full_range"],
                                                progress)), folder / "full", progress)
    members = _members(full.model, full.card_path, full.golden_path)
    contents = {good: members,
                bad: _with_golden(members, full.card_path, _shifted_golden(full.golden_path))}
    paths = {}
    for version, files in contents.items():
        paths[version] = folder / f"bundle-{version}.ebundle"
        paths[version].write_bytes(build_bundle(files, private, version, target))
    return paths

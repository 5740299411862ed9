"""Step (A/B layout): the OS keyring baked in, and the build's root as a signed RAUC bundle.

The keys come from `invoke make-os-key` (an X.509 CA, and a signing key and certificate it
issued): the CA is the unit's keyring, so a new signing certificate from the same CA needs
no reflash. Without them the image takes no system updates, and says so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import BuildError
from ..hostcmd import run
from ..progress import Progress
from ..recipe import Recipe
from ..recipe.schema import BY_PATH
from .rootfs import inside

KEYRING = "/etc/rauc/keyring.pem"
CA_NAME = "os-ca.crt"
KEY_NAME = "os.key"
CERT_NAME = "os.crt"


@dataclass(frozen=True)
class OsKeys:
    keyring: Path
    key: Path | None  # the signing key and certificate, when this host has them
    cert: Path | None


def find_keys(recipe: Recipe) -> OsKeys | None:
    """The recipe's keyring and, beside it, the signing key; None: no system updates."""
    keyring = Path(recipe["update.os_keyring"]).expanduser()
    if not keyring.is_file():
        if recipe["update.os_keyring"] == BY_PATH["update.os_keyring"].default:
            return None
        raise BuildError(f"recipe: update.os_keyring: {keyring} not found; expected the CA "
                         "certificate that `invoke make-os-key` writes")
    key, cert = keyring.parent / KEY_NAME, keyring.parent / CERT_NAME
    if key.is_file() and cert.is_file():
        return OsKeys(keyring.resolve(), key.resolve(), cert.resolve())
    return OsKeys(keyring.resolve(), None, None)


def install_keyring(recipe: Recipe, rootfs: Path, progress: Progress) -> OsKeys | None:
    keys = find_keys(recipe)
    if keys is None:
        progress.say(f"      system updates: off (no {recipe['update.os_keyring']}; make one "
                     "with `invoke make-os-key --out keys/` and rebuild)")
        return None
    check = subprocess.run(["openssl", "x509", "-noout", "-in", str(keys.keyring)],
                           capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise BuildError(f"recipe: update.os_keyring: {keys.keyring} is not a PEM certificate")
    target = inside(rootfs, KEYRING)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(keys.keyring, target)
    target.chmod(0o644)
    progress.say(f"      system updates: RAUC trusts bundles signed under {keys.keyring.name}")
    return keys


def manifest_text(compatible: str, version: str) -> str:
    return ("[update]\n"
            f"compatible={compatible}\n"
            f"version={version}\n\n"
            "[bundle]\n"
            "format=verity\n\n"
            "[image.rootfs]\n"
            "filename=rootfs.ext4\n")


def make_bundle(keys: OsKeys, compatible: str, version: str, root_ext4: Path, workdir: Path,
                dest: Path, progress: Progress) -> Path | None:
    """`dest` (a .raucb): this build's root filesystem, signed; None without a signing key."""
    if keys.key is None or keys.cert is None:
        progress.say(f"      no system bundle: {keys.keyring.parent} has no {KEY_NAME} and "
                     f"{CERT_NAME} to sign it with")
        return None
    source = workdir / "bundle"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir()
    (source / "manifest.raucm").write_text(manifest_text(compatible, version))
    shutil.move(str(root_ext4), source / "rootfs.ext4")
    dest.unlink(missing_ok=True)
    run(["rauc", "bundle", f"--cert={keys.cert}", f"--key={keys.key}",
         f"--keyring={keys.keyring}", "--mksquashfs-args=-comp zstd -Xcompression-level 6",
         source, dest], progress, what="rauc bundle")
    shutil.rmtree(source, ignore_errors=True)
    progress.say(f"      system bundle {dest.name}: {dest.stat().st_size / 2**20:.0f} MiB, "
                 f"version {version}, compatible {compatible}")
    return dest


def bundle_version(bundle: Path) -> str:
    """The version in a bundle's manifest, read with `rauc info` (its signature checked
    against the signer's own certificate chain: this is the laptop's side, not the unit's)."""
    if not bundle.is_file():
        raise BuildError(f"{bundle}: bundle not found")
    result = subprocess.run(["rauc", "info", "--no-verify", "--output-format=json",
                             str(bundle)], capture_output=True, text=True, check=False)
    try:
        return str(json.loads(result.stdout)["version"])
    except (ValueError, KeyError, TypeError):
        raise BuildError(f"{bundle}: not a RAUC bundle ({result.stderr.strip()[-200:]})"
                         ) from None

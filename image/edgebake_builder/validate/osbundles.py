"""System bundles for the update checks, made from a build's own bundle without a rebuild.

The build's root filesystem is taken out of its bundle, changed in place with debugfs (a new
version string and a marker file; for the failure cases, a service config that never loads
or an initrd that cannot boot) and signed again with the same key. A real second build
(`build-image --version 1.1 --out out-v2`) gives the same kind of bundle, in minutes more.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import BuildError
from ..oskeys import make_os_keys
from ..steps.osbundle import CA_NAME, CERT_NAME, KEY_NAME, OsKeys, manifest_text

MARKER = "/etc/edgebake/os-test-marker"
# what each kind of bundle changes in the root, beyond its version
BROKEN = {
    # the service refuses its config at every start: it never becomes healthy
    "unhealthy": {"/etc/edgebake/app.yaml": b"inference: {num_threads: not-a-number}\n"},
    # the kernel finds no root without its initrd's modules, panics, and restarts (panic=)
    "unbootable": {"/boot/initrd.img": b"not an initramfs\n"},
}


def _run(args: list[str], what: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"{what} failed: {(result.stderr or result.stdout).strip()[-400:]}")
    return result


def root_of(bundle: Path, dest: Path) -> Path:
    """The bundle's rootfs.ext4 (a squashfs with RAUC's signature appended: unsquashfs
    reads the filesystem and ignores what follows it)."""
    tree = dest / "squash"
    _run(["unsquashfs", "-no-progress", "-d", str(tree), str(bundle), "rootfs.ext4"],
         f"unsquashfs {bundle.name}")
    root = dest / "rootfs.ext4"
    (tree / "rootfs.ext4").replace(root)
    shutil.rmtree(tree)
    return root


def write_into(fs_image: Path, files: dict[str, bytes], work: Path) -> None:
    """Each file replaced (or made) in the ext4 image with debugfs: no mount, no loop."""
    lines = []
    for number, (path, data) in enumerate(sorted(files.items())):
        source = work / f"file-{number}"
        source.write_bytes(data)
        lines += [f"rm {path}", f"write {source} {path}", f"sif {path} mode 0100644"]
    script = work / "edit.debugfs"
    script.write_text("\n".join(lines) + "\n")
    _run(["debugfs", "-w", "-f", str(script), str(fs_image)], "debugfs")


def derive_bundle(base: Path, keys: OsKeys, compatible: str, version: str, dest: Path,
                  kind: str = "good") -> Path:
    """`dest`: `base`'s root with `version` and a marker, broken as `kind` says."""
    if keys.key is None or keys.cert is None:
        raise BuildError(f"{keys.keyring.parent}: no signing key for test bundles")
    with tempfile.TemporaryDirectory(prefix="edgebake-osbundle-", dir=dest.parent) as tmp:
        work = Path(tmp)
        source = work / "content"
        source.mkdir()
        root = root_of(base, work)
        files = {"/etc/edgebake/version": f"{version}\n".encode(),
                 MARKER: f"{version} {kind}\n".encode(), **BROKEN.get(kind, {})}
        write_into(root, files, work)
        root.replace(source / "rootfs.ext4")
        (source / "manifest.raucm").write_text(manifest_text(compatible, version))
        partial = dest.with_name(f".{dest.name}")  # RAUC wants the .raucb ending
        partial.unlink(missing_ok=True)
        _run(["rauc", "bundle", f"--cert={keys.cert}", f"--key={keys.key}",
              f"--keyring={keys.keyring}", "--mksquashfs-args=-comp zstd -Xcompression-level 1",
              str(source), str(partial)], "rauc bundle")
        partial.replace(dest)
    return dest


def foreign_bundle(dest: Path, compatible: str, version: str) -> Path:
    """A small bundle for the unit's `compatible`, signed under a CA it has never seen: what
    a stranger's stick or server offers. The unit must refuse it before anything is written."""
    with tempfile.TemporaryDirectory(prefix="edgebake-foreign-", dir=dest.parent) as tmp:
        work = Path(tmp)
        make_os_keys(work / "keys", organisation="stranger")
        source = work / "content"
        source.mkdir()
        (source / "rootfs.ext4").write_bytes(os.urandom(256 * 1024))  # squashfs > 4 KiB
        (source / "manifest.raucm").write_text(manifest_text(compatible, version))
        partial = dest.with_name(f".{dest.name}")
        partial.unlink(missing_ok=True)
        _run(["rauc", "bundle", f"--cert={work / 'keys' / CERT_NAME}",
              f"--key={work / 'keys' / KEY_NAME}", f"--keyring={work / 'keys' / CA_NAME}",
              str(source), str(partial)], "rauc bundle")
        partial.replace(dest)
    return dest

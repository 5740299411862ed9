"""Step: the base rootfs from Debian packages (mmdebstrap, arm64 under qemu-user), cached by key."""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from pathlib import Path

from ..cache import atomic_path, cache_root, entry_lock
from ..hostcmd import run
from ..progress import Progress
from ..recipe import Recipe
from . import basephases

# mmdebstrap's own hooks: dpkg under eatmydata (downloaded for the target), and /usr merged
# by directory links where the suite has usr-is-merged, as debootstrap does (the usrmerge
# package instead converts the tree under qemu-user and pulls in perl)
EATMYDATA_HOOKS = "/usr/share/mmdebstrap/hooks/eatmydata"
MERGED_USR_HOOKS = "/usr/share/mmdebstrap/hooks/maybe-merged-usr"
# Bump when the way the base is made changes, so old cache entries stop matching.
BOOTSTRAP_FORMAT = 6
# openssh-server's postinst makes host keys under qemu-user when none exist; every unit makes
# its own at first boot (overlays remove these), so empty files stand in while it installs
SSH_HOST_KEYS = ("rsa", "ecdsa", "ed25519")


def essential_hook(recipe: Recipe) -> str:
    """Shell run before the kernel is installed: small initramfs and the firmware's root=."""
    modules = "\n".join(recipe["initramfs.modules"])
    # raspi-firmware writes cmdline.txt from these when a kernel is installed; the image's
    # own cmdline.txt is written later, with this build's root partition
    root = recipe["kernel.root"]
    firmware_defaults = ((f"ROOTPART={root}\n" if root != "auto" else "")
                         + f'CONSOLES="{recipe["kernel.console"]}"\n')
    return "; ".join([
        'mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d" '
        '"$1/etc/default" "$1/etc/ssh"',
        'printf "MODULES=list\\n" > "$1/etc/initramfs-tools/conf.d/edgebake.conf"',
        f'printf %s {shlex.quote(modules + chr(10))} > '
        '"$1/usr/share/initramfs-tools/modules.d/edgebake"',
        f'printf %s {shlex.quote(firmware_defaults)} > "$1/etc/default/raspi-firmware"',
        *(ONE_INITRAMFS if "initramfs-tools" in recipe["packages"] else []),
        *(f': > "$1/etc/ssh/ssh_host_{kind}_key"' for kind in SSH_HOST_KEYS),
    ])


# One initramfs: the kernel's postinst makes it (-c); the updates (-u) that firmware and other
# packages trigger afterwards would only make the same one again under qemu-user (~37 s each).
# zstd first, so that the one run compresses as initramfs.conf says.
ONE_INITRAMFS = (
    'printf "update_initramfs=no\\n" > "$1/etc/initramfs-tools/update-initramfs.conf"',
    'APT_CONFIG="$MMDEBSTRAP_APT_CONFIG" apt-get --yes install -oDPkg::Chroot-Directory="$1" zstd',
)


# after every package: the package's own update-initramfs.conf (kept aside by force-confold)
CUSTOMIZE_HOOK = ('if [ -f "$1/etc/initramfs-tools/update-initramfs.conf.dpkg-dist" ]; then '
                  'mv "$1/etc/initramfs-tools/update-initramfs.conf.dpkg-dist" '
                  '"$1/etc/initramfs-tools/update-initramfs.conf"; fi; '
                  + "; ".join(f'rm -f "$1/etc/ssh/ssh_host_{kind}_key"'
                              for kind in SSH_HOST_KEYS))


def base_key(recipe: Recipe) -> str:
    """Hash of everything that determines the base rootfs, and nothing else."""
    blob = json.dumps({"format": BOOTSTRAP_FORMAT, "settings": recipe.base_values(),
                       "hook": essential_hook(recipe), "customize": CUSTOMIZE_HOOK},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def base_tarball(recipe: Recipe) -> Path:
    return cache_root() / "base" / f"{recipe['suite']}-{recipe['arch']}-{base_key(recipe)}.tar"


def mmdebstrap_command(recipe: Recipe, output: Path) -> list[str]:
    cmd = ["mmdebstrap", f"--arch={recipe['arch']}", f"--variant={recipe['variant']}",
           "--mode=root", "--format=tar",
           # dpkg's own lines in the log: the phase clock sees each initramfs run
           "--verbose",
           f"--components={','.join(recipe['components'])}",
           f"--include={','.join(recipe['packages'])}",
           # the hook pre-writes /etc/default/raspi-firmware: keep it, don't prompt
           "--dpkgopt=force-confold", "--dpkgopt=force-confdef",
           # a half-made base is thrown away whole, never resumed: dpkg's fsyncs buy nothing
           f"--hook-dir={EATMYDATA_HOOKS}", "--dpkgopt=force-unsafe-io",
           f"--hook-dir={MERGED_USR_HOOKS}",
           f"--essential-hook={essential_hook(recipe)}",
           f"--customize-hook={CUSTOMIZE_HOOK}"]
    cmd += [f"--dpkgopt=path-exclude={p}" for p in recipe["dpkg.exclude"]]
    cmd += [f"--dpkgopt=path-include={p}" for p in recipe["dpkg.include"]]
    cmd += [recipe["suite"], str(output), recipe["mirror"]]
    return cmd


KEEP_BASES = 3


def prune_bases(keep: Path, count: int = KEEP_BASES) -> list[Path]:
    """Delete all but the `count` most recently used tarballs in `keep`'s folder (never
    `keep`), with the files kept beside each one (same stem)."""
    bases = sorted(keep.parent.glob("*.tar"), key=lambda p: p.stat().st_mtime, reverse=True)
    removed = [p for p in bases[count:] if p != keep]
    for path in removed:
        path.unlink(missing_ok=True)
        for beside in path.parent.glob(f"{path.stem}.*"):
            if not beside.name.endswith(".lock"):
                beside.unlink(missing_ok=True)
    return removed


def bootstrap_base(recipe: Recipe, progress: Progress, no_cache: bool = False) -> Path:
    """Return the cached base tarball for this recipe, building it if needed."""
    tarball = base_tarball(recipe)
    def waiting(seconds: float) -> None:
        progress.heartbeat("another build is making this base rootfs; waiting for it",
                           time.monotonic() - seconds)

    with entry_lock(tarball, on_wait=waiting) as waited:
        # after a wait the entry is fresh, made by the other build, even with no_cache
        if tarball.is_file() and (not no_cache or waited > 0):
            tarball.touch()  # most recently used: kept by prune_bases
            made = f", made by the other build while this one waited {waited:.0f}s" \
                if waited > 0 else ""
            progress.say(f"      cached base rootfs {tarball.name} "
                         f"({tarball.stat().st_size / 2**20:.0f} MiB){made}")
            return tarball
        progress.say(f"      building base rootfs with mmdebstrap ({len(recipe['packages'])} "
                     "packages, maintainer scripts under qemu-user; several minutes)")
        clock = basephases.PhaseClock()
        with atomic_path(tarball) as tmp:
            tmp.unlink()  # mmdebstrap writes the file itself
            run(mmdebstrap_command(recipe, tmp), progress, what="mmdebstrap",
                on_line=clock.feed)
        phases = basephases.save(tarball, clock)
        progress.say(f"      mmdebstrap phases: {basephases.describe(phases)}")
    for old in prune_bases(tarball):
        progress.say(f"      removed an old cached base: {old.name}")
    return tarball

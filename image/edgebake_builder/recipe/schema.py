"""The recipe schema, declared once: each setting's type, default, merge rule and help."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .validators import Bool, Enum, Int, Mapping, Network, Str, StrList, Validator

PACKAGE = Str(r"[a-z0-9][a-z0-9+.-]+", "naming a Debian package")
NAME = Str(r"[a-z0-9][a-z0-9-]{0,62}", "of lowercase letters, digits and dashes")
MODULE_GLOB = Str(r"kernel/\S+", "that is a glob like kernel/drivers/gpu/*")
SIZE = Str(r"[0-9]+[KMG]", "like 64M")


@dataclass(frozen=True)
class Setting:
    """One recipe field. `base=True` means it changes the bootstrapped base rootfs."""

    path: str
    validator: Validator
    default: Any
    help: str
    base: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("name", NAME, "edgebake", "Image name; outputs are <name>.img and friends."),
    Setting("description", Str(), "", "One line saying what this recipe is for."),
    Setting("base", Enum(("debian", "none")), "debian",
            "Where the rootfs starts: Debian packages (mmdebstrap), or nothing, for an overlay "
            "applied later to a rootfs made elsewhere (NVIDIA's L4T). A vendor image given "
            "with --base replaces either."),
    Setting("output", Enum(("disk-image", "overlay")), "disk-image",
            "What the build makes: a flashable disk image, or a rootfs overlay tarball "
            "(.tar.zst) for `invoke apply-overlay`."),
    Setting("systemd.version", Int(240, 400), 252,
            "systemd of the target: units may use only directives it knows (bookworm 252, "
            "trixie 257, JetPack 6 249)."),
    Setting("arch", Enum(("arm64",)), "arm64", "Debian architecture of the target.", base=True),
    Setting("suite", Enum(("bookworm", "trixie")), "bookworm", "Debian suite of the base system.",
            base=True),
    Setting("mirror", Str(r"https?://\S+", "that is an http(s) URL"),
            "http://deb.debian.org/debian", "Debian mirror used by mmdebstrap.", base=True),
    Setting("components", StrList(Str(r"[a-z-]+", "naming an archive component")),
            ["main"], "Archive components (raspi-firmware needs non-free-firmware).", base=True),
    Setting("variant", Enum(("essential", "apt", "required", "minbase")), "apt",
            "mmdebstrap variant: the package set before `packages` is added.", base=True),
    Setting("packages", StrList(PACKAGE), [], "Debian packages to install.", base=True),
    Setting("dpkg.exclude", StrList(Str(r"/\S*", "that is an absolute path glob")), [],
            "Paths dpkg never unpacks (docs, man pages, locales, unused modules).", base=True),
    Setting("dpkg.include", StrList(Str(r"/\S*", "that is an absolute path glob")), [],
            "Exceptions to dpkg.exclude.", base=True),
    Setting("initramfs.modules", StrList(Str(r"[a-z0-9_-]+", "naming a kernel module")), [],
            "The only modules put in the initramfs (MODULES=list).", base=True),
    Setting("kernel.root", Str(r"auto|(LABEL|PARTUUID|UUID)=\S+", "like auto or LABEL=rootfs"),
            "auto", "How the kernel finds the root filesystem; auto: this image's own root "
            "partition by its PARTUUID, unique to the build (a USB stick with the same label "
            "is never taken for it).", base=True),
    Setting("kernel.console", Str(r"tty[A-Za-z]*[0-9]+,[0-9]+", "like ttyS1,115200"),
            "ttyS1,115200", "Serial console of the unit.", base=True),
    Setting("prune", StrList(Str(r"/\S*", "that is an absolute path glob")), [],
            "Files removed from the finished root before assembly: what only package "
            "maintainer scripts use (the root is read-only and replaced whole)."),
    Setting("prune_keep", StrList(Str(r"/\S*", "that is an absolute path glob")), [],
            "Exceptions to prune."),
    Setting("refuse_libraries", StrList(Str(r"/\S*", "that is an absolute path glob")), [],
            "Shared libraries replaced at assembly by small ones with the same name and the "
            "symbols their users bind to, which end the process with a message naming the "
            "function if called: what a unit loads but never calls (the encoders PyAV's "
            "FFmpeg links)."),
    Setting("refuse_answer_none", StrList(Str(r"[A-Za-z0-9_.$*?\[\]]+",
                                              "that is a symbol name glob")), [],
            "Functions of refused libraries that return 0 (nothing there) instead: those a "
            "user calls only to ask what the library can do."),
    Setting("hwdb_exclude", StrList(Str(r"[A-Za-z0-9_.*?\[\]-]+\.hwdb",
                                        "that is a file name glob ending in .hwdb")), [],
            "udev hardware database sources (names in hwdb.d) left out when the database is "
            "compiled again at assembly, in the target with its own systemd-hwdb."),
    Setting("kernel.modules_exclude", StrList(MODULE_GLOB), [],
            "Kernel modules pruned from the image (globs under /lib/modules/<version>/); a module "
            "a kept one depends on always stays. Pruned at assembly: no new base."),
    Setting("kernel.modules_keep", StrList(MODULE_GLOB), [],
            "Exceptions to kernel.modules_exclude."),
    Setting("kernel.cmdline", StrList(Str(r"[^\s\"']+", "that is one argument without spaces, "
                                          "quotes or newlines")), ["rootwait", "fsck.repair=yes"],
            "Extra kernel command line arguments."),
    Setting("firmware.config_txt", StrList(Str(r"[^\r\n\x00]+", "that is one line")), [],
            "Extra lines appended to config.txt."),
    Setting("firmware.requires", StrList(Str(r"[A-Za-z0-9_.-]+", "naming a boot partition file")),
            [], "Files the base's boot partition must have (a vendor base is refused without "
            "them), e.g. the Pi 5's kernel_2712.img."),
    Setting("layout.boot_mib", Int(64, 2048), 256, "Size of the FAT boot partition in MiB."),
    Setting("layout.kind", Enum(("single", "ab")), "single",
            "single: one root; ab: root slots A and B, booted by U-Boot with boot counting, "
            "so RAUC can update the whole system and fall back (docs/system-updates.md)."),
    Setting("layout.slot_mib", Int(256, 65536), 1024,
            "With layout.kind ab: the size of each root slot in MiB (a system update's root "
            "must fit; slot B ships empty and sparse)."),
    Setting("layout.root_free_mib", Int(16, 65536), 256,
            "Free space in MiB added to the root filesystem beyond its contents."),
    Setting("layout.data_mib", Int(16, 65536), 128,
            "Size of the data partition in MiB (results, model slots, logs)."),
    Setting("overlays", StrList(Str(r"[a-z0-9][a-z0-9_-]*", "naming a folder of overlays/")), [],
            "Overlay trees copied and rendered into the rootfs, in order."),
    Setting("python.version", Enum(("3.10", "3.11", "3.13")), "3.11",
            "The base's python3: selects the wheels (cp310, cp311, cp313) from the lock."),
    Setting("python.glibc", Str(r"2\.[0-9]+", "like 2.36"), "2.36",
            "The base's glibc: the newest manylinux tag a wheel may have."),
    Setting("runtime", Enum(("auto", "tflite-runtime", "ai-edge-litert")), "auto",
            "TFLite runtime on the unit; auto takes tflite-runtime where the model loads and "
            "matches its golden outputs under it (and a wheel exists), else ai-edge-litert."),
    Setting("wheels", StrList(Str(r"[A-Za-z0-9][A-Za-z0-9_.-]*", "naming a locked wheel")), [],
            "Python wheels from recipes/wheels.lock installed into /opt/edgebake."),
    Setting("services.enable", StrList(Str(r"\S+\.(service|timer|socket|path|target)",
                                           "naming a systemd unit")), [],
            "systemd units enabled at build time."),
    Setting("services.disable", StrList(Str(r"\S+\.(service|timer|socket|path|target)",
                                            "naming a systemd unit")), [],
            "systemd units disabled at build time (wins over services.enable)."),
    Setting("hostname", Str(r"[a-z0-9][a-z0-9-]{0,62}", "that is a valid hostname"),
            "edgebake", "Hostname until a per-unit seed sets one."),
    Setting("ssh.authorized_keys",
            StrList(Str(r"(ssh|ecdsa|sk)-\S+ \S+.*", "holding a public key")),
            [], "Build-time SSH keys for the service account; SSH stays off without keys."),
    Setting("watchdog.hardware_sec", Int(0, 60), 15,
            "systemd RuntimeWatchdogSec for the hardware watchdog (0 disables)."),
    Setting("watchdog.service_sec", Int(5, 600), 30,
            "WatchdogSec of the edgebake service: restart when pings stop this long."),
    Setting("update.public_keys",
            StrList(Str(r"ed25519 [0-9a-f]{64}", "like `ed25519 <64 hex digits>` (a .pub from "
                        "`invoke make-key`)")), [],
            "Keys whose signed model bundles the unit accepts (several: key rotation); "
            "without any, the unit takes no model updates."),
    Setting("update.os_keyring", Str(r"\S*", "that is a path to a PEM file"), "keys/os-ca.crt",
            "With layout.kind ab: the CA certificate (from `invoke make-os-key`) whose signed "
            "system bundles the unit installs; relative to the current folder. Without the "
            "file, the image takes no system updates and no bundle is made."),
    Setting("version", Str(r"[0-9A-Za-z][0-9A-Za-z.+~_-]{0,63}", "like 1.0 or 2026.12.1"),
            "1.0", "The system version: in the image, its system bundle and /health "
            "(build-image --version overrides it)."),
    Setting("update.fleet", Str(r"[a-z0-9][a-z0-9._-]{0,63}", "of lowercase letters, digits, "
                                "'.', '_' or '-'"), "default",
            "The fleet a unit belongs to: it takes only bundles and orders signed for it "
            "(one per customer or site when one key signs for several)."),
    Setting("network.allow", StrList(Network()), [],
            "The only addresses the service may talk to, both ways (systemd IPAddressAllow=, "
            "localhost always): cameras, broker, update server, monitoring. Empty: any."),
    Setting("journald.max_use", SIZE, "64M", "SystemMaxUse for the persistent journal."),
    Setting("app", Mapping(), {}, "Defaults for /etc/edgebake/app.yaml (checked by the runtime)."),
    Setting("model.path", Str(), "", "Model file; empty means the project's default model."),
    Setting("model.variants", StrList(Str(r"\S+\.tflite", "that is a .tflite file")), [],
            "Other precisions of the same model (`invoke convert-model --quantize float16` or "
            "int8, each with the card the converter wrote beside it, its accuracy gate passed), "
            "shipped beside it: with inference.num_threads 0 the unit measures each that "
            "passes its golden test there and runs the fastest."),
    Setting("verify.enabled", Bool(), True,
            "Run the model inside the target rootfs with the shipped runtime before assembly."),
)

BY_PATH: dict[str, Setting] = {s.path: s for s in SETTINGS}
GROUPS: frozenset[str] = frozenset(
    ".".join(s.path.split(".")[:i]) for s in SETTINGS for i in range(1, s.path.count(".") + 1)
)


def defaults() -> dict[str, Any]:
    """A fresh copy of every setting's default, keyed by dotted path."""
    import copy

    return {s.path: copy.deepcopy(s.default) for s in SETTINGS}


def describe_all() -> str:
    """The schema as text, for `invoke recipe-schema` and the README."""
    lines = []
    for s in SETTINGS:
        lines.append(f"{s.path:24} {s.validator.describe():45} default {s.default!r}\n"
                     f"{'':24} {s.help}")
    return "\n".join(lines)

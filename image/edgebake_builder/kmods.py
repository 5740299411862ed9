"""Kernel modules: prune what an appliance never loads, but never a module a kept one needs.

dpkg path excludes cannot follow module dependencies, which is how usb-storage once shipped
without scsi_mod. This prunes the assembled root (not the cached base, so a recipe can keep
more without a new base), keeps the dependency closure, and then proves that every remaining
module's `depends=` is present.
"""

from __future__ import annotations

import fnmatch
import lzma
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(path: Path) -> str:
    """The kernel's name for a module file: no suffix, dashes as underscores."""
    name = path.name
    for suffix in MODULE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def _module_bytes(path: Path) -> bytes:
    if path.name.endswith(".xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".gz"):
        import gzip

        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dcq", str(path)], capture_output=True,
                              check=True).stdout
    return path.read_bytes()


def module_depends(path: Path) -> list[str]:
    """The `depends=` entry of the module's .modinfo section (names, underscores)."""
    data = _module_bytes(path)
    start = data.find(b"\0depends=")
    if start < 0:
        return []
    end = data.index(b"\0", start + 1)
    value = data[start + len(b"\0depends="):end].decode("ascii", "replace")
    return [d.replace("-", "_") for d in value.split(",") if d]


@dataclass(frozen=True)
class ModuleTree:
    """Every module file under one /lib/modules/<version>, by module name."""

    root: Path
    files: dict[str, Path]

    @classmethod
    def scan(cls, root: Path) -> ModuleTree:
        files = {module_name(p): p for p in sorted(root.rglob("*.ko*"))
                 if p.name.endswith(MODULE_SUFFIXES)}
        return cls(root, files)

    def relative(self, name: str) -> str:
        return str(self.files[name].relative_to(self.root))


def kernel_trees(rootfs: Path) -> list[Path]:
    base = rootfs / "lib" / "modules"
    if base.is_symlink() or not base.exists():
        base = rootfs / "usr" / "lib" / "modules"
    return sorted(p for p in base.iterdir() if (p / "kernel").is_dir()) if base.is_dir() else []


def _matches(relative: str, globs: list[str]) -> bool:
    return any(fnmatch.fnmatch(relative, g) for g in globs)


def plan_prune(tree: ModuleTree, exclude: list[str], keep: list[str]) -> set[str]:
    """Names of the modules to delete: excluded, not kept, and needed by no kept module."""
    depends = {name: module_depends(path) for name, path in tree.files.items()}
    wanted = {n for n in tree.files
              if not _matches(tree.relative(n), exclude) or _matches(tree.relative(n), keep)}
    stack = list(wanted)
    while stack:
        for dep in depends[stack.pop()]:
            if dep in tree.files and dep not in wanted:
                wanted.add(dep)
                stack.append(dep)
    return set(tree.files) - wanted


def missing_dependencies(tree: ModuleTree) -> dict[str, list[str]]:
    """Module -> the modules it depends on that are not in the tree."""
    missing = {}
    for name, path in tree.files.items():
        absent = [d for d in module_depends(path) if d not in tree.files]
        if absent:
            missing[name] = absent
    return missing


@dataclass(frozen=True)
class PruneReport:
    kept: int
    removed: int
    removed_bytes: int


def prune(rootfs: Path, exclude: list[str], keep: list[str]) -> dict[str, PruneReport]:
    """Delete pruned modules in every kernel tree, rerun depmod (in the target, under
    qemu-user), and prove the closure."""
    report = {}
    for root in kernel_trees(rootfs):
        tree = ModuleTree.scan(root)
        doomed = plan_prune(tree, exclude, keep)
        freed = 0
        for name in doomed:
            freed += tree.files[name].stat().st_size
            tree.files[name].unlink()
        for folder in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()
        result = subprocess.run(["chroot", str(rootfs), "depmod", "-a", root.name],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BuildError(f"depmod {root.name} failed: {result.stderr.strip()[-300:]}")
        left = ModuleTree.scan(root)
        broken = missing_dependencies(left)
        if broken:
            raise BuildError(f"{root}: modules with missing dependencies: {broken}")
        report[root.name] = PruneReport(len(left.files), len(doomed), freed)
    return report

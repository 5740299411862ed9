"""Copies an ext4 filesystem image into a folder without mounting it (debugfs), whole.

`debugfs rdump` alone is not enough for a root filesystem: it chowns after chmod, so every
setuid/setgid bit is lost (su, passwd, sudo), it skips device nodes and fifos, it writes hard
links as separate copies, and it drops extended attributes (file capabilities). A second
debugfs pass lists every directory with `ls -p` and `ea_list`s what needs it, and the tree is
repaired from that listing.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError
from .hostcmd import run
from .progress import Progress

# `ls -p` lines: /inode/mode/uid/gid/name/size/
LS_LINE = re.compile(r"^/(\d+)/([0-7]+)/(\d+)/(\d+)/(.*)/(\d*)/$")
DEVICE_LINE = re.compile(r"Device major/minor number: ([0-9a-f]+):([0-9a-f]+)")


@dataclass(frozen=True)
class Entry:
    path: str  # absolute inside the filesystem
    inode: int
    mode: int
    uid: int
    gid: int


def _quote(path: str) -> str:
    if '"' in path or "\n" in path:
        raise BuildError(f"{path}: file names with quotes or newlines are not supported")
    return f'"{path}"'


def _debugfs(fs_image: Path, commands: list[str], workdir: Path, progress: Progress,
             what: str) -> str:
    script = workdir / "debugfs.cmds"
    script.write_text("\n".join(commands) + "\n")
    try:
        return run(["debugfs", "-f", script, fs_image], progress, what=what)
    finally:
        script.unlink(missing_ok=True)


def list_entries(fs_image: Path, tree: Path, workdir: Path, progress: Progress
                 ) -> list[Entry]:
    """Every entry of the filesystem with its inode, full mode and owner."""
    found = sorted("/" + os.path.relpath(os.path.join(d, n), tree)
                   for d, names, _ in os.walk(tree) for n in names
                   if not os.path.islink(os.path.join(d, n)))
    dirs = ["/", *found]
    out = _debugfs(fs_image, [f"ls -p {_quote(d)}" for d in dirs], workdir, progress,
                   "debugfs (list the base's files)")
    entries: list[Entry] = []
    current = ""
    for line in out.splitlines():
        if line.startswith("debugfs: ls -p "):
            current = line[len("debugfs: ls -p "):].strip('"')
            continue
        match = LS_LINE.match(line)
        if not match or match.group(5) in ("", ".", "..") or match.group(1) == "0":
            continue  # inode 0: an unused slot (lost+found is full of them)
        inode, mode, uid, gid, name, _ = match.groups()
        path = (current.rstrip("/") + "/" + name) if current != "/" else "/" + name
        entries.append(Entry(path, int(inode), int(mode, 8), int(uid), int(gid)))
    return entries


def _xattrs(fs_image: Path, files: list[Entry], workdir: Path, progress: Progress
            ) -> dict[str, dict[str, bytes]]:
    """Extended attributes of the given files (security.capability above all)."""
    if not files:
        return {}
    out = _debugfs(fs_image, [f"ea_list {_quote(e.path)}" for e in files], workdir, progress,
                   "debugfs (extended attributes)")
    found: dict[str, dict[str, bytes]] = {}
    current = ""
    for line in out.splitlines():
        if line.startswith("debugfs: ea_list "):
            current = line[len("debugfs: ea_list "):].strip('"')
            continue
        # e.g. `security.capability (20) = 01 00 00 02 00 20 00 00 ...` or `user.x (3) = "abc"`
        match = re.match(r"^\s*(\S+) \((\d+)\) = (.*)$", line)
        if not match or not current:
            continue
        name, _size, value = match.groups()
        if value.startswith('"') and value.endswith('"'):
            data = value[1:-1].encode()
        else:
            data = bytes(int(b, 16) for b in value.split())
        found.setdefault(current, {})[name] = data
    return found


def copy_out(fs_image: Path, tree: Path, workdir: Path, progress: Progress) -> int:
    """Fill `tree` (empty) with the filesystem's contents; returns the number of entries."""
    tree.mkdir(parents=True, exist_ok=True)
    run(["debugfs", "-R", f"rdump / {tree}", fs_image], progress, what="debugfs rdump")
    entries = list_entries(fs_image, tree, workdir, progress)
    first_of: dict[int, str] = {}
    devices: list[Entry] = []
    for entry in entries:
        host = tree / entry.path.lstrip("/")
        kind = stat.S_IFMT(entry.mode)
        if kind == stat.S_IFREG:
            earlier = first_of.setdefault(entry.inode, entry.path)
            if earlier != entry.path and host.exists():
                host.unlink()
                os.link(tree / earlier.lstrip("/"), host)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            devices.append(entry)
        elif kind == stat.S_IFIFO and not host.exists():
            os.mkfifo(host)
        if kind != stat.S_IFLNK and (host.exists() or kind == stat.S_IFIFO):
            os.chown(host, entry.uid, entry.gid, follow_symlinks=False)
            os.chmod(host, stat.S_IMODE(entry.mode))  # after chown, which clears setuid
        elif kind == stat.S_IFLNK and host.is_symlink():
            os.chown(host, entry.uid, entry.gid, follow_symlinks=False)
    if devices:
        out = _debugfs(fs_image, [f"stat {_quote(e.path)}" for e in devices], workdir,
                       progress, "debugfs (device nodes)")
        numbers: dict[str, tuple[int, int]] = {}
        for block in out.split("debugfs: stat ")[1:]:
            found = DEVICE_LINE.search(block)
            if found:
                numbers[block.split("\n", 1)[0].strip('"')] = (int(found.group(1), 16),
                                                              int(found.group(2), 16))
        for entry in devices:
            host = tree / entry.path.lstrip("/")
            if entry.path not in numbers:
                raise BuildError(f"{fs_image}: {entry.path}: device numbers not readable")
            if host.exists() or host.is_symlink():  # rdump may leave an empty file there
                host.unlink()
            os.mknod(host, entry.mode, os.makedev(*numbers[entry.path]))
            os.chown(host, entry.uid, entry.gid)
            os.chmod(host, stat.S_IMODE(entry.mode))  # mknod's mode went through the umask
    # capabilities and other attributes: only executables and libraries carry them in practice
    candidates = [e for e in entries if stat.S_ISREG(e.mode) and e.mode & 0o111]
    for path, attrs in _xattrs(fs_image, candidates, workdir, progress).items():
        host = tree / path.lstrip("/")
        for name, value in attrs.items():
            os.setxattr(host, name, value, follow_symlinks=False)
    return len(entries)

"""ext4tree.copy_out: an ext4 image read into a folder without mounting, with what `debugfs
rdump` alone loses (setuid bits, hard links, device nodes, fifos, capabilities)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from edgebake_builder.ext4tree import copy_out
from edgebake_builder.progress import Progress


def test_copy_out_keeps_what_rdump_loses(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "usr" / "bin").mkdir(parents=True)
    (src / "home" / "pi").mkdir(parents=True)
    su = src / "usr" / "bin" / "su"
    su.write_bytes(b"\x7fELF pretend")
    os.chmod(su, 0o4755)
    os.link(su, src / "usr" / "bin" / "su-again")
    ping = src / "usr" / "bin" / "ping"
    ping.write_bytes(b"\x7fELF ping")
    ping.chmod(0o755)
    subprocess.run(["setcap", "cap_net_raw+ep", str(ping)], check=True)
    os.mkfifo(src / "fifo")
    os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(src / "null", 0o666)
    (src / "home" / "pi" / "notes").write_text("x")
    os.chown(src / "home" / "pi", 1000, 1000)
    os.chown(src / "home" / "pi" / "notes", 1000, 1000)
    os.chmod(src / "home" / "pi", 0o2750)
    (src / "usr" / "bin" / "link").symlink_to("su")
    image = tmp_path / "fs.ext4"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(src), str(image), "16M"],
                   check=True)
    out = tmp_path / "out"
    count = copy_out(image, out, tmp_path, Progress(1))
    assert count == 12  # lost+found usr bin su su-again ping link fifo null home pi notes
    got = out / "usr" / "bin" / "su"
    assert stat.S_IMODE(got.stat().st_mode) == 0o4755
    assert got.stat().st_ino == (out / "usr" / "bin" / "su-again").stat().st_ino
    assert stat.S_ISFIFO((out / "fifo").lstat().st_mode)
    null = (out / "null").lstat()
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    home = (out / "home" / "pi").stat()
    assert (home.st_uid, home.st_gid, stat.S_IMODE(home.st_mode)) == (1000, 1000, 0o2750)
    assert os.readlink(out / "usr" / "bin" / "link") == "su"
    caps = subprocess.run(["getcap", str(out / "usr" / "bin" / "ping")], capture_output=True,
                          text=True, check=True).stdout
    assert "cap_net_raw=ep" in caps

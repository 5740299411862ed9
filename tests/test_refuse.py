"""Libraries that refuse (recipe refuse_libraries): made with the target's binutils, they
export what their users bind to and nothing the original did not. Loading them in the target
and calling one is checked on the built image (test-image's static checks)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from edgebake_builder.errors import BuildError
from edgebake_builder.progress import Progress
from edgebake_builder.steps import refuse


def _library(folder: Path, soname: str, source: str, needs: list[Path] | None = None) -> Path:
    """An aarch64 shared library assembled from `source`."""
    asm, obj, out = folder / f"{soname}.s", folder / f"{soname}.o", folder / soname
    asm.write_text(source)
    subprocess.run([refuse.ASSEMBLER, "-o", str(obj), str(asm)], check=True)
    subprocess.run([refuse.LINKER, "-shared", "-soname", soname, "-o", str(out), str(obj),
                    *map(str, needs or [])], check=True)
    return out


ENCODER = """.text
.globl enc_open, enc_caps, enc_unused
enc_open: ret
enc_caps: ret
enc_unused: ret
.data
.globl enc_table
.type enc_table, %object
.size enc_table, 48
enc_table: .zero 48
"""
USER = """.text
.globl use
use:
  bl enc_open
  bl enc_caps
  adrp x0, :got:enc_table
  ret
"""


def test_a_refused_library_keeps_only_what_its_users_bind_to(tmp_path: Path) -> None:
    libs = tmp_path / "site" / "pkg.libs"
    libs.mkdir(parents=True)
    encoder = _library(libs, "libenc.so.1", ENCODER)
    user = _library(libs, "libuser.so.1", USER, needs=[encoder])
    others = refuse.read_symbols([user])
    assert others[user].needed == ["libenc.so.1"]
    own = refuse.read_symbols([encoder])[encoder]
    users = refuse._replace(tmp_path, encoder, own, others, ["enc_caps"], Progress(1))
    assert users == [user]
    made = refuse.read_symbols([encoder])[encoder]
    assert made.soname == "libenc.so.1"
    assert made.defined == {"enc_open": ("FUNC", 0), "enc_caps": ("FUNC", 0),
                            "enc_table": ("OBJECT", 48)}  # enc_unused: nobody binds to it
    disassembly = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(encoder)],
                                 capture_output=True, text=True, check=True).stdout
    caps = disassembly.split("<enc_caps>:")[1].split("\n\n")[0]
    assert "mov\tx0, #0x0" in caps and "ret" in caps and "svc" not in caps
    opened = disassembly.split("<enc_open>:")[1].split("\n\n")[0]
    assert "b\t" in opened  # on to the message and exit_group
    rodata = subprocess.run(["aarch64-linux-gnu-objdump", "-s", "-j", ".rodata", str(encoder)],
                            capture_output=True, text=True, check=True).stdout
    assert "enc_open()" in "".join(line[43:] for line in rodata.splitlines())


def test_what_cannot_be_refused_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"symbol 'odd-name' cannot be refused"):
        refuse.refusing_library_source("libx.so", {"odd-name": ("FUNC", 0)}, set(), "/x")
    with pytest.raises(BuildError, match=r"symbol counter is TLS; only functions and data"):
        refuse.refusing_library_source("libx.so", {"counter": ("TLS", 8)}, set(), "/x")
    program = tmp_path / "lib" / "prog"
    program.parent.mkdir()
    obj = tmp_path / "prog.o"
    (tmp_path / "prog.s").write_text(".text\n.globl _start\n_start: ret\n")
    subprocess.run([refuse.ASSEMBLER, "-o", str(obj), str(tmp_path / "prog.s")], check=True)
    subprocess.run([refuse.LINKER, "-o", str(program), str(obj)], check=True)
    with pytest.raises(BuildError, match=r"^recipe: refuse_libraries: /lib/prog: has no SONAME"):
        refuse._replace(tmp_path, program, refuse.read_symbols([program])[program], {}, [],
                        Progress(1))

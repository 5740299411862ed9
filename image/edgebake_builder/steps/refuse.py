"""Shared libraries a unit never calls, replaced by ones that refuse (recipe `refuse_libraries`).

PyAV's wheel links its FFmpeg against every encoder it was built with (x264, x265, SVT-AV1,
libvpx, LAME, ...): libavcodec names them in DT_NEEDED, so they must exist for `import av`
to work, yet a unit only decodes, with FFmpeg's own decoders. Each matched library is
replaced by a small one with the same name and the symbols its users bind to: calling any
of them writes which one to stderr and ends the process (exit 70), so a recipe that left
out something it needed fails loudly, never silently. The few functions a user calls to ask
what the library can do (FFmpeg asks libvpx and libx265 while it lists its codecs) are named
in `refuse_answer_none` and return 0: nothing there. After the swap every user of a
refused library is loaded in the target with all its symbols bound (RTLD_NOW), which
proves the replacement is complete.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BuildError
from ..hostcmd import capture, run
from ..progress import Progress
from .rootfs import is_elf, matching_files, run_in_target

READELF = "aarch64-linux-gnu-readelf"
ASSEMBLER = "aarch64-linux-gnu-as"
LINKER = "aarch64-linux-gnu-ld"
EXIT_CODE = 70  # EX_SOFTWARE, as the runtime's own fatal errors
SYMBOL_NAME = re.compile(r"[A-Za-z_.$][A-Za-z0-9_.$]*")
# readelf --dyn-syms -W: "  62: 00000000001dea80   160 OBJECT  GLOBAL DEFAULT   15 name"
SYMBOL_LINE = re.compile(r"^\s*\d+:\s+[0-9a-f]+\s+(\d+|0x[0-9a-f]+)\s+(\w+)\s+(\w+)\s+\w+\s+"
                         r"(\S+)\s+(\S+)")


@dataclass
class ElfSymbols:
    """What the dynamic linker sees of one ELF file."""
    soname: str | None = None
    needed: list[str] = field(default_factory=list)
    defined: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (type, size)
    undefined: set[str] = field(default_factory=set)


def refuse_libraries(rootfs: Path, patterns: list[str], answer_none: list[str],
                     progress: Progress) -> int:
    """Replace the shared libraries matching `patterns` (absolute globs in the target);
    functions matching `answer_none` return 0. Returns the bytes saved."""
    if not patterns:
        return 0
    libraries = _matching_libraries(rootfs, patterns)
    unmatched = [p for p in patterns
                 if not any(fnmatch.fnmatch(f"/{lib.relative_to(rootfs)}", p) for lib in libraries)]
    if unmatched:  # a wheel or package renamed its libraries: say so, the image is larger
        progress.say(f"      refuse_libraries: nothing matches {', '.join(unmatched)}")
    if not libraries:
        return 0
    # who can bind to a library: ELF files in the folder above its own (for a wheel's
    # `<name>.libs` folder, the whole site folder the wheel was installed into)
    scopes = sorted({library.parent.parent for library in libraries})
    others = sorted({p for scope in scopes for p in scope.rglob("*") if p not in libraries
                     and p.is_file() and not p.is_symlink() and is_elf(p)})
    symbols = read_symbols(others + libraries)
    saved = 0
    users: set[Path] = set()
    for library in libraries:
        before = library.stat().st_size
        in_scope = {p: s for p, s in symbols.items() if p not in libraries
                    and p.is_relative_to(library.parent.parent)}
        users.update(_replace(rootfs, library, symbols[library], in_scope, answer_none,
                              progress))
        saved += before - library.stat().st_size
    _check_users_load(rootfs, sorted(users), progress)
    progress.say(f"      refused {len(libraries)} libraries no unit calls (recipe: "
                 f"refuse_libraries), {saved / 2**20:.1f} MiB; {len(users)} users load")
    return saved


def _matching_libraries(rootfs: Path, patterns: list[str]) -> list[Path]:
    return sorted(path for path, _ in matching_files(rootfs, patterns)
                  if not path.is_symlink() and is_elf(path))


def _replace(rootfs: Path, library: Path, own: ElfSymbols, others: dict[Path, ElfSymbols],
             answer_none: list[str], progress: Progress) -> list[Path]:
    """Swap one library (whose symbols are `own`) for a refusing one; returns the files
    among `others` that need it."""
    if not own.soname:
        raise BuildError(f"recipe: refuse_libraries: /{library.relative_to(rootfs)}: has no "
                         "SONAME, so it is not a shared library others link to")
    users = {p: s for p, s in others.items() if own.soname in s.needed}
    wanted = set().union(*(s.undefined for s in users.values())) if users else set()
    exported = {name: own.defined[name] for name in sorted(wanted & own.defined.keys())}
    where = f"/{library.relative_to(rootfs)}"
    quiet = {n for n in exported if any(fnmatch.fnmatchcase(n, g) for g in answer_none)}
    source = refusing_library_source(own.soname, exported, quiet, where)
    with tempfile.TemporaryDirectory(prefix="edgebake-refuse-") as scratch:
        asm, obj = Path(scratch) / "lib.s", Path(scratch) / "lib.o"
        asm.write_text(source)
        run([ASSEMBLER, "-o", obj, asm], progress, what=f"{ASSEMBLER} ({own.soname})")
        made = library.with_name(library.name + ".refusing")
        run([LINKER, "-shared", "--build-id=none", "--hash-style=gnu", "-z", "noexecstack",
             "-z", "noseparate-code",
             "-soname", own.soname, "-o", made, obj], progress, what=f"{LINKER} ({own.soname})")
    made.chmod(library.stat().st_mode & 0o7777)
    os.replace(made, library)
    progress.log(f"refused {where}: {len(exported)} symbols kept for {len(users)} users, "
                 f"{len(quiet)} answering none")
    return sorted(users)


def refusing_library_source(soname: str, exported: dict[str, tuple[str, int]],
                            answer_none: set[str], where: str) -> str:
    """aarch64 assembly of a library exporting `exported`: functions that write which
    symbol was called and end the process (those in `answer_none` return 0), and zeroed
    data of the original sizes."""
    text = [".text", ".p2align 2", "refused:", "  mov x0, #2", "  mov x8, #64", "  svc #0",
            f"  mov x0, #{EXIT_CODE}", "  mov x8, #94", "  svc #0"]
    data = [".bss"]
    strings = [".section .rodata"]
    for number, (name, (kind, size)) in enumerate(exported.items()):
        if not SYMBOL_NAME.fullmatch(name):
            raise BuildError(f"recipe: refuse_libraries: {where}: symbol {name!r} cannot be "
                             "refused (an unusual name)")
        if kind in ("FUNC", "IFUNC", "NOTYPE") and name in answer_none:
            text += [f".globl {name}", f".type {name}, %function", f"{name}:", "  mov x0, #0",
                     "  ret"]
        elif kind in ("FUNC", "IFUNC", "NOTYPE"):
            message = (f"edgebake: {name}() of {soname} was left out of this image (recipe: "
                       f"refuse_libraries); whatever called it is not supported here\n")
            text += [f".globl {name}", f".type {name}, %function", f"{name}:",
                     f"  adr x1, .Lmessage{number}", f"  mov x2, #{len(message)}",
                     "  b refused"]
            strings += [f".Lmessage{number}:", f"  .ascii {_quoted(message)}"]
        elif kind == "OBJECT":
            data += [".p2align 4", f".globl {name}", f".type {name}, %object",
                     f".size {name}, {size}", f"{name}:", f"  .zero {max(size, 1)}"]
        else:
            raise BuildError(f"recipe: refuse_libraries: {where}: symbol {name} is {kind}; "
                             "only functions and data can be refused")
    return "\n".join([*text, *data, *strings, '.section .note.GNU-stack,"",%progbits', ""])


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def read_symbols(files: list[Path]) -> dict[Path, ElfSymbols]:
    """Dynamic section and symbols of each file, from one readelf run per 200 files."""
    found: dict[Path, ElfSymbols] = {}
    for start in range(0, len(files), 200):
        batch = files[start:start + 200]
        out = capture([READELF, "-W", "--dynamic", "--dyn-syms", *map(str, batch)])
        _parse_readelf(out, batch, found)
    return found


def _parse_readelf(out: str, batch: list[Path], found: dict[Path, ElfSymbols]) -> None:
    by_name = {str(p): p for p in batch}
    current = found.setdefault(batch[0], ElfSymbols())
    for line in out.splitlines():
        if line.startswith("File: "):
            current = found.setdefault(by_name[line[6:].strip()], ElfSymbols())
        elif "(NEEDED)" in line:
            current.needed.append(line.rsplit("[", 1)[1].rstrip("]"))
        elif "(SONAME)" in line:
            current.soname = line.rsplit("[", 1)[1].rstrip("]")
        elif (match := SYMBOL_LINE.match(line)) and match[3] in ("GLOBAL", "WEAK"):
            size, kind, _bind, section, name = match.groups()
            name = name.split("@")[0]
            if section == "UND":
                current.undefined.add(name)
            elif section != "ABS":
                current.defined[name] = (kind, int(size, 0))


LOAD_CHECK = ("import ctypes, sys\n"
              "for path in sys.argv[1:]:\n"
              "    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)\n")


def _check_users_load(rootfs: Path, users: list[Path], progress: Progress) -> None:
    """Load every user of a refused library in the target, all symbols bound at once."""
    if not users:
        return
    inside_paths = ["/" + str(p.relative_to(rootfs)) for p in users]
    # a wheel's libraries find their siblings through the extension module that loads them
    # first; loaded alone here, they are told where to look
    folders = ":".join(sorted({str(Path(p).parent) for p in inside_paths}))
    result = run_in_target(rootfs, ["env", f"LD_LIBRARY_PATH={folders}", "python3", "-c",
                                    LOAD_CHECK, *inside_paths], progress,
                           "load check of refused libraries' users")
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BuildError(f"recipe: refuse_libraries: a user of a refused library no longer "
                         f"loads in the target: {last}")

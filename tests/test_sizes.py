"""The manifest's size table: each file counted once, in its component; packages by their
dpkg lists and wheels by their RECORD, as the files are in the finished root."""

from __future__ import annotations

import os
from pathlib import Path

from edgebake_builder.sizes import largest, size_table


def put(root: Path, relative: str, size: int) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def test_every_byte_is_counted_once_in_its_component(tmp_path: Path) -> None:
    module = put(tmp_path, "usr/lib/modules/6.1.0/kernel/drivers/net/wifi.ko", 5000)
    os.link(module, tmp_path / "usr/lib/modules/6.1.0/kernel/drivers/net/alias.ko")
    put(tmp_path, "usr/lib/aarch64-linux-gnu/gconv/UTF-16.so", 300)
    put(tmp_path, "usr/lib/aarch64-linux-gnu/libavcodec.so.59", 7000)
    put(tmp_path, "usr/lib/aarch64-linux-gnu/libz.so.1", 100)
    put(tmp_path, "usr/lib/python3.11/os.py", 40)
    put(tmp_path, "opt/edgebake/model/m.tflite", 900)
    put(tmp_path, "etc/hostname", 9)
    put(tmp_path, "opt/edgebake/lib/av.libs/libavcodec-1a2b.so.62", 3000)
    put(tmp_path, "opt/edgebake/lib/numpy/__init__.py", 1200)
    put(tmp_path, "opt/edgebake/lib/numpy/core.so", 20000)  # listed at 30000, stripped since
    put(tmp_path, "opt/edgebake/lib/numpy-1.26.4.dist-info/RECORD", 0).write_text(
        "numpy/__init__.py,sha256=abc,1200\nnumpy/core.so,sha256=def,30000\n"
        "numpy/tests/gone.py,sha256=ghi,500\nnumpy-1.26.4.dist-info/RECORD,,\n")
    put(tmp_path, "usr/bin/ssh", 70)
    lists = tmp_path / "var/lib/dpkg/info"
    put(tmp_path, "var/lib/dpkg/info/openssh-client.list", 0).write_text(
        "/.\n/usr\n/usr/bin\n/usr/bin/ssh\n/usr/share/man/ssh.1.gz\n")
    (lists / "libc6:arm64.list").write_text("/usr/lib/aarch64-linux-gnu/libz.so.1\n"
                                            "/usr/lib/python3.11/os.py\n")
    (lists / "perl-base.list").write_text("/usr/bin/perl\n/usr/share/perl5/pruned.pm\n")
    table = size_table(tmp_path)
    parts = table["components"]
    assert parts["kernel modules"] == 5000  # the hard link is not counted twice
    assert parts["gconv"] == 300 and parts["ffmpeg and codecs"] == 7000 + 3000
    assert parts["shared libraries"] == 100 and parts["python stdlib"] == 40
    assert parts["model"] == 900 and parts["other"] == 9
    assert parts["programs"] == 70
    record = (tmp_path / "opt/edgebake/lib/numpy-1.26.4.dist-info/RECORD").stat().st_size
    assert parts["python wheels"] == 1200 + 20000 + record
    dpkg = sum(p.stat().st_size for p in lists.iterdir())
    assert parts["dpkg and apt state"] == dpkg
    assert sum(parts.values()) == 5000 + 300 + 10000 + 100 + 40 + 900 + 9 + 70 + dpkg + \
        parts["python wheels"]
    # packages and wheels by what is left of their files; a package with nothing left is gone
    assert table["packages"] == {"libc6": 140, "openssh-client": 70}
    assert table["wheels"] == {"numpy": 1200 + 20000 + record}
    assert largest(table, 2) == [("component python wheels", 1200 + 20000 + record),
                                 ("wheel numpy", 1200 + 20000 + record)]


def test_prune_removes_what_matches_and_keeps_the_exceptions(tmp_path: Path) -> None:
    from edgebake_builder.progress import Progress
    from edgebake_builder.recipe import load_recipe
    from edgebake_builder.steps.prune import prune

    put(tmp_path, "usr/lib/aarch64-linux-gnu/gconv/BIG5.so", 1000)
    put(tmp_path, "usr/lib/aarch64-linux-gnu/gconv/gconv-modules.cache", 500)
    put(tmp_path, "usr/lib/aarch64-linux-gnu/gconv/UTF-16.so", 30)
    put(tmp_path, "usr/lib/aarch64-linux-gnu/gconv/gconv-modules", 20)
    put(tmp_path, "usr/share/perl/5.36/strict.pm", 200)
    put(tmp_path, "usr/lib/aarch64-linux-gnu/perl-base/strict.pm", 50)
    put(tmp_path, "usr/bin/perl", 10)
    recipe = load_recipe("pi4")
    removed = prune(tmp_path, recipe["prune"], recipe["prune_keep"], Progress(1))
    assert removed == 1760
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["usr/lib/aarch64-linux-gnu/gconv/UTF-16.so",
                    "usr/lib/aarch64-linux-gnu/gconv/gconv-modules"], left

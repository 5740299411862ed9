"""The build cache's entry lock: a second build of an entry waits for the first instead of
doing the same minutes of work beside it, and a killed builder never leaves the lock held."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from edgebake_builder.cache import entry_lock

ROOT = Path(__file__).resolve().parents[1]

# Holds the lock on argv[1], says so, then makes the entry once argv[2] appears.
HOLDER = """
import sys, time
from pathlib import Path
from edgebake_builder.cache import entry_lock
entry, go = Path(sys.argv[1]), Path(sys.argv[2])
with entry_lock(entry):
    print("held", flush=True)
    while not go.exists():
        time.sleep(0.05)
    entry.write_text("made by the holder")
"""


def hold(entry: Path, go: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(entry), str(go)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_build_waits_for_the_first_and_finds_its_entry(tmp_path: Path) -> None:
    entry, go = tmp_path / "base.tar", tmp_path / "go"
    holder = hold(entry, go)
    told: list[float] = []

    def on_wait(seconds: float) -> None:
        told.append(seconds)
        if len(told) == 2:
            go.touch()  # the first build finishes while the second waits

    with entry_lock(entry, on_wait=on_wait, every_sec=0.2) as waited:
        assert entry.read_text() == "made by the holder"
    assert holder.wait(10) == 0
    assert len(told) >= 2 and told[0] < told[1] <= waited, (told, waited)
    with entry_lock(entry, on_wait=on_wait) as again:  # nobody holds it now
        assert again == 0.0


def test_a_killed_builder_leaves_no_lock_behind(tmp_path: Path) -> None:
    entry, go = tmp_path / "base.tar", tmp_path / "go"
    holder = hold(entry, go)
    began = time.monotonic()
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    def stuck(seconds: float) -> None:
        if seconds > 5:
            raise AssertionError("the lock is still held after its builder was killed")

    with entry_lock(entry, on_wait=stuck, every_sec=0.1) as waited:
        assert not entry.exists()  # the killed build made nothing; this one builds it
    assert waited < 5 and time.monotonic() - began < 5


def test_a_build_stopped_by_sigterm_cleans_up_and_says_so(tmp_path: Path) -> None:
    """A container stop or a cancelled CI job sends SIGTERM: the build ends like Ctrl-C, its
    work and staging folders are removed, and nothing half-written is in the output."""
    out = tmp_path / "out"
    build = subprocess.Popen([sys.executable, "-m", "invoke", "build-image", "--target", "pi4",
                              "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert build.stdout is not None
    for line in build.stdout:  # once the build is under way (its folders exist)
        if line.startswith("[2/"):
            break
    build.send_signal(signal.SIGTERM)
    _, stderr = build.communicate(timeout=120)
    assert build.returncode == 130, stderr[-2000:]
    assert "interrupted; nothing half-written was left in place" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr
    left = sorted(p.name for p in tmp_path.iterdir()) + sorted(p.name for p in out.iterdir())
    assert left == ["out", "build.log"], left


def test_base_phases_add_up_from_mmdebstrap_output(tmp_path: Path) -> None:
    """Seconds per phase come from the `I:` lines; initramfs runs are counted apart, and
    the install phase resumes after each."""
    from edgebake_builder.steps import basephases

    now = [0.0]
    clock = basephases.PhaseClock(lambda: now[0])
    for seconds, line in [(1, "I: running apt-get update..."),
                          (10, "I: downloading packages with apt..."),
                          (40, "I: extracting archives..."),
                          (45, "I: installing remaining packages inside the chroot..."),
                          (100, "update-initramfs: Generating /boot/initrd.img-6.1"),
                          (130, "Setting up raspi-firmware (1.2)"),
                          (140, "update-initramfs: Generating /boot/initrd.img-6.1"),
                          (150, "Processing triggers for libc-bin"),
                          (160, "I: creating tarball..."),
                          (170, "I: success in 170 seconds")]:
        now[0] = float(seconds)
        clock.feed(line + "\n")
    tarball = tmp_path / "bookworm-arm64-key.tar"
    seconds = basephases.save(tarball, clock)
    assert seconds == {"setup": 1.0, "package lists": 9.0, "download": 30.0, "unpack": 5.0,
                       "install and configure the rest (qemu-user)": 75.0,
                       "initramfs (qemu-user)": 40.0, "tarball": 10.0}
    assert basephases.load(tarball) == seconds
    assert "initramfs (qemu-user) 40s" in basephases.describe(seconds)
    assert basephases.load(tmp_path / "other.tar") == {}
    assert basephases.load(tarball, "slowest_packages") == {"raspi-firmware": 10.0}


def test_only_the_newest_bases_are_kept_with_their_side_files(tmp_path: Path) -> None:
    import os

    from edgebake_builder.steps.bootstrap import prune_bases

    for age, name in enumerate(["d", "c", "b", "a"]):
        for suffix in (".tar", ".phases.json"):
            path = tmp_path / f"{name}{suffix}"
            path.write_text(name)
            os.utime(path, (1000 - age, 1000 - age))
    (tmp_path / ".a.tar.lock").write_text("")
    removed = prune_bases(tmp_path / "a.tar", count=2)
    assert [p.name for p in removed] == ["b.tar"]  # a is older, but it is the one in use
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".a.tar.lock", "a.tar", "a.phases.json", "c.tar", "c.phases.json", "d.tar",
         "d.phases.json"])

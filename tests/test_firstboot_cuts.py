"""First boot cut at every step: the process is killed with SIGKILL before each file
operation or tool it runs, then first boot runs again, as at the next power-on. Every file is
always either as it was or as first boot makes it, and the rerun ends where an uncut run ends.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edgebake_builder.validate.seed import render_seed

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ6oB9bHt0pLq7d3m0Yl1f3S0oQm7bTqkQJ0Zk0m3nXv tech@laptop"

# Runs first boot on a folder; with a number N it kills itself before its N-th step, and
# prints how many steps it took otherwise.
DRIVER = """
import os, signal, subprocess, sys
from pathlib import Path
from edgebake_runtime import firstboot

base = Path(sys.argv[1])
cut_at = int(sys.argv[2])
firstboot.SEED = base / "boot" / "edgebake-seed.yaml"
firstboot.ETC = base / "etc"
firstboot.DONE = base / "state" / "firstboot.done"
steps = [0]

def step(name, real):
    def wrapped(*args, **kwargs):
        steps[0] += 1
        if steps[0] == cut_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return wrapped

os.replace = step("replace", os.replace)
os.open = step("open", os.open)
os.symlink = step("symlink", os.symlink)
subprocess.run = step("run", subprocess.run)
code = firstboot.main([])
print("steps", steps[0])
sys.exit(code)
"""


def make_unit(base: Path) -> None:
    etc = base / "etc"
    (etc / "edgebake").mkdir(parents=True)
    (etc / "edgebake" / "app.yaml").write_text(
        "model:\n  path: /opt/edgebake/model/m.tflite\n"
        "sources:\n  - {name: pattern, kind: synthetic}\n")
    (etc / "hostname").write_text("edgebake\n")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n")
    (base / "boot").mkdir()
    (base / "boot" / "edgebake-seed.yaml").write_text(render_seed(
        "pole-17", [KEY], app={"mqtt": {"enabled": True, "host": "broker.lan"}},
        device_id="pole-17") + "wifi: {ssid: yard, psk: longenough, country: DE}\n")


def run_first_boot(base: Path, cut_at: int = 0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", DRIVER, str(base), str(cut_at)],
                          capture_output=True, text=True, timeout=120, check=False)


def files(base: Path) -> dict[str, bytes | str]:
    """Every file and link under the unit, host keys reduced to 'whole' (they are random)."""
    found: dict[str, bytes | str] = {}
    for path in sorted(base.rglob("*")):
        name = str(path.relative_to(base))
        if path.is_symlink():
            found[name] = "-> " + str(path.readlink())
        elif path.is_file() and not path.name.endswith(".tmp"):
            found[name] = "host key" if "ssh_host_" in path.name else path.read_bytes()
    return found


def test_first_boot_cut_at_every_step_resumes_to_the_same_end(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    make_unit(reference)
    before = files(reference)
    done = run_first_boot(reference)
    assert done.returncode == 0, done.stderr
    total = int(done.stdout.split("steps")[-1])
    after = files(reference)
    assert total >= 10 and after["etc/hostname"] == b"pole-17\n", done.stdout
    for cut_at in range(1, total + 1):
        unit = tmp_path / f"cut-{cut_at}"
        make_unit(unit)
        cut = run_first_boot(unit, cut_at)
        assert cut.returncode == -9, (cut_at, cut.stdout, cut.stderr)
        if (unit / "state" / "firstboot.done").exists():  # only once all else is done
            assert files(unit) == after, cut_at
        for name, content in files(unit).items():  # as it was, or as first boot makes it
            assert content in (before.get(name), after.get(name)), (cut_at, name)
        again = run_first_boot(unit)
        assert again.returncode == 0, (cut_at, again.stderr)
        assert files(unit) == after, cut_at
        for key in (unit / "etc" / "ssh").glob("ssh_host_*_key"):
            assert subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True,
                                  check=False).returncode == 0, (cut_at, key)

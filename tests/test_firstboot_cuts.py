"""First boot cut at every step: the process is killed with SIGKILL before each file
operation or tool it runs, then first boot runs again, as at the next power-on. Every file is
always either as it was or as first boot makes it, and the rerun ends where an uncut run ends.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from cutpoint import call_count, run_cut
from edgebake_builder.validate.seed import render_seed
from test_seed import make_etc

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ6oB9bHt0pLq7d3m0Yl1f3S0oQm7bTqkQJ0Zk0m3nXv tech@laptop"

# First boot on the unit folder argv[2].
BODY = """
from pathlib import Path
from edgebake_runtime import firstboot

base = Path(sys.argv[2])
firstboot.SEED = base / "boot" / "edgebake-seed.yaml"
firstboot.ETC = base / "etc"
firstboot.DONE = base / "state" / "firstboot.done"
code = firstboot.main([])
print("calls", calls[0])
sys.exit(code)
"""
STEPS = ["os.replace", "os.open", "os.symlink", "subprocess.run"]


def make_unit(base: Path) -> None:
    etc = make_etc(base)
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n")
    (base / "boot").mkdir()
    (base / "boot" / "edgebake-seed.yaml").write_text(render_seed(
        "pole-17", [KEY], app={"mqtt": {"enabled": True, "host": "broker.lan"}},
        device_id="pole-17") + "wifi: {ssid: yard, psk: longenough, country: DE}\n")


def run_first_boot(base: Path, cut_at: int = 0) -> subprocess.CompletedProcess[str]:
    return run_cut(BODY, STEPS, cut_at, base)


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
    total = call_count(done)
    after = files(reference)
    assert total >= 10 and after["etc/hostname"] == b"pole-17\n", done.stdout
    # the card's boot partition keeps the seed only without its secrets
    assert "boot/edgebake-seed.yaml" not in after, sorted(after)
    applied = after["boot/edgebake-seed.applied.yaml"]
    assert isinstance(applied, bytes) and b"pole-17" in applied and b"longenough" not in applied
    assert b"longenough" in after["etc/wpa_supplicant/wpa_supplicant-wlan0.conf"]
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

"""The booted unit's journal as `test-image` keeps and reads it: saved beside the checks'
reports, the boot figures taken from it, and what it says when the unit has no /data."""

from __future__ import annotations

import re
from pathlib import Path

from ..progress import Progress
from .qemu import QemuMachine


def save_journal(machine: QemuMachine, key: Path, test_dir: Path) -> str:
    """Every boot of the run (the first one is the unit's real first boot), written to
    test/journal.txt; its text."""
    journal = machine.ssh(key, "journalctl --no-pager -o short-monotonic", timeout=180).stdout
    (test_dir / "journal.txt").write_text(journal)
    return journal


def boot_figures(journal_text: str) -> dict[str, float]:
    """Seconds since kernel start (monotonic clock) for multi-user and the first inference,
    taken from the first boot in the journal."""
    figures: dict[str, float] = {}
    for line in journal_text.splitlines():
        match = re.match(r"\[\s*([0-9.]+)\]", line)
        if not match:
            continue
        stamp = float(match.group(1))
        if "boot-to-multi-user" not in figures and "Reached target multi-user.target" in line:
            figures["boot-to-multi-user"] = stamp
        if "boot-to-first-inference" not in figures and "edgebake: ready:" in line:
            figures["boot-to-first-inference"] = stamp
    return figures


def data_is_mounted(machine: QemuMachine, key: Path, test_dir: Path,
                    progress: Progress) -> bool:
    """Every running check needs /data: a unit that lost it at first boot is shown with the
    journal of what happened to it, instead of some 50 minutes of checks each timing out."""
    if machine.ssh(key, "findmnt -n /data").returncode == 0:
        return True
    journal = save_journal(machine, key, test_dir)
    progress.say("      /data is not mounted on the booted unit: running checks not run; "
                 f"what the journal says of it ({test_dir / 'journal.txt'}):")
    about_data = [line for line in journal.splitlines()
                  if any(word in line for word in ("data.mount", "growdata", "by-partuuid"))]
    for line in about_data[-20:]:
        progress.say(f"      | {line}")
    return False

"""The timing table at the end of `invoke test`, from real JUnit reports pytest writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edgebake_builder.validate.timing import read_junit, table


def test_the_table_reads_what_pytest_reported(tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(
        "import time, pytest\n"
        "def test_slow():\n    time.sleep(0.3)\n"
        "def test_broken():\n    assert False\n"
        "@pytest.mark.skip\ndef test_later():\n    pass\n")
    report = tmp_path / "report.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={report}", str(tmp_path / "test_sample.py")],
                   cwd=tmp_path, capture_output=True, check=False)
    checks = read_junit(report)
    assert sorted((c.name.split("::")[-1], c.outcome) for c in checks) == [
        ("test_broken", "failed"), ("test_later", "skipped"), ("test_slow", "passed")]
    slow = next(c for c in checks if c.name.endswith("test_slow"))
    assert slow.seconds >= 0.3
    text = table([("pytest -m 'x'", 125.0, checks), ("waiting", 5.0, [])], slowest=1)
    assert "pytest -m 'x'" in text and "2:05  3 (1/1/1)" in text, text
    assert "total" in text and "2:10" in text and "slowest 1 checks" in text
    assert text.splitlines()[-1].strip().endswith("test_slow"), text
    assert read_junit(tmp_path / "missing.xml") == []

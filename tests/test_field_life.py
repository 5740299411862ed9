"""What months unattended need: a full data disk, write errors, broker outages, thread crashes,
a hostile LAN neighbour. Real filesystems (a small tmpfs), a real mosquitto, real sockets."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from edgebake_runtime.config import ConfigError, validate
from edgebake_runtime.journal import Journal, journal_files, read_lines

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def tmpfs(folder: Path, size_kib: int) -> Iterator[Path]:
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder)],
                   check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def record(n: int) -> dict[str, object]:
    return {"id": f"t-{n}", "pad": "x" * 150}


def test_retention_keeps_free_space_and_counts_undelivered(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "data", 2048) as data:
        journal = Journal(data / "results", rotate_bytes=64 * 1024, min_free_percent=30.0)
        journal.delivered = lambda: None  # a consumer that has delivered nothing yet
        journal.open()
        for n in range(30000):  # ~5.5 MiB of records into a 2 MiB filesystem
            assert journal.append(record(n)), journal.failed
            if n % 500 == 0:
                journal.sync_if_due()
        journal.close()
        stats = journal.stats()
        assert stats["free_percent"] >= 25.0, stats
        kept = list(read_lines(data / "results"))
        assert journal.written == 30000 and stats["dropped_unwritten"] == 0
        assert stats["deleted_records"] + len(kept) == 30000
        assert stats["dropped_undelivered"] == stats["deleted_records"] > 0
        assert kept[-1]["id"] == "t-29999"  # the newest survive, the oldest went first


def test_retention_spares_nothing_it_was_not_told_was_delivered(tmp_path: Path) -> None:
    """Records before the consumer's mark are deleted as delivered, not counted as lost."""
    with tmpfs(tmp_path / "data", 2048) as data:
        journal = Journal(data / "results", rotate_bytes=64 * 1024, min_free_percent=30.0)
        journal.delivered = lambda: (journal_files(journal.folder)[-1].name, 0)
        journal.open()
        for n in range(30000):
            journal.append(record(n))
        journal.close()
        assert journal.deleted_records > 0 and journal.dropped_undelivered == 0


def test_journal_is_unhealthy_while_full_and_recovers_when_space_returns(tmp_path: Path
                                                                         ) -> None:
    with tmpfs(tmp_path / "data", 512) as data:
        journal = Journal(data / "results", min_free_percent=1.0)
        journal.open()
        blocker = data / "someone-elses-file"
        with contextlib.suppress(OSError), blocker.open("wb") as handle:
            handle.write(b"\0" * (1024 * 1024))  # fills the filesystem
        results = [journal.append(record(n)) for n in range(50)]
        assert not all(results)
        assert "No space left" in journal.failed
        assert journal.dropped_unwritten > 0
        blocker.unlink()
        time.sleep(Journal.RETRY_SEC + 0.1)
        assert journal.append(record(999))
        assert journal.failed == ""
        journal.close()
        ids = [r["id"] for r in read_lines(data / "results")]
        assert ids[-1] == "t-999" and len(ids) + journal.dropped_unwritten == 51


def test_journal_reports_what_is_synced_and_its_slowest_fsync(tmp_path: Path) -> None:
    """The power-cut bench bounds lost results by the interval plus the slowest fsync seen."""
    journal = Journal(tmp_path / "results", fsync_interval_sec=3600.0)
    journal.open()
    for n in range(20):
        assert journal.append_lines(json.dumps(record(n)).encode() + b"\n", 1, 1000.0 + n)
    stats = journal.stats()
    assert stats["last_written_ts"] == 1019.0 and stats["last_synced_ts"] is None
    assert stats["slowest_fsync_sec"] == 0.0  # nothing synced yet: an hour's interval
    journal.fsync_interval = 0.0
    journal.sync_if_due()
    stats = journal.stats()
    assert stats["last_synced_ts"] == 1019.0 and journal.slowest_fsync_sec > 0.0
    assert stats["slowest_fsync_sec"] == round(journal.slowest_fsync_sec, 3)
    journal.close()


def test_supervised_thread_comes_back_after_errors() -> None:
    from edgebake_runtime.supervise import Supervised

    calls = []
    stop = threading.Event()

    def body() -> None:
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise OSError("journal file deleted by rotation")
        stop.wait()

    worker = Supervised("test", body, stop, first_backoff=0.05)
    worker.start()
    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(calls) == 3 and worker.restarts == 2 and worker.alive()
    assert "journal file deleted" in worker.last_error
    stop.set()
    worker.thread.join(2)
    assert not worker.alive()


def test_soak_loses_nothing_while_the_broker_comes_and_goes() -> None:
    """A short `invoke soak`: journal + MQTT sender on a tiny tmpfs, broker restarted."""
    from edgebake_builder.bench.soak import run_soak
    from edgebake_builder.progress import Progress

    result = run_soak(0.6, Progress(1), rate=3000.0, fs_mib=8)
    assert result.broker_restarts >= 1
    assert result.lost == 0, result.line()
    assert result.received_unique + result.dropped_undelivered >= result.records


@pytest.mark.parametrize(("change", "message"), [
    ({"device_id": "pole/17"}, "device_id: expected a string of letters"),
    ({"mqtt": {"topic": "a/#"}}, "mqtt.topic: expected a string that is an MQTT topic"),
    ({"mqtt": {"topic": "$SYS/x"}}, "mqtt.topic: expected a string that is an MQTT topic"),
    ({"mqtt": {"tls": {"cert_file": "/etc/c.pem"}}}, "mqtt.tls.key_file: expected cert_file"),
    ({"mqtt": {"tls": {"ca_file": "ca.pem"}}},
     "mqtt.tls.ca_file: expected a string that is an absolute path"),
    ({"http": {"allow": ["10.0.0.0/33"]}},
     "http.allow: expected a list of client networks like 10.0.0.0/8 or addresses "
     ".'10.0.0.0/33' is not one."),
    ({"journal": {"keep_files": 3}}, "journal.keep_files: unknown setting"),
    ({"update": {"mqtt_commands": True}}, "update.mqtt_commands: expected mqtt.enabled with "
     "mqtt.tls.enabled and a mqtt.username and password"),
    ({"update": {"mqtt_commands": True}, "mqtt": {"enabled": True, "username": "u",
                                                   "password": "p"}},
     "update.mqtt_commands: expected mqtt.enabled with mqtt.tls.enabled"),
    ({"update": {"allowed_origins": ["https://h.example/x"]}},
     "update.allowed_origins: expected a list of origins"),
    ({"journal": {"dir": "/etc/results"}}, "journal.dir: expected an absolute path under /data"),
    ({"sources": [{"name": "c", "kind": "rtsp", "url": "file:///etc/shadow"}]},
     "sources[0].url: expected a rtsp:// or rtsps:// URL"),
    ({"http": {"bind": "unit.local"}}, "http.bind: expected an IP address"),
    ({"sources": [{"name": "cam", "kind": "v4l2", "device": "/dev/video0", "fps": 5000}]},
     "sources[0].fps: expected a number between 0.1 and 1000.0, found 5000"),
    ({"sources": [{"name": "rec", "kind": "replay", "path": "/data/rec", "fps": 200000}]},
     "sources[0].fps: expected a number between 0.1 and 100000.0, found 200000"),
])
def test_values_that_reach_topics_files_and_sockets_are_checked(change: dict[str, object],
                                                                message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("$", r"\$")):
        validate(change, "app.yaml")


def _get(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
        return int(reply.status)


def test_http_idle_connections_cannot_wedge_the_server() -> None:
    from edgebake_runtime.http import HealthServer

    server = HealthServer("127.0.0.1", 0, lambda: {"healthy": True}, max_connections=2,
                          timeout_sec=1.0)
    server.start()
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        time.sleep(0.2)
        with pytest.raises((ConnectionError, urllib.error.URLError)):
            _get(server.port)  # both slots held by clients that send nothing
        assert server.server.refused >= 1
        time.sleep(1.5)  # their timeout frees the slots
        assert _get(server.port) == 200
        for sock in idle:
            sock.close()
    finally:
        server.stop()


def test_slow_clients_never_keep_monitoring_out() -> None:
    """Slowloris: eight clients trickle a byte at a time, each read well inside the socket
    timeout. Each is cut at the request's deadline, one address holds a few connections at
    most, and a monitor from another address is answered meanwhile."""
    from edgebake_runtime.http import HealthServer

    server = HealthServer("127.0.0.1", 0, lambda: {"healthy": True}, max_connections=8,
                          timeout_sec=1.0)
    server.start()
    stop = threading.Event()
    cut: list[float] = []

    def trickle() -> None:
        began = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200:
                    if stop.is_set():
                        return
                    sock.sendall(bytes([byte]))
                    time.sleep(0.3)
        except OSError:
            pass
        cut.append(time.monotonic() - began)

    slow = [threading.Thread(target=trickle, daemon=True) for _ in range(8)]
    for thread in slow:
        thread.start()
    try:
        time.sleep(0.5)
        # from another loopback address: its own share of the slots
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5,
                                          source_address=("127.0.0.2", 0))
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        wait_cut = time.monotonic() + 20
        while len(cut) < 8 and time.monotonic() < wait_cut:
            time.sleep(0.1)
        assert len(cut) == 8, "a trickling client was never cut"
        assert max(cut) < 10, cut  # a 1 s deadline, not the 70 s the trickle would take
    finally:
        stop.set()
        server.stop()


def test_a_slow_snapshot_is_answered_not_cut() -> None:
    """On a loaded unit building /health can take longer than a client may take to send its
    request: the deadline is for the client's reading and writing, not the unit's own work."""
    from edgebake_runtime.http import HealthServer

    def slow() -> dict[str, bool]:
        time.sleep(1.5)
        return {"healthy": True}

    server = HealthServer("127.0.0.1", 0, slow, timeout_sec=1.0)
    server.start()
    try:
        assert _get(server.port) == 200
    finally:
        server.stop()


def test_http_allow_list_refuses_other_networks() -> None:
    from edgebake_runtime.http import HealthServer

    server = HealthServer("127.0.0.1", 0, lambda: {"healthy": True}, allow=["10.0.0.0/8"])
    server.start()
    try:
        with pytest.raises((ConnectionError, urllib.error.URLError)):
            _get(server.port)
    finally:
        server.stop()
    allowed = HealthServer("127.0.0.1", 0, lambda: {"healthy": True}, allow=["127.0.0.0/8"])
    allowed.start()
    try:
        assert _get(allowed.port) == 200
    finally:
        allowed.stop()


def test_invoke_test_passes_whole_marker_expressions_to_pytest() -> None:
    out = subprocess.run([sys.executable, "-m", "invoke", "--dry", "test", "--unit"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)  # invoke --dry colours its echo
    commands = [shlex.split(line) for line in plain.splitlines() if " -m pytest " in line]
    expressions = [cmd[cmd.index("-m", cmd.index("pytest")) + 1] for cmd in commands]
    assert expressions == ["(tensorflow) and not image and not boot and not long",
                           "(not tensorflow) and not image and not boot and not long"]


def test_growdata_plans_on_a_real_partition_table(tmp_path: Path) -> None:
    """The arithmetic of the first-boot grow, on an MBR made by sfdisk (no loop device)."""
    from edgebake_runtime.growdata import ALIGN_SECTORS, Plan

    disk = tmp_path / "card.img"
    subprocess.run(["truncate", "-s", "64M", str(disk)], check=True)
    subprocess.run(["sfdisk", "-q", str(disk)], input="label: dos\n,8M,c\n,16M,83\n,8M,83\n",
                   text=True, check=True)
    table = json.loads(subprocess.run(["sfdisk", "-J", str(disk)], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    last = table["partitions"][-1]
    plan = Plan(str(disk), 3, last["node"], int(last["start"]), int(last["size"]),
                64 * 2**20 // 512)
    assert plan.spare > ALIGN_SECTORS
    subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", "-N", "3", str(disk)],
                   input=", +\n", text=True, check=True)
    grown = json.loads(subprocess.run(["sfdisk", "-J", str(disk)], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    end = int(grown["partitions"][-1]["start"]) + int(grown["partitions"][-1]["size"])
    assert 64 * 2**20 // 512 - end < ALIGN_SECTORS
    assert grown["partitions"][-1]["start"] == last["start"]


def test_growing_waits_for_udevs_probe_and_gives_up_in_bounds(tmp_path: Path,
                                                             monkeypatch: Any) -> None:
    """The grow holds the whole disk's BSD lock (udev probes under a shared one): it waits
    while a probe holds the disk, takes it once the probe ends, and leaves the card alone
    for this boot when the disk stays held past its bound."""
    import fcntl

    from edgebake_runtime import growdata

    disk = tmp_path / "card.img"
    disk.write_bytes(b"\0" * 4096)
    probe = os.open(disk, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH)  # udev probing the disk
    released = threading.Event()

    def probe_ends() -> None:
        time.sleep(0.5)
        released.set()
        os.close(probe)

    threading.Thread(target=probe_ends, daemon=True).start()
    with growdata.whole_disk_locked(str(disk)):
        assert released.is_set()
        other = os.open(disk, os.O_RDONLY)
        with pytest.raises(BlockingIOError):  # and a new probe now waits for us
            fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
        os.close(other)

    held = os.open(disk, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_SH)  # held for good
    monkeypatch.setattr(growdata, "LOCK_WAIT_SEC", 0.5)
    with pytest.raises(growdata.DiskBusy, match="stayed locked"), \
            growdata.whole_disk_locked(str(disk)):
        pytest.fail("the grow ran on a disk someone else held")
    os.close(held)


@pytest.mark.long
def test_ten_minute_soak_loses_nothing() -> None:
    """`invoke soak --minutes 10` as a test (only with `invoke test --long`)."""
    from edgebake_builder.bench.soak import run_soak
    from edgebake_builder.progress import Progress

    result = run_soak(10.0, Progress(1), rate=22000.0)
    assert result.lost == 0, result.line()
    assert result.broker_restarts >= 15

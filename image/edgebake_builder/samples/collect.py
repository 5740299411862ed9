"""`invoke collect-samples`: a unit's field samples to a folder on this machine, over SSH.

Resumable without duplicates: samples come in small batches (one `tar` stream each), are
unpacked into a temp folder and renamed into place, and only then recorded in the folder's
`manifest.jsonl` (one line per sample: unit, name, files, sha256). A cut connection loses at
most the batch in flight, which the next run fetches again; what the manifest lists is
never fetched twice. At the end the unit is told the newest name collected (`.collected`),
so its pruning counts what goes unseen.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgebake_runtime.atomic import write_atomic
from edgebake_runtime.samples import NAME

from ..errors import BuildError
from ..flashing.push import ssh_options

SAMPLES_DIR = "/data/samples"
BATCH = 16
MAX_BATCH_BYTES = 256 * 2**20
SSH_TIMEOUT_SEC = 600


@dataclass(frozen=True)
class Collected:
    fetched: int
    already: int
    seconds: float


def collect_samples(host: str, out: Path, since: float = 0.0, port: int = 22,
                    user: str = "root", identity: str = "", batch: int = BATCH,
                    say: Callable[[str], None] = print,
                    extra_options: list[str] | None = None) -> Collected:
    began = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.jsonl"
    have = recorded(manifest, host)
    target = ["ssh", "-p", str(port), *ssh_options(port, identity), *(extra_options or []),
              f"{user}@{host}"]
    names = [n for n in _remote_names(target, host) if stamp(n) >= since]
    wanted = [n for n in names if n not in have]
    say(f"{host}: {len(names)} sample(s) since {since:g}, {len(names) - len(wanted)} "
          f"already here, {len(wanted)} to fetch")
    fetched = 0
    for start in range(0, len(wanted), batch):
        names_now = wanted[start:start + batch]
        for name, files in _fetch_batch(target, host, names_now, out):
            record(manifest, host, name, files)
            fetched += 1
        say(f"      {fetched}/{len(wanted)} fetched ({time.monotonic() - began:.0f} s)")
    if names:
        newest = max(names)
        subprocess.run([*target, f"echo {shlex.quote(newest)} > {SAMPLES_DIR}/.collected"],
                       capture_output=True, check=False, timeout=60)
    return Collected(fetched, len(names) - len(wanted), time.monotonic() - began)


def stamp(name: str) -> float:
    return float(name.split("-", 1)[0].replace("_", "."))


def _remote_names(target: list[str], host: str) -> list[str]:
    """The unit's complete samples: a JPEG with its sidecar, names as the unit makes them."""
    listed = subprocess.run([*target, f"ls -1 {SAMPLES_DIR}"], capture_output=True, text=True,
                            check=False, timeout=120)
    if listed.returncode != 0:
        raise BuildError(f"{host}: cannot list {SAMPLES_DIR} over SSH: "
                         f"{listed.stderr.strip()[-300:] or 'exit ' + str(listed.returncode)}")
    files = set(listed.stdout.split())
    stems = {f.rsplit(".", 1)[0] for f in files if f.endswith((".jpg", ".json"))}
    return sorted(s for s in stems if NAME.fullmatch(s) and f"{s}.jpg" in files and
                  f"{s}.json" in files)


def _fetch_batch(target: list[str], host: str, names: list[str], out: Path
                 ) -> list[tuple[str, list[Path]]]:
    """One tar stream of the batch's files, unpacked to temp names and renamed in place."""
    members = [f"{n}{suffix}" for n in names for suffix in (".jpg", ".json")]
    command = f"cd {SAMPLES_DIR} && tar -cf - -- {' '.join(shlex.quote(m) for m in members)}"
    proc = subprocess.run([*target, command], capture_output=True, check=False,
                          timeout=SSH_TIMEOUT_SEC)
    if proc.returncode != 0:
        raise BuildError(f"{host}: fetching samples failed (exit {proc.returncode}): "
                         f"{proc.stderr.decode(errors='replace').strip()[-300:]}; run it "
                         "again to resume")
    if len(proc.stdout) > MAX_BATCH_BYTES:
        raise BuildError(f"{host}: a batch of {len(names)} samples is over "
                         f"{MAX_BATCH_BYTES >> 20} MiB")
    contents: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        for info in tar:
            if not info.isfile() or info.name not in members:
                continue  # only what was asked for, by its plain name
            handle = tar.extractfile(info)
            if handle is not None:
                contents[info.name] = handle.read()
    done = []
    for name in names:
        pair = [f"{name}.jpg", f"{name}.json"]
        if not all(m in contents for m in pair):
            continue  # pruned on the unit meanwhile
        paths = []
        for member in pair:
            write_atomic(out / member, contents[member])
            paths.append(out / member)
        done.append((name, paths))
    return done


def recorded(manifest: Path, host: str) -> set[str]:
    if not manifest.is_file():
        return set()
    found = set()
    for line in manifest.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash: its sample is fetched again
        if isinstance(entry, dict) and entry.get("unit_host") == host:
            found.add(str(entry.get("name")))
    return found


def record(manifest: Path, host: str, name: str, files: list[Path]) -> None:
    """One fetched sample in the manifest, after its files are in place (fsynced)."""
    entry = {"unit_host": host, "name": name, "collected": round(time.time(), 3),
             "files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}
    with manifest.open("a") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())

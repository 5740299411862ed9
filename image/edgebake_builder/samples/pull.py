"""`invoke collect-samples --broker`: ask units over MQTT to share their samples, then pull
them from each unit's HTTP server.

A token is made here and only its sha256 goes into the signed order, so the broker and
whoever reads its topics never see it. Each unit answers on its update status topic with the
URL to pull from; the samples then come one file at a time into the same folder and
manifest as an SSH collect (temp names, renamed, then recorded), so a broken connection is
resumed by running it again, without duplicates.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from edgebake_runtime.atomic import write_atomic
from edgebake_runtime.samples import NAME

from ..errors import BuildError
from ..fleet import Broker
from ..rollout.watch import UnitAnswers
from ..signing import order_seq, read_private_key, sign_order
from .collect import Collected, record, recorded, stamp

MAX_FILE_BYTES = 16 * 2**20
HTTP_TIMEOUT_SEC = 30


def pull_samples(broker: Broker, key: Path, to: str, out: Path, fleet: str = "default",
                 since: float = 0.0, minutes: int = 15, wait_sec: float = 30.0,
                 say: Callable[[str], None] = print) -> dict[str, Collected]:
    """Samples of the unit `to` (or every unit of `group/<name>`) that answer in wait_sec."""
    token = secrets.token_urlsafe(32)
    share = {"minutes": minutes, "token_sha256": hashlib.sha256(token.encode()).hexdigest()}
    order = sign_order(read_private_key(key), to, fleet, share=share)
    seq = order_seq(order)
    answers = UnitAnswers(broker)
    try:
        if not answers.send(to, order):
            raise BuildError(f"the broker did not take the order for {to} in 30 s")
        deadline = time.monotonic() + wait_sec
        while time.monotonic() < deadline:
            found = answers.answering(seq)
            if found and not to.startswith("group/"):
                break
            time.sleep(0.3)
        found = answers.answering(seq)
    finally:
        answers.close()
    if not found:
        raise BuildError(f"no unit of {to} answered the share order in {wait_sec:g} s "
                         "(offline, or samples.enabled / update.mqtt_commands off)")
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for device, answer in sorted(found.items()):
        if answer.get("step") != "samples-shared":
            say(f"{device}: {answer.get('step')}: {str(answer.get('detail'))[:300]}")
            continue
        results[device] = _pull_one(device, str(answer.get("detail")), token, out, since, say)
    return results


def _pull_one(device: str, url: str, token: str, out: Path, since: float,
              say: Callable[[str], None]) -> Collected:
    began = time.monotonic()
    if not url.startswith(("http://", "https://")):
        raise BuildError(f"{device}: answered with {url!r}, not an http(s) URL")
    listing = json.loads(_get(f"{url}?token={token}", device))
    names = sorted(n for n in listing.get("samples", []) if isinstance(n, str) and
                   NAME.fullmatch(n) and stamp(n) >= since)
    manifest = out / "manifest.jsonl"
    have = recorded(manifest, device)
    wanted = [n for n in names if n not in have]
    say(f"{device}: {len(names)} sample(s), {len(names) - len(wanted)} already here, "
        f"{len(wanted)} to fetch from {url}")
    for count, name in enumerate(wanted, 1):
        paths = []
        for suffix in (".jpg", ".json"):  # the sidecar last: it marks the sample collected
            final = out / f"{name}{suffix}"
            write_atomic(final, _get(f"{url}/{name}{suffix}?token={token}", device))
            paths.append(final)
        record(manifest, device, name, paths)
        if count % 16 == 0 or count == len(wanted):
            say(f"      {count}/{len(wanted)} fetched ({time.monotonic() - began:.0f} s)")
    return Collected(len(wanted), len(names) - len(wanted), time.monotonic() - began)


def _get(url: str, device: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SEC) as reply:
            body: bytes = reply.read(MAX_FILE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise BuildError(f"{device}: HTTP {exc.code} from {url.split('?')[0]}; run it again "
                         "to resume") from None
    except (urllib.error.URLError, OSError) as exc:
        raise BuildError(f"{device}: {url.split('?')[0]}: {getattr(exc, 'reason', exc)}; run "
                         "it again to resume") from None
    if len(body) > MAX_FILE_BYTES:
        raise BuildError(f"{device}: {url.split('?')[0]} is over {MAX_FILE_BYTES >> 20} MiB")
    return body


def describe(results: dict[str, Collected], out: Path) -> list[str]:
    return [f"{device}: {done.fetched} sample(s) fetched, {done.already} already in {out}, "
            f"in {done.seconds:.0f} s" for device, done in results.items()]


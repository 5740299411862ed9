"""`edgebake-update apply B.ebundle | status | rollback`: a new model, checked on the unit first.

apply: the bundle's signature against the keys in /etc/edgebake/update-keys/*.pub (less those a
signed bundle revoked), its target and fleet against /etc/edgebake/target and
/etc/edgebake/fleet, its version against the running one; then the golden test with
this unit's TFLite runtime, then a latency run against `update.max_latency_ms`. Only then is
the slot written and the model put on trial; the running service picks it up within
`update.poll_sec` without a restart and rolls it back on its own if the health window fails.
Every step goes to /data/models/audit.log. Exit codes: 0 done, 1 refused, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import (
    DEFAULT_FLEET,
    ORDER_TAG,
    VERSION,
    BundleError,
    check_bundle,
    check_slot,
    load_public_key,
    signed_json,
    version_key,
)
from .card import card_path_for, load_card
from .config import AppConfig, ConfigError, UpdateSettings, load_config
from .interp import ModelError, load_interpreter
from .modelstore import ModelStore, Slot
from .pagetoken import kept_page_token
from .selfcheck import check_model

LATENCY_RUNS = 20  # at most; at least LATENCY_MIN_RUNS
LATENCY_MIN_RUNS = 5
# a slow unit (or a large model) stops measuring here: the update's check stays bounded
LATENCY_BUDGET_SEC = 5.0


def trusted_keys(folder: Path, revoked: Any = ()) -> dict[str, Any]:
    """Every key in the folder's *.pub files, one per line (# comments allowed), except the
    revoked ones."""
    keys = dict(load_public_key(line, f"{path}:{number}")
                for path in sorted(folder.glob("*.pub"))
                for number, line in enumerate(path.read_text().splitlines(), 1)
                if line.strip() and not line.lstrip().startswith("#"))
    keys = {name: key for name, key in keys.items() if name not in revoked}
    if not keys:
        raise BundleError(f"{folder}: no public keys; this unit accepts no updates "
                          "(recipe: update.public_keys)")
    return keys


def measure_latency_ms(model: Path, card_path: Path) -> float:
    """Median invoke time of the model on this unit, on its first golden input."""
    card = load_card(card_path)
    golden = card.data.get("golden") or {}
    arrays = np.load(card_path.parent / str(golden.get("file", "")))
    interpreter = load_interpreter(model, num_threads=1)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.set_tensor(index, arrays["input_0"])
    interpreter.invoke()
    return float(np.median(invoke_times(interpreter, LATENCY_BUDGET_SEC)) * 1000)


def invoke_times(interpreter: Any, budget_sec: float) -> list[float]:
    """Seconds per invoke: up to LATENCY_RUNS, fewer (never under LATENCY_MIN_RUNS) once
    `budget_sec` has gone, so a model that takes a second a frame on a slow unit does not
    hold its update's check up for twenty."""
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < LATENCY_RUNS and (len(times) < LATENCY_MIN_RUNS or
                                         time.perf_counter() - started < budget_sec):
        began = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - began)
    return times


def apply(bundle_path: Path, store: ModelStore, keys: dict[str, Any], made_for: tuple[str, str],
          current_version: str, settings: UpdateSettings, allow_rollback: bool,
          order_seq: int = 0, window_sec: float | None = None) -> str:
    """All checks, then the slot and the trial; returns the line to print. `order_seq`: the
    number of the MQTT order that brought the bundle, kept with the trial for its verdict;
    `window_sec`: the order's health window instead of update.window_sec."""
    window = settings.window_sec if window_sec is None else window_sec
    store.audit("received", bundle=str(bundle_path))
    trial = store.state().get("trial")
    if trial:  # its `previous` would become an unconfirmed model
        left = float(trial["started"]) + float(trial["window_sec"]) - time.time()
        when = (f"its health window ends in {left:.0f}s" if left > 0 else
                "its health window is over; it waits for enough inferences to be judged")
        raise BundleError(f"model {trial['version']} is on trial ({when}); send the update "
                          "once it is confirmed or rolled back")
    target, fleet = made_for
    bundle = check_bundle(bundle_path, keys, target, current_version, allow_rollback,
                          fleet=fleet)
    store.audit("signature ok", version=bundle.version, key_id=bundle.manifest["key_id"])
    with store.changing:  # signed by a trusted key: it holds whatever becomes of the model
        revoked = set(store.state().get("revoked") or [])
        revokes = set(bundle.manifest.get("revokes", [])) - revoked
        if revokes:
            store.remember(revoked=sorted(revoked | revokes))
    if revokes:
        store.audit("keys revoked", key_ids=sorted(revokes))
    with tempfile.TemporaryDirectory(prefix=".check-", dir=store.root) as tmp:
        # the golden test runs on the bundle's files before anything replaces a model
        trial = ModelStore(Path(tmp)).write_slot(bundle)
        result = check_model(trial.model, trial.card)
        if not result["ok"]:
            raise BundleError(f"golden test failed with {result.get('runtime')}: "
                              f"{result.get('error')}")
        store.audit("golden test ok", version=bundle.version, runtime=result["runtime"],
                    max_deviation=result["max_deviation"]["abs"])
        latency = measure_latency_ms(trial.model, trial.card)
        budget = settings.max_latency_ms
        if latency > budget:
            raise BundleError(f"latency {latency:.1f} ms per frame on this unit exceeds "
                              f"update.max_latency_ms {budget:g}")
        store.audit("latency ok", version=bundle.version, p50_ms=round(latency, 3))
    store.write_slot(bundle)
    store.start_trial(bundle.version, window, order_seq)
    store.audit("trial started", version=bundle.version, window_sec=window)
    return (f"model {bundle.version} installed and on trial for {window:g}s "
            f"(golden ok, latency {latency:.1f} ms); the service switches to it without a "
            "restart")


def unit_target(settings: UpdateSettings) -> tuple[str, str]:
    """This unit's target name and fleet, as the image wrote them (empty target when unknown,
    the default fleet when the image names none)."""
    target, fleet = Path(settings.target_file), Path(settings.fleet_file)
    return (target.read_text().strip() if target.is_file() else "",
            fleet.read_text().strip() if fleet.is_file() else DEFAULT_FLEET)


def current_version(store: ModelStore, baked_card: Path) -> str:
    """The version a bundle must be newer than: what runs, or the newest version this unit
    ever confirmed if that is newer (a floor: a rollback does not reopen older bundles)."""
    state = store.state()
    floor = state.get("floor")
    if state.get("current"):
        running = str(state["current"])
        if isinstance(floor, str) and VERSION.fullmatch(floor) and \
                version_key(floor) > version_key(running):
            return floor
        return running
    if isinstance(floor, str) and VERSION.fullmatch(floor):
        return floor
    try:
        version = load_card(baked_card).version
        version_key(version)
        return version
    except Exception:  # the image's model has no numeric version: any bundle is newer
        return "0"


@dataclass(frozen=True)
class UnitUpdates:
    """This unit's update settings, its model slots, and the card of the image's model:
    what every way in (SSH, USB, pull, MQTT) checks a bundle against."""

    settings: UpdateSettings
    store: ModelStore
    baked_card: Path

    @classmethod
    def of(cls, config: AppConfig) -> UnitUpdates:
        return cls(config.update, ModelStore(Path(config.update.dir)),
                   config.card_path or card_path_for(config.model_path))

    def keys(self) -> dict[str, Any]:
        """The keys this unit trusts now: the image's and the seed's, less revoked ones."""
        return trusted_keys(Path(self.settings.keys_dir), self.store.state().get("revoked")
                            or ())

    def apply(self, bundle: Path, allow_rollback: bool = False, order_seq: int = 0,
              window_sec: float | None = None) -> str:
        return apply(bundle, self.store, self.keys(), unit_target(self.settings),
                     current_version(self.store, self.baked_card), self.settings,
                     allow_rollback, order_seq, window_sec)

    def accept_order(self, to: str, payload: bytes) -> dict[str, Any]:
        """An order's fields, once it is signed by a trusted key for this fleet and for `to`
        (this device, or `group/<name>`), and numbered above every order taken before: a
        recorded order is refused when it comes again."""
        head, _, text = payload.partition(b"\n")
        if not head.startswith(ORDER_TAG) or len(head) != len(ORDER_TAG) + 128:
            raise BundleError("not a signed order (`EBORDER1 <signature>` and a newline, "
                              "then the order: made by `invoke send-order`)")
        try:
            signature = bytes.fromhex(head[len(ORDER_TAG):].decode("ascii"))
        except ValueError:
            raise BundleError("order signature: expected 128 hex digits") from None
        order = signed_json(text, signature, self.keys(), "order")
        fleet = unit_target(self.settings)[1]
        if order.get("to") != to or order.get("fleet") != fleet:
            raise BundleError(f"order for {order.get('to')!r} in fleet {order.get('fleet')!r}"
                              f", taken here as {to!r} in fleet {fleet!r}")
        with self.store.changing:
            seq, last = order.get("seq"), self.store.state().get("order_seq") or 0
            if not isinstance(seq, int) or seq <= last:
                raise BundleError(f"order number {seq!r} is not above the last one taken "
                                  f"({last}): a replayed order")
            self.store.remember(order_seq=seq)
        return order

    def check_slot(self, slot: Slot) -> None:
        """BundleError unless the slot still matches what a trusted key signed for it."""
        check_slot(slot.model.parent, self.keys(), *unit_target(self.settings))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgebake-update", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("/etc/edgebake/app.yaml"))
    parser.add_argument("--overrides", type=Path,
                        default=Path("/etc/edgebake/seed-overrides.yaml"),
                        help="the unit's seed overrides, as the service reads them")
    sub = parser.add_subparsers(dest="command", required=True)
    apply_cmd = sub.add_parser("apply", help="check and install a bundle")
    apply_cmd.add_argument("bundle", type=Path)
    apply_cmd.add_argument("--allow-rollback", action="store_true",
                           help="accept a bundle older than the running model")
    sub.add_parser("status", help="what runs, what is on trial, the last audit lines")
    sub.add_parser("rollback", help="go back to the previous model now")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        updates = UnitUpdates.of(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    store = updates.store
    try:
        if args.command == "apply":
            print(updates.apply(args.bundle, args.allow_rollback))
        elif args.command == "rollback":
            now = store.rollback()
            store.audit("rollback", reason="asked", now=now)
            print(f"rolled back; running {now or 'the image model'}")
        else:
            state = store.state()
            lines = store.audit_path.read_text().splitlines()[-5:] \
                if store.audit_path.is_file() else []
            token = kept_page_token(config.http)
            page = {"path": f"/?token={token}"} if token else \
                {"path": "", "why": "no token yet: the service makes one at its first start"}
            print(json.dumps({"state": state, "audit": [json.loads(x) for x in lines],
                              "page": page}, indent=1))
    except (BundleError, ModelError, OSError, ValueError) as exc:
        store.audit("refused", reason=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`invoke rollout`: a signed bundle to a fleet in stages over its MQTT broker, with an error
threshold and an emergency stop (the shape of Eclipse hawkBit's rollouts).

Each stage orders its units one by one (the unit's own topic, the bundle inline or by URL,
the rollout's health window), then waits for every one of them to answer: confirmed after its
window, or refused, rolled back, or silent past the deadline (failed). The next stage starts
only while failures stay within --max-failures; otherwise the rollout stops and the units
not yet ordered are never touched. Only standard MQTT is used (retained messages, QoS 1, a
last will), so any 3.1.1/5 broker does."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgebake_runtime.commands import MAX_INLINE_BYTES

from ..errors import BuildError
from ..fleet import Broker, collect
from ..signing import order_seq, public_key_of, read_private_key, sign_order
from .plan import BundleFacts, parse_stages, read_bundle, stage_ends, unit_list
from .state import UNDECIDED, RolloutState, UnitRecord, default_state_path, load_state
from .watch import UnitAnswers

Say = Callable[[str], None]
PROGRESS_EVERY_SEC = 30.0


@dataclass(frozen=True)
class RolloutRequest:
    bundle: Path
    broker: Broker
    key: Path
    stages: str = "1,10%,50%,100%"
    group: str = ""
    units: str = ""
    max_failures: int = 0
    window_sec: float = 600.0
    deadline_sec: float = 3600.0
    target: str = "pi4"
    url: str = ""  # where units download the bundle; inline in the order when empty
    state_path: Path | None = None
    resume: bool = False
    listen_sec: float = 3.0  # how long retained health messages are gathered for --group

    @property
    def state_file(self) -> Path:
        return self.state_path or default_state_path(self.bundle)


class Rollout:
    def __init__(self, request: RolloutRequest, say: Say = print) -> None:
        self.request = request
        self.say = say
        self.private = read_private_key(request.key)
        public, key_id = public_key_of(self.private)
        self.bundle: BundleFacts = read_bundle(request.bundle, request.target, public, key_id)
        if not request.url and len(self.bundle.data) > MAX_INLINE_BYTES:
            raise BuildError(f"--bundle {request.bundle}: {len(self.bundle.data)} bytes is "
                             f"more than an order carries ({MAX_INLINE_BYTES}); serve it and "
                             "give --url")
        self.state = self._start_or_resume()

    def _start_or_resume(self) -> RolloutState:
        request, path = self.request, self.request.state_file
        if request.resume:
            state = load_state(path)
            if state.bundle_sha256 != self.bundle.sha256:
                raise BuildError(f"--resume: {path} is the rollout of another bundle "
                                 f"({state.bundle_path}, version {state.version}); give that "
                                 "bundle, or --abort that rollout")
            return state
        stages = parse_stages(request.stages)
        if request.max_failures < 0:
            raise BuildError("--max-failures: expected 0 or more")
        if not 0 <= request.window_sec < request.deadline_sec:
            raise BuildError(f"--deadline {request.deadline_sec:g}: expected more seconds than "
                             f"--health-window {request.window_sec:g} (a unit confirms only "
                             "after its window)")
        if path.exists():
            raise BuildError(f"{path}: a rollout of this bundle is on record; --resume it, "
                             "see it with --status, or move the file away")
        devices = unit_list(request.units) if request.units else self._group()
        ends = stage_ends(stages, len(devices))
        records = [UnitRecord(d, next(i for i, end in enumerate(ends) if n < end))
                   for n, d in enumerate(devices)]
        state = RolloutState(self.bundle.sha256, str(request.bundle), self.bundle.version,
                             self.bundle.target, [s.text for s in stages], ends,
                             request.max_failures, request.window_sec, request.deadline_sec,
                             records)
        state.save(path)
        return state

    def _group(self) -> list[str]:
        group = self.request.group
        if not group:
            raise BuildError("expected --group G or --units u1,u2,…")
        seen = collect(self.request.broker, self.request.listen_sec)
        members = sorted(name for name, view in seen.items() if view.group == group)
        if not members:
            raise BuildError(f"--group {group}: no unit of that group has reported to the "
                             f"broker {self.request.broker.host} (units name their group in "
                             "their retained health message)")
        return members

    # --- the stages ----------------------------------------------------------------------
    def run(self) -> RolloutState:
        state = self.state
        if state.phase != "running":
            self.say(f"this rollout is {state.phase}; nothing to do")
            return state
        began = time.monotonic()
        answers = UnitAnswers(self.request.broker)
        try:
            for index, end in enumerate(state.ends):
                members = state.in_stage(index)
                if all(u.outcome not in ("waiting", *UNDECIDED) for u in members):
                    continue  # done before a --resume
                self.say(f"stage {index + 1}/{len(state.ends)} ({state.stages[index]}): "
                         f"{len(members)} unit(s), {end} of {len(state.units)} in all")
                for unit in members:
                    if unit.outcome == "waiting":
                        self._order(answers, unit)
                self._wait(answers, members, f"stage {index + 1}/{len(state.ends)}", began)
                failed = state.count("failed")
                if failed > state.max_failures:
                    state.phase = "stopped"
                    state.note = (f"stopped: {failed} unit(s) failed, more than "
                                  f"--max-failures {state.max_failures}; "
                                  f"{state.count('waiting')} unit(s) left untouched")
                    break
            else:
                state.phase = "done"
                state.note = f"done in {time.monotonic() - began:.0f} s"
        finally:
            state.save(self.request.state_file)
            answers.close()
        return state

    def _order(self, answers: UnitAnswers, unit: UnitRecord) -> None:
        bundle = b"" if self.request.url else self.bundle.data
        order = sign_order(self.private, unit.device, self.bundle.fleet, self.request.url,
                           bundle, window_sec=self.state.window_sec)
        unit.seq = order_seq(order)
        unit.ordered_at = time.time()
        unit.outcome = "ordered"
        self.state.save(self.request.state_file)  # an order on record before it is sent
        if not answers.send(unit.device, order):
            raise BuildError(f"the broker did not take the order for {unit.device} in 30 s; "
                             "--resume once it answers")

    def _wait(self, answers: UnitAnswers, members: list[UnitRecord], what: str,
              began: float, judge: Callable[[UnitRecord, dict[str, Any]], None] | None = None
              ) -> None:
        """Until every member has its verdict (or its deadline passed), saying how far."""
        judge = judge or self._judge
        shown, last_shown = "", 0.0
        while True:
            for unit in members:
                if unit.outcome in UNDECIDED:
                    answer = answers.answer(unit.device, unit.seq)
                    if answer is not None:
                        judge(unit, answer)
                    if unit.outcome in UNDECIDED and \
                            time.time() - unit.ordered_at > self.state.deadline_sec:
                        link = answers.link(unit.device)
                        self._decide(unit, "failed", f"no verdict in "
                                     f"{self.state.deadline_sec:g} s" +
                                     (" (offline)" if link == "offline" else ""))
            undecided = sum(u.outcome in UNDECIDED for u in members)
            line = (f"      {what}: {len(members) - undecided}/{len(members)} decided, "
                    f"{sum(u.outcome == 'confirmed' for u in members)} confirmed, "
                    f"{sum(u.outcome == 'failed' for u in members)} failed, "
                    f"{sum(u.outcome == 'trial' for u in members)} on trial")
            now = time.monotonic()
            if line != shown or now - last_shown > PROGRESS_EVERY_SEC:
                self.say(f"{line} ({now - began:.0f} s)")
                shown, last_shown = line, now
            if not undecided:
                return
            time.sleep(0.3)

    def _judge(self, unit: UnitRecord, answer: dict[str, Any]) -> None:
        step, detail = str(answer.get("step")), str(answer.get("detail", ""))[:300]
        if step == "applied" and unit.outcome == "ordered":
            unit.outcome = "trial"
            self.state.save(self.request.state_file)
        elif step == "confirmed":
            self._decide(unit, "confirmed", "")
        elif step in ("refused", "error", "rolled-back"):
            self._decide(unit, "failed", f"{step}: {detail}")

    def _decide(self, unit: UnitRecord, outcome: str, reason: str) -> None:
        unit.outcome, unit.reason, unit.decided_at = outcome, reason, time.time()
        self.state.save(self.request.state_file)
        if outcome == "failed":
            self.say(f"      {unit.device} failed: {reason}")

    # --- the emergency stop --------------------------------------------------------------
    def abort(self) -> RolloutState:
        """Order the units that took (or may yet take) the bundle back to their previous
        model; the units never ordered stay untouched."""
        state = self.state
        began = time.monotonic()
        touched = [u for u in state.units if u.outcome in ("confirmed", *UNDECIDED)]
        answers = UnitAnswers(self.request.broker)
        try:
            for unit in touched:
                order = sign_order(self.private, unit.device, self.bundle.fleet,
                                   rollback=state.version)
                unit.seq, unit.ordered_at, unit.outcome = order_seq(order), time.time(), "ordered"
                unit.reason = "abort ordered"
                state.save(self.request.state_file)
                if not answers.send(unit.device, order):
                    raise BuildError(f"the broker did not take the rollback for {unit.device}")
            self._wait(answers, touched, "abort", began, self._judge_abort)
            state.phase = "aborted"
            state.note = (f"aborted: {state.count('rolled-back')} unit(s) rolled back, "
                          f"{state.count('waiting')} never ordered")
        finally:
            state.save(self.request.state_file)
            answers.close()
        return state

    def _judge_abort(self, unit: UnitRecord, answer: dict[str, Any]) -> None:
        step, detail = str(answer.get("step")), str(answer.get("detail", ""))[:300]
        if step == "rolled-back":
            self._decide(unit, "rolled-back", detail)
        elif step in ("refused", "error"):
            self._decide(unit, "failed", f"abort {step}: {detail}")


"""Interpreter threads, and the model's precision, chosen by measurement on the unit itself.

Every camera's interpreter runs at once, with 1, 2 and all cores' worth of threads each, and
the most results per second wins (ties go to fewer threads). Why: XNNPACK's workers spin
while they wait, so with several cameras on few cores fewer threads are often faster, and
only a run on the unit says by how much. Where the image ships other precisions of its model
(`<model>.variants/`, the recipe's `model.variants`: float16, int8 from `convert-model`, each
through its accuracy gate on the host), each that also passes its golden test with this
unit's runtime is measured the same way, and the fastest of all wins (ties go to the model
itself). The choice is kept on /data by model, variants, camera count and cores, so a restart
reuses it and a new model is measured again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_atomic
from .card import CardError, card_path_for, load_card
from .digest import sha256_file
from .interp import load_interpreter
from .selfcheck import check_model

log = logging.getLogger("edgebake.threadtune")

MEASURE_SEC = 1.0  # per candidate, after one warm-up invoke per interpreter
CHILD_TIMEOUT_SEC = 300.0  # loads and runs under QEMU's emulation too
STORE_NAME = "threads.json"
VARIANTS_SUFFIX = ".variants"
# what a variant's card must share with the model's: the unit serves one as the other
SAME_MODEL_KEYS = ("version", "task", "labels")


@dataclass(frozen=True)
class Tuning:
    threads: int  # interpreter threads per camera process
    results_per_sec: dict[str, float]  # the model's, all cameras together, by threads each
    model_sha256: str
    cameras: int
    cores: int
    measured_while_serving: bool = False  # the old model's cameras ran beside the measurement
    measured_at: float = field(default=0.0)
    variant: str = ""  # the chosen variant's name ("" for the model itself)
    variant_path: str = ""  # its file, which the cameras load
    variants: dict[str, dict[str, float]] = field(default_factory=dict)  # results/s by threads
    refused: dict[str, str] = field(default_factory=dict)  # variants left out, and why
    variants_sha256: str = ""  # of the variants' files ("" without any)

    def matches(self, model_sha256: str, variants_sha256: str, cameras: int, cores: int
                ) -> bool:
        return (self.model_sha256, self.variants_sha256, self.cameras, self.cores) == \
            (model_sha256, variants_sha256, cameras, cores)

    def health(self) -> dict[str, Any]:
        shown = {"threads": self.threads, "results_per_sec": self.results_per_sec,
                 "cameras": self.cameras, "cores": self.cores,
                 "model_sha256": self.model_sha256[:16],
                 "measured_while_serving": self.measured_while_serving}
        if self.variants or self.refused:
            shown.update(variant=self.variant or "the model itself", variants=self.variants,
                         refused=self.refused)
        return shown


def candidates(cores: int) -> list[int]:
    """1, 2 and all cores' worth of threads, each at most the cores there are."""
    return sorted({1, min(2, cores), max(1, cores)})


def _zero_input(interpreter: Any) -> tuple[int, Any]:
    detail = interpreter.get_input_details()[0]
    return int(detail["index"]), np.zeros(detail["shape"], dtype=detail["dtype"])


def measure(model: Path, threads: int, cameras: int, seconds: float = MEASURE_SEC) -> float:
    """Results per second of `cameras` interpreters invoking at once (the runtime lets go of
    Python's lock while it invokes, so threads here run as the camera processes would)."""
    interpreters = [load_interpreter(model, num_threads=threads) for _ in range(max(1, cameras))]
    counts = [0] * len(interpreters)
    start = threading.Barrier(len(interpreters) + 1)
    deadline = [0.0]

    def run(slot: int) -> None:
        interpreter = interpreters[slot]
        index, frame = _zero_input(interpreter)
        interpreter.set_tensor(index, frame)
        interpreter.invoke()  # warm-up, not counted
        start.wait()
        while time.monotonic() < deadline[0]:
            interpreter.set_tensor(index, frame)
            interpreter.invoke()
            counts[slot] += 1

    workers = [threading.Thread(target=run, args=(slot,), daemon=True)
               for slot in range(len(interpreters))]
    for worker in workers:
        worker.start()
    began = time.monotonic()
    deadline[0] = began + seconds
    start.wait()
    for worker in workers:
        worker.join()
    return sum(counts) / max(time.monotonic() - began, 1e-6)


def variants_of(model: Path) -> list[Path]:
    """The other precisions of `model` the image ships beside it (`<stem>.variants/*.tflite`,
    each with its card and golden file)."""
    return sorted(p for p in variants_folder(model).glob("*.tflite")
                  if card_path_for(p).is_file())


def variants_folder(model: Path) -> Path:
    """Where the other precisions of `model` are shipped: `<stem>.variants/` beside it."""
    return model.with_name(model.stem + VARIANTS_SUFFIX)


def variant_problem(model: Path, variant: Path) -> str:
    """Why `variant` cannot stand in for `model` ("" when it can): it must be the same model
    (version, task, labels) and pass its golden test with this unit's runtime."""
    try:
        ours, theirs = load_card(card_path_for(model)), load_card(card_path_for(variant))
    except CardError as exc:
        return str(exc)
    for key in SAME_MODEL_KEYS:
        if ours.data.get(key) != theirs.data.get(key):
            return f"its card's {key} differs from the model's"
    try:
        check = check_model(variant, card_path_for(variant))
    except Exception as exc:  # a golden input the interpreter refuses, say
        return f"golden test: {type(exc).__name__}: {exc}"
    return "" if check["ok"] else f"golden test: {check.get('error', 'failed')}"


def _digest_of(paths: list[Path]) -> str:
    listing = "".join(f"{p.name} {sha256_file(p)}\n" for p in paths)
    return hashlib.sha256(listing.encode()).hexdigest() if paths else ""


def read(store: Path) -> Tuning | None:
    try:
        data = json.loads(store.read_text())
        return Tuning(**data)
    except (OSError, ValueError, TypeError):
        return None


def tune(model: Path, cameras: int, cores: int, store: Path | None,
         serving: bool = False, seconds: float = MEASURE_SEC) -> Tuning:
    """The stored choice when it was made quietly for this model, its variants, camera
    count and cores; otherwise a new measurement, stored."""
    digest = sha256_file(model)
    variants = variants_of(model)
    variants_digest = _digest_of(variants)
    known = read(store) if store is not None else None
    if known is not None and known.matches(digest, variants_digest, cameras, cores) and \
            not known.measured_while_serving:
        return known
    rates = {str(n): round(measure(model, n, cameras, seconds), 1) for n in candidates(cores)}
    measured: dict[str, dict[str, float]] = {}
    refused: dict[str, str] = {}
    for variant in variants:
        problem = variant_problem(model, variant)
        if problem:
            refused[variant.stem] = problem[:300]
            log.warning("model variant %s left out: %s", variant.stem, problem)
            continue
        measured[variant.stem] = {str(n): round(measure(variant, n, cameras, seconds), 1)
                                  for n in candidates(cores)}
    # the fastest of all; a tie goes to the model itself, then to fewer threads
    tables = {"": rates, **measured}
    name, threads = max(((name, n) for name, table in tables.items() for n in table),
                        key=lambda o: (tables[o[0]][o[1]], o[0] == "", -int(o[1])))
    files = {v.stem: str(v) for v in variants}
    tuning = Tuning(int(threads), rates, digest, cameras, cores, serving,
                    round(time.time(), 1), name, files.get(name, ""), measured, refused,
                    variants_digest)
    log.info("interpreter threads per camera: %s%s (results/s of %d camera(s) by threads: %s)",
             threads, f", variant {name}" if name else "", cameras, tables[name])
    if store is not None:
        try:
            write_atomic(store, (json.dumps(asdict(tuning), indent=1) + "\n").encode())
        except OSError as exc:  # a full or read-only /data costs the reuse, not the choice
            log.warning("cannot keep the thread choice in %s: %s", store, exc)
    return tuning


def tune_in_child(model: Path, cameras: int, cores: int, store: Path, serving: bool
                  ) -> Tuning:
    """`tune` in a process of its own: the service never loads an interpreter itself (its
    memory stays small), and a model that crashes the runtime cannot take the service down."""
    args = [sys.executable, "-m", "edgebake_runtime.threadtune", str(model), str(cameras),
            str(cores), str(store), "1" if serving else "0"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    try:
        done = subprocess.run(args, capture_output=True, text=True, check=False, env=env,
                              stdin=subprocess.DEVNULL, timeout=CHILD_TIMEOUT_SEC)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"no answer in {CHILD_TIMEOUT_SEC:.0f}s") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        why = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise RuntimeError(why[:300])
    return Tuning(**json.loads(lines[-1]))


def main(argv: list[str]) -> int:
    model, cameras, cores, store, serving = argv
    tuning = tune(Path(model), int(cameras), int(cores), Path(store), serving == "1")
    print(json.dumps(asdict(tuning)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Inference workers: each owns an interpreter and takes the freshest frame from any source."""

from __future__ import annotations

import itertools
import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .card import Card
from .frames import Frame, FrameSignal, LatestFrameQueue, RoundRobin
from .interp import load_interpreter
from .metrics import Metrics
from .postprocess import decoder_for
from .preprocess import Placement, Preprocessor

log = logging.getLogger("edgebake.worker")


# Record ids: unique across restarts and reboots without persisted state, so MQTT receivers
# can drop the duplicates that at-least-once delivery allows.
RUN_ID = secrets.token_hex(6)
RECORD_NUMBERS = itertools.count(1)

class InferenceWorker:
    def __init__(self, index: int, model: Path, card: Card, num_threads: int,
                 queues: dict[str, LatestFrameQueue], signal: FrameSignal,
                 emit: Callable[[dict[str, Any]], None], metrics: Metrics,
                 threshold: float | None, top_k: int, generation: int = 0) -> None:
        self.index = index
        self.generation = generation
        self.card = card
        self.interpreter = load_interpreter(model, num_threads=num_threads)
        details = self.interpreter.get_input_details()[0]
        expected = [int(x) for x in details["shape"]]
        if expected != list(card.inputs[0].shape):
            raise ValueError(f"model input shape {expected} does not match the card's "
                             f"{list(card.inputs[0].shape)}")
        self._input = self.interpreter.tensor(details["index"])
        self._outputs = [d["index"] for d in self.interpreter.get_output_details()]
        self.preprocess = Preprocessor(card)
        self.decode = decoder_for(card)
        self.queues = queues
        self.signal = signal
        self.emit = emit
        self.metrics = metrics
        self.threshold = threshold
        self.top_k = top_k
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.busy_since = 0.0  # monotonic start of the current invoke, 0 when idle
        self.last_done = time.monotonic()
        self.processed = 0
        self._frames = RoundRobin(queues)
        self.handoff: DecodeStage | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"worker-{self.index}",
                                        daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.signal.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        generation = 0
        while not self._stop.is_set():
            frame = self._frames.take()
            if frame is None:
                generation = self.signal.wait(generation, 0.5)
                continue
            if frame.generation != self.generation:
                self.metrics.switch_drops += 1  # prepared for the other model
                continue
            try:
                if self.handoff is None:
                    self.infer(frame)
                else:
                    outputs, placement, seconds = self.run_model(frame.image, frame.placement)
                    self.handoff.submit(self.index, frame, outputs, placement, seconds)
            except Exception as exc:  # a bad frame must not kill the worker
                self.metrics.inference_errors += 1
                log.warning("worker %d: inference failed on %s#%d: %s", self.index,
                            frame.source, frame.seq, exc)

    def run_model(self, image: np.ndarray[Any, Any], placement: Placement | None = None
                  ) -> tuple[list[np.ndarray[Any, Any]], Placement, float]:
        """Fill the input tensor's own buffer, invoke, and copy the outputs out.

        A frame the source thread already turned into an input tensor is copied in once;
        anything else is resized and normalised straight into the buffer.
        """
        started = time.monotonic()
        self.busy_since = started
        try:
            view = self._input()
            if placement is not None and image.shape == view.shape and \
                    image.dtype == view.dtype:
                np.copyto(view, image)
            else:
                filled, placement = self.preprocess(image, out=view)
                del filled
            del view  # invoke() refuses to run while a view of its buffers is alive
            began = time.monotonic()
            self.interpreter.invoke()
            invoke_seconds = time.monotonic() - began
            outputs = [self.interpreter.get_tensor(i) for i in self._outputs]
        finally:
            self.busy_since = 0.0  # a failed invoke is an error, not a stuck worker
        self.last_done = time.monotonic()
        self.processed += 1
        self.metrics.inference.add(invoke_seconds)
        return outputs, placement, invoke_seconds

    def infer(self, frame: Frame) -> dict[str, Any]:
        """Run and decode one frame in this thread (the service hands decoding to a stage)."""
        outputs, placement, invoke_seconds = self.run_model(frame.image, frame.placement)
        return finish(self.card, self.decode, frame, outputs, placement, invoke_seconds,
                      self.index, self.threshold, self.top_k, self.emit, self.metrics)


def finish(card: Card, decode: Any, frame: Frame, outputs: list[np.ndarray[Any, Any]],
           placement: Placement, invoke_seconds: float, worker: int, threshold: float | None,
           top_k: int, emit: Callable[[dict[str, Any]], None], metrics: Metrics
           ) -> dict[str, Any]:
    """Decode the outputs into a result record, hand it to the sinks, and count it."""
    result = decode(card, outputs, placement, threshold, top_k)
    return deliver(card, frame, result, invoke_seconds, worker, emit, metrics)


def deliver(card: Card, frame: Frame, result: dict[str, Any], invoke_seconds: float,
            worker: int, emit: Callable[[dict[str, Any]], None], metrics: Metrics
            ) -> dict[str, Any]:
    """Turn a decoded result into a record with a unique id, hand it to the sinks, count it."""
    done = time.monotonic()
    record = {"id": f"{RUN_ID}-{next(RECORD_NUMBERS)}", "ts": round(frame.wall_time, 3),
              "source": frame.source, "seq": frame.seq,
              "model": card.version, "worker": worker,
              "latency_ms": round((done - frame.captured_at) * 1000, 2),
              "inference_ms": round(invoke_seconds * 1000, 2), **result}
    emit(record)
    metrics.end_to_end.add(done - frame.captured_at)
    metrics.count_result()
    return record


def deliver_encoded(card: Card, frame: Frame, result_json: str, invoke_seconds: float,
                    worker: int, write_line: Callable[[bytes, float], None], metrics: Metrics
                    ) -> None:
    """The same record as `deliver`, for a result a worker process already encoded as JSON:
    its text goes into the journal line as it is, so the service never decodes nor encodes
    a result (on a 2-core unit that CPU is what a second camera needs)."""
    done = time.monotonic()
    write_line(journal_line(card.version, frame, result_json, invoke_seconds,
                            done - frame.captured_at, worker), frame.wall_time)
    metrics.end_to_end.add(done - frame.captured_at)
    metrics.count_result()


def journal_line(version: str, frame: Frame, result_json: str, invoke_seconds: float,
                 latency_seconds: float, worker: int) -> bytes:
    """The record `deliver` writes, built as text around a result already encoded as JSON
    (keys in the same sorted order, so both paths write identical lines)."""
    fields = result_json[1:-1]
    return (f'{{"id":"{RUN_ID}-{next(RECORD_NUMBERS)}",'
            f'"inference_ms":{round(invoke_seconds * 1000, 2)!r},'
            f'"latency_ms":{round(latency_seconds * 1000, 2)!r},'
            f'"model":{_json_text(version)},"seq":{frame.seq},'
            f'"source":{_json_text(frame.source)},"ts":{round(frame.wall_time, 3)!r},'
            f'"worker":{worker}{"," if fields else ""}{fields}}}\n').encode()


@lru_cache(maxsize=256)
def _json_text(value: str) -> str:
    return json.dumps(value)


class DecodeStage:
    """Decodes outputs and writes results in its own thread, so workers only run the model.

    Its queue is bounded: if decoding falls behind, workers wait rather than pile up work.
    """

    def __init__(self, card: Card, emit: Callable[[dict[str, Any]], None], metrics: Metrics,
                 threshold: float | None, top_k: int, depth: int = 32) -> None:
        self.card = card
        self.decode = decoder_for(card)
        self.emit = emit
        self.metrics = metrics
        self.threshold = threshold
        self.top_k = top_k
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="decode", daemon=True)
        self.busy_since = 0.0

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, worker: int, frame: Frame, outputs: list[np.ndarray[Any, Any]],
               placement: Placement, invoke_seconds: float) -> None:
        self._queue.put((worker, frame, outputs, placement, invoke_seconds))

    def pending(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish what is queued, then end the thread."""
        if not self._thread.is_alive():
            return  # never started (a service stopped before it ran), or already ended
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            worker, frame, outputs, placement, invoke_seconds = item
            self.busy_since = time.monotonic()
            try:
                finish(self.card, self.decode, frame, outputs, placement, invoke_seconds, worker,
                       self.threshold, self.top_k, self.emit, self.metrics)
            except Exception as exc:  # a decoding bug must not stop the service
                self.metrics.inference_errors += 1
                log.warning("decoding %s#%d failed: %s", frame.source, frame.seq, exc)
            self.busy_since = 0.0

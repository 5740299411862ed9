"""The camera process's helpers work inside the main thread's invokes, never blocked by it."""

from __future__ import annotations

import threading
import time

from edgebake_runtime.invokeclock import MAX_WAIT_SEC, InvokeClock


def test_a_helper_goes_ahead_when_the_main_thread_is_idle_or_has_time_left() -> None:
    clock = InvokeClock(typical_sec=0.05)
    began = time.monotonic()
    clock.await_window(0.01)  # no invoke running: the main thread waits for a frame
    clock.enter(time.monotonic())
    clock.await_window(0.01)  # 50 ms left, 10 ms asked
    assert time.monotonic() - began < 0.005


def test_work_that_would_outlast_the_invoke_waits_for_the_next_one() -> None:
    clock = InvokeClock(typical_sec=0.004)
    starts: list[float] = []
    done = threading.Event()

    def main_thread() -> None:
        while not done.is_set():
            now = time.monotonic()
            starts.append(now)
            clock.enter(now)
            time.sleep(0.004)  # invoke() releases the GIL
            clock.leave(time.monotonic())
            gap_ends = time.monotonic() + 0.0002
            while time.monotonic() < gap_ends:
                pass  # between two invokes the main thread holds the GIL

    runner = threading.Thread(target=main_thread, daemon=True)
    runner.start()
    try:
        while len(starts) < 3:
            time.sleep(0.001)
        while (left := clock.time_left(time.monotonic())) is None or left > 0.0003:
            time.sleep(0.00005)  # near the end of an invoke
        invoke = clock.began
        clock.await_window(0.0005)
        assert clock.began != invoke, "went ahead with 0.5 ms of work and 0.3 ms left"
        left = clock.time_left(time.monotonic())
        assert left is not None and left >= 0.0005, left
    finally:
        done.set()
        runner.join(1)


def test_an_invoke_that_runs_long_holds_a_helper_for_a_bounded_time() -> None:
    clock = InvokeClock(typical_sec=0.001)
    clock.enter(time.monotonic() - 1.0)  # a second into an invoke typically 1 ms long
    began = time.monotonic()
    clock.await_window(0.0005)
    assert time.monotonic() - began < MAX_WAIT_SEC + 0.02


def test_the_clock_learns_how_long_an_invoke_takes_and_the_gap_between_two() -> None:
    clock = InvokeClock(typical_sec=0.001)
    now = 100.0
    for _ in range(200):
        clock.enter(now)
        now += 0.004
        clock.leave(now)
        now += 0.0002
    assert abs(clock.typical - 0.004) < 0.0001
    assert abs(clock.between - 0.0002) < 0.00002
    assert clock.time_left(now) is None

"""The one timing method both sides use: warm-up calls, then RUNS timed calls (time.perf_counter), in ms."""

import time
from collections.abc import Callable

WARMUP, RUNS = 2, 10


def time_calls(fn: Callable, x) -> list[float]:
    for _ in range(WARMUP):
        fn(x)
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        fn(x)
        times.append(1000 * (time.perf_counter() - t0))
    return times

"""Wall-clock timing of repeated calls, shared by the benchmarks."""

import time


def call_times(function, repeats, warm_up=True):
    """Seconds of each of `repeats` calls of `function`, after one untimed
    call (warm-up and compilation) unless `warm_up` is False, and the last
    call's result."""
    if warm_up:
        function()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return times, result

"""Wall-clock timing of repeated calls, shared by the benchmarks."""

import time


def call_times(function, repeats):
    """Seconds of each of `repeats` calls of `function`, after one untimed
    call (warm-up and compilation), and the last call's result."""
    function()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return times, result

"""Freed host memory kept for reuse: glibc's `malloc` set for training steps.

A training step on a CPU frees and allocates the same large blocks at
every step: XLA's temporary buffer on JAX (282 MB in the peer
configuration's step), torch's retrieved keys and values (32 MiB each).
glibc's `malloc` serves an allocation over its `mmap` threshold (at most
32 MiB; a 32 MiB tensor is just over it with its header) with a fresh
`mmap`, and on a thread other than the main one any allocation over
64 MB, whatever its settings; `free` gives it back with `munmap`. The
next step's allocation then faults in every page again: 72,000 page
faults and 135 ms of kernel time per JAX step on a 2-core machine
(docs/performance.md, "Page faults of the host's allocator").

`keep_freed_memory` has every thread started after it allocate from the
main arena, serves large blocks from the heap and never trims it, so a
freed block is reused as it is. The process keeps its peak memory until
it exits, which a training run does anyway. TensorFlow allocates its
tensors with an allocator of its own (no such faults), and its steps were
1-3% slower with the setting: on TensorFlow, as on a machine without
glibc, nothing is set.
"""

import ctypes
import platform

import keras

# glibc's `mallopt` parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# The largest trim threshold `mallopt` takes (an int): the heap is never
# trimmed in practice.
NEVER_TRIM = 2**31 - 1


def keep_freed_memory():
    """Sets glibc's `malloc` to keep freed memory for reuse, for this
    process, where its C library is glibc.

    Call it before any thread but the main one has allocated (at the start
    of a recipe's `main`, before the backend starts its threads): a thread
    arena that exists by then keeps serving its thread, and glibc hands it
    to later threads too.

    Returns:
        Whether the settings were taken (`False` on TensorFlow or without
        glibc).
    """
    if keras.backend.backend() == "tensorflow" or platform.libc_ver()[0] != "glibc":
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM))
    # A list, not a generator: every setting is made even if one fails.
    return all([mallopt(parameter, value) for parameter, value in settings])


def mallopt(parameter, value):
    """glibc's `mallopt`: whether it took `value` for `parameter`."""
    return ctypes.CDLL(None).mallopt(parameter, value) == 1

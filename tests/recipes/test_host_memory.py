"""`keep_freed_memory`: a large block freed by a backend's thread is
reused without faulting its pages in again."""

import pathlib
import platform
import subprocess
import sys

import keras
import pytest

from recipes import host_memory

ON_GLIBC = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc",
    reason="mallopt and its arenas are glibc's: another C library has no "
    "such settings, and keep_freed_memory makes none there",
)

# A thread of the backend's (not the main one) allocates, fills and frees
# 96 MB three times, as XLA's temporary buffer is at every step: over the
# 64 MB that glibc's thread arenas can serve without `mmap`. Prints the
# page faults of the last two rounds.
ROUNDS = """
import ctypes, resource, sys, threading
import keras
from recipes.host_memory import keep_freed_memory
if sys.argv[1] == "kept":
    keep_freed_memory()
libc = ctypes.CDLL(None)
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: a fault per 4 KiB page
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 96 << 20
def allocate_fill_free():
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)
    libc.free(block)
faults = []
def rounds():
    allocate_fill_free()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    allocate_fill_free()
    allocate_fill_free()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=rounds)
thread.start()
thread.join()
print(faults[0])
"""


def page_faults(mode):
    """Page faults of the last two rounds of `ROUNDS` in a fresh process
    (the setting is the process's, for good)."""
    result = subprocess.run(
        [sys.executable, "-c", ROUNDS, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=pathlib.Path(__file__).parents[2],
    )
    return int(result.stdout.split()[-1])


@ON_GLIBC
def test_freed_block_is_reused_without_page_faults():
    default = page_faults("default")
    kept = page_faults("kept")
    # By default each round maps the block afresh: a fault per page.
    pages = 2 * (96 << 20) // 4096
    assert default >= pages
    if keras.backend.backend() == "tensorflow":
        assert kept >= pages  # left as it was
    else:
        assert kept * 100 <= pages


def recorded_settings(monkeypatch):
    """The `(parameter, value)` of each `mallopt` call, none made."""
    made = []

    def record(parameter, value):
        made.append((parameter, value))
        return True

    monkeypatch.setattr(host_memory, "mallopt", record)
    return made


@ON_GLIBC
def test_one_arena_no_mmap_no_trim_except_on_tensorflow(monkeypatch):
    made = recorded_settings(monkeypatch)
    kept = host_memory.keep_freed_memory()
    if keras.backend.backend() == "tensorflow":
        assert kept is False and made == []
    else:
        assert kept is True
        assert made == [
            (host_memory.M_ARENA_MAX, 1),
            (host_memory.M_MMAP_MAX, 0),
            (host_memory.M_TRIM_THRESHOLD, host_memory.NEVER_TRIM),
        ]


def test_without_glibc_nothing_is_set(monkeypatch):
    made = recorded_settings(monkeypatch)
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert host_memory.keep_freed_memory() is False
    assert made == []

"""What a `ScannMemory` takes from its host: the threads that search its
lanes, and the `scann` package."""

import sys

import pytest

from keras_memtrans import ScannMemory
from keras_memtrans.memory import scann_memory


@pytest.mark.parametrize(
    "cores, processes, threads",
    [
        # Every core of the machine: shared by the host's processes.
        (64, None, 64),
        (64, "2", 32),
        (64, "3", 21),
        # Pinned to fewer (a container, or a launcher that pins each
        # process): those cores are this process's own.
        (8, None, 8),
        (8, "2", 8),
        (1, "4", 1),
    ],
)
def test_search_threads_use_the_cores_this_process_may_run_on(
    monkeypatch, cores, processes, threads
):
    # One of `processes` that torchrun started on a 64-core host.
    monkeypatch.setattr(scann_memory.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(  # also where the platform has no affinity call
        scann_memory.os,
        "sched_getaffinity",
        lambda pid: set(range(cores)),
        raising=False,
    )
    if processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    assert scann_memory.search_thread_count() == threads


@pytest.mark.parametrize("processes", ["0", "two", "-1", "", "\u00b2", "1.5"])
def test_a_bad_local_world_size_is_named(monkeypatch, processes):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
        scann_memory.search_thread_count()


def test_a_scann_that_does_not_import_says_why(monkeypatch):
    # An installed `scann` can fail to import (a TensorFlow it was not
    # built for): the error carries the import's own message.
    monkeypatch.setitem(sys.modules, "scann.scann_ops.py", None)
    with pytest.raises(ImportError, match=r"did not import \(.*halted"):
        ScannMemory(1, 1, 8, 32)

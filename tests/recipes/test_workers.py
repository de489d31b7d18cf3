"""Benchmark workers run in this process for its own backend and in a
worker process otherwise, with the same measurements."""

import subprocess

import keras

from recipes.benchmarks.workers import worker_lines

# `generate`'s worker on the tiny preset: one measurement, whose digest
# is that of its greedy tokens.
GENERATE = ("recipes.benchmarks.generate", "worker")
TINY = ["--presets", "tiny", "--new-tokens", "2", "--repeats", "1", "--worker"]


def test_a_worker_of_this_backend_runs_in_this_process(monkeypatch):
    def no_process(*args, **kwargs):
        raise AssertionError("started a process")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    environment = {"KERAS_BACKEND": keras.backend.backend()}
    (measurement,) = worker_lines(*GENERATE, TINY, environment)
    assert measurement["preset"] == "tiny"


def test_a_worker_process_measures_what_this_process_does():
    backend = keras.backend.backend()
    here = list(worker_lines(*GENERATE, TINY, {"KERAS_BACKEND": backend}))
    # Any other variable makes it a worker process.
    environment = {"KERAS_BACKEND": backend, "PYTHONHASHSEED": "0"}
    there = list(worker_lines(*GENERATE, TINY, environment))
    assert [m["digest"] for m in there] == [m["digest"] for m in here]
    assert [m["preset"] for m in there] == ["tiny"]

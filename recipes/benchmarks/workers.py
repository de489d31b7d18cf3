"""Benchmark workers: one process per backend (Keras picks its backend once
per process), each printing its measurements as JSON lines, or this very
process where it already runs the backend asked for."""

import gc
import importlib
import json
import os
import subprocess
import sys

import keras


def free_previous_model():
    """Frees the model (or memories) a previous measurement of this process
    built before the next is built: unreachable once its measurement
    returned, it is still held by the reference cycles of Keras' layers
    until the garbage collector runs, so the next was built beside it (two
    `paper` models in one process overflowed a 24 GB machine, where either
    alone fits)."""
    gc.collect()


def print_measurements(measurements):
    """A worker's output: each measurement (a dict) as one JSON line, as
    soon as it is made."""
    for measurement in measurements:
        print(json.dumps(measurement), flush=True)


def runs_here(environment):
    """Whether `environment` asks for this process's own backend and
    nothing else: what a worker would then do can run in this process,
    without importing every framework again."""
    return environment == {"KERAS_BACKEND": keras.backend.backend()}


def run_main(module, argv, backend):
    """Runs `python -m module *argv` on `backend`: its `main(argv)` in this
    process where `runs_here`, else in a process of its own (which must
    succeed)."""
    environment = {"KERAS_BACKEND": backend}
    if runs_here(environment):
        importlib.import_module(module).main(argv)
        return
    subprocess.run(
        [sys.executable, "-m", module, *argv],
        env={**os.environ, **environment},
        check=True,
    )


def worker_lines(module, name, argv, environment):
    """Yields the measurements of `module`'s worker for `argv` (its
    `measurements(parse_args(argv))`) as soon as each is made.

    Where `runs_here(environment)`, they are made in this process.
    Otherwise `python -m module *argv` runs with
    `environment` added and its JSON lines are read as it prints them (a
    run stopped early still shows what it measured); a failed worker's
    error is printed."""
    if runs_here(environment):
        worker = importlib.import_module(module)
        yield from worker.measurements(worker.parse_args(argv))
        return
    command = [sys.executable, "-m", module, *argv]
    with subprocess.Popen(
        command,
        env={**os.environ, **environment, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as worker:
        for line in worker.stdout:
            if line[:1] == "{":
                yield json.loads(line)
        errors = worker.stderr.read()
    if worker.returncode != 0:
        print(f"[{name}] failed:\n{errors[-2000:]}", file=sys.stderr)

"""Benchmark workers: one process per backend (Keras picks its backend once
per process), each printing its measurements as JSON lines."""

import json
import os
import subprocess
import sys


def worker_lines(module, name, argv, environment):
    """Yields the JSON lines printed by `python -m module *argv`, run with
    `environment` added, as soon as each is printed (a run stopped early
    still shows what it measured); a failed worker's error is printed."""
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

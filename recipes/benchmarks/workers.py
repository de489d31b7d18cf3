"""Benchmark workers: one process per backend (Keras picks its backend once
per process), each printing its measurements as JSON lines."""

import json
import os
import subprocess
import sys


def worker_lines(module, name, argv, environment):
    """The JSON lines printed by `python -m module *argv` run with
    `environment` added; a failed worker's error is printed and gives `[]`."""
    command = [sys.executable, "-m", module, *argv]
    result = subprocess.run(
        command, env={**os.environ, **environment}, capture_output=True, text=True
    )
    if result.returncode != 0:
        print(f"[{name}] failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return []
    return [json.loads(line) for line in result.stdout.splitlines() if line[:1] == "{"]

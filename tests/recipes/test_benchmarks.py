"""Each benchmark runs at a tiny size and prints its table (benchmarks are
scripts: their timings are never asserted)."""

import re

import keras

from recipes.benchmarks import memory_lookup
from recipes.benchmarks import train_step


def table_rows(text):
    return [line for line in text.splitlines() if re.match(r"\| \d", line)]


def test_memory_lookup_prints_lookup_and_throughput_tables(capsys):
    memory_lookup.main(
        [
            "--memory-sizes",
            "512",
            "--repeats",
            "1",
            "--throughput-sizes",
            "256",
            "--dense-size",
            "64",
        ]
    )
    output = capsys.readouterr().out
    lookup, throughput = table_rows(output)
    assert lookup.startswith("| 512 |")
    assert throughput.startswith("| 256 |")
    assert "GFLOP/s" in output


def test_train_step_times_each_memory_against_none(capsys):
    backend = keras.backend.backend()  # each backend's own run tests its worker
    train_step.main(
        [
            *("--config", "tiny", "--backends", backend),
            *("--memories", "none", "64:exact", "--steps", "2", "--warmup", "1"),
        ]
    )
    rows = [row.split("|")[1:3] for row in capsys.readouterr().out.splitlines()]
    cells = [[cell.strip() for cell in row] for row in rows if len(row) == 2]
    assert [backend, "none"] in cells and [backend, "64:exact"] in cells

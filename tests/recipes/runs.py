"""Recipe runs on the `tiny` preset, for the recipe tests, and readers of
what a run wrote (its losses by epoch, its results)."""

import csv
import json

import keras
import pytest

from recipes import checkpointing
from recipes import train

# `tox` runs the tests with `--dist loadgroup`: the tests that read one
# session fixture's run go to one pytest-xdist worker, which makes the run
# once (each worker would otherwise make its own).
COMPARED_RUN = pytest.mark.xdist_group("compared_run")
UNINTERRUPTED_RUN = pytest.mark.xdist_group("uninterrupted_run")

# The recipe's own compile mode, except on TensorFlow, whose XLA compile of
# each step function is most of a tiny run's time there (an 8-step run took
# 12 s with it and 5 s without, alone on this machine). The recipe's XLA
# default on TensorFlow is tested end to end by
# `test_trains_exactly_the_steps_asked_for_across_epochs` and
# `test_the_compiled_training_step_is_traced_once`.
COMPILE_MODE = (
    ("--jit-compile", "false") if keras.backend.backend() == "tensorflow" else ()
)

# Long enough for the longest schedule (8 steps of 2 lanes x 32 tokens) on
# the three training documents; the held-out one is read whole at every
# evaluation, so it is short (an evaluation of 20,000 characters took 11 s
# on torch, most of a tiny run's time).
DOCUMENT_LENGTH = 8_000


def recipe_args(tmp_path, *flags, output="out"):
    """`recipes.train` arguments: the tiny preset for 3 steps on a corpus of
    four documents of `DOCUMENT_LENGTH` characters (made once under
    `tmp_path`), writing to `tmp_path / output`, in `COMPILE_MODE`; later
    `flags` take precedence."""
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        corpus.mkdir()
        source = keras.__file__.rsplit("/", 1)[0] + "/src/ops/numpy.py"
        text = open(source).read()
        for i in range(4):
            document = text[i * DOCUMENT_LENGTH : (i + 1) * DOCUMENT_LENGTH]
            (corpus / f"doc{i}.py").write_text(document)
    return [
        "--preset",
        "tiny",
        "--corpus",
        str(corpus),
        "--steps",
        "3",
        "--output-dir",
        str(tmp_path / output),
        "--verbose",
        "0",
        "--validation-fraction",
        "0.25",
        *COMPILE_MODE,
        *flags,
    ]


def run(tmp_path, *flags, output="out"):
    """Runs `recipes.train` in this process; it must succeed."""
    assert train.main(recipe_args(tmp_path, *flags, output=output)) == 0


class Interrupted(Exception):
    """Stands for a kill right after a checkpoint was written."""


def run_until_checkpoint(tmp_path, monkeypatch, step, *flags, output):
    """Runs `recipes.train` in this process and stops it, as a kill would,
    right after it has written checkpoint `step`."""
    save = checkpointing.save_checkpoint

    def save_then_stop(causal_lm, directory, saved_step, state, processes):
        save(causal_lm, directory, saved_step, state, processes)
        if saved_step == step:
            raise Interrupted

    monkeypatch.setattr(checkpointing, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        train.main(recipe_args(tmp_path, *flags, output=output))
    monkeypatch.setattr(checkpointing, "save_checkpoint", save)


def epoch_losses(output_dir, name="memory"):
    """`{epoch: loss}` of a run's `name` model, from its CSV log."""
    log = output_dir / "training" / name / "log.csv"
    with open(log) as file:
        return {int(row["epoch"]): float(row["loss"]) for row in csv.DictReader(file)}


def results(output_dir):
    """The `results` list of a run's results.json."""
    return json.loads((output_dir / "results.json").read_text())["results"]

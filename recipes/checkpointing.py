"""Runs that survive a kill: atomic files, claimed directories, step
checkpoints with the memories' state, and streams that resume mid-way.

A checkpoint is a directory `checkpoints/step-<k>/` holding

- `model.keras`: weights, optimizer state (its step count included), the
  preprocessor with its tokenizer, and the dropout RNG states;
- `lane_states/`: every lane state `fit` reads (training memories, XL caches,
  carried smeared keys), as `MemorizingTransformerBackbone.save_lane_states`
  writes it;
- `state.json`: the step, the held-out curve so far and the training time.

It is written as `.step-<k>.partial` and renamed when complete; the text
file `checkpoints/latest` then names it (written atomically), and older
checkpoints are deleted. A kill at any moment therefore leaves `latest`
naming a complete checkpoint, or no `latest` at all. The training stream
needs no state of its own: `LaneStreamer(repeat=True)` batch `k` depends
only on `k` and the documents, so it resumes at batch `step`.
"""

import csv
import io
import json
import math
import os
import pathlib
import shutil

import keras

from keras_memtrans.memory import atomic_files
from recipes.processes import SINGLE


def atomic_write(path, data):
    """Writes `data` (str or bytes) to `path` atomically (through
    `keras_memtrans.memory.atomic_files.atomic_write`): readers see the old
    file or the complete new one, whenever the writer is killed."""
    contents = data.encode() if isinstance(data, str) else data
    atomic_files.atomic_write(path, lambda file: file.write(contents))


def claim_directory(path):
    """Creates and returns `path`, or `path-2`, `path-3`, ...: the first that
    did not exist. `mkdir` is atomic, so two runs started at the same moment
    never share a directory."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = path, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")


def truncate_log(path, epochs):
    """Keeps the first `epochs` epochs' rows of the CSV log `path` (a
    `keras.callbacks.CSVLogger`'s, which appends a row per epoch), written
    atomically: a run resumed from the checkpoint of epoch `epochs` logs
    the later ones again. A row a kill cut short is dropped too."""
    path = pathlib.Path(path)
    if not path.exists():
        return
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        fields = reader.fieldnames
        if fields is None:  # no row logged yet
            return
        if "epoch" not in fields:
            raise ValueError(f"{path} is not a log of epochs: no `epoch` column.")
        rows = [
            row
            for row in reader
            if None not in row.values()
            and row["epoch"].isdigit()
            and int(row["epoch"]) < epochs
        ]
    text = io.StringIO()
    writer = csv.DictWriter(text, fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())


def latest_checkpoint(directory):
    """The newest complete checkpoint under `directory/checkpoints`, or None."""
    pointer = pathlib.Path(directory) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    return pointer.parent / pointer.read_text().strip()


def save_checkpoint(causal_lm, directory, step, state, processes=SINGLE):
    """Writes checkpoint `step` of `causal_lm` under `directory/checkpoints`.

    Args:
        causal_lm: the `MemorizingTransformerCausalLM` being trained.
        directory: the run's training directory.
        step: int, the training steps done.
        state: a JSON-serialisable dict saved as `state.json` (with `step`).
        processes: the run's `recipes.processes.Processes`: process 0
            writes the model and the state, each process its own lanes'
            states (in `lane_states/process-<index>` when there are several).
    """
    checkpoints = pathlib.Path(directory) / "checkpoints"
    name = f"step-{step}"
    partial = checkpoints / f".{name}.partial"
    if processes.is_main:
        checkpoints.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # what a killed save left
        partial.mkdir()
        with processes.alone():
            causal_lm.save(partial / "model.keras")
    processes.barrier()
    lane_states = processes.lane_states(partial)
    causal_lm.backbone.save_lane_states(lane_states, training=True)
    processes.barrier()
    if processes.is_main:
        (partial / "state.json").write_text(json.dumps({**state, "step": step}))
        atomic_files.fsync_tree(partial)
        if (checkpoints / name).exists():  # the same step, saved before a kill
            shutil.rmtree(partial)
        else:
            os.rename(partial, checkpoints / name)
        atomic_write(checkpoints / "latest", name)
        for old in checkpoints.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    processes.barrier()


def load_checkpoint(checkpoint, processes=SINGLE):
    """`(causal_lm, state)` of a checkpoint: the compiled model, its training
    lane states restored (this process's lanes, see `save_checkpoint`), and
    the `state.json` dict."""
    checkpoint = pathlib.Path(checkpoint)
    state = json.loads((checkpoint / "state.json").read_text())
    causal_lm = keras.saving.load_model(checkpoint / "model.keras")
    lane_states = processes.lane_states(checkpoint)
    causal_lm.backbone.load_lane_states(lane_states, training=True)
    return causal_lm, state


def finite(causal_lm):
    """Whether every trainable weight and optimizer variable of `causal_lm`
    is finite (the same on every process: data-parallel replicas hold the
    same weights)."""
    variables = list(causal_lm.trainable_weights)
    if causal_lm.optimizer is not None:
        variables += causal_lm.optimizer.variables
    # One bool per variable is read back, not the variable.
    return all(
        bool(keras.ops.convert_to_numpy(keras.ops.all(keras.ops.isfinite(variable))))
        for variable in variables
        if keras.backend.is_float_dtype(variable.dtype)
    )


class StepCheckpoint(keras.callbacks.Callback):
    """Checkpoints at the end of every epoch whose step is a multiple of
    `every` or the last one (epochs are the recipe's reporting intervals).

    Args:
        directory: the run's training directory.
        every: int, steps between checkpoints.
        steps: int, the run's total steps.
        first_step: int, the step `fit` starts at (a resumed run's).
        state: callable taking the epoch's logs and returning the extra
            JSON state to save.
        processes: the run's `recipes.processes.Processes`.
    """

    def __init__(self, directory, every, steps, first_step, state, processes=SINGLE):
        super().__init__()
        self.directory, self.every, self.steps = directory, every, steps
        self.step, self.state, self.processes = first_step, state, processes

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1

    def on_epoch_end(self, epoch, logs=None):
        if self.step % self.every == 0 or self.step >= self.steps:
            # Never a NaN model: the epoch's loss precedes its last update.
            if math.isfinite((logs or {}).get("loss", 0.0)) and finite(self.model):
                state = self.state(logs or {})
                save_checkpoint(
                    self.model, self.directory, self.step, state, self.processes
                )


class StreamFrom(keras.utils.PyDataset):
    """`stream[first_step]`, `stream[first_step + 1]`, ...: an endless stream
    read from a later batch, so that a resumed `fit` continues where the
    interrupted one stopped."""

    def __init__(self, stream, first_step):
        super().__init__()
        self.stream, self.first_step = stream, first_step

    @property
    def num_batches(self):
        return None

    def __getitem__(self, index):
        return self.stream[self.first_step + index]

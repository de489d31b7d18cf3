"""`recipes.train --data-parallel`: on JAX the run on two devices (the forced
host devices of tests/conftest.py) gives the single-device run's losses and
resumes from its checkpoints; TensorFlow and torch, and settings that cannot
work, are refused with the reason before anything is written."""

import json

import keras
import numpy as np
import pytest

from recipes import checkpointing
from recipes import train
from tests.recipes.conftest import RESUMED_SCHEDULE
from tests.recipes.runs import recipe_args
from tests.recipes.runs import run
from tests.recipes.test_train_durability import Interrupted
from tests.recipes.test_train_durability import epoch_losses
from tests.recipes.test_train_durability import results

ON_JAX = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="--data-parallel trains on JAX only (the refusal of the other "
    "backends is tested below)",
)


@ON_JAX
def test_a_data_parallel_run_equals_the_single_device_run(tmp_path):
    per_step = ("--checkpoint-every", "1")  # an epoch, and a logged loss, per step
    run(tmp_path, *per_step, output="one")
    run(tmp_path, *per_step, "--data-parallel", output="two")
    one, two = tmp_path / "one", tmp_path / "two"
    losses = epoch_losses(two)
    assert sorted(losses) == [0, 1, 2]
    np.testing.assert_allclose(
        [losses[step] for step in range(3)],
        [epoch_losses(one)[step] for step in range(3)],
        rtol=1e-5,
    )
    (want,), (got,) = results(one), results(two)
    np.testing.assert_allclose(got["validation_nll"], want["validation_nll"], rtol=1e-5)
    report = json.loads((two / "results.json").read_text())
    assert report["devices"] == 2
    assert json.loads((one / "results.json").read_text())["devices"] == 1


@ON_JAX
def test_a_data_parallel_run_resumes_with_the_same_later_losses(
    tmp_path, monkeypatch, uninterrupted_run
):
    schedule = (*RESUMED_SCHEDULE, "--memory-kind", "exact", "--data-parallel")
    save = checkpointing.save_checkpoint

    def save_then_stop(causal_lm, directory, step, state):
        save(causal_lm, directory, step, state)
        if step == 4:
            raise Interrupted

    monkeypatch.setattr(checkpointing, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        train.main(recipe_args(tmp_path, *schedule, output="parts"))
    monkeypatch.setattr(checkpointing, "save_checkpoint", save)
    assert train.main(["--resume", str(tmp_path / "parts")]) == 0
    parts = tmp_path / "parts"
    assert json.loads((parts / "results.json").read_text())["devices"] == 2
    # Steps 5-8 on two devices, from the checkpoint of step 4 written on two
    # devices: the losses of the uninterrupted run (on one device, which
    # equals a run on two).
    whole = uninterrupted_run("exact")
    np.testing.assert_allclose(
        epoch_losses(parts)[1], epoch_losses(whole)[1], rtol=1e-5
    )
    (want,), (got,) = results(whole), results(parts)
    np.testing.assert_allclose(got["validation_nll"], want["validation_nll"], rtol=1e-5)


def expected_refusal(message):
    """The error `--data-parallel` gives on this backend: TensorFlow and
    torch refuse it whatever the settings, JAX gives `message`."""
    return {
        "tensorflow": "not supported on TensorFlow.*MirroredStrategy",
        "torch": "not supported on torch.*no torch backend",
    }.get(keras.backend.backend(), message)


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            ["--batch-size", "3"],
            r"batch size \(3 lanes\) must divide by the number of devices \(2\)",
        ),
        (["--memory-kind", "scann"], "cannot use --memory-kind scann"),
        ([], None),  # the tiny preset, which JAX trains (above)
    ],
)
def test_impossible_data_parallel_runs_are_refused_before_anything_is_written(
    tmp_path, settings, message
):
    message = expected_refusal(message)
    if message is None:
        pytest.skip("JAX trains the tiny preset with --data-parallel (above)")
    with pytest.raises(ValueError, match=message):
        train.main(recipe_args(tmp_path, *settings, "--data-parallel"))
    assert not (tmp_path / "out").exists()

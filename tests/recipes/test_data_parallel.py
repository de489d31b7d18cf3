"""`recipes.train --data-parallel`: on JAX the run on two devices (the forced
host devices of tests/conftest.py) and the run of two JAX processes (hosts),
on torch two `torchrun` processes (gloo), give the single-device run's
losses and memories and resume from their checkpoints; TensorFlow, and
settings that cannot work, are refused with the reason before anything is
written."""

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from recipes import checkpointing
from recipes import train
from tests.recipes.conftest import RESUMED_SCHEDULE
from tests.recipes.runs import UNINTERRUPTED_RUN
from tests.recipes.runs import epoch_losses
from tests.recipes.runs import recipe_args
from tests.recipes.runs import results
from tests.recipes.runs import run
from tests.recipes.runs import run_until_checkpoint

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]
TORCH_ENVIRONMENT = dict(os.environ, OMP_NUM_THREADS="1")
ON_JAX = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution's data parallelism is JAX's (torch's is "
    "tested below, TensorFlow's refusal too)",
)
ON_TORCH = pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="torchrun processes are torch's data parallelism (JAX's is "
    "tested above, TensorFlow's refusal below)",
)


def assert_same_run(parallel, single, rtol):
    """A data-parallel run of 3 steps, one epoch each, on 2 devices (or
    processes) logged the single-device run's per-step losses and reached
    its held-out NLL."""
    losses = epoch_losses(parallel)
    assert sorted(losses) == [0, 1, 2]
    np.testing.assert_allclose(
        [losses[step] for step in range(3)],
        [epoch_losses(single)[step] for step in range(3)],
        rtol=rtol,
    )
    (want,), (got,) = results(single), results(parallel)
    np.testing.assert_allclose(got["validation_nll"], want["validation_nll"], rtol=rtol)
    for output, devices in ((parallel, 2), (single, 1)):
        assert json.loads((output / "results.json").read_text())["devices"] == devices


@ON_JAX
def test_a_data_parallel_run_equals_the_single_device_run(tmp_path):
    per_step = ("--checkpoint-every", "1")  # an epoch, and a logged loss, per step
    run(tmp_path, *per_step, output="one")
    run(tmp_path, *per_step, "--data-parallel", output="two")
    assert_same_run(tmp_path / "two", tmp_path / "one", rtol=1e-5)


@ON_JAX
@UNINTERRUPTED_RUN
def test_a_data_parallel_run_resumes_with_the_same_later_losses(
    tmp_path, monkeypatch, uninterrupted_run
):
    schedule = (*RESUMED_SCHEDULE, "--memory-kind", "exact", "--data-parallel")
    run_until_checkpoint(tmp_path, monkeypatch, 4, *schedule, output="parts")
    assert train.main(["--resume", str(tmp_path / "parts")]) == 0
    # Steps 5-8 on two devices, from the checkpoint of step 4 written on two
    # devices: the losses of the uninterrupted run (on one device, which
    # equals a run on two).
    assert_resumed(tmp_path / "parts", uninterrupted_run("exact"))


def torchrun_command(tmp_path, *flags, output):
    """`recipes.train --data-parallel` on the tiny preset in two torch
    processes on this machine's CPUs (gloo)."""
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        *("--nproc-per-node", "2", "-m", "recipes.train"),
        *recipe_args(tmp_path, *flags, "--data-parallel", output=output),
    ]


def jax_processes(arguments):
    """`(command, environment)` of each of two JAX processes, as on two
    hosts of one device each, running `recipes.train arguments` together:
    Keras' `KERAS_DISTRIBUTION_*` variables join them (gloo on CPUs)."""
    with socket.socket() as probe:  # a free port for the coordinator
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    flags = os.environ.get("XLA_FLAGS", "").split()
    one_device = " ".join(f for f in flags if "device_count" not in f)
    return [
        (
            [sys.executable, "-m", "recipes.train", *arguments],
            dict(
                os.environ,
                KERAS_BACKEND="jax",
                XLA_FLAGS=one_device,
                OMP_NUM_THREADS="1",
                KERAS_DISTRIBUTION_JOB_ADDRESSES=f"localhost:{port}",
                KERAS_DISTRIBUTION_NUM_PROCESSES="2",
                KERAS_DISTRIBUTION_PROCESS_ID=str(index),
            ),
        )
        for index in range(2)
    ]


def start(processes, log):
    """Starts each `(command, environment)` of `processes`, each in its own
    process group, writing to the file `log`."""
    children = []
    with open(log, "ab") as output:
        for command, environment in processes:
            children.append(
                subprocess.Popen(
                    command,
                    cwd=REPOSITORY,
                    env=environment,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    return children


def succeed(processes, log):
    """Runs `processes` (see `start`) to the end; each must succeed."""
    children = start(processes, log)
    codes = [child.wait(timeout=600) for child in children]
    assert codes == [0] * len(children), log.read_text()[-6000:]


def kill_after_checkpoint(children, output, step, log):
    """Kills `children` (and their processes) once the run in `output` has
    written its checkpoint `step`."""
    latest = output / "training" / "memory" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    try:
        while not (latest.exists() and int(latest.read_text()[5:]) >= step):
            assert all(child.poll() is None for child in children), log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):  # a group that ended
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert not (output / "results.json").exists()


def lane_state_arrays(directory):
    """`{"<block>/<state>/<array>": array}` of a lane-state save directory,
    read from its `.npz` files (`lane_states.json` names the current save)."""
    save = json.loads((directory / "lane_states.json").read_text())["save"]
    arrays = {}
    for path in sorted((directory / save).glob("*/*.npz")):
        with np.load(path) as file:
            for name in file.files:
                arrays[f"{path.parent.name}/{path.stem}/{name}"] = file[name]
    return arrays


def final_lane_states(output, process=None):
    """The lane states of a run's last checkpoint (of one process's lanes)."""
    checkpoint = checkpointing.latest_checkpoint(output / "training" / "memory")
    directory = checkpoint / "lane_states"
    if process is not None:
        directory = directory / f"process-{process}"
    return lane_state_arrays(directory)


def assert_own_lanes(parallel, single):
    """Each of the two processes of the run `parallel` saved, as its lane
    states, its own lane of the single-device run's memories, caches and
    carried keys (each file stores its own batch size: 1 lane)."""
    whole = final_lane_states(single)
    for process in (0, 1):
        own = final_lane_states(parallel, process)
        assert own.keys() == whole.keys()
        for name, array in whole.items():
            if array.ndim and name.split("/")[-1] != "next_slot":
                array = array[process : process + 1]
            elif name.endswith("batch_size"):
                array = array // 2
            if array.dtype.kind == "f":
                np.testing.assert_allclose(own[name], array, atol=1e-5, err_msg=name)
            else:  # positions, masks, sizes, the class name
                np.testing.assert_array_equal(own[name], array, err_msg=name)


def assert_resumed(parts, whole):
    """The run `parts`, killed after step 4 and resumed, logged the later
    losses of the uninterrupted run `whole` and reached its held-out NLL."""
    np.testing.assert_allclose(
        epoch_losses(parts)[1], epoch_losses(whole)[1], rtol=1e-5
    )
    (want,), (got,) = results(whole), results(parts)
    assert got["steps"] == 8
    np.testing.assert_allclose(got["validation_nll"], want["validation_nll"], rtol=1e-5)
    assert json.loads((parts / "results.json").read_text())["devices"] == 2


@ON_JAX
@UNINTERRUPTED_RUN
def test_two_jax_processes_train_as_one_device_and_resume_when_killed(
    tmp_path, uninterrupted_run
):
    schedule = (*RESUMED_SCHEDULE, "--memory-kind", "exact", "--data-parallel")
    parts, log = tmp_path / "parts", tmp_path / "processes.log"
    arguments = recipe_args(tmp_path, *schedule, output="parts")
    kill_after_checkpoint(start(jax_processes(arguments), log), parts, 4, log)
    # Each process restores its own lanes' states from the checkpoint ...
    succeed(jax_processes(["--resume", str(parts)]), log)
    whole = uninterrupted_run("exact")
    assert_resumed(parts, whole)
    # ... and ends with its own lanes of the run on one device: two
    # processes train as one device (their steps before the kill too, or
    # the later losses and memories would differ).
    assert_own_lanes(parts, whole)


@ON_TORCH
@pytest.mark.parametrize("memory_kind", ["exact", "scann"])
def test_two_torch_processes_train_as_one_device(tmp_path, memory_kind):
    # Each process keeps ScaNN searchers of its own lane; an approximate
    # search over other trees than the single process's (its held-out NLL
    # differed by 2e-5 relative) is compared as a resumed ScaNN run is
    # (tests/recipes/test_train_durability.py).
    tolerance = {"exact": 1e-5, "scann": 1e-4}[memory_kind]
    flags = ("--checkpoint-every", "1", "--memory-kind", memory_kind)
    run(tmp_path, *flags, output="one")
    torchrun = [(torchrun_command(tmp_path, *flags, output="two"), TORCH_ENVIRONMENT)]
    succeed(torchrun, tmp_path / "torchrun.log")
    assert_same_run(tmp_path / "two", tmp_path / "one", rtol=tolerance)
    assert_own_lanes(tmp_path / "two", tmp_path / "one")


@ON_TORCH
@UNINTERRUPTED_RUN
def test_a_killed_torch_data_parallel_run_resumes_with_the_same_later_losses(
    tmp_path, uninterrupted_run
):
    schedule = (*RESUMED_SCHEDULE, "--memory-kind", "exact")
    parts, log = tmp_path / "parts", tmp_path / "torchrun.log"
    command = torchrun_command(tmp_path, *schedule, output="parts")
    kill_after_checkpoint(start([(command, TORCH_ENVIRONMENT)], log), parts, 4, log)
    launcher = command[: command.index("recipes.train") + 1]
    succeed([([*launcher, "--resume", str(parts)], TORCH_ENVIRONMENT)], log)
    assert_resumed(parts, uninterrupted_run("exact"))


# Settings `--data-parallel` cannot work with on JAX, and the error naming why.
JAX_REFUSALS = [
    (
        ["--batch-size", "3"],
        r"batch size \(3 lanes\) must divide by the number of devices \(2\)",
    ),
    (["--memory-kind", "scann"], "cannot use --memory-kind scann on JAX"),
    (["--memory-kind", "scann_exact"], "cannot use --memory-kind scann_exact on"),
]
# TensorFlow refuses `--data-parallel` whatever the settings (the tiny
# preset's too); torch outside `torchrun` asks for it.
BACKEND_REFUSALS = {
    "tensorflow": "not supported on TensorFlow.*MirroredStrategy",
    "torch": "launch it with `torchrun --nproc-per-node",
}


def refusals():
    """`(settings, message)` of the runs this backend refuses."""
    backend = keras.backend.backend()
    if backend not in BACKEND_REFUSALS:
        return JAX_REFUSALS
    settings = [flags for flags, _ in JAX_REFUSALS] + [[]]
    return [(flags, BACKEND_REFUSALS[backend]) for flags in settings]


@pytest.mark.parametrize("settings, message", refusals())
def test_impossible_data_parallel_runs_are_refused_before_anything_is_written(
    tmp_path, settings, message
):
    with pytest.raises(ValueError, match=message):
        train.main(recipe_args(tmp_path, *settings, "--data-parallel"))
    assert not (tmp_path / "out").exists()

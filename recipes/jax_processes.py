"""JAX `--data-parallel` over several hosts: one process per host.

`keras.distribution.initialize` joins the processes (from the
`KERAS_DISTRIBUTION_*` variables, or a TPU pod's own environment); then one
`keras.distribution.ModelParallel` spans every process's devices, so the
model, its step and its metrics are global: each process feeds its own
lanes and holds those lanes' state (docs/scaling.md).
"""

import contextlib
import os
import pickle

import keras
import numpy as np

from recipes.processes import Processes

# Keras' variables that launch a JAX run over several processes.
PROCESS_VARIABLES = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
)


def start_jax_processes():
    """Joins the run's processes where the environment names several
    (`PROCESS_VARIABLES`) and returns this process's `Processes`: a
    `JaxProcesses` of several hosts, or `Processes()` for one."""
    import jax

    if any(os.environ.get(name) for name in PROCESS_VARIABLES):
        if not jax.distributed.is_initialized():
            keras.distribution.initialize()
    if jax.process_count() == 1:
        return Processes()
    return JaxProcesses(jax.process_index(), jax.process_count())


def process_major_devices():
    """Every device of the run, those of process 0 first, then process 1's,
    ...: so that each process's lanes are one contiguous block of the
    batch, the block `Processes.lanes` feeds."""
    import jax

    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return [f"{d.platform}:{d.id}" for d in devices]


class JaxProcesses(Processes):
    """The processes (one per host) of a JAX run over several hosts.

    The model and its step are global (`keras.distribution`): each process
    builds the whole model but holds only its devices' lanes of every lane
    state, feeds its own lanes of the stream (`lanes`) and writes those
    lanes' states into a checkpoint (`lane_states`); the gradients and the
    metrics are those of every lane already.

    Args:
        index: int, this process's index (`jax.process_index()`).
        count: int, the number of processes (`jax.process_count()`).
    """

    def barrier(self):
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("recipes")

    def broadcast(self, value):
        from jax.experimental import multihost_utils

        data = np.frombuffer(pickle.dumps(value), np.uint8)
        size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
        buffer = np.zeros(size, np.uint8)
        if self.is_main:
            buffer[:] = data
        return pickle.loads(multihost_utils.broadcast_one_to_all(buffer).tobytes())

    @contextlib.contextmanager
    def alone(self):
        """Outside the run's distribution: a variable made there (Keras'
        `Model.save` makes an optimizer's) would be placed on every
        process's devices, which waits for the other processes."""
        distribution = keras.distribution.distribution()
        keras.distribution.set_distribution(None)
        try:
            yield
        finally:
            keras.distribution.set_distribution(distribution)

"""`--data-parallel`: the recipe's model trained on several devices.

Each device reads some of the lanes, the weights are replicated, and each
device keeps only its own lanes' state (XL caches, carried keys, kNN
memories): nothing about a memory crosses devices, only gradients do.

- JAX: `keras.distribution` runs one step over every visible device, of
  this host or, launched with Keras' `KERAS_DISTRIBUTION_*` variables, of
  every host (`recipes.jax_processes`). The lanes (the input batch) are
  split across the devices and every per-lane state is sharded along its
  lane axis by `MemorizingTransformerBackbone.get_layout_map`. A ScaNN
  memory cannot run there (its searchers are called back on one host), so
  `memory_kind="auto"` picks the in-graph exact memory and `"scann"` is
  refused.
- torch: one process per device, launched by `torchrun`, each with a model
  of `batch_size / processes` lanes (`recipes.torch_processes`): its
  memories, ScaNN's included, hold its own lanes only.
- TensorFlow: refused, with the reason (`TENSORFLOW_REFUSAL`).

docs/scaling.md says how to launch it on TPU VMs and multi-GPU hosts.
"""

import keras

from keras_memtrans.memory.factory import HOST_MEMORY_KINDS
from keras_memtrans.models import MemorizingTransformerBackbone
from recipes.jax_processes import process_major_devices
from recipes.jax_processes import start_jax_processes
from recipes.torch_processes import start_torch_processes

TENSORFLOW_REFUSAL = (
    "--data-parallel is not supported on TensorFlow: Keras' distribution "
    "API is a DTensor prototype there, and under tf.distribute."
    "MirroredStrategy each variable is mirrored, so a lane state written "
    "by each replica keeps one replica's value and loses the other "
    "lanes' (measured: docs/scaling.md). Use KERAS_BACKEND=jax or torch."
)


def start_data_parallel(backbone_config, devices=None):
    """The engine of a `--data-parallel` run, checked before anything runs.

    Args:
        backbone_config: the run's backbone arguments (`batch_size`, the
            global number of lanes, and `memory_options`).
        devices: JAX only: the device names; every device of every process
            by default, process by process.

    Returns:
        `(distribution, processes, config)`: the JAX
        `keras.distribution.ModelParallel` (None on torch), the run's
        `recipes.processes.Processes`, and the backbone arguments of this
        process's model (its share of the lanes on torch).

    Raises:
        ValueError: on TensorFlow, for a ScaNN memory on JAX, on torch
            outside `torchrun`, or where `batch_size` does not divide by
            the number of devices.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        raise ValueError(TENSORFLOW_REFUSAL)
    batch_size = backbone_config["batch_size"]
    if backend == "torch":
        processes = start_torch_processes()
        check_divides(batch_size, processes.count, "processes")
        model_lanes = processes.model_lanes(batch_size)
        return None, processes, dict(backbone_config, batch_size=model_lanes)
    memory_kind = backbone_config["memory_options"].get("memory_kind")
    if backbone_config["memory_layer_indices"] and memory_kind in HOST_MEMORY_KINDS:
        raise ValueError(
            f"--data-parallel cannot use --memory-kind {memory_kind} on JAX: a ScaNN "
            "memory's searchers are called back on one host, which a step "
            "spread over devices does not do correctly. Use --memory-kind "
            "exact or auto (auto picks the in-graph exact memory there)."
        )
    processes = start_jax_processes()
    devices = list(devices or process_major_devices())
    check_divides(batch_size, len(devices), "devices")
    mesh = keras.distribution.DeviceMesh((len(devices),), ["batch"], devices)
    distribution = keras.distribution.ModelParallel(
        layout_map=MemorizingTransformerBackbone.get_layout_map(mesh),
        batch_dim_name="batch",
    )
    # Each process feeds its own lanes (`Processes.lanes`), not a dataset
    # for Keras to shard.
    distribution.auto_shard_dataset = False
    return distribution, processes, backbone_config


def check_divides(batch_size, count, what):
    if batch_size % count:
        raise ValueError(
            f"--data-parallel: the batch size ({batch_size} lanes) must divide "
            f"by the number of {what} ({count}); choose --batch-size as a "
            f"multiple of {count}."
        )

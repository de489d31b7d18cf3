"""`--data-parallel`: the recipe's model trained on every visible device.

On JAX, `keras.distribution` runs one step over all devices: the lanes (the
input batch) are split across them, the weights are replicated, and every
per-lane state (XL caches, carried keys, kNN memories) is sharded along its
lane axis by `MemorizingTransformerBackbone.get_layout_map`, so each device
holds only its own lanes' memory and no memory crosses devices. A ScaNN
memory cannot run there (its searchers are called back on one host), so
`memory_kind="auto"` picks the in-graph exact memory under a distribution
and `"scann"` is refused. docs/scaling.md says how to launch it on TPU VMs,
pod slices and multi-GPU hosts.
"""

import keras

from keras_memtrans.models import MemorizingTransformerBackbone

# Why the other backends refuse `--data-parallel`, in the words they print.
UNSUPPORTED = {
    "tensorflow": (
        "--data-parallel is not supported on TensorFlow: Keras' distribution "
        "API is a DTensor prototype there, and under tf.distribute."
        "MirroredStrategy each variable is mirrored, so a lane state written "
        "by each replica keeps one replica's value and loses the other "
        "lanes' (measured: docs/scaling.md). Use KERAS_BACKEND=jax."
    ),
    "torch": (
        "--data-parallel is not supported on torch yet: Keras' distribution "
        "API has no torch backend, and the recipe's fit has no "
        "DistributedDataParallel path (docs/scaling.md). Use KERAS_BACKEND=jax."
    ),
}


def data_parallel_distribution(backbone_config, devices=None):
    """The `keras.distribution.ModelParallel` of a data-parallel run.

    Args:
        backbone_config: the run's backbone arguments (`batch_size`, the
            global number of lanes, and `memory_options`).
        devices: the device names to use; all visible devices by default.

    Returns:
        A `ModelParallel` over a one-axis mesh `"batch"` of the devices,
        with the backbone's lane-sharding layout map.

    Raises:
        ValueError: on a backend without a supported engine, for a ScaNN
            memory, or where `batch_size` does not divide by the number of
            devices.
    """
    backend = keras.backend.backend()
    if backend in UNSUPPORTED:
        raise ValueError(UNSUPPORTED[backend])
    memory_kind = backbone_config["memory_options"].get("memory_kind")
    if backbone_config["memory_layer_indices"] and memory_kind == "scann":
        raise ValueError(
            "--data-parallel cannot use --memory-kind scann: a ScaNN memory's "
            "searchers are called back on one host, which a step spread over "
            "devices does not do correctly. Use --memory-kind exact or auto "
            "(auto picks the in-graph exact memory under --data-parallel)."
        )
    batch_size = backbone_config["batch_size"]
    devices = list(devices or keras.distribution.list_devices())
    if batch_size % len(devices):
        raise ValueError(
            f"--data-parallel: the batch size ({batch_size} lanes) must divide "
            f"by the number of devices ({len(devices)}); choose --batch-size "
            f"as a multiple of {len(devices)}."
        )
    mesh = keras.distribution.DeviceMesh((len(devices),), ["batch"], devices)
    return keras.distribution.ModelParallel(
        layout_map=MemorizingTransformerBackbone.get_layout_map(mesh),
        batch_dim_name="batch",
    )

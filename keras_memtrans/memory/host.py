"""The one place that knows each backend's host-callback mechanism.

A host memory (`ScannMemory`) keeps its state in NumPy and in ScaNN
searchers on the host. Its methods are called from inside the model's call,
which may run eagerly (torch, TF eager), inside a `tf.function` (TF `fit`)
or inside `jax.jit` (JAX `fit`). `host_call` runs a NumPy function in all
three situations; `approx_top_k` exposes the accelerator-friendly
approximate top-k that `keras.ops` lacks. `scatter_update_variable` and
`slice_update_variable` write entries of a variable in place where
`ops.scatter_update` and `ops.slice_update` would copy it whole; `full_like`
fills a tensor on the device where torch's `ops.full_like` would copy its
value from the host; `on_accelerator` tells a GPU or TPU from the CPU.
`process_rows` and `assign_process_rows` read and write the lanes a process
holds of a state a JAX distribution shards over several processes (hosts).
Backends are imported lazily, inside the function that needs them: nothing
else in the package imports tensorflow, jax or torch.
"""

import keras
import numpy as np
from keras import ops


def host_call_supports_jit():
    """Whether a compiled step can contain `host_call`s.

    JAX runs them inside `jax.jit` through `io_callback`. TensorFlow's
    `tf.numpy_function` works inside `tf.function` but XLA cannot compile
    it, and `torch.compile` would split the step at every call, so a layer
    holding a host memory sets `supports_jit` to this value and
    `Model.compile(jit_compile="auto" or True)` turns XLA off by itself.
    """
    return keras.backend.backend() == "jax"


def distributed_devices():
    """Devices the current `keras.distribution` spreads a step over: 1
    without one.

    A host memory cannot run under a distribution over several devices: on
    JAX its `io_callback`s then saw other arrays than on one device (the
    same steps retrieved other neighbours), and each host would need its
    own devices' lanes only.
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    return int(np.prod(distribution.device_mesh.shape))


def split_across_processes(value):
    """Whether `value` is a JAX array sharded over the devices of several
    processes (a `keras.distribution` over several hosts), of which this
    process holds some rows only."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    return (
        isinstance(value, jax.Array)
        and not value.is_fully_addressable
        and not value.is_fully_replicated
    )


def _process_shards(value):
    """`{first row: shard data}` of this process's shards of `value`, split
    along its first axis (a shard replicated on several local devices
    counted once)."""
    return {
        shard.index[0].indices(value.shape[0])[0]: shard.data
        for shard in value.addressable_shards
    }


def process_row_count(value):
    """The number of rows (lanes) of `value` that this process holds: all
    of them unless `split_across_processes(value)`."""
    if not split_across_processes(value):
        return value.shape[0]
    return sum(data.shape[0] for data in _process_shards(value).values())


def process_rows(value):
    """The rows of `value` this process holds, as one NumPy array: all of
    them, unless the array is split across processes
    (`split_across_processes`): then this process's rows, in order, of an
    array sharded along its first axis (the lanes). A replicated array is
    whole in every process."""
    if keras.backend.backend() == "jax":
        import jax

        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            if value.is_fully_replicated:
                return np.asarray(value.addressable_data(0))
            shards = _process_shards(value)
            return np.concatenate([np.asarray(shards[row]) for row in sorted(shards)])
    return ops.convert_to_numpy(value)


def assign_process_rows(variable, rows):
    """Assigns `rows`, as `process_rows(variable.value)` reads them, to
    `variable`: where the variable is split across processes, each process
    gives its own rows and together they make the whole value; a variable
    replicated over several processes gets the same `rows` from each."""
    value = variable.value
    if keras.backend.backend() == "jax":
        import jax

        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            rows = np.asarray(rows, jax.numpy.dtype(variable.dtype))
            if value.is_fully_replicated:
                whole = jax.device_put(rows, value.sharding)
            else:
                whole = jax.make_array_from_process_local_data(
                    value.sharding, rows, value.shape
                )
            variable.assign(whole)
            return
    variable.assign(ops.convert_to_tensor(rows, variable.dtype))


def on_accelerator():
    """Whether the backend computes on an accelerator (a GPU, including
    Apple's MPS, or a TPU) rather than the CPU: JAX's default backend,
    TensorFlow's logical devices, torch's current Keras device (`False` in
    torch's symbolic build, whose device `meta` holds no data)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        return any(tf.config.list_logical_devices(kind) for kind in ("GPU", "TPU"))
    if backend == "torch":
        import torch
        from keras.src.backend.torch.core import get_device

        return torch.device(get_device()).type not in ("cpu", "meta")
    return False


def in_symbolic_build():
    """Whether the layers run inside Keras' symbolic scope: torch's
    `compute_output_spec` (e.g. `fit`'s symbolic build) runs them on
    tensors without data there (device `meta`), where no state may change.
    Keras has no public test for it."""
    from keras.src.backend.common.symbolic_scope import in_symbolic_scope

    return in_symbolic_scope()


def writes_in_place():
    """Whether a variable's value is its own tensor here: not inside a
    stateless scope (there `assign` records an update) nor a symbolic
    build (there the inputs have no data)."""
    # Keras has no public test for the stateless scope either.
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    return not (in_stateless_scope() or in_symbolic_build())


def full_like(x, value, dtype=None):
    """`ops.full_like(x, value, dtype)`, filled on the device.

    Keras' torch backend turns a Python number into a tensor on the
    device, for `ops.full_like` as for an operand of `ops.where` or
    `ops.maximum`: on a GPU a copy from the host that waits for the device,
    so a step that makes one stalls until the device has caught up. Torch
    fills the tensor on the device instead (`torch.full_like`); elsewhere
    the number is a constant of the compiled step.

    Args:
        x: the tensor whose shape (and dtype, if `dtype` is `None`) to take.
        value: a Python number.
        dtype: the dtype, or `None` for `x`'s.
    """
    if keras.backend.backend() == "torch" and not in_symbolic_build():
        import torch
        from keras.src.backend.torch.core import to_torch_dtype

        x = ops.convert_to_tensor(x)
        return torch.full_like(x, value, dtype=to_torch_dtype(dtype or x.dtype))
    return ops.full_like(x, value, dtype)


def scatter_update_variable(variable, indices, updates):
    """`variable.assign(ops.scatter_update(...))`, in place on torch.

    Torch's `scatter_update` returns a fresh copy of the whole variable
    and `assign` copies it back: for a memory's buffer, two passes over it
    and a fresh allocation of its size (page faults on every segment
    written). Torch writes the entries in place instead, outside a
    stateless or symbolic scope (there `assign` records an update, or the
    inputs have no data). XLA (JAX, TensorFlow with `jit_compile`) writes a
    variable's scatter in place inside a compiled step; TensorFlow's graph
    mode without XLA copies it. The variable must not be autocast (its
    `value` is then the variable's own tensor).

    Args:
        variable: the `keras.Variable` to write.
        indices: int `[entries, rank]`: where each entry goes, as the
            leading indices of the variable.
        updates: `[entries, ...]` in the variable's dtype: the entries.
    """
    if keras.backend.backend() == "torch":
        if writes_in_place():
            import torch

            indices = ops.convert_to_tensor(indices).long()
            with torch.no_grad():
                variable.value.index_put_(
                    tuple(indices.unbind(-1)),
                    ops.convert_to_tensor(updates, variable.dtype),
                )
            return
    variable.assign(ops.scatter_update(variable.value, indices, updates))


def slice_update_variable(variable, start, axis, updates):
    """`variable.assign(ops.slice_update(...))` along one axis, in place on
    torch and TensorFlow.

    Writes `updates` at positions `start` to `start + n - 1` of `axis` (n
    the size of that axis in `updates`, which has the variable's shape
    otherwise). Torch's `slice_update` from a tensor `start` copies the
    whole variable (which `assign` copies back) and runs about thirty
    operations to index it; torch copies the entries in place with one
    `index_copy_` instead, and TensorFlow assigns to a strided slice of
    its variable (its `slice_update` is an XLA operation, slow outside
    XLA, where a CPU step runs), both outside a stateless or symbolic scope
    (see `scatter_update_variable`). JAX's XLA writes a dynamic slice of a
    variable in place inside a compiled step. The variable must not be
    autocast.

    Args:
        variable: the `keras.Variable` to write.
        start: int scalar (a tensor or a Python int): the first position.
        axis: int. The axis written along.
        updates: the entries, in the variable's dtype.
    """
    backend = keras.backend.backend()
    in_place = writes_in_place()
    if backend == "tensorflow" and in_place:
        import tensorflow as tf

        updates = ops.convert_to_tensor(updates, variable.dtype)
        begin = [0] * len(variable.shape)
        end = list(variable.shape)
        begin[axis], end[axis] = start, start + ops.shape(updates)[axis]
        # Not `tf.Variable[...].assign`: its slice reads the whole variable
        # first, which then makes the write copy it.
        tf.raw_ops.ResourceStridedSliceAssign(
            ref=variable.value.handle,
            begin=tf.stack(begin),
            end=tf.stack(end),
            strides=[1] * len(variable.shape),
            value=updates,
        )
        return
    if backend == "torch" and in_place:
        import torch

        updates = ops.convert_to_tensor(updates, variable.dtype)
        # [n]: the positions written (from a Python `start` made on the
        # device, not copied there: see `full_like`)
        if not isinstance(start, int):
            start = ops.convert_to_tensor(start, "int64")
        positions = torch.arange(updates.shape[axis], device=updates.device) + start
        with torch.no_grad():
            variable.value.index_copy_(axis, positions, updates)
        return
    starts = [0] * axis + [start] + [0] * (len(variable.shape) - axis - 1)
    variable.assign(ops.slice_update(variable.value, starts, updates))


def host_call(function, *arrays, result_specs):
    """Runs `function(*numpy_arrays)` on the host, in program order.

    Args:
        function: callable taking NumPy arrays and returning a tuple of
            NumPy arrays matching `result_specs` (an empty tuple for none).
        *arrays: tensors (or NumPy arrays) passed to `function`, without
            gradient.
        result_specs: tuple of `(shape, dtype)` of the results; shapes must
            be static.

    Returns:
        A tuple of tensors of the current backend, one per result spec.
        With no result spec the call still runs, in order, for its side
        effect on host state.
    """
    backend = keras.backend.backend()
    arrays = [ops.stop_gradient(ops.convert_to_tensor(a)) for a in arrays]
    # Every call returns at least one array so that no backend treats it as
    # a no-op: a dummy int32 scalar is appended and dropped afterwards.
    specs = (*result_specs, ((), "int32"))

    def wrapped(*numpy_arrays):
        results = function(*(np.asarray(a) for a in numpy_arrays))
        results = (*results, np.zeros((), "int32"))
        return tuple(
            np.asarray(result, dtype=dtype).reshape(shape)  # the declared shape
            for result, (shape, dtype) in zip(results, specs)
        )

    if backend == "jax":
        import jax
        from jax.experimental import io_callback

        # Ordered io_callback: reset, search and append touch host state, so
        # they must run once each, in program order (pure_callback may be
        # reordered, deduplicated or dropped).
        results = io_callback(
            wrapped,
            tuple(jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in specs),
            *arrays,
            ordered=True,
        )
    elif backend == "tensorflow":
        import tensorflow as tf

        # Stateful numpy_function: automatic control dependencies keep the
        # calls in program order inside tf.function.
        results = tf.numpy_function(
            wrapped, arrays, [tf.as_dtype(dtype) for _, dtype in specs], stateful=True
        )
        if not isinstance(results, (list, tuple)):
            results = [results]
        for result, (shape, _) in zip(results, specs):
            result.set_shape(shape)
    else:
        # Host state must not change in a symbolic build: shape-only zeros
        # are returned instead.
        if in_symbolic_build():
            results = [np.zeros(shape, dtype) for shape, dtype in specs]
        else:
            results = wrapped(*(ops.convert_to_numpy(a) for a in arrays))
        # Without the dummy: on a GPU each tensor made from a NumPy array is
        # a copy from the host that waits for the device.
        return tuple(ops.convert_to_tensor(result) for result in results[:-1])
    return tuple(results[:-1])


def approx_top_k(scores, k, recall_target=0.95):
    """Top-`k` over the last axis, approximate where the backend offers it.

    JAX uses `jax.lax.approx_max_k` and TensorFlow `tf.math.approx_max_k`,
    which are fast on TPU; on CPU and GPU both fall back to an exact top-k,
    so results equal `ops.top_k`. Other backends use the exact
    `ops.top_k(sorted=False)`.

    Args:
        scores: `[..., n]` float tensor.
        k: int, number of entries to keep.
        recall_target: float in `(0, 1]`, the expected fraction of the true
            top-`k` returned (on TPU).

    Returns:
        `(values, indices)`, each `[..., k]`, in no particular order.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.lax.approx_max_k(scores, k, recall_target=recall_target)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.math.approx_max_k(scores, k, recall_target=recall_target)
    return ops.top_k(scores, k, sorted=False)

import concurrent.futures
import functools
import importlib.util
import math
import os

import keras
import numpy as np
from keras import ops

from keras_memtrans.memory.host import distributed_devices
from keras_memtrans.memory.host import host_call
from keras_memtrans.memory.host import host_call_supports_jit
from keras_memtrans.memory.knn_memory import KNNMemory
from keras_memtrans.memory.ring_buffer import RingBuffer
from keras_memtrans.memory.ring_buffer import emptied_non_finite
from keras_memtrans.memory.scann_lane_index import ScannLaneIndex
from keras_memtrans.memory.scann_lane_index import min_index_entries
from keras_memtrans.validation import check_positive_ints


def search_thread_count():
    """The threads this process searches lanes with: one per core it may
    run on (its CPU affinity, not the machine's count). Where it may run on
    every core of the machine, they are shared with the other processes a
    launcher started on the host (`LOCAL_WORLD_SIZE`, which `torchrun`
    sets); a process pinned to fewer cores has them to itself."""
    machine = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = machine
    processes = os.environ.get("LOCAL_WORLD_SIZE", "1")
    if not (processes.isascii() and processes.isdecimal()) or int(processes) < 1:
        raise ValueError(
            "LOCAL_WORLD_SIZE (the processes on this host) must be a "
            f"positive integer, got {processes!r}."
        )
    if cores < machine:
        return cores
    return max(1, cores // int(processes))


@functools.cache
def search_threads():
    """The threads that search a memory's lanes (`search_thread_count`)."""
    return concurrent.futures.ThreadPoolExecutor(search_thread_count())


def scann_installed():
    """Whether the `scann` package is installed (without importing it)."""
    return importlib.util.find_spec("scann") is not None


def _import_scann():
    try:
        from scann.scann_ops.py import scann_ops_pybind
    except ImportError as error:
        raise ImportError(
            f"ScannMemory needs the `scann` package, which did not import "
            f"({error}): `pip install keras-memtrans[scann]` (scann 1.4.2 "
            "needs TensorFlow 2.20)."
        ) from error
    return scann_ops_pybind


# The kinds of ScaNN searcher a `ScannMemory` keeps per (lane, head).
SEARCHERS = ("tree", "brute_force")


def default_num_leaves(memory_size):
    """A `ScannMemory`'s tree leaves when `num_leaves` is not given: about
    `sqrt(memory_size)`, at most `memory_size // 16` (one at least)."""
    return max(1, min(round(math.sqrt(memory_size)), memory_size // 16))


@keras.saving.register_keras_serializable(package="keras_memtrans")
class ScannMemory(KNNMemory):
    """A host-side `KNNMemory` searched with ScaNN, for large memories.

    The drop-in large-memory counterpart of `ExactMemory` (same contract
    and results) with its state in a host NumPy `RingBuffer` and a ScaNN
    searcher per (lane, head): tree partitioning, exact dot products in the
    visited leaves (docs/memory_lookup.md). Methods run through
    `host_call`: eagerly, in `tf.function` and in `jax.jit`; XLA cannot
    compile them, so on TensorFlow and torch `supports_jit = False` turns
    `Model.compile`'s `jit_compile` off.

    Each slot of the ring buffer is a searcher document id. With tree
    searchers (`searcher="tree"`) a lane is searched exactly until it
    holds `memory_size // 2` entries, then indexed: writes upsert their
    slots, padded tokens delete theirs, the trees are rebuilt after
    `memory_size` writes, and a lane left with fewer than
    `max(16, 8 * num_leaves)` entries goes back to exact search
    (`ScannLaneIndex`). With `searcher="brute_force"` every lane with an
    entry has ScaNN's brute-force searchers: the exact top-k, scored with
    SIMD and a fused top-k that never writes the scores out (on a CPU
    faster than the in-graph `ExactMemory`, docs/performance.md). A token
    whose key or value has a non-finite element is stored like a padded
    token (an empty slot that does not advance its lane's document
    position), so ScaNN, which cannot index it, never sees it. The trees
    are seeded by k-means++, so the same writes give the same searchers and
    results. Resetting a lane drops its searchers. `read_only` is read on
    the host when the call runs; `save` stores the searchers too.

    Args:
        batch_size: int. Number of lanes (the fixed batch size).
        num_heads: int. Number of key and value heads held (the attention's
            `num_key_value_heads`).
        head_dim: int. Size of each key and value vector.
        memory_size: int. Number of (key, value) pairs kept per lane and head.
        searcher: `"tree"` (the default: tree partitions, exact scores in
            the visited leaves) or `"brute_force"` (exact search; the tree
            arguments are then unused).
        num_leaves: int. Tree partitions per searcher. Defaults to about
            `sqrt(memory_size)`; `memory_size // 2` must be at least
            `max(16, 8 * num_leaves)`.
        num_leaves_to_search: int. Partitions visited per query. Defaults
            to a quarter of `num_leaves` (at least 1).
        training_sample_size: int. Keys sampled to train the trees.
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> import numpy as np
    >>> memory = ScannMemory(batch_size=2, num_heads=1, head_dim=4,
    ...                      memory_size=64)
    >>> keys = np.eye(4, dtype="float32")[None, :, None, :].repeat(2, axis=0)
    >>> memory.append(keys, keys)
    >>> keys, values, positions = memory.search(keys[:, :1], 2)
    >>> tuple(positions.shape)  # [batch, query, heads, neighbours]
    (2, 1, 1, 2)

    Reference:
        Wu et al., "Memorizing Transformers", ICLR 2022
        (https://arxiv.org/abs/2203.08913); Guo et al., "Accelerating
        Large-Scale Inference with Anisotropic Vector Quantization",
        ICML 2020 (https://arxiv.org/abs/1908.10396).
    """

    def __init__(
        self,
        batch_size,
        num_heads,
        head_dim,
        memory_size,
        searcher="tree",
        num_leaves=None,
        num_leaves_to_search=None,
        training_sample_size=16384,
        **kwargs,
    ):
        devices = distributed_devices()
        if devices > 1:
            raise ValueError(
                f"ScannMemory cannot run under a keras.distribution over "
                f"{devices} devices: its searchers live on one host and are "
                "called back from the step, which the devices' shards of a "
                "data-parallel step do not do correctly. Use "
                "`memory_kind='exact'` (the in-graph memory, sharded by lane); "
                "`memory_kind='auto'` picks it under a distribution."
            )
        super().__init__(batch_size, num_heads, head_dim, memory_size, **kwargs)
        self._scann = _import_scann()
        check_positive_ints(
            num_leaves=num_leaves,
            num_leaves_to_search=num_leaves_to_search,
            training_sample_size=training_sample_size,
            optional=("num_leaves", "num_leaves_to_search"),
        )
        if searcher not in SEARCHERS:
            raise ValueError(
                f"`searcher` must be one of {SEARCHERS}, got {searcher!r}."
            )
        leaves = num_leaves or default_num_leaves(memory_size)
        min_entries = min_index_entries(leaves)
        if searcher == "tree" and memory_size // 2 < min_entries:
            raise ValueError(
                f"`memory_size` ({memory_size}) is too small for {leaves} tree "
                f"leaves: the index is built at memory_size // 2 entries, which "
                f"must be at least max(16, 8 * num_leaves) = {min_entries}."
            )
        self.searcher = searcher
        self.num_leaves = num_leaves
        self.num_leaves_to_search = num_leaves_to_search
        self.training_sample_size = training_sample_size
        self._leaves = leaves
        self._leaves_to_search = min(
            leaves, num_leaves_to_search or max(1, leaves // 4)
        )
        self.supports_jit = host_call_supports_jit()
        self.reset_state()
        self.built = True

    @property
    def keys(self):
        """Slot keys `[batch, heads, memory_size, head_dim]`, as ExactMemory's."""
        return self._buffer.keys.copy()

    @property
    def values(self):
        """Slot values `[batch, heads, memory_size, head_dim]`."""
        return self._buffer.values.copy()

    @property
    def positions(self):
        """Slot document positions `[batch, memory_size]`, as ExactMemory's."""
        return self._buffer.positions.copy()

    @property
    def document_length(self):
        """Tokens of each lane's document so far `[batch]`."""
        return self._buffer.document_length.copy()

    @property
    def indexed_lanes(self):
        """Bool `[batch]`: the lanes searched through ScaNN, not exactly."""
        return np.array([index.indexed for index in self._indexes])

    def build(self, input_shape=None):
        """Nothing to build: the state lives on the host from the start."""
        self.built = True

    def _new_indexes(self):
        return [
            ScannLaneIndex(
                self._scann,
                self.num_heads,
                self.memory_size,
                self._leaves if self.searcher == "tree" else None,
                self._leaves_to_search,
                self.training_sample_size,
            )
            for _ in range(self.batch_size)
        ]

    # Host-side operations on NumPy arrays.

    def _host_reset(self, document_start):
        if self.read_only:
            return ()
        self._buffer.reset(document_start)
        for lane in np.flatnonzero(document_start):
            self._indexes[lane].clear()
        return ()

    def _host_append(self, keys, values, padding_mask):
        if self.read_only:
            return ()
        buffer = self._buffer
        slots = buffer.write(keys, values, padding_mask)
        for lane, index in enumerate(self._indexes):
            index.update(buffer.keys[lane], buffer.positions[lane], slots)
        return ()

    def _host_search(self, queries, num_neighbors):
        buffer = self._buffer
        queries = queries.astype("float32")

        def search_lane(lane):
            return self._indexes[lane].search(
                queries[lane], buffer.keys[lane], buffer.positions[lane], num_neighbors
            )

        # The lanes are searched side by side: ScaNN and NumPy release the GIL.
        slots = np.stack(
            list(search_threads().map(search_lane, range(self.batch_size)))
        )  # [batch, query, heads, k]
        return buffer.gather(slots)

    # Graph-side methods, the KNNMemory contract.

    def reset(self, document_start):
        """Empties the lanes whose `document_start` flag `[batch]` is set."""
        host_call(self._host_reset, ops.cast(document_start, "bool"), result_specs=())

    def search(self, queries, num_neighbors):
        """Top-k inner-product search, as `KNNMemory.search`: approximate
        with trees (exact when `num_leaves_to_search == num_leaves`), exact
        with brute-force searchers. The queries are
        used without gradient.
        """
        self._check_num_neighbors(num_neighbors)
        num_neighbors = int(num_neighbors)
        batch, num_queries = self.batch_size, queries.shape[1]
        shape = (batch, num_queries, self.num_heads, num_neighbors)
        keys, values, positions = host_call(
            lambda q: self._host_search(q, num_neighbors),
            ops.cast(queries, "float32"),
            result_specs=(
                ((*shape, self.head_dim), "float32"),
                ((*shape, self.head_dim), "float32"),
                (shape, "int32"),
            ),
        )
        return (
            ops.cast(keys, self.compute_dtype),
            ops.cast(values, self.compute_dtype),
            positions,
        )

    def append(self, keys, values, padding_mask=None):
        """Writes one segment, as `KNNMemory.append`."""
        if padding_mask is None:
            padding_mask = ops.ones(ops.shape(keys)[:2], dtype="bool")
        host_call(
            self._host_append,
            ops.cast(keys, "float32"),
            ops.cast(values, "float32"),
            ops.cast(padding_mask, "bool"),
            result_specs=(),
        )

    def reset_state(self):
        """Empties every lane and rewinds the ring buffer."""
        self._buffer = RingBuffer(
            self.batch_size, self.num_heads, self.head_dim, self.memory_size
        )
        self._indexes = self._new_indexes()

    def _state_arrays(self):
        arrays = self._buffer.state_arrays()
        for lane, index in enumerate(self._indexes):
            for name, array in index.state_arrays().items():
                arrays[f"index/{lane}/{name}"] = array
        return arrays

    def _restore_state(self, arrays):
        buffer = RingBuffer.from_state(emptied_non_finite(arrays))
        indexes = self._new_indexes()
        for lane, index in enumerate(indexes):
            prefix = f"index/{lane}/"
            index.restore(
                {
                    name[len(prefix) :]: array
                    for name, array in arrays.items()
                    if name.startswith(prefix)
                },
                buffer.keys[lane],
                buffer.positions[lane],
            )
        self._buffer, self._indexes = buffer, indexes

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "searcher": self.searcher,
                "num_leaves": self.num_leaves,
                "num_leaves_to_search": self.num_leaves_to_search,
                "training_sample_size": self.training_sample_size,
            }
        )
        return config

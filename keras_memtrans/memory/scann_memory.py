import math
import os

import keras
import numpy as np
from keras import ops

from keras_memtrans.memory.host import host_call
from keras_memtrans.memory.host import host_call_supports_jit
from keras_memtrans.memory.scann_index import delete_slots
from keras_memtrans.memory.scann_index import exact_top_slots
from keras_memtrans.memory.scann_index import min_index_entries
from keras_memtrans.validation import check_positive_ints


def _import_scann():
    try:
        from scann.scann_ops.py import scann_ops_pybind
    except ImportError as error:
        raise ImportError(
            "ScannMemory needs the `scann` package: "
            "`pip install keras-memtrans[scann]`."
        ) from error
    return scann_ops_pybind


@keras.saving.register_keras_serializable(package="keras_memtrans")
class ScannMemory(keras.layers.Layer):
    """A host-side FIFO (key, value) memory per lane, searched with ScaNN.

    The drop-in large-memory counterpart of `ExactMemory` (same sizes,
    methods and results) with its state in host NumPy arrays and a ScaNN
    searcher per (lane, head): tree partitioning, exact dot products in the
    visited leaves (docs/memory_lookup.md). Methods run through
    `host_call`: eagerly, in `tf.function` and in `jax.jit`; XLA cannot
    compile them, so on TensorFlow and torch `supports_jit = False` turns
    `Model.compile`'s `jit_compile` off.

    Like `ExactMemory`, a ring buffer of `memory_size` slots is shared by
    all lanes and each slot is a searcher document id. A lane is searched
    exactly until it holds `memory_size // 2` entries, then its searchers
    are built from its entries; from then on every write `upsert`s its slot
    in place (the evicted entry is replaced, never returned) and a padded
    token `delete`s it. Once the lane has been rewritten `memory_size` times
    since the build, its trees are rebuilt on the current keys. A lane left
    with fewer than `max(16, 8 * num_leaves)` entries (a finished document
    fed padding) drops its searchers and is searched exactly until it again
    holds `memory_size // 2`: k-means cannot train the trees on so few keys.
    Resetting a lane drops its searchers. While `read_only` is `True` (when
    the host call runs), `reset` and `append` do nothing (`generate()` uses
    it).

    Its contents are not saved with the model: `save_memory(path)` and
    `load_memory(path)` store and restore them to resume a long document.

    Args:
        batch_size: int. Number of lanes (the fixed batch size).
        num_heads: int. Number of attention heads.
        head_dim: int. Size of each key and value vector.
        memory_size: int. Number of (key, value) pairs kept per lane and head.
        num_leaves: int. Tree partitions per searcher. Defaults to about
            `sqrt(memory_size)`; `memory_size // 2` must be at least
            `max(16, 8 * num_leaves)`.
        num_leaves_to_search: int. Partitions visited per query. Defaults
            to an eighth of `num_leaves` (at least 1).
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
        num_leaves=None,
        num_leaves_to_search=None,
        training_sample_size=16384,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._scann = _import_scann()
        check_positive_ints(
            batch_size=batch_size,
            num_heads=num_heads,
            head_dim=head_dim,
            memory_size=memory_size,
            num_leaves=num_leaves,
            num_leaves_to_search=num_leaves_to_search,
            training_sample_size=training_sample_size,
            optional=("num_leaves", "num_leaves_to_search"),
        )
        leaves = num_leaves or max(
            1, min(round(math.sqrt(memory_size)), memory_size // 16)
        )
        self._min_entries = min_index_entries(leaves)
        if memory_size // 2 < self._min_entries:
            raise ValueError(
                f"`memory_size` ({memory_size}) is too small for {leaves} tree "
                f"leaves: the index is built at memory_size // 2 entries, which "
                f"must be at least max(16, 8 * num_leaves) = {self._min_entries}."
            )
        self.batch_size = batch_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.memory_size = memory_size
        self.num_leaves = num_leaves
        self.num_leaves_to_search = num_leaves_to_search
        self.training_sample_size = training_sample_size
        self._leaves = leaves
        self._leaves_to_search = min(
            leaves, num_leaves_to_search or max(1, leaves // 8)
        )
        self.supports_jit = host_call_supports_jit()
        self.read_only = False
        self._clear()
        self.built = True

    @property
    def positions(self):
        """Slot document positions `[memory_size, batch]`, as ExactMemory's."""
        return self._positions.T.copy()

    def build(self, input_shape=None):
        """Nothing to build: the state lives on the host from the start."""
        self.built = True

    def _clear(self):
        lanes, heads, slots = self.batch_size, self.num_heads, self.memory_size
        self._keys = np.zeros((lanes, heads, slots, self.head_dim), "float32")
        self._values = np.zeros_like(self._keys)
        self._positions = np.full((lanes, slots), -1, "int32")
        self._next_slot = 0
        self._document_length = np.zeros((lanes,), "int32")
        self._searchers = [None] * lanes  # per lane: one searcher per head
        self._index_slots = [None] * lanes  # per lane: searcher index -> slot
        self._writes_since_build = np.zeros((lanes,), "int64")

    # Host-side operations on NumPy arrays.

    def _host_reset(self, document_start):
        if self.read_only:
            return ()
        for lane in np.flatnonzero(document_start):
            self._positions[lane] = -1
            self._document_length[lane] = 0
            self._searchers[lane] = None
            self._index_slots[lane] = None
        return ()

    def _build(self, lane):
        slots = np.flatnonzero(self._positions[lane] >= 0)
        self._searchers[lane] = []
        for head in range(self.num_heads):
            keys = self._keys[lane, head, slots]
            builder = self._scann.builder(keys, 1, "dot_product")
            builder = builder.tree(
                num_leaves=self._leaves,
                num_leaves_to_search=self._leaves_to_search,
                training_sample_size=min(len(slots), self.training_sample_size),
            )
            # Exact scores inside the visited leaves: on text keys this beat
            # quantised scoring plus re-ranking in recall and speed alike.
            searcher = builder.score_brute_force().build().searcher
            self._searchers[lane].append(searcher)
        self._index_slots[lane] = slots.astype("int64")
        self._writes_since_build[lane] = 0

    def _update_index(self, lane, slots):
        """Upserts the written `slots` of an indexed lane, deletes padded ones."""
        filled = self._positions[lane, slots] >= 0
        index_slots, slot_index, deleted = delete_slots(
            self._index_slots[lane], slots[~filled], self.memory_size
        )
        written = slots[filled]
        indices = [int(i) if i >= 0 else None for i in slot_index[written]]
        new_slots = written[slot_index[written] < 0]
        for head, searcher in enumerate(self._searchers[lane]):
            if deleted:
                searcher.delete(deleted)
            if len(written):
                searcher.upsert(indices, self._keys[lane, head, written], 1)
        self._index_slots[lane] = np.concatenate([index_slots, new_slots])

    def _host_append(self, keys, values, padding_mask):
        if self.read_only:
            return ()
        segment_length = keys.shape[1]
        slots = (self._next_slot + np.arange(segment_length)) % self.memory_size
        mask = padding_mask.astype(bool)  # [batch, segment]
        positions = self._document_length[:, None] + np.cumsum(mask, axis=1) - 1
        # [batch, segment, heads, dim] -> [batch, heads, segment, dim]
        self._keys[:, :, slots] = np.swapaxes(keys, 1, 2)
        self._values[:, :, slots] = np.swapaxes(values, 1, 2)
        self._positions[:, slots] = np.where(mask, positions, -1)
        self._next_slot = int((self._next_slot + segment_length) % self.memory_size)
        self._document_length += mask.sum(axis=1).astype("int32")
        entries = np.count_nonzero(self._positions >= 0, axis=1)  # [batch]
        for lane in range(self.batch_size):
            if self._searchers[lane] is None:
                if entries[lane] >= self.memory_size // 2:
                    self._build(lane)
            elif entries[lane] < self._min_entries:  # searched exactly
                self._searchers[lane] = self._index_slots[lane] = None
            else:
                self._writes_since_build[lane] += segment_length
                if self._writes_since_build[lane] >= self.memory_size:
                    self._build(lane)
                else:
                    self._update_index(lane, slots)
        return ()

    def _lane_slots(self, lane, queries, num_neighbors):
        """Slots `[query, heads, k]` (-1: none) of one lane's top-k."""
        if self._searchers[lane] is None:
            slots = np.flatnonzero(self._positions[lane] >= 0)
            return exact_top_slots(queries, self._keys[lane], slots, num_neighbors)
        num_queries = queries.shape[0]
        found = np.full((num_queries, self.num_heads, num_neighbors), -1, "int64")
        index_slots = self._index_slots[lane]
        k = min(num_neighbors, len(index_slots))
        for head, searcher in enumerate(self._searchers[lane]):
            indices, _ = searcher.search_batched(
                queries[:, head], k, k, -1, False, 0
            )  # [query, k]
            indices = indices.astype("int64")
            valid = indices < len(index_slots)
            found[:, head, : indices.shape[1]] = np.where(
                valid, index_slots[np.where(valid, indices, 0)], -1
            )
        return found

    def _host_search(self, queries, num_neighbors):
        num_neighbors = int(num_neighbors)
        queries = queries.astype("float32")
        slots = np.stack(
            [
                self._lane_slots(lane, queries[lane], num_neighbors)
                for lane in range(self.batch_size)
            ]
        )  # [batch, query, heads, k]
        lanes = np.arange(self.batch_size)[:, None, None, None]
        heads = np.arange(self.num_heads)[None, None, :, None]
        clipped = np.maximum(slots, 0)
        keys = self._keys[lanes, heads, clipped]  # [batch, query, heads, k, dim]
        values = self._values[lanes, heads, clipped]
        positions = np.where(slots >= 0, self._positions[lanes, clipped], -1)
        return keys, values, positions

    # Graph-side methods, the ExactMemory interface.

    def reset(self, document_start):
        """Empties the lanes whose `document_start` flag `[batch]` is set."""
        host_call(self._host_reset, ops.cast(document_start, "bool"), result_specs=())

    def search(self, queries, num_neighbors):
        """Approximate top-k inner-product search in each lane's own memory.

        Args:
            queries: `[batch, query, heads, head_dim]`, used without gradient.
            num_neighbors: int, `k`, at most `memory_size`.

        Returns:
            `(keys, values, positions)`: the retrieved keys and values
            `[batch, query, heads, k, head_dim]` and the document positions
            of their tokens `[batch, query, heads, k]`, `-1` where a lane
            holds fewer than `k` entries.
        """
        if num_neighbors > self.memory_size:
            raise ValueError(
                f"`num_neighbors` ({num_neighbors}) cannot exceed `memory_size` "
                f"({self.memory_size})."
            )
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
        """Writes one segment; the oldest slots are overwritten (FIFO).

        Args:
            keys: `[batch, segment, heads, head_dim]`, stored without gradient.
            values: `[batch, segment, heads, head_dim]`, stored without
                gradient.
            padding_mask: optional bool `[batch, segment]`; padded tokens
                take a slot but are stored as empty and do not advance the
                lane's document position.
        """
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
        self._clear()

    def save_memory(self, path):
        """Saves the contents to the directory `path` (arrays + searchers)."""
        os.makedirs(path, exist_ok=True)
        indexed = [s is not None for s in self._searchers]
        index_slots = [
            s if s is not None else np.zeros((0,), "int64") for s in self._index_slots
        ]
        np.savez(
            os.path.join(path, "memory.npz"),
            keys=self._keys,
            values=self._values,
            positions=self._positions,
            next_slot=self._next_slot,
            document_length=self._document_length,
            writes_since_build=self._writes_since_build,
            indexed=np.array(indexed),
            **{f"index_slots_{lane}": slots for lane, slots in enumerate(index_slots)},
        )
        for lane, searchers in enumerate(self._searchers):
            for head, searcher in enumerate(searchers or ()):
                directory = os.path.join(path, f"lane_{lane}_head_{head}")
                os.makedirs(directory, exist_ok=True)
                searcher.serialize(directory, True)

    def load_memory(self, path):
        """Restores contents written by `save_memory(path)`."""
        with np.load(os.path.join(path, "memory.npz")) as data:
            if data["keys"].shape != self._keys.shape:
                raise ValueError(
                    f"The saved memory has shape {data['keys'].shape}, this one "
                    f"{self._keys.shape} ([batch, heads, memory_size, head_dim])."
                )
            self._clear()
            self._keys[...] = data["keys"]
            self._values[...] = data["values"]
            self._positions[...] = data["positions"]
            self._next_slot = int(data["next_slot"])
            self._document_length[...] = data["document_length"]
            self._writes_since_build[...] = data["writes_since_build"]
            for lane in np.flatnonzero(data["indexed"]):
                self._index_slots[lane] = data[f"index_slots_{lane}"]
                self._searchers[lane] = [
                    self._scann.load_searcher(
                        os.path.join(path, f"lane_{lane}_head_{head}")
                    ).searcher
                    for head in range(self.num_heads)
                ]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "batch_size": self.batch_size,
                "num_heads": self.num_heads,
                "head_dim": self.head_dim,
                "memory_size": self.memory_size,
                "num_leaves": self.num_leaves,
                "num_leaves_to_search": self.num_leaves_to_search,
                "training_sample_size": self.training_sample_size,
            }
        )
        return config

import numbers

import keras
import ml_dtypes
from keras import ops
from keras.backend import standardize_dtype

from keras_memtrans.memory import host
from keras_memtrans.memory.host import approx_top_k
from keras_memtrans.memory.knn_memory import KNNMemory
from keras_memtrans.memory.ring_buffer import document_lengths_after
from keras_memtrans.memory.ring_buffer import document_positions
from keras_memtrans.memory.ring_buffer import emptied_non_finite
from keras_memtrans.memory.ring_buffer import next_slot_after
from keras_memtrans.memory.ring_buffer import stored_tokens
from keras_memtrans.memory.ring_buffer import written_slots
from keras_memtrans.memory.top_k import group_size_for
from keras_memtrans.memory.top_k import top_k_slots


@keras.saving.register_keras_serializable(package="keras_memtrans")
class ExactMemory(KNNMemory):
    """An in-graph `KNNMemory`: variables of fixed shape, exact top-k.

    The ring buffer of `memory_size` slots shared by all lanes lives in
    non-trainable variables (`keys` and `values`
    `[batch, heads, memory_size, head_dim]` in the layer's compute dtype,
    `positions` `[batch, memory_size]` with `-1` for an empty slot,
    `next_slot` and `document_length` `[batch]`), updated with `assign`
    (a segment's entries in place on torch: `host.scatter_update_variable`),
    so the memory persists across `model.fit` steps on every backend and
    compiles under XLA. Each (lane, head) keeps its slots contiguous: a
    search scores them with one batched matmul, and takes the exact top-k
    in two stages (`top_k.top_k_slots`), never one top-k over every slot. The
    (lane, head)s are searched in blocks of at most `scores_per_block`
    scores (one `ops.map` step each), so that a block's scores are reduced
    to its top-k while they are still in the CPU's caches instead of being
    written whole to memory and read back. A segment is written with one
    scatter of whole `head_dim` rows. Resetting a lane only marks its slots
    empty, so a reset costs `O(memory_size)` integers, not a rewrite of the
    buffer.
    A token whose key or value has a non-finite element is stored like a
    padded token: an empty slot (zero key and value) that does not advance
    its lane's document position, so a NaN or inf never reaches a search.

    `read_only` is read in Python when `reset` or `append` is called: it
    takes effect for the calls made, or traced, while it is set (a function
    traced earlier keeps writing).

    Args:
        batch_size: int. Number of lanes (the fixed batch size).
        num_heads: int. Number of attention heads.
        head_dim: int. Size of each key and value vector.
        memory_size: int. Number of (key, value) pairs kept per lane and head.
        top_k: `"exact"` or `"approx"`: `"approx"` takes the top-k with
            `approx_max_k` on JAX and TensorFlow (fast on TPU, exact on CPU
            and GPU) and exactly on torch.
        recall_target: float. Recall target of `top_k="approx"`.
        scores_per_block: int or `None`. How many scores (queries x slots
            of whole (lane, head)s, one (lane, head) at least) one step of
            the search computes and reduces at a time. The default, 2**21
            (8 MB of float32 scores), made the search 1.15-2x faster at 8K
            on a 2-core CPU (docs/performance.md); `None` scores every lane
            and head at once.
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> import numpy as np
    >>> memory = ExactMemory(batch_size=2, num_heads=1, head_dim=4,
    ...                      memory_size=8)
    >>> memory.build()
    >>> keys = np.eye(4, dtype="float32")[None, :, None, :].repeat(2, axis=0)
    >>> memory.append(keys, keys)
    >>> keys, values, positions = memory.search(keys[:, :1], 2)
    >>> tuple(positions.shape)  # [batch, query, heads, neighbours]
    (2, 1, 1, 2)

    Reference:
        Wu et al., "Memorizing Transformers", ICLR 2022
        (https://arxiv.org/abs/2203.08913).
    """

    def __init__(
        self,
        batch_size,
        num_heads,
        head_dim,
        memory_size,
        top_k="exact",
        recall_target=0.95,
        scores_per_block=2**21,
        **kwargs,
    ):
        super().__init__(batch_size, num_heads, head_dim, memory_size, **kwargs)
        self.top_k = top_k
        self.recall_target = recall_target
        self.scores_per_block = checked_scores_per_block(scores_per_block)

    def build(self, input_shape=None):
        slots = (self.batch_size, self.memory_size)
        vectors = (self.batch_size, self.num_heads, self.memory_size, self.head_dim)
        self.keys = self.add_weight(
            name="keys",
            shape=vectors,
            initializer="zeros",
            dtype=self.compute_dtype,
            trainable=False,
            autocast=False,
        )
        self.values = self.add_weight(
            name="values",
            shape=vectors,
            initializer="zeros",
            dtype=self.compute_dtype,
            trainable=False,
            autocast=False,
        )
        self.positions = self.add_weight(
            name="positions",
            shape=slots,
            initializer=keras.initializers.Constant(-1),
            dtype="int32",
            trainable=False,
            autocast=False,
        )
        self.next_slot = self.add_weight(
            name="next_slot",
            shape=(),
            initializer="zeros",
            dtype="int32",
            trainable=False,
            autocast=False,
        )
        self.document_length = self.add_weight(
            name="document_length",
            shape=(self.batch_size,),
            initializer="zeros",
            dtype="int32",
            trainable=False,
            autocast=False,
        )
        self.built = True

    def reset(self, document_start):
        """Empties the lanes whose `document_start` flag `[batch]` is set."""
        if self.read_only:
            return
        document_start = ops.cast(document_start, "bool")
        self.positions.assign(
            ops.where(document_start[:, None], -1, self.positions.value)
        )
        self.document_length.assign(
            ops.where(document_start, 0, self.document_length.value)
        )

    def search(self, queries, num_neighbors):
        """Exact top-k inner-product search, as `KNNMemory.search`.

        The scan over all slots is not differentiable; gradients reach the
        queries through the retrieved keys, which are gathered afresh (so a
        later write to the memory never alters what backpropagation reads).
        """
        self._check_num_neighbors(num_neighbors)
        queries = ops.convert_to_tensor(queries, self.compute_dtype)
        queries = ops.stop_gradient(queries)
        slots = self._top_slots(queries, num_neighbors)  # [batch, heads, query, k]
        slots = ops.transpose(slots, (0, 2, 1, 3))  # [batch, query, heads, k]
        # Flat index of (lane, head, slot) in the [batch * heads * slots] rows.
        lanes = ops.arange(self.batch_size, dtype="int32")[:, None, None, None]
        heads = ops.arange(self.num_heads, dtype="int32")[None, None, :, None]
        lane_slots = lanes * self.memory_size + slots
        rows = (lanes * self.num_heads + heads) * self.memory_size + slots
        keys, values = (
            # [batch * heads * slots, head_dim] rows, taken at `rows`
            ops.take(ops.reshape(variable.value, (-1, self.head_dim)), rows, axis=0)
            for variable in (self.keys, self.values)
        )  # [batch, query, heads, k, head_dim]
        # [batch * slots] -> [batch, query, heads, k]
        positions = ops.take(ops.reshape(self.positions.value, (-1,)), lane_slots)
        return keys, values, positions

    def _top_slots(self, queries, num_neighbors):
        """The slots `[batch, heads, query, k]` of each query's top-k,
        searched in blocks of (lane, head)s."""
        num_queries = queries.shape[1]
        rows = self.batch_size * self.num_heads
        rows_per_block = self._rows_per_block(num_queries)
        blocks = rows // rows_per_block
        queries = ops.transpose(queries, (0, 2, 1, 3))  # [batch, heads, query, dim]
        # [blocks, rows per block, query, dim]: (lane, head) rows, lane-major
        queries = ops.reshape(queries, (blocks, rows_per_block, -1, self.head_dim))
        keys = ops.reshape(
            self.keys.value, (blocks, rows_per_block, self.memory_size, self.head_dim)
        )  # [blocks, rows per block, slots, dim]
        filled = ops.repeat(self.positions.value >= 0, self.num_heads, axis=0)
        # An empty slot must rank below every filled one, at the cost of one
        # pass over the smaller of a block's keys and its scores. With more
        # queries than `dim + 1`, one more dimension of the score matmul does
        # it: each query gets a 1 there, each key 0 (filled) or half the
        # dtype's lowest value (empty; finite, so that no kernel meets an
        # infinity). Otherwise (one token while generating) each score is
        # capped by +inf (filled) or -inf (empty). Keys are finite and
        # `KNNAttention`'s queries unit vectors, so no score reaches either
        # bound.
        mask_in_matmul = num_queries is not None and num_queries > self.head_dim + 1
        if mask_in_matmul:
            dtype = standardize_dtype(queries.dtype)
            lowest = -0.5 * float(ml_dtypes.finfo(dtype).max)
            empty = ops.cast(ops.where(filled, 0.0, lowest), dtype)  # [rows, slots]
            # [blocks, rows per block, slots, 1]
            empty = ops.reshape(empty, (blocks, rows_per_block, self.memory_size, 1))
            # [blocks, rows per block, query, dim + 1]
            queries = ops.concatenate([queries, ops.ones_like(queries[..., :1])], -1)
        else:
            empty = ops.where(filled, float("inf"), float("-inf"))  # [rows, slots]
            empty = ops.reshape(
                ops.cast(empty, queries.dtype),
                (blocks, rows_per_block, 1, self.memory_size),
            )  # [blocks, rows per block, 1, slots]

        def block_slots(block):
            queries, keys, empty = block
            if mask_in_matmul:
                keys = ops.concatenate([keys, empty], -1)  # [rows, slots, dim + 1]
            scores = ops.einsum("rqd,rmd->rqm", queries, keys)  # [rows, query, slots]
            if not mask_in_matmul:
                scores = ops.minimum(scores, empty)
            if self.top_k == "approx":
                _, slots = approx_top_k(scores, num_neighbors, self.recall_target)
                return ops.cast(slots, "int32")
            group_size = group_size_for(self.memory_size, num_neighbors)
            return top_k_slots(scores, num_neighbors, group_size)  # [rows, query, k]

        if blocks == 1:
            slots = block_slots((queries[0], keys[0], empty[0]))
        else:  # [blocks, rows per block, query, k]
            slots = ops.map(block_slots, (queries, keys, empty))
        return ops.reshape(
            slots, (self.batch_size, self.num_heads, -1, num_neighbors)
        )  # [batch, heads, query, k]

    def _rows_per_block(self, num_queries):
        """The most (lane, head) rows, a divisor of all of them, whose
        scores fit in `scores_per_block` (one at least; all of them when
        it is `None`; one when the query count is unknown)."""
        rows = self.batch_size * self.num_heads
        if self.scores_per_block is None:
            return rows
        if num_queries is None:
            return 1
        most = max(1, self.scores_per_block // (num_queries * self.memory_size))
        return max(d for d in range(1, min(rows, most) + 1) if rows % d == 0)

    def append(self, keys, values, padding_mask=None):
        """Writes one segment, as `KNNMemory.append`."""
        if self.read_only:
            return
        segment_length = keys.shape[1]
        if padding_mask is None:
            padding_mask = ops.ones(ops.shape(keys)[:2], dtype="bool")
        keys, values = (  # in the memory's dtype, where a float16 may overflow
            ops.stop_gradient(ops.convert_to_tensor(update, variable.dtype))
            for update, variable in ((keys, self.keys), (values, self.values))
        )
        # [batch, segment]: padded and non-finite tokens are stored empty
        stored = stored_tokens(keys, values, ops.cast(padding_mask, "bool"), xp=ops)
        mask = ops.cast(stored, "int32")
        document_length = self.document_length.value
        positions = document_positions(document_length, mask, xp=ops)
        next_slot = self.next_slot.value
        following = next_slot_after(next_slot, segment_length, self.memory_size)
        if segment_length > self.memory_size:  # only its last tokens remain
            dropped = segment_length - self.memory_size
            next_slot = (next_slot + dropped) % self.memory_size
            keys, values = keys[:, dropped:], values[:, dropped:]
            stored, positions = stored[:, dropped:], positions[:, dropped:]
        for variable, update in ((self.keys, keys), (self.values, values)):
            update = ops.where(stored[:, :, None, None], update, 0)
            update = ops.transpose(update, (0, 2, 1, 3))  # [batch, heads, seg, dim]
            host.scatter_update_variable(
                variable, *self._ring_entries(update, next_slot)
            )
        host.scatter_update_variable(
            self.positions, *self._ring_entries(positions, next_slot)
        )
        self.next_slot.assign(following)
        self.document_length.assign(
            document_lengths_after(document_length, mask, xp=ops)
        )

    def _ring_entries(self, update, next_slot):
        """`(indices, entries)` that write `update` to the slots from
        `next_slot` on, wrapping around the ring: `ops.scatter_update`'s
        arguments for the buffer of the same layout.

        Args:
            update: keys or values `[batch, heads, seg, dim]`, or positions
                `[batch, seg]`, of at most `memory_size` entries.
            next_slot: int32 scalar, the first slot written.

        Returns:
            int32 `[entries, 3]` (lane, head, slot) or `[entries, 2]` (lane,
            slot), and the entries `[entries, dim]` or `[entries]`.
        """
        vectors = len(update.shape) == 4
        lead = (self.batch_size, self.num_heads) if vectors else (self.batch_size,)
        length = update.shape[len(lead)]
        slots = written_slots(next_slot, length, self.memory_size, xp=ops)
        grids = ops.meshgrid(
            *(ops.arange(size, dtype="int32") for size in lead), slots, indexing="ij"
        )  # each [*lead, seg]
        # [entries, rank]: (lane, head, slot) or (lane, slot) per entry
        indices = ops.reshape(ops.stack(grids, axis=-1), (-1, len(grids)))
        tail = (self.head_dim,) if vectors else ()
        return indices, ops.reshape(update, (-1, *tail))  # [entries, *tail]

    def reset_state(self):
        """Empties every lane and rewinds the ring buffer."""
        for variable in (self.keys, self.values):
            variable.assign(ops.zeros(variable.shape, variable.dtype))
        self.positions.assign(ops.full(self.positions.shape, -1, "int32"))
        self.next_slot.assign(0)
        self.document_length.assign(ops.zeros((self.batch_size,), "int32"))

    def _state_arrays(self):
        if not self.built:
            self.build()
        arrays = {
            name: host.process_rows(getattr(self, name).value)
            for name in ("keys", "values", "positions", "next_slot", "document_length")
        }
        for name in ("keys", "values"):  # [batch, heads, slots, dim]
            arrays[name] = arrays[name].astype("float32")
        return arrays

    def _restore_state(self, arrays):
        if not self.built:
            self.build()
        arrays = emptied_non_finite(arrays)
        for name in ("keys", "values", "positions", "next_slot", "document_length"):
            host.assign_process_rows(getattr(self, name), arrays[name])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "top_k": self.top_k,
                "recall_target": self.recall_target,
                "scores_per_block": self.scores_per_block,
            }
        )
        return config


def checked_scores_per_block(scores_per_block):
    """`scores_per_block` as an int (or `None`); a ValueError unless it is a
    positive integer or `None`."""
    if scores_per_block is None:
        return None
    if (
        isinstance(scores_per_block, bool)
        or not isinstance(scores_per_block, numbers.Integral)
        or scores_per_block < 1
    ):
        raise ValueError(
            "`scores_per_block` must be a positive int or None, "
            f"got {scores_per_block!r}."
        )
    return int(scores_per_block)

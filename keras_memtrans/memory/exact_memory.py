import keras
import numpy as np
from keras import ops

from keras_memtrans.memory import host
from keras_memtrans.memory.block_search import top_slots_in_blocks
from keras_memtrans.memory.knn_memory import KNNMemory
from keras_memtrans.memory.ring_buffer import document_lengths_after
from keras_memtrans.memory.ring_buffer import document_positions
from keras_memtrans.memory.ring_buffer import emptied_non_finite
from keras_memtrans.memory.ring_buffer import next_slot_after
from keras_memtrans.memory.ring_buffer import saved_slots
from keras_memtrans.memory.ring_buffer import stored_tokens
from keras_memtrans.memory.ring_buffer import written_slots
from keras_memtrans.validation import check_positive_ints
from keras_memtrans.validation import check_top_k
from keras_memtrans.validation import checked_scores_per_block


@keras.saving.register_keras_serializable(package="keras_memtrans")
class ExactMemory(KNNMemory):
    """An in-graph `KNNMemory`: variables of fixed shape, exact top-k.

    The ring buffer of `num_slots` slots shared by all lanes lives in
    non-trainable variables (`keys` and `values`
    `[batch, heads, num_slots, head_dim]` in the layer's compute dtype,
    `positions` `[batch, num_slots]` with `-1` for an empty slot,
    `document_length` `[batch]` and the ring's `next_slot`, a scalar
    shared by the lanes), updated with `assign`
    (a segment's entries in place on torch: `host.scatter_update_variable`),
    so the memory persists across `model.fit` steps on every backend and
    compiles under XLA. The ring has `memory_size` slots plus
    `segment_length` spare ones: a search skips the `segment_length` slots
    from `next_slot` on (the oldest, or the segment just written), so it
    always sees the last `memory_size` slots written before them. That lets
    `search_and_append` write a segment before it searches: XLA writes a
    buffer in place only when nothing reads it before the write in the
    same step, and otherwise copies the whole buffer, twice per variable
    (docs/performance.md). Each (lane, head) keeps its slots contiguous: a
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
        num_heads: int. Number of key and value heads held (the attention's
            `num_key_value_heads`).
        head_dim: int. Size of each key and value vector.
        memory_size: int. Number of (key, value) pairs kept per lane and head.
        top_k: `"exact"` or `"approx"`: `"approx"` takes the top-k with
            `approx_max_k` on JAX and TensorFlow (fast on TPU, exact on CPU
            and GPU) and exactly on torch.
        recall_target: float. Recall target of `top_k="approx"`.
        scores_per_block: int, `None` or `"auto"`. How many scores
            (queries x slots of whole (lane, head)s, one (lane, head) at
            least; a (lane, head) far above it is scored in chunks of its
            queries of about this many, see `block_search.queries_per_block`)
            one step of the search computes and reduces at a time. `"auto"`
            (the default) is 2**21 on the CPU (8 MB of float32 scores, which
            made the search 1.15-2x faster at 8K on a 2-core CPU,
            docs/performance.md) and 2**28 on a GPU or TPU
            (`block_search.resolved_scores_per_block`); `None` scores every
            lane and head at once.
        segment_length: int or `None`. The longest segment
            `search_and_append` writes before it searches (the attention
            layer's segment length): the ring's spare slots. `None`: no
            spare slot; `search_and_append` then searches first.
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
        scores_per_block="auto",
        segment_length=None,
        **kwargs,
    ):
        super().__init__(batch_size, num_heads, head_dim, memory_size, **kwargs)
        check_positive_ints(segment_length=segment_length, optional=("segment_length",))
        check_top_k(top_k, recall_target)
        self.top_k = top_k
        self.recall_target = recall_target
        self.scores_per_block = checked_scores_per_block(scores_per_block)
        self.segment_length = segment_length

    @property
    def spare_slots(self):
        """The ring's slots beyond `memory_size`: `segment_length` or 0."""
        return self.segment_length or 0

    @property
    def num_slots(self):
        """The ring's slots per lane: `memory_size + spare_slots`."""
        return self.memory_size + self.spare_slots

    def build(self, input_shape=None):
        slots = (self.batch_size, self.num_slots)
        vectors = (self.batch_size, self.num_heads, self.num_slots, self.head_dim)
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
            ops.where(
                document_start[:, None],
                host.full_like(self.positions.value, -1),
                self.positions.value,
            )
        )
        self.document_length.assign(
            ops.where(
                document_start,
                ops.zeros_like(self.document_length.value),
                self.document_length.value,
            )
        )

    def search(self, queries, num_neighbors):
        """Exact top-k inner-product search, as `KNNMemory.search`.

        The scan over all slots is not differentiable; gradients reach the
        queries through the retrieved keys, which are gathered afresh (so a
        later write to the memory never alters what backpropagation reads).
        """
        return self._search(queries, num_neighbors, self.next_slot.value)

    def search_and_append(
        self, queries, num_neighbors, keys, values, padding_mask=None
    ):
        """`search`, then `append`, as `KNNMemory.search_and_append`.

        A segment of at most `segment_length` tokens is written first, into
        the spare slots, and the search skips them: the same results, with
        the buffers written in place under XLA.
        """
        segment_length = keys.shape[1]
        if (
            self.read_only
            or host.in_symbolic_build()  # torch's build: tensors without data
            or segment_length is None
            or segment_length > self.spare_slots
        ):
            return super().search_and_append(
                queries, num_neighbors, keys, values, padding_mask
            )
        start = ops.copy(self.next_slot.value)  # torch's is written in place
        self.append(keys, values, padding_mask)
        return self._search(queries, num_neighbors, start)

    def _search(self, queries, num_neighbors, skipped_from):
        """The search of the slots outside the `spare_slots` from slot
        `skipped_from` (an int32 scalar) on."""
        self._check_num_neighbors(num_neighbors)
        queries = ops.convert_to_tensor(queries, self.compute_dtype)
        queries = ops.stop_gradient(queries)
        # [batch, slots]: a slot's position where it is searched, else -1
        # (`%`, not `ops.mod`: torch's takes the number as is, `ops.mod`
        # would copy it to the device first, see `host.full_like`)
        skipped = (ops.arange(self.num_slots) - skipped_from) % self.num_slots
        positions = ops.where(
            (skipped >= self.spare_slots)[None, :],
            self.positions.value,
            host.full_like(self.positions.value, -1),
        )
        # [batch, heads, query, k]
        slots = top_slots_in_blocks(
            queries,
            self.keys.value,
            positions >= 0,
            num_neighbors,
            self.scores_per_block,
            self.top_k,
            self.recall_target,
        )
        slots = ops.transpose(slots, (0, 2, 1, 3))  # [batch, query, heads, k]
        # Flat index of (lane, head, slot) in the [batch * heads * slots] rows.
        lanes = ops.arange(self.batch_size, dtype="int32")[:, None, None, None]
        heads = ops.arange(self.num_heads, dtype="int32")[None, None, :, None]
        lane_slots = lanes * self.num_slots + slots
        rows = (lanes * self.num_heads + heads) * self.num_slots + slots
        keys, values = (
            # [batch * heads * slots, head_dim] rows, taken at `rows`
            ops.take(ops.reshape(variable.value, (-1, self.head_dim)), rows, axis=0)
            for variable in (self.keys, self.values)
        )  # [batch, query, heads, k, head_dim]
        # [batch * slots] -> [batch, query, heads, k]
        positions = ops.take(ops.reshape(positions, (-1,)), lane_slots)
        return keys, values, positions

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
        following = next_slot_after(next_slot, segment_length, self.num_slots)
        if segment_length > self.num_slots:  # only its last tokens remain
            dropped = segment_length - self.num_slots
            next_slot = (next_slot + dropped) % self.num_slots
            keys, values = keys[:, dropped:], values[:, dropped:]
            stored, positions = stored[:, dropped:], positions[:, dropped:]
        for variable, update in ((self.keys, keys), (self.values, values)):
            update = ops.where(stored[:, :, None, None], update, ops.zeros_like(update))
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
                `[batch, seg]`, of at most `num_slots` entries.
            next_slot: int32 scalar, the first slot written.

        Returns:
            int32 `[entries, 3]` (lane, head, slot) or `[entries, 2]` (lane,
            slot), and the entries `[entries, dim]` or `[entries]`.
        """
        vectors = len(update.shape) == 4
        lead = (self.batch_size, self.num_heads) if vectors else (self.batch_size,)
        length = update.shape[len(lead)]
        slots = written_slots(next_slot, length, self.num_slots, xp=ops)
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
        # The file holds the `memory_size` slots a search sees, as a ring
        # without spare slots (the same arrays where there are none).
        ring_slots = saved_slots(
            int(arrays["next_slot"]), self.memory_size, self.spare_slots
        )
        arrays["keys"], arrays["values"] = (
            arrays[name][:, :, ring_slots] for name in ("keys", "values")
        )
        arrays["positions"] = arrays["positions"][:, ring_slots]
        arrays["next_slot"] = np.asarray(arrays["next_slot"] % self.memory_size)
        return arrays

    def _restore_state(self, arrays):
        if not self.built:
            self.build()
        arrays = emptied_non_finite(arrays)
        ring_slots = saved_slots(
            int(arrays["next_slot"]), self.memory_size, self.spare_slots
        )
        lanes = arrays["positions"].shape[0]
        ring = {
            "positions": np.full((lanes, self.num_slots), -1, "int32"),
            "next_slot": arrays["next_slot"],
            "document_length": arrays["document_length"],
        }
        ring["positions"][:, ring_slots] = arrays["positions"]
        for name in ("keys", "values"):
            ring[name] = np.zeros(
                (lanes, self.num_heads, self.num_slots, self.head_dim), "float32"
            )
            ring[name][:, :, ring_slots] = arrays[name]
        for name, array in ring.items():
            host.assign_process_rows(getattr(self, name), array)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "top_k": self.top_k,
                "recall_target": self.recall_target,
                "scores_per_block": self.scores_per_block,
                "segment_length": self.segment_length,
            }
        )
        return config

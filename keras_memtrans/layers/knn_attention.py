import inspect

import keras
from keras import ops

from keras_memtrans.layers.attention_functions import masked_softmax
from keras_memtrans.layers.segment_attention import SegmentAttention
from keras_memtrans.memory.factory import check_memory_kind
from keras_memtrans.memory.factory import make_memory
from keras_memtrans.validation import check_positive_ints
from keras_memtrans.validation import check_top_k
from keras_memtrans.validation import checked_scores_per_block


@keras.saving.register_keras_serializable(package="keras_memtrans")
class KNNAttention(SegmentAttention):
    """Causal multi-head attention augmented with a kNN (key, value) memory.

    A `SegmentAttention` that also reads from, and writes to, an external
    memory.

    Every query attends (1) causally to its own segment, optionally prefixed
    by a Transformer-XL cache of the previous segment, with a T5 relative
    position bias, and (2) to its `num_neighbors` nearest (key, value) pairs
    in an external memory of the last `memory_size` tokens of the same
    document. Queries and keys are L2-normalised and scaled by a learned
    per-head factor; the two attentions are mixed by a learned per-head gate
    `g = sigmoid(b)`: `out = g * memory + (1 - g) * local`. A query whose
    lane memory is still empty (the first segment of a document) uses local
    attention alone.

    Within one call the layer (1) empties the memory and cache of lanes
    whose document starts in this segment, (2) attends, then (3) appends
    this segment's keys and values, without gradient, to the memory: a
    segment never retrieves itself.

    Memory is state, kept per batch lane: the batch size is fixed (like a
    stateful RNN) and batch row `b` must carry consecutive segments of one
    document. Training calls (`training=True`, as in `fit`) and inference
    calls (`evaluate`, `predict`, plain calls) use two separate memories,
    so validation never overwrites the training memory. A saved model holds
    the weights only; memories load empty. `reset_state()` empties all.

    Args:
        num_heads: int. Number of attention heads.
        memory_size: int. Tokens kept in memory per lane (FIFO).
        num_neighbors: int. Memory entries each query retrieves (`k`).
        memory_kind: `"exact"` (`ExactMemory`: in-graph ring buffer, exact
            top-k, compiles with XLA), `"scann"` (`ScannMemory`: host
            memory searched with ScaNN's trees; turns `jit_compile` off on
            TensorFlow and torch, runs inside `jax.jit` on JAX),
            `"scann_exact"` (the host memory with ScaNN's brute-force
            searchers: exact; on a CPU under JAX and torch faster than
            `"exact"` from 8K slots in the PyTorch peer's configuration,
            docs/performance.md) or
            `"auto"`:
            `"scann"` from `memory_size >= 32768` (the crossover measured in
            docs/memory_lookup.md) when `scann` is installed, else
            `"exact"` (see `make_memory`).
        top_k: `"exact"` or `"approx"`: the exact memory's top-k;
            `"approx"` uses `approx_max_k` on JAX and TensorFlow (fast on
            TPU; exact on CPU and GPU), exact top-k on torch.
        recall_target: float. Recall target of `top_k="approx"`.
        scores_per_block: int, `None` or `"auto"`. The exact memory's
            search scores whole (lane, head)s in blocks of at most this many
            scores (one (lane, head) at least, in chunks of its queries of
            about this many scores when it holds far more), each reduced to
            its top-k while in the CPU's caches; `"auto"` is a CPU cache's
            size on the CPU and a larger budget on a GPU or TPU, `None`
            scores every lane at once (see `ExactMemory`).
        num_leaves: optional int. Tree partitions of each ScaNN searcher
            (ScaNN memory only; default about `sqrt(memory_size)`).
        num_leaves_to_search: optional int. Partitions a ScaNN search
            visits (ScaNN memory only; default a quarter of `num_leaves`):
            more is slower and finds more of the true top-k.
        **kwargs: the `SegmentAttention` arguments (`head_dim`,
            `num_key_value_heads`: the memory then holds that many heads,
            each searched by its group of query heads; `batch_size`,
            `use_xl_cache`, `num_buckets`, `max_distance`,
            `kernel_initializer`, `smear_keys`, `tie_query_key_init`; with
            `smear_keys` the memory holds the mixed keys) and standard
            `keras.layers.Layer` arguments. The batch size defaults to the
            static batch size of the input (e.g. `keras.Input(...,
            batch_size=8)`).

    Call arguments:
        hidden_states: `[batch, segment, hidden_dim]` layer input.
        document_start: optional bool `[batch]`: `True` where a new document
            starts in this segment, emptying that lane's memory (and cache)
            before it is read. `None` continues every lane.
        padding_mask: optional bool `[batch, segment]`: `False` marks padded
            tokens, which are neither attended to nor stored.
        return_neighbors: bool. Also return the document positions of the
            retrieved memory entries.
        training: bool. Selects the training or the inference memory.

    Returns:
        `[batch, segment, hidden_dim]`; with `return_neighbors=True`, also
        int `[batch, segment, num_heads, num_neighbors]` positions within
        the document of the retrieved tokens (`-1`: no entry).

    Example:
    >>> import numpy as np
    >>> layer = KNNAttention(num_heads=2, memory_size=64, num_neighbors=4)
    >>> segments = np.random.rand(3, 2, 16, 8).astype("float32")
    >>> starts = np.array([True, True])
    >>> for i, segment in enumerate(segments):
    ...     outputs = layer(segment, document_start=starts if i == 0 else None)
    >>> tuple(outputs.shape)
    (2, 16, 8)

    Reference:
        Wu et al., "Memorizing Transformers", ICLR 2022
        (https://arxiv.org/abs/2203.08913).
    """

    def __init__(
        self,
        num_heads,
        memory_size=8192,
        num_neighbors=32,
        memory_kind="auto",
        top_k="exact",
        recall_target=0.95,
        scores_per_block="auto",
        num_leaves=None,
        num_leaves_to_search=None,
        **kwargs,
    ):
        super().__init__(num_heads=num_heads, **kwargs)
        check_positive_ints(memory_size=memory_size, num_neighbors=num_neighbors)
        if num_neighbors > memory_size:
            raise ValueError(
                f"`num_neighbors` ({num_neighbors}) cannot exceed `memory_size` "
                f"({memory_size}): a lane holds at most memory_size entries."
            )
        check_memory_kind(memory_kind)
        check_top_k(top_k, recall_target)
        self.memory_size = memory_size
        self.num_neighbors = num_neighbors
        self.memory_kind = memory_kind
        self.top_k = top_k
        self.recall_target = recall_target
        self.scores_per_block = checked_scores_per_block(scores_per_block)
        self.num_leaves = num_leaves
        self.num_leaves_to_search = num_leaves_to_search

    @classmethod
    def memory_options(cls):
        """The memory's arguments and their defaults, as a dict.

        The one declaration of these options: `DecoderBlock` and
        `MemorizingTransformerBackbone` take a `memory_options` dict of them,
        check it with `check_memory_options` and pass it through.
        """
        parameters = inspect.signature(KNNAttention.__init__).parameters
        return {
            name: parameter.default
            for name, parameter in parameters.items()
            if parameter.default is not inspect.Parameter.empty
        }

    @property
    def needs_fixed_batch(self):
        return True

    def build(self, input_shape):
        super().build(input_shape)
        self.gate_bias = self.add_weight(
            name="gate_bias", shape=(self.num_heads,), initializer="zeros"
        )
        self._add_lane_state(
            make_memory,
            "memory",
            memory_kind=self.memory_kind,
            memory_size=self.memory_size,
            top_k=self.top_k,
            recall_target=self.recall_target,
            scores_per_block=self.scores_per_block,
            num_leaves=self.num_leaves,
            num_leaves_to_search=self.num_leaves_to_search,
            segment_length=input_shape[1],
        )
        self.built = True

    def _check_inputs(self, hidden_states, document_start, padding_mask):
        lane_inputs = super()._check_inputs(hidden_states, document_start, padding_mask)
        segment_length = hidden_states.shape[1]
        if segment_length is not None and segment_length > self.memory_size:
            raise ValueError(
                f"The segment length ({segment_length}) exceeds `memory_size` "
                f"({self.memory_size}): a segment would overwrite itself."
            )
        return lane_inputs

    def call(
        self,
        hidden_states,
        document_start=None,
        padding_mask=None,
        return_neighbors=False,
        training=None,
    ):
        outputs, positions = self._attend(
            hidden_states, document_start, padding_mask, training
        )
        if return_neighbors:
            return outputs, positions
        return outputs

    def _mix_extra_attention(self, queries, local, states, segment=None):
        """Attends to each query's nearest memory entries, mixed by the gate,
        and appends `segment` to the memory (`search_and_append`).

        The memory attention runs in the memory's layout, a group's query
        heads side by side under their key head (`_queries_by_key_head`):
        only its result and the positions go back to query-head order, not
        the `k` keys and values each query retrieved.

        Returns:
            `(attended, positions)`: `[batch, query, heads, head_dim]` and the
            int `[batch, query, heads, k]` document positions retrieved.
        """
        memory = states["memory"]
        grouped = self._queries_by_key_head(queries)  # [b, q * group, kv, d]
        if segment is None:
            found = memory.search(grouped, self.num_neighbors)
        else:
            found = memory.search_and_append(grouped, self.num_neighbors, *segment)
        # [batch, query * group, key heads, k, dim] twice, [..., k] positions
        memory_keys, memory_values, positions = found
        found = positions >= 0
        # An empty slot's key and value are arbitrary but finite (the
        # `KNNMemory` contract): its weight of 0 adds exactly nothing, in the
        # forward pass and the gradient.
        memory_keys = ops.cast(memory_keys, queries.dtype)
        memory_values = ops.cast(memory_values, local.dtype)
        scores = ops.einsum(
            "bqhd,bqhkd->bqhk", grouped, memory_keys
        )  # [batch, query * group, key heads, k]
        weights = masked_softmax(self._scaled(scores), found)
        retrieved = ops.einsum(
            "bqhk,bqhkd->bqhd", ops.cast(weights, local.dtype), memory_values
        )  # [batch, query * group, key heads, head_dim]
        has_memory = ops.any(found, axis=-1, keepdims=True)  # [b, q * g, kv, 1]
        # [batch, query, heads, ...]: dim, 1 and k
        retrieved, has_memory, positions = map(
            self._by_query_head, (retrieved, has_memory, positions)
        )
        gate = ops.cast(ops.sigmoid(self.gate_bias), local.dtype)[:, None]
        mixed = gate * retrieved + (1.0 - gate) * local
        return ops.where(has_memory, mixed, local), positions

    def _scaled(self, scores):
        """Memory scores `[batch, query * group, key_value_heads, k]` (see
        `_queries_by_key_head`) times their query head's attention scale."""
        scale = ops.cast(self.attention_scale, scores.dtype)
        groups = self.num_heads // self.num_key_value_heads
        if groups == 1:
            return scores * scale[:, None]
        lanes, key_heads, k = self.batch_size, self.num_key_value_heads, scores.shape[3]
        # Query head `n * groups + g` is member `g` of key head `n`'s group.
        scale = ops.transpose(ops.reshape(scale, (key_heads, groups)))  # [group, kv]
        # [batch, query, group, key heads, k]
        grouped = ops.reshape(scores, (lanes, -1, groups, key_heads, k))
        return ops.reshape(grouped * scale[:, :, None], ops.shape(scores))

    def _queries_by_key_head(self, queries):
        """`[batch, query, heads, dim]` queries as `[batch, query * group,
        key_value_heads, dim]`: each group of query heads searches the
        memory of its key head, with its queries side by side."""
        groups = self.num_heads // self.num_key_value_heads
        if groups == 1:
            return queries
        lanes, key_heads = self.batch_size, self.num_key_value_heads
        # [batch, query, key heads, group, dim]
        queries = ops.reshape(queries, (lanes, -1, key_heads, groups, self.head_dim))
        queries = ops.transpose(queries, (0, 1, 3, 2, 4))  # [b, q, group, n, d]
        return ops.reshape(queries, (lanes, -1, key_heads, self.head_dim))

    def _by_query_head(self, grouped):
        """A `[batch, query * group, key_value_heads, ...]` array in
        `_queries_by_key_head`'s layout as `[batch, query, heads, ...]`."""
        groups = self.num_heads // self.num_key_value_heads
        if groups == 1:
            return grouped
        lanes, key_heads = self.batch_size, self.num_key_value_heads
        tail = tuple(grouped.shape[3:])  # e.g. [k] or [dim]
        # [batch, query, group, key heads, ...]
        grouped = ops.reshape(grouped, (lanes, -1, groups, key_heads, *tail))
        grouped = ops.transpose(grouped, (0, 1, 3, 2, *range(4, 4 + len(tail))))
        return ops.reshape(grouped, (lanes, -1, self.num_heads, *tail))

    def compute_output_spec(
        self,
        hidden_states,
        document_start=None,
        padding_mask=None,
        return_neighbors=False,
        training=None,
    ):
        self._check_inputs(hidden_states, document_start, padding_mask)
        outputs = keras.KerasTensor(hidden_states.shape, dtype=self.compute_dtype)
        if not return_neighbors:
            return outputs
        neighbor_shape = (*hidden_states.shape[:2], self.num_heads, self.num_neighbors)
        return outputs, keras.KerasTensor(neighbor_shape, dtype="int32")

    def save_memory(self, path, training=False):
        """Saves the kNN memory of one mode to the `.npz` file `path`.

        `KNNMemory.save`: the ring buffer of every lane and, for a ScaNN
        memory, its searchers, written atomically (an existing file is
        replaced only once the new one is complete; missing directories are
        created). `load_memory` restores it, to go on reading long
        documents later. `save_lane_states` saves the XL cache and last
        keys too.

        Args:
            path: the file to write.
            training: bool. `False` (the default) saves the inference
                memory (`evaluate`, `predict`, generation), `True` the one
                `fit` reads.

        Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> from keras import ops
        >>> options = dict(num_heads=2, memory_size=64, num_neighbors=4,
        ...                memory_kind="exact")
        >>> layer = KNNAttention(**options)
        >>> segment = np.random.rand(2, 16, 8).astype("float32")
        >>> _ = layer(segment, document_start=np.array([True, True]))
        >>> restored = KNNAttention(**options)
        >>> restored.build(segment.shape)
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     path = os.path.join(directory, "memory.npz")
        ...     layer.save_memory(path)
        ...     restored.load_memory(path)
        >>> positions = restored.lane_states()["memory"].positions
        >>> int((ops.convert_to_numpy(positions) >= 0).sum())  # 2 lanes x 16
        32
        """
        self._built_lane_states(training)["memory"].save(path)

    def load_memory(self, path, training=False):
        """Restores the kNN memory of one mode saved by `save_memory`.

        The whole file is checked before the memory changes: a load that
        fails leaves it as it was. Any kind of memory of the same sizes
        loads it: a ScaNN memory gets its searchers back from its own
        file, and builds them from another memory's.

        Args:
            path: the file to read.
            training: bool. `False` (the default) restores the inference
                memory, `True` the one `fit` reads.

        Raises:
            FileNotFoundError: there is no file at `path`.
            ValueError: the file is unreadable, or holds a state other
                than a memory, or other sizes (the message names what
                differs).
        """
        self._built_lane_states(training)["memory"].load(path)

    def get_config(self):
        config = super().get_config()
        config.update({name: getattr(self, name) for name in self.memory_options()})
        return config


def check_memory_options(memory_options):
    """Raises a ValueError naming any key that is not a `KNNAttention` memory
    option; returns the options as a new dict (`None`: no options)."""
    memory_options = dict(memory_options or {})
    unknown = sorted(set(memory_options) - set(KNNAttention.memory_options()))
    if unknown:
        raise ValueError(
            f"Unknown memory option(s) {unknown}; valid: "
            f"{sorted(KNNAttention.memory_options())}."
        )
    return memory_options

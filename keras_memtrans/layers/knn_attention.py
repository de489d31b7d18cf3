import math

import keras
from keras import ops

from keras_memtrans.layers.relative_position_bias import RelativePositionBias
from keras_memtrans.memory.exact_memory import ExactMemory
from keras_memtrans.memory.segment_cache import SegmentCache

_MASKED_LOGIT = -1e9


def _l2_normalize(x):
    x32 = ops.cast(x, "float32")
    norm = ops.sqrt(ops.sum(ops.square(x32), axis=-1, keepdims=True) + 1e-12)
    return ops.cast(x32 / norm, x.dtype)


def _masked_softmax(logits, mask, axis=-1):
    """Softmax in float32 over `axis`; masked entries get weight 0."""
    logits = ops.where(mask, ops.cast(logits, "float32"), _MASKED_LOGIT)
    return ops.where(mask, ops.softmax(logits, axis=axis), 0.0)


@keras.saving.register_keras_serializable(package="keras_memtrans")
class KNNAttention(keras.layers.Layer):
    """Causal multi-head attention augmented with a kNN (key, value) memory.

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
        head_dim: int. Size of each head. Defaults to
            `hidden_dim // num_heads`.
        memory_size: int. Tokens kept in memory per lane (FIFO).
        num_neighbors: int. Memory entries each query retrieves (`k`).
        batch_size: int. Number of lanes. Defaults to the static batch size
            of the input (e.g. `keras.Input(..., batch_size=8)`).
        use_xl_cache: bool. Whether local attention also covers the
            previous segment (Transformer-XL cache, no gradient).
        num_buckets: int. Relative position buckets (T5).
        max_distance: int. Relative distance of the last bucket (T5).
        kernel_initializer: initializer of the projection kernels.
        **kwargs: standard `keras.layers.Layer` arguments.

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
    >>> outputs.shape
    (2, 16, 8)

    Reference:
        Wu et al., "Memorizing Transformers", ICLR 2022
        (https://arxiv.org/abs/2203.08913).
    """

    def __init__(
        self,
        num_heads,
        head_dim=None,
        memory_size=8192,
        num_neighbors=32,
        batch_size=None,
        use_xl_cache=False,
        num_buckets=32,
        max_distance=128,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"`num_heads` must be a positive int, got {num_heads!r}.")
        if head_dim is not None and (not isinstance(head_dim, int) or head_dim < 1):
            raise ValueError(f"`head_dim` must be a positive int, got {head_dim!r}.")
        if not isinstance(memory_size, int) or memory_size < 1:
            raise ValueError(
                f"`memory_size` must be a positive int, got {memory_size!r}."
            )
        if not isinstance(num_neighbors, int) or num_neighbors < 1:
            raise ValueError(
                f"`num_neighbors` must be a positive int, got {num_neighbors!r}."
            )
        if num_neighbors > memory_size:
            raise ValueError(
                f"`num_neighbors` ({num_neighbors}) cannot exceed `memory_size` "
                f"({memory_size}): a lane holds at most memory_size entries."
            )
        if batch_size is not None and (
            not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(
                f"`batch_size` must be a positive int, got {batch_size!r}."
            )
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.memory_size = memory_size
        self.num_neighbors = num_neighbors
        self.batch_size = batch_size
        self.use_xl_cache = use_xl_cache
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(
                "`hidden_states` must have rank 3 [batch, segment, hidden_dim], "
                f"got shape {tuple(input_shape)}."
            )
        batch_size, segment_length, hidden_dim = input_shape
        if self.batch_size is None:
            if batch_size is None:
                raise ValueError(
                    "KNNAttention keeps one memory per batch lane and needs a "
                    "fixed batch size: pass `batch_size=` or build it on an "
                    "input with a static batch size "
                    "(`keras.Input(..., batch_size=B)`)."
                )
            self.batch_size = batch_size
        if segment_length is not None and segment_length > self.memory_size:
            raise ValueError(
                f"The segment length ({segment_length}) exceeds `memory_size` "
                f"({self.memory_size}): a segment would overwrite itself."
            )
        if self.use_xl_cache and segment_length is None:
            raise ValueError(
                "`use_xl_cache=True` needs a static segment length (the cache "
                "length); got hidden_states of shape "
                f"{tuple(input_shape)}."
            )
        self._check_batch(batch_size)
        if self.head_dim is None:
            if hidden_dim % self.num_heads:
                raise ValueError(
                    f"`num_heads` ({self.num_heads}) must divide the hidden size "
                    f"({hidden_dim}), or pass `head_dim`."
                )
            self.head_dim = hidden_dim // self.num_heads
        heads = (self.num_heads, self.head_dim)
        for name in ("query", "key", "value"):
            projection = keras.layers.EinsumDense(
                "btd,dnh->btnh",
                output_shape=(None, *heads),
                kernel_initializer=self.kernel_initializer,
                dtype=self.dtype_policy,
                name=f"{name}_projection",
            )
            projection.build(input_shape)
            setattr(self, f"{name}_projection", projection)
        self.output_projection = keras.layers.EinsumDense(
            "btnh,nhd->btd",
            output_shape=(None, hidden_dim),
            kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
            name="output_projection",
        )
        self.output_projection.build((batch_size, segment_length, *heads))
        self.relative_position_bias = RelativePositionBias(
            num_heads=self.num_heads,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
            dtype=self.dtype_policy,
            name="relative_position_bias",
        )
        self.relative_position_bias.build()
        self.attention_scale = self.add_weight(
            name="attention_scale",
            shape=(self.num_heads,),
            initializer=keras.initializers.Constant(math.sqrt(self.head_dim)),
        )
        self.gate_bias = self.add_weight(
            name="gate_bias", shape=(self.num_heads,), initializer="zeros"
        )
        state = dict(batch_size=self.batch_size, dtype=self.dtype_policy)
        state.update(num_heads=self.num_heads, head_dim=self.head_dim)
        self.train_memory = ExactMemory(
            memory_size=self.memory_size, name="train_memory", **state
        )
        self.inference_memory = ExactMemory(
            memory_size=self.memory_size, name="inference_memory", **state
        )
        self.train_memory.build()
        self.inference_memory.build()
        if self.use_xl_cache:
            self.train_cache = SegmentCache(
                cache_length=segment_length, name="train_cache", **state
            )
            self.inference_cache = SegmentCache(
                cache_length=segment_length, name="inference_cache", **state
            )
            self.train_cache.build()
            self.inference_cache.build()
        self.built = True

    def _check_batch(self, batch_size):
        if batch_size is not None and batch_size != self.batch_size:
            raise ValueError(
                f"Got a batch of {batch_size} lanes but the memory has "
                f"`batch_size={self.batch_size}` lanes: feed full batches of "
                "the fixed batch size."
            )

    def _check_inputs(self, hidden_states, document_start, padding_mask):
        shape = tuple(hidden_states.shape)
        if len(shape) != 3:
            raise ValueError(
                "`hidden_states` must have rank 3 [batch, segment, hidden_dim], "
                f"got shape {shape}."
            )
        self._check_batch(shape[0])
        if shape[1] is not None and shape[1] > self.memory_size:
            raise ValueError(
                f"The segment length ({shape[1]}) exceeds `memory_size` "
                f"({self.memory_size}): a segment would overwrite itself."
            )
        if self.use_xl_cache and shape[1] != self.train_cache.cache_length:
            raise ValueError(
                f"With `use_xl_cache=True` every segment must have the length "
                f"the layer was built with ({self.train_cache.cache_length}), "
                f"got {shape[1]}."
            )
        for name, value, expected in (
            ("document_start", document_start, shape[:1]),
            ("padding_mask", padding_mask, shape[:2]),
        ):
            if value is not None and tuple(value.shape) != expected:
                raise ValueError(
                    f"`{name}` must have shape {expected} (rank {len(expected)}), "
                    f"got {tuple(value.shape)}."
                )

    def call(
        self,
        hidden_states,
        document_start=None,
        padding_mask=None,
        return_neighbors=False,
        training=None,
    ):
        self._check_inputs(hidden_states, document_start, padding_mask)
        if training:
            memory = self.train_memory
            cache = self.train_cache if self.use_xl_cache else None
        else:
            memory = self.inference_memory
            cache = self.inference_cache if self.use_xl_cache else None
        if document_start is not None:
            memory.reset(document_start)
            if cache is not None:
                cache.reset(document_start)

        queries = _l2_normalize(self.query_projection(hidden_states))
        keys = _l2_normalize(self.key_projection(hidden_states))
        values = self.value_projection(hidden_states)  # [batch, seg, heads, dim]
        scale = ops.cast(self.attention_scale, queries.dtype)

        local = self._local_attention(queries, keys, values, padding_mask, cache)
        memory_keys, memory_values, positions = memory.search(
            queries, self.num_neighbors
        )  # [batch, seg, heads, k, dim] twice, [batch, seg, heads, k]
        found = positions >= 0
        scores = ops.einsum(
            "bqhd,bqhkd->bqhk", queries, ops.cast(memory_keys, queries.dtype)
        )
        weights = _masked_softmax(scores * scale[:, None], found)
        retrieved = ops.einsum(
            "bqhk,bqhkd->bqhd",
            ops.cast(weights, values.dtype),
            ops.cast(memory_values, values.dtype),
        )
        gate = ops.cast(ops.sigmoid(self.gate_bias), values.dtype)[:, None]
        mixed = gate * retrieved + (1.0 - gate) * local
        has_memory = ops.any(found, axis=-1, keepdims=True)  # [b, seg, heads, 1]
        attended = ops.where(has_memory, mixed, local)

        memory.append(keys, values, padding_mask)
        if cache is not None:
            cache.write(keys, values, padding_mask)
        outputs = self.output_projection(attended)
        if return_neighbors:
            return outputs, positions
        return outputs

    def _local_attention(self, queries, keys, values, padding_mask, cache):
        """Causal attention over the segment (and cache) with relative bias."""
        batch_size, segment_length = ops.shape(queries)[:2]
        if padding_mask is None:
            key_mask = ops.ones((batch_size, segment_length), dtype="bool")
        else:
            key_mask = ops.cast(padding_mask, "bool")
        cache_length = 0
        if cache is not None:
            cache_keys, cache_values, cache_mask = cache.read()
            cache_length = self.train_cache.cache_length
            keys = ops.concatenate([ops.cast(cache_keys, keys.dtype), keys], 1)
            values = ops.concatenate(
                [ops.cast(cache_values, values.dtype), values], 1
            )
            key_mask = ops.concatenate([cache_mask, key_mask], axis=1)
        # Key j sits at position j - cache_length relative to segment start.
        query_positions = ops.arange(segment_length)[:, None]
        key_positions = ops.arange(cache_length + segment_length)[None, :]
        relative = key_positions - cache_length - query_positions  # [q, k]
        scale = ops.cast(self.attention_scale, queries.dtype)[:, None, None]
        logits = ops.einsum("bqhd,bkhd->bhqk", queries, keys) * scale
        logits = logits + ops.cast(
            self.relative_position_bias(relative), logits.dtype
        )[None]
        mask = ops.logical_and(relative <= 0, key_mask[:, None, None, :])
        weights = _masked_softmax(logits, mask)  # [batch, heads, query, key]
        return ops.einsum(
            "bhqk,bkhd->bqhd", ops.cast(weights, values.dtype), values
        )

    def reset_state(self):
        """Empties the training and inference memories (and caches)."""
        for name in (
            "train_memory",
            "inference_memory",
            "train_cache",
            "inference_cache",
        ):
            if hasattr(self, name):
                getattr(self, name).reset_state()

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

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

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "head_dim": self.head_dim,
                "memory_size": self.memory_size,
                "num_neighbors": self.num_neighbors,
                "batch_size": self.batch_size,
                "use_xl_cache": self.use_xl_cache,
                "num_buckets": self.num_buckets,
                "max_distance": self.max_distance,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config

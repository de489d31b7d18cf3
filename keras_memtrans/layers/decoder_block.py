import keras
from keras import ops

from keras_memtrans.layers.direct_call import direct_call
from keras_memtrans.layers.initializers import clone_initializer
from keras_memtrans.layers.knn_attention import KNNAttention
from keras_memtrans.layers.knn_attention import check_memory_options
from keras_memtrans.layers.segment_attention import SegmentAttention


@keras.saving.register_keras_serializable(package="keras_memtrans")
class DecoderBlock(keras.layers.Layer):
    """Pre-LayerNorm decoder block, with or without a kNN memory.

    `x + attention(norm(x))`, then `x + feedforward(norm(x))`. The attention
    is a `KNNAttention` when `memory_options` is given, otherwise a
    `SegmentAttention` (local causal attention, optionally Transformer-XL).

    Args:
        num_heads: int. Number of attention heads.
        head_dim: int. Size of each attention head. Defaults to
            `hidden_dim // num_heads`.
        intermediate_dim: int. Hidden size of the feedforward network.
        num_key_value_heads: int. Number of key and value heads, a divisor
            of `num_heads` (grouped-query attention, see
            `SegmentAttention`). Defaults to `num_heads`.
        memory_options: optional dict of `KNNAttention` memory arguments
            (`memory_size`, `num_neighbors`, `memory_kind`, `top_k`,
            `recall_target`, `scores_per_block`, `num_leaves`,
            `num_leaves_to_search`; see
            `KNNAttention.memory_options()`). Given (`{}` for the defaults),
            the attention also reads a kNN memory; `None`: no memory.
        batch_size: int. Number of lanes (needed for memory or XL cache).
        use_xl_cache: bool. Whether attention also covers the previous
            segment of each lane.
        dropout: float. Dropout rate after attention and feedforward.
        activation: feedforward activation.
        layer_norm_epsilon: float. Epsilon of both layer norms.
        num_buckets: int. Relative position buckets (T5).
        max_distance: int. Relative distance of the last bucket (T5).
        kernel_initializer: initializer of every kernel; each kernel gets
            its own copy (`clone_initializer`).
        smear_keys: bool. Whether attention keys are mixed with the previous
            token's key (see `SegmentAttention`).
        tie_query_key_init: bool. Whether each attention's key projection
            starts as a copy of its query projection (see
            `SegmentAttention`).
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        hidden_states: `[batch, segment, hidden_dim]`.
        document_start: optional bool `[batch]`, see `KNNAttention`.
        padding_mask: optional bool `[batch, segment]`, see `KNNAttention`.
        return_neighbors: bool. Also return the document positions the
            memory lookup retrieved (only with memory).
        training: bool.

    Returns:
        `[batch, segment, hidden_dim]`; with `return_neighbors=True`, also
        int `[batch, segment, num_heads, num_neighbors]` positions, as
        returned by `KNNAttention`.

    Example:
    >>> import numpy as np
    >>> block = DecoderBlock(num_heads=2, intermediate_dim=32,
    ...                      memory_options={"memory_size": 64, "num_neighbors": 4})
    >>> tuple(block(np.random.rand(2, 16, 8).astype("float32")).shape)
    (2, 16, 8)

    Reference:
        Wu et al., "Memorizing Transformers", ICLR 2022
        (https://arxiv.org/abs/2203.08913).
    """

    def __init__(
        self,
        num_heads,
        intermediate_dim,
        head_dim=None,
        num_key_value_heads=None,
        memory_options=None,
        batch_size=None,
        use_xl_cache=False,
        dropout=0.0,
        activation="gelu",
        layer_norm_epsilon=1e-6,
        num_buckets=32,
        max_distance=128,
        kernel_initializer="glorot_uniform",
        smear_keys=False,
        tie_query_key_init=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.head_dim = head_dim
        self.num_key_value_heads = num_key_value_heads
        self.memory_options = (
            None if memory_options is None else check_memory_options(memory_options)
        )
        self.batch_size = batch_size
        self.use_xl_cache = use_xl_cache
        self.dropout = dropout
        self.activation = keras.activations.get(activation)
        self.layer_norm_epsilon = layer_norm_epsilon
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.smear_keys = smear_keys
        self.tie_query_key_init = tie_query_key_init
        attention = dict(
            num_heads=num_heads,
            head_dim=head_dim,
            num_key_value_heads=num_key_value_heads,
            batch_size=batch_size,
            use_xl_cache=use_xl_cache,
            num_buckets=num_buckets,
            max_distance=max_distance,
            kernel_initializer=self.kernel_initializer,
            smear_keys=smear_keys,
            tie_query_key_init=tie_query_key_init,
            dtype=self.dtype_policy,
            name="attention",
        )
        if self.use_memory:
            self.attention = KNNAttention(**self.memory_options, **attention)
        else:
            self.attention = SegmentAttention(**attention)
        norm = dict(epsilon=layer_norm_epsilon, dtype=self.dtype_policy)
        self.attention_norm = keras.layers.LayerNormalization(
            name="attention_norm", **norm
        )
        self.feedforward_norm = keras.layers.LayerNormalization(
            name="feedforward_norm", **norm
        )
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        self.attention_norm.build(input_shape)
        self.attention.build(input_shape)
        self.feedforward_norm.build(input_shape)
        self.feedforward_intermediate = keras.layers.Dense(
            self.intermediate_dim,
            kernel_initializer=clone_initializer(
                self.kernel_initializer, "feedforward_intermediate"
            ),
            dtype=self.dtype_policy,
            name="feedforward_intermediate",
        )
        self.feedforward_intermediate.build(input_shape)
        self.feedforward_output = keras.layers.Dense(
            hidden_dim,
            kernel_initializer=clone_initializer(
                self.kernel_initializer, "feedforward_output"
            ),
            dtype=self.dtype_policy,
            name="feedforward_output",
        )
        self.feedforward_output.build((*input_shape[:-1], self.intermediate_dim))
        self.built = True

    @property
    def use_memory(self):
        """Whether the attention reads a kNN memory (`KNNAttention`)."""
        return self.memory_options is not None

    def call(
        self,
        hidden_states,
        document_start=None,
        padding_mask=None,
        return_neighbors=False,
        training=None,
    ):
        self._check_return_neighbors(return_neighbors)
        x = self.attention_norm(hidden_states)
        attention_options = dict(
            document_start=document_start, padding_mask=padding_mask, training=training
        )
        if return_neighbors:
            x, positions = self.attention(x, return_neighbors=True, **attention_options)
        else:
            x = self.attention(x, **attention_options)
        x = self.dropout_layer(x, training=training)
        one = run_time_one(hidden_states)
        hidden_states = fusion_boundary(hidden_states + x, one)
        outputs = self._feedforward_residual(hidden_states, training)
        outputs = fusion_boundary(outputs, one)
        if return_neighbors:
            return outputs, positions
        return outputs

    def call_with_cache(
        self,
        hidden_states,
        decode_cache,
        cache_update_index,
        token_mask,
        starts_segment=False,
    ):
        """The block on new tokens of the segment being generated.

        See `SegmentAttention.call_with_cache`: `hidden_states` is
        `[batch, tokens, hidden_dim]`; returns the outputs, of that shape,
        and writes the new tokens into `decode_cache`.
        """
        x = direct_call(self.attention_norm, hidden_states)
        x = self.attention.call_with_cache(
            x, decode_cache, cache_update_index, token_mask, starts_segment
        )
        return self._feedforward_residual(hidden_states + x, training=False)

    def _feedforward_residual(self, hidden_states, training):
        """The feed-forward residual; with `training=False` (predicting and
        generating) its sublayers are called by `direct_call` and the
        dropout not at all."""
        if training is False:
            x = direct_call(self.feedforward_norm, hidden_states)
            x = direct_call(self.feedforward_intermediate, x)
            x = direct_call(self.feedforward_output, self.activation(x))
            return hidden_states + x
        x = self.feedforward_norm(hidden_states)
        x = self.feedforward_output(self.activation(self.feedforward_intermediate(x)))
        return hidden_states + self.dropout_layer(x, training=training)

    def _check_return_neighbors(self, return_neighbors):
        if return_neighbors and not self.use_memory:
            raise ValueError(
                f"`return_neighbors=True` needs a memory block; {self.name!r} "
                "was built without `memory_options`."
            )

    def reset_state(self, training=None):
        """Empties the attention's memories and caches (see `KNNAttention`)."""
        self.attention.reset_state(training)

    def compute_output_spec(
        self,
        hidden_states,
        document_start=None,
        padding_mask=None,
        return_neighbors=False,
        training=None,
    ):
        self._check_return_neighbors(return_neighbors)
        if return_neighbors:  # the block keeps the attention's output shapes
            return self.attention.compute_output_spec(
                hidden_states, document_start, padding_mask, return_neighbors=True
            )
        # A model that could never run fails as it is built.
        self.attention._check_inputs(hidden_states, document_start, padding_mask)
        return keras.KerasTensor(hidden_states.shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "intermediate_dim": self.intermediate_dim,
                "head_dim": self.head_dim,
                "num_key_value_heads": self.num_key_value_heads,
                "memory_options": self.memory_options,
                "batch_size": self.batch_size,
                "use_xl_cache": self.use_xl_cache,
                "dropout": self.dropout,
                "activation": keras.activations.serialize(self.activation),
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "num_buckets": self.num_buckets,
                "max_distance": self.max_distance,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "smear_keys": self.smear_keys,
                "tie_query_key_init": self.tie_query_key_init,
            }
        )
        return config


def run_time_one(hidden_states):
    """A float32 scalar 1.0 computed from `hidden_states`, so that no
    compiler folds it away."""
    finite = ops.cast(ops.isfinite(hidden_states[0, 0, 0]), "float32")
    return ops.maximum(finite, ops.ones_like(finite))  # no 1.0 from the host


def fusion_boundary(hidden_states, one):
    """`hidden_states` divided by `one`, a 1 computed at run time
    (`run_time_one`): the same values (a division by 1 is exact), with a
    division in the residual stream's gradient.

    XLA's CPU compiler fuses cheap elementwise chains into every consumer
    rather than computing them once; a division is not cheap to it. Without
    this, under JAX each layer's weight-gradient fusion recomputed the
    residual gradient through every layer above it, a cost that grows with
    the square of the depth (docs/performance.md, "Where a training step's
    time goes").
    """
    return hidden_states / ops.cast(one, hidden_states.dtype)

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_memtrans")
class RelativePositionBias(keras.layers.Layer):
    """T5-style bucketed relative position bias, one learned scalar per head.

    A relative distance `key_position - query_position` is mapped to one of
    `num_buckets` buckets: small distances get a bucket each, larger ones
    share logarithmically wider buckets up to `max_distance`, beyond which
    all distances share the last bucket. Each bucket holds one learned bias
    per head that is added to the attention logits.

    Args:
        num_heads: int. Number of attention heads.
        num_buckets: int. Number of buckets (32 in T5 and meliad).
        max_distance: int. Distance from which all positions share the last
            bucket (128 in T5 and meliad).
        bidirectional: bool. If `False` (a causal decoder) only keys at or
            before the query are distinguished; later keys fall in bucket 0.
        embeddings_initializer: initializer of the `[num_buckets, num_heads]`
            bias table.
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        relative_positions: int tensor `[query, key]` of
            `key_position - query_position`.

    Returns:
        A float tensor `[num_heads, query, key]` to add to attention logits.

    Example:
    >>> import numpy as np
    >>> bias = RelativePositionBias(num_heads=4)
    >>> positions = np.arange(8)
    >>> relative = positions[None, :] - positions[:, None]
    >>> tuple(bias(relative).shape)
    (4, 8, 8)

    Reference:
        Raffel et al., "Exploring the Limits of Transfer Learning with a
        Unified Text-to-Text Transformer", JMLR 2020
        (https://arxiv.org/abs/1910.10683).
    """

    def __init__(
        self,
        num_heads,
        num_buckets=32,
        max_distance=128,
        bidirectional=False,
        embeddings_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        exact_buckets = num_buckets // 2 if bidirectional else num_buckets
        if num_heads < 1:
            raise ValueError(f"`num_heads` must be >= 1, got {num_heads}.")
        if exact_buckets < 2 or max_distance <= exact_buckets // 2:
            raise ValueError(
                "`num_buckets` and `max_distance` leave no logarithmic range: "
                f"got num_buckets={num_buckets}, max_distance={max_distance}. "
                "Use max_distance > num_buckets // 2 (// 4 if bidirectional)."
            )
        self.num_heads = num_heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)

    def build(self, input_shape=None):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.num_buckets, self.num_heads),
            initializer=self.embeddings_initializer,
        )
        self.built = True

    def bucket(self, relative_positions):
        """Maps `key - query` distances to bucket ids in `[0, num_buckets)`."""
        distance = -ops.cast(relative_positions, "int32")
        num_buckets = self.num_buckets
        offset = 0
        if self.bidirectional:
            num_buckets //= 2
            offset = ops.where(distance < 0, num_buckets, 0)
            distance = ops.abs(distance)
        else:
            distance = ops.maximum(distance, 0)
        max_exact = num_buckets // 2
        # Logarithmic bucket for distances >= max_exact; the maximum() keeps
        # log() finite where the exact branch is taken anyway.
        log_ratio = ops.log(
            ops.cast(ops.maximum(distance, max_exact), "float32") / max_exact
        ) / math.log(self.max_distance / max_exact)
        large = max_exact + ops.cast(log_ratio * (num_buckets - max_exact), "int32")
        large = ops.minimum(large, num_buckets - 1)
        return offset + ops.where(distance < max_exact, distance, large)

    def call(self, relative_positions):
        buckets = self.bucket(relative_positions)
        bias = ops.take(self.embeddings, buckets, axis=0)  # [query, key, heads]
        return ops.transpose(bias, (2, 0, 1))  # [heads, query, key]

    def compute_output_shape(self, input_shape):
        return (self.num_heads, *input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "num_buckets": self.num_buckets,
                "max_distance": self.max_distance,
                "bidirectional": self.bidirectional,
                "embeddings_initializer": keras.initializers.serialize(
                    self.embeddings_initializer
                ),
            }
        )
        return config

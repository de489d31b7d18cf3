import numbers

import keras
import numpy as np
from keras import ops

from keras_memtrans.memory.host import full_like


def bucket_boundaries(num_buckets, max_distance):
    """The smallest causal distance of each of T5's buckets, exactly.

    Distances `d < m = num_buckets // 2` get bucket `d`; bucket `m + k`
    (`0 <= k < L = num_buckets - m`) starts at the smallest integer `d` with
    `L * log(d / m) / log(max_distance / m) >= k`, that is
    `d ** L >= max_distance ** k * m ** (L - k)`: compared in Python integers,
    so a distance on a boundary (`18` for 12 buckets to 162) is never put a
    bucket low as a float32 logarithm can. Requires `max_distance > m`.

    Returns:
        A list of `num_buckets` non-decreasing ints; a bucket that no integer
        distance reaches starts where the next one does.
    """
    max_exact = num_buckets // 2
    num_log = num_buckets - max_exact
    starts = list(range(max_exact))
    distance = max_exact
    for k in range(num_log):
        target = max_distance**k * max_exact ** (num_log - k)
        while distance**num_log < target:
            distance += 1
        starts.append(distance)
    return starts


def toeplitz(diagonals, num_queries, num_keys):
    """The `[..., query, key]` matrix whose entry `(i, j)` is
    `diagonals[..., j - i + num_queries - 1]`, from `diagonals`
    `[..., num_queries + num_keys - 1]`.

    Built by tiling and reshaping, with no gather: its gradient is a sum of
    slices, where a gather's is a scatter-add over every entry. Each row of
    the tiled `diagonals`, read with a stride one shorter than a row, starts
    one diagonal earlier than the row above.
    """
    if num_queries == 1:  # one row: the diagonals themselves
        return diagonals[..., None, :]
    length = num_queries + num_keys - 1
    *lead, _ = ops.shape(diagonals)
    tiled = ops.tile(diagonals, (*[1] * len(lead), num_queries))  # [..., q * length]
    skewed = tiled[..., num_queries - 1 : num_queries - 1 + num_queries * (length - 1)]
    skewed = ops.reshape(skewed, (*lead, num_queries, length - 1))  # [..., q, len-1]
    return skewed[..., :num_keys]


@keras.saving.register_keras_serializable(package="keras_memtrans")
class RelativePositionBias(keras.layers.Layer):
    """T5-style bucketed relative position bias, one learned scalar per head.

    A relative distance `key_position - query_position` is mapped to one of
    `num_buckets` buckets: small distances get a bucket each, larger ones
    share logarithmically wider buckets up to `max_distance`, beyond which
    all distances share the last bucket. Each bucket holds one learned bias
    per head that is added to the attention logits.

    Buckets are T5's formula evaluated exactly. With `n = num_buckets`,
    `d = max(query_position - key_position, 0)` (bidirectional: `n =
    num_buckets // 2`, `d = |key_position - query_position|`, plus `n` for
    keys after the query) and `m = n // 2`, the bucket is `d` if `d < m`, else
    `min(n - 1, m + floor((n - m) * log(d / m) / log(max_distance / m)))`.
    The bucket of each distance `0..max_distance` is decided once in Python
    integers (see `bucket_boundaries`) and looked up in the graph, so every
    backend and device gives the same buckets. T5 takes the logarithm in
    float32, which may put a distance that lies exactly on a boundary one
    bucket low, differently per backend (12 buckets to 162: distances 18 and
    54 on JAX); for the defaults 32/128, causal or bidirectional, T5's
    buckets and these are the same.

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
        for value in (num_buckets, max_distance):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(
                    "`num_buckets` and `max_distance` must be integers, got "
                    f"num_buckets={num_buckets!r}, max_distance={max_distance!r}."
                )
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
        self.num_buckets = int(num_buckets)
        self.max_distance = int(max_distance)
        self.bidirectional = bidirectional
        # Causal bucket of each distance 0..max_distance (per side), a
        # tensor made once: from NumPy at every call, torch copied it from
        # the host each time (on a GPU, a copy that waits for the device).
        starts = bucket_boundaries(exact_buckets, self.max_distance)
        distances = np.arange(self.max_distance + 1)
        self._bucket_table = ops.convert_to_tensor(
            np.searchsorted(starts, distances, "right") - 1, "int32"
        )
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
        if self.bidirectional:
            offset = ops.cast(distance < 0, "int32") * (self.num_buckets // 2)
            distance = ops.abs(distance)
        # Bounds made on the device: `ops.clip`'s Python numbers are copied
        # from the host on every call under torch (see `host.full_like`).
        distance = ops.minimum(
            ops.maximum(distance, ops.zeros_like(distance)),
            full_like(distance, self.max_distance),
        )
        buckets = ops.take(self._bucket_table, distance, axis=0)
        return offset + buckets if self.bidirectional else buckets

    def segment_bias(self, segment_length, cache_length):
        """The bias `[heads, segment, cache + segment]` of a segment's
        queries over `cache_length` cached keys and then the segment's own
        keys.

        Built from each diagonal once (`toeplitz`): one lookup per
        distance, not per entry.

        Args:
            segment_length: int. The segment's queries (and own keys).
            cache_length: int. Cached keys before the segment's.
        """
        num_keys = cache_length + segment_length
        # Diagonal t holds the distance t - (segment_length - 1) - cache_length.
        diagonals = ops.arange(num_keys + segment_length - 1)
        diagonals = diagonals - (segment_length - 1) - cache_length
        bias = self(diagonals[None, :])  # [heads, 1, segment + key - 1]
        return toeplitz(bias[:, 0], segment_length, num_keys)

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

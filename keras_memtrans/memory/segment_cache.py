import keras
from keras import ops

from keras_memtrans.memory.lane_state import LaneState
from keras_memtrans.memory.ring_buffer import stored_tokens


@keras.saving.register_keras_serializable(package="keras_memtrans")
class SegmentCache(LaneState):
    """Transformer-XL cache: the previous segment's keys and values per lane.

    Holds the keys and values one attention layer produced for the last
    segment of each lane, without gradient, so that the next segment can
    attend to them as a prefix of its local context. A lane whose document
    starts in the new segment is emptied first.

    Like `ExactMemory`, this is a `LaneState` of fixed shape driven by the
    attention layer through `reset`, `read` and `write`; its contents are
    not saved with the model's weights, but `save(path)` / `load(path)`
    keep them in one `.npz` file (`keys` and `values`
    `[batch, cache_length, heads, head_dim]` float32, `mask`
    `[batch, cache_length]` bool, the sizes and `state_class`).

    Args:
        batch_size: int. Number of lanes (the fixed batch size).
        cache_length: int. Number of cached tokens (the segment length).
        num_heads: int. Number of key and value heads held (the attention's
            `num_key_value_heads`).
        head_dim: int. Size of each key and value vector.
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> import numpy as np
    >>> cache = SegmentCache(batch_size=2, cache_length=3, num_heads=1,
    ...                      head_dim=4)
    >>> cache.build()
    >>> keys, values, mask = cache.read()
    >>> tuple(keys.shape), bool(np.asarray(mask).any())  # empty until written
    ((2, 3, 1, 4), False)

    Reference:
        Dai et al., "Transformer-XL: Attentive Language Models Beyond a
        Fixed-Length Context", ACL 2019 (https://arxiv.org/abs/1901.02860).
    """

    SIZE_NAMES = ("batch_size", "cache_length", "num_heads", "head_dim")

    def __init__(self, batch_size, cache_length, num_heads, head_dim, **kwargs):
        super().__init__(
            batch_size=batch_size,
            cache_length=cache_length,
            num_heads=num_heads,
            head_dim=head_dim,
            **kwargs,
        )

    def build(self, input_shape=None):
        vectors = (self.batch_size, self.cache_length, self.num_heads, self.head_dim)
        self.keys = self.add_weight(
            name="keys",
            shape=vectors,
            initializer="zeros",
            dtype=self.compute_dtype,
            trainable=False,
        )
        self.values = self.add_weight(
            name="values",
            shape=vectors,
            initializer="zeros",
            dtype=self.compute_dtype,
            trainable=False,
        )
        self.mask = self.add_weight(
            name="mask",
            shape=(self.batch_size, self.cache_length),
            initializer="zeros",
            dtype="bool",
            trainable=False,
        )
        self.built = True

    def reset(self, document_start):
        """Empties the lanes whose `document_start` flag `[batch]` is set."""
        document_start = ops.cast(document_start, "bool")
        self.mask.assign(
            ops.logical_and(self.mask.value, ops.logical_not(document_start)[:, None])
        )

    def read(self):
        """Returns `(keys, values, mask)`: `[batch, cache, heads, head_dim]`
        twice, and the bool `[batch, cache]` of tokens present."""
        return self.keys.value, self.values.value, self.mask.value

    def write(self, keys, values, padding_mask=None):
        """Replaces the cache with a segment of `cache_length` tokens.

        A padded token, and one whose key or value is not finite, is cached
        as absent (mask `False`, zero key and value): a NaN never reaches
        the next segment.
        """
        keys, values = (
            ops.stop_gradient(ops.convert_to_tensor(update, variable.dtype))
            for update, variable in ((keys, self.keys), (values, self.values))
        )
        if padding_mask is None:
            padding_mask = ops.ones(self.mask.shape, dtype="bool")
        # [batch, cache]; a new array, as every layer's cache gets the same
        # padding mask and a variable must own its buffer (JAX's `fit`
        # donates each one to the step).
        present = stored_tokens(keys, values, ops.cast(padding_mask, "bool"), xp=ops)
        for variable, update in ((self.keys, keys), (self.values, values)):
            # Zeros made on the device: a Python 0 is copied from the host
            # on every call under torch (a synchronization on a GPU).
            zeros = ops.zeros_like(update)
            variable.assign(ops.where(present[:, :, None, None], update, zeros))
        self.mask.assign(present)

    def reset_state(self):
        """Empties every lane."""
        for variable in (self.keys, self.values):
            variable.assign(ops.zeros(variable.shape, variable.dtype))
        self.mask.assign(ops.zeros(self.mask.shape, "bool"))

    def _state_specs(self):
        lanes = self.process_batch_size
        vectors = (lanes, self.cache_length, self.num_heads, self.head_dim)
        return {
            "keys": (vectors, "float32"),
            "values": (vectors, "float32"),
            "mask": ((lanes, self.cache_length), "bool"),
        }

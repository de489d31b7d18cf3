import keras
from keras import ops

from keras_memtrans.memory.host import full_like
from keras_memtrans.memory.lane_state import LaneState


@keras.saving.register_keras_serializable(package="keras_memtrans")
class LastKey(LaneState):
    """Smeared-keys state: the key of each lane's last real token so far.

    With `smear_keys=True` a key is mixed with the key of the previous real
    token of its document. For the first real token of a segment that
    token lies in an earlier segment of the lane; this layer carries its
    raw key (projected, before smearing and normalisation), without
    gradient, from one segment to the next. A lane whose document starts
    in the new segment is emptied first; a segment without a real token
    keeps the carried key.

    Like `SegmentCache`, this is a `LaneState` of fixed shape driven by the
    attention layer through `reset`, `read` and `write`; its contents are
    not saved with the model's weights, but `save(path)` / `load(path)`
    keep them in one `.npz` file (`keys` `[batch, heads, head_dim]`
    float32, `present` `[batch]` bool, the sizes and `state_class`).

    Args:
        batch_size: int. Number of lanes (the fixed batch size).
        num_heads: int. Number of key and value heads held (the attention's
            `num_key_value_heads`).
        head_dim: int. Size of each key.
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> import numpy as np
    >>> state = LastKey(batch_size=2, num_heads=1, head_dim=4)
    >>> state.build()
    >>> state.write(np.ones((2, 1, 4), "float32"), np.array([True, False]))
    >>> keys, present = state.read()
    >>> np.asarray(present).tolist()
    [True, False]
    """

    SIZE_NAMES = ("batch_size", "num_heads", "head_dim")

    def __init__(self, batch_size, num_heads, head_dim, **kwargs):
        super().__init__(
            batch_size=batch_size, num_heads=num_heads, head_dim=head_dim, **kwargs
        )

    def build(self, input_shape=None):
        self.keys = self.add_weight(
            name="keys",
            shape=(self.batch_size, self.num_heads, self.head_dim),
            initializer="zeros",
            dtype=self.compute_dtype,
            trainable=False,
        )
        self.present = self.add_weight(
            name="present",
            shape=(self.batch_size,),
            initializer="zeros",
            dtype="bool",
            trainable=False,
        )
        self.built = True

    def reset(self, document_start):
        """Empties the lanes whose `document_start` flag `[batch]` is set."""
        document_start = ops.cast(document_start, "bool")
        self.present.assign(
            ops.logical_and(self.present.value, ops.logical_not(document_start))
        )

    def read(self):
        """Returns `(keys, present)`: `[batch, heads, head_dim]` and the bool
        `[batch]` of lanes that carry a key; absent lanes' keys are zero."""
        present = self.present.value
        keys = self.keys.value
        keys = ops.where(present[:, None, None], keys, ops.zeros_like(keys))
        return keys, present

    def write(self, keys, found):
        """Carries `keys` `[batch, heads, head_dim]` of the lanes where the
        bool `found` `[batch]` is set and the key is finite; the other lanes
        keep theirs."""
        keys = ops.stop_gradient(ops.convert_to_tensor(keys, self.keys.dtype))
        finite = ops.all(ops.isfinite(keys), axis=(1, 2))  # [batch]
        found = ops.logical_and(ops.cast(found, "bool"), finite)
        self.keys.assign(ops.where(found[:, None, None], keys, self.keys.value))
        self.present.assign(ops.logical_or(self.present.value, found))

    def reset_state(self):
        """Empties every lane."""
        self.keys.assign(ops.zeros(self.keys.shape, self.keys.dtype))
        self.present.assign(ops.zeros(self.present.shape, "bool"))

    def _state_specs(self):
        lanes = self.process_batch_size
        return {
            "keys": ((lanes, self.num_heads, self.head_dim), "float32"),
            "present": ((lanes,), "bool"),
        }


def smeared_keys(keys, padding_mask, carried, smear_logit):
    """Each key mixed with the raw key of its previous real token,
    `sigmoid(a) * k[t] + (1 - sigmoid(a)) * k[t-1]` with `a` the head's
    entry of `smear_logit` `[heads]` (see `previous_real_keys`).

    Returns:
        `(keys, last, found)`: the smeared keys, and `previous_real_keys`'
        `last` and `found`.
    """
    previous, last, found = previous_real_keys(keys, padding_mask, carried)
    own = ops.cast(ops.sigmoid(smear_logit), keys.dtype)[:, None]  # [heads, 1]
    return own * keys + (1.0 - own) * previous, last, found  # [b, seg, h, d]


def previous_real_keys(keys, padding_mask=None, carried=None):
    """The raw key of each token's previous real token, for smeared keys.

    That token is the last unpadded one before it in the segment, else the
    lane's `carried` key (a zero key, i.e. no mixing, when there is none).

    Args:
        keys: `[batch, segment, heads, head_dim]` raw keys of a segment.
        padding_mask: optional bool `[batch, segment]`, `False` on padding.
        carried: optional `[batch, heads, head_dim]` key of each lane's last
            real token before the segment (zero where there is none).

    Returns:
        `(previous, last, found)`: the previous real keys
        `[batch, segment, heads, head_dim]`, the key of each lane's last
        real token in the segment `[batch, heads, head_dim]` and the bool
        `[batch]` of lanes whose segment has a real token.
    """
    batch_size, segment_length = ops.shape(keys)[:2]
    if padding_mask is None:
        padding_mask = ops.ones((batch_size, segment_length), dtype="bool")
    if carried is None:
        carried = ops.zeros_like(keys[:, :1])  # [batch, 1, heads, dim]
    else:
        carried = ops.cast(carried, keys.dtype)[:, None]  # [batch, 1, heads, dim]
    if keys.shape[1] == 1:
        # One token (each generated one): nothing real before it in the
        # segment. The same values as below, in three operations, not
        # twenty (each a dispatch from Python when torch runs eagerly).
        return carried, keys[:, 0], ops.cast(padding_mask, "bool")[:, 0]
    positions = ops.arange(segment_length, dtype="int32")
    no_position = full_like(positions, -1)  # [seg]
    # [batch, seg]: a real token's position, -1 for padding.
    real = ops.where(ops.cast(padding_mask, "bool"), positions[None, :], no_position)
    earlier = positions[None, :] < positions[:, None]  # [t, s]: s before t
    # [batch, seg]: the last real position before each token, -1 if none.
    previous_real = ops.max(ops.where(earlier[None], real[:, None, :], no_position), -1)
    previous_index = ops.maximum(previous_real, ops.zeros_like(previous_real))
    previous = ops.take_along_axis(
        keys, previous_index[:, :, None, None], axis=1
    )  # [batch, seg, heads, dim]
    previous = ops.where(previous_real[:, :, None, None] >= 0, previous, carried)
    final = ops.max(real, axis=1)  # [batch]: the last real position
    last = ops.take_along_axis(
        keys, ops.maximum(final, ops.zeros_like(final))[:, None, None, None], axis=1
    )[:, 0]  # [batch, heads, dim]
    return previous, last, final >= 0

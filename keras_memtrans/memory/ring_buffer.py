"""The ring buffer of a kNN memory: a FIFO of (key, value, position) per lane.

A memory of `memory_size` slots is shared by all lanes: every write fills
one slot per token in every lane at once, so each lane holds the entries of
the last `memory_size` tokens it was fed, and each slot records the position
of its token in its document (`-1`: empty). The arithmetic of a write is
written once, against an array namespace `xp`: `numpy` for `RingBuffer`, the
host-side buffer of `ScannMemory`, and `keras.ops` for the in-graph
`ExactMemory` (both namespaces share `all`, `arange`, `cumsum`, `isfinite`,
`logical_and`, `where` and `sum`).
"""

import numpy as np


def written_slots(next_slot, segment_length, memory_size, xp=np):
    """The int32 slots `[segment]` a segment is written to, oldest first."""
    return (next_slot + xp.arange(segment_length, dtype="int32")) % memory_size


def next_slot_after(next_slot, segment_length, memory_size):
    """The slot the segment after one of `segment_length` tokens starts at."""
    return (next_slot + segment_length) % memory_size


def saved_slots(next_slot, memory_size, spare_slots):
    """Where a saved memory's slots lie in a ring with spare slots.

    A ring of `memory_size + spare_slots` slots whose `next_slot` is
    `next_slot` is searched outside the `spare_slots` slots from
    `next_slot` on (`ExactMemory`). Saved, it is the ring of the
    `memory_size` slots searched, oldest first from its `next_slot`
    (`next_slot % memory_size`): with no spare slot, the same ring.

    Returns:
        The ring slot `[memory_size]` of each saved slot.

    Example:
    >>> saved_slots(1, 4, 2).tolist()  # ring slots 3, 4, 5, 0 from saved 1 on
    [0, 3, 4, 5]
    """
    steps = np.arange(memory_size)
    slots = np.empty_like(steps)
    slots[(next_slot + steps) % memory_size] = (next_slot + spare_slots + steps) % (
        memory_size + spare_slots
    )
    return slots


def stored_tokens(keys, values, padding_mask, xp=np):
    """Which tokens of a segment a memory stores: bool `[batch, segment]`.

    A padded token is not stored, nor is one whose key or value has a
    non-finite element: it would spoil every later search of its lane (and
    ScaNN refuses to index it). Both take their slot as empty and do not
    advance the lane's document position.

    Args:
        keys: `[batch, segment, heads, head_dim]`.
        values: `[batch, segment, heads, head_dim]`.
        padding_mask: bool `[batch, segment]`, `False` on padding.
        xp: the array namespace, `numpy` or `keras.ops`.
    """
    finite_keys = xp.all(xp.isfinite(keys), axis=(2, 3))  # [batch, segment]
    finite_values = xp.all(xp.isfinite(values), axis=(2, 3))
    return xp.logical_and(padding_mask, xp.logical_and(finite_keys, finite_values))


def document_positions(document_length, padding_mask, xp=np):
    """Document positions `[batch, segment]` of a segment's tokens.

    Args:
        document_length: int `[batch]`, the tokens each lane's document has
            had before the segment.
        padding_mask: int `[batch, segment]`, 1 for a real token, 0 for
            padding.
        xp: the array namespace, `numpy` or `keras.ops`.

    Returns:
        The position of each real token in its document, `-1` on padding.
    """
    positions = document_length[:, None] + xp.cumsum(padding_mask, axis=1) - 1
    # -1 from a tensor, not a Python number (see `host.full_like`).
    return xp.where(padding_mask > 0, positions, -xp.ones_like(positions))


def document_lengths_after(document_length, padding_mask, xp=np):
    """Each lane's document length `[batch]` after the segment: padded tokens
    (0 in the int `padding_mask` `[batch, segment]`) do not count."""
    return document_length + xp.sum(padding_mask, axis=1)


def emptied_non_finite(arrays):
    """A memory's state arrays with each entry whose key or value has a
    non-finite element (in any head) stored as empty, as `stored_tokens`
    has `write` store such a token: position `-1`, zero key and value.

    A state a memory loads (an old save, a damaged file) then holds finite
    keys and values only, so a search never returns a NaN or inf, not even
    from an empty slot.

    Args:
        arrays: dict of NumPy `keys` and `values`
            `[batch, heads, memory_size, head_dim]` and `positions`
            `[batch, memory_size]`, and any others (kept as they are).
    """
    keys, values = arrays["keys"], arrays["values"]
    finite = np.logical_and(
        np.all(np.isfinite(keys), axis=(1, 3)), np.all(np.isfinite(values), axis=(1, 3))
    )  # [batch, memory_size]
    return {
        **arrays,
        "keys": np.where(finite[:, None, :, None], keys, 0).astype(keys.dtype),
        "values": np.where(finite[:, None, :, None], values, 0).astype(values.dtype),
        "positions": np.where(finite, arrays["positions"], -1).astype("int32"),
    }


class RingBuffer:
    """A NumPy FIFO of (key, value, document position) per lane and head.

    The host-side storage of a kNN memory: `write` fills the next slots of
    the ring (shared by all lanes), overwriting the oldest entries; a
    padded token, and one whose key or value is not finite
    (`stored_tokens`), takes its slot but is stored as empty (position
    `-1`, zero key and value) and does not advance its lane's document
    position; `reset` empties lanes.

    Args:
        batch_size: int. Number of lanes.
        num_heads: int. Number of key and value heads held (the attention's
            `num_key_value_heads`).
        head_dim: int. Size of each key and value vector.
        memory_size: int. Number of slots per lane.

    Example:
    >>> import numpy as np
    >>> buffer = RingBuffer(batch_size=1, num_heads=1, head_dim=2, memory_size=3)
    >>> keys = np.ones((1, 4, 1, 2), "float32")  # [batch, segment, heads, dim]
    >>> buffer.write(keys, keys, np.array([[True, False, True, True]])).tolist()
    [0, 1, 2, 0]
    >>> buffer.positions.tolist()  # token 0 overwritten, token 1 padded
    [[2, -1, 1]]
    """

    def __init__(self, batch_size, num_heads, head_dim, memory_size):
        self.memory_size = memory_size
        vectors = (batch_size, num_heads, memory_size, head_dim)
        self.keys = np.zeros(vectors, "float32")  # [batch, heads, slots, dim]
        self.values = np.zeros(vectors, "float32")
        self.positions = np.full((batch_size, memory_size), -1, "int32")
        self.next_slot = 0
        self.document_length = np.zeros((batch_size,), "int32")

    @classmethod
    def from_state(cls, arrays):
        """A buffer holding `arrays`, as returned by `state_arrays`."""
        batch_size, num_heads, memory_size, head_dim = arrays["keys"].shape
        buffer = cls(batch_size, num_heads, head_dim, memory_size)
        for name in ("keys", "values", "positions", "document_length"):
            getattr(buffer, name)[...] = arrays[name]
        buffer.next_slot = int(arrays["next_slot"])
        return buffer

    def state_arrays(self):
        """The contents as a dict of NumPy arrays (copies): `keys` and
        `values` `[batch, heads, memory_size, head_dim]`, `positions`
        `[batch, memory_size]`, `next_slot` `()` and `document_length`
        `[batch]`."""
        return {
            "keys": self.keys.copy(),
            "values": self.values.copy(),
            "positions": self.positions.copy(),
            "next_slot": np.array(self.next_slot, "int32"),
            "document_length": self.document_length.copy(),
        }

    def reset(self, lanes):
        """Empties the lanes flagged in the bool `lanes` `[batch]`."""
        lanes = np.asarray(lanes, bool)
        self.positions[lanes] = -1
        self.document_length[lanes] = 0

    def write(self, keys, values, padding_mask):
        """Writes one segment into the next slots, oldest first.

        Args:
            keys: `[batch, segment, heads, head_dim]`.
            values: `[batch, segment, heads, head_dim]`.
            padding_mask: bool `[batch, segment]`, `False` on padding.

        Returns:
            The int32 slots `[segment]` written (stored or not).
        """
        segment_length = keys.shape[1]
        slots = written_slots(self.next_slot, segment_length, self.memory_size)
        stored = stored_tokens(keys, values, np.asarray(padding_mask, bool))
        mask = stored.astype("int32")  # [batch, segment]
        for buffer, update in ((self.keys, keys), (self.values, values)):
            update = np.where(stored[:, :, None, None], update, 0)
            # [batch, segment, heads, dim] -> [batch, heads, segment, dim]
            buffer[:, :, slots] = np.swapaxes(update, 1, 2)
        self.positions[:, slots] = document_positions(self.document_length, mask)
        self.next_slot = int(
            next_slot_after(self.next_slot, segment_length, self.memory_size)
        )
        self.document_length[...] = document_lengths_after(self.document_length, mask)
        return slots

    def entries(self):
        """The number of entries `[batch]` each lane holds."""
        return np.count_nonzero(self.positions >= 0, axis=1)

    def gather(self, slots):
        """The entries at `slots` `[batch, query, heads, k]` of each lane.

        Returns:
            `(keys, values, positions)`: `[batch, query, heads, k, head_dim]`
            twice and `[batch, query, heads, k]`; where a slot is `-1` (none)
            the position is `-1` and the key and value are arbitrary finite
            vectors.
        """
        batch_size, num_heads, memory_size, head_dim = self.keys.shape
        lanes = np.arange(batch_size)[:, None, None, None]
        heads = np.arange(num_heads)[None, None, :, None]
        clipped = np.maximum(slots, 0)
        # Flat index of (lane, head, slot) in the [batch * heads * slots] rows:
        # `take` of whole rows is about twice as fast as fancy indexing.
        rows = (lanes * num_heads + heads) * memory_size + clipped
        keys, values = (  # [batch, query, heads, k, head_dim]
            np.take(vectors.reshape(-1, head_dim), rows, axis=0)
            for vectors in (self.keys, self.values)
        )
        positions = np.where(slots >= 0, self.positions[lanes, clipped], -1)
        return keys, values, positions

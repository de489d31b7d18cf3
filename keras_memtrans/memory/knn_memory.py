import contextlib
import os

from keras_memtrans.memory.lane_state import LaneState


class KNNMemory(LaneState):
    """The contract of a kNN memory: a FIFO of (key, value) pairs per lane.

    Each of the `batch_size` lanes (one document stream of the fixed
    batch) keeps, per attention head, the (key, value) pairs of the last
    `memory_size` tokens written to it, and the position of each token in
    its document. The attention layer drives a memory through its methods;
    it is not called on tensors:

    - `reset(document_start)` empties the lanes flagged in the bool
      `[batch]`, whose documents start in the current segment.
    - `search(queries, num_neighbors)` takes queries
      `[batch, query, heads, head_dim]` and returns `(keys, values,
      positions)`: the top-`k` keys and values by inner product in each
      lane's own memory, `[batch, query, heads, k, head_dim]`, and the
      int32 document positions of their tokens `[batch, query, heads, k]`,
      in no particular order. A position is `-1` where the lane holds fewer
      than `k` entries; the keys and values there are arbitrary but finite
      and callers mask them (a weight of 0 times a finite vector adds
      nothing). `num_neighbors` cannot exceed `memory_size`.
    - `search_and_append(queries, num_neighbors, keys, values,
      padding_mask=None)` is `search`, then `append`.
    - `append(keys, values, padding_mask=None)` writes a segment,
      `[batch, segment, heads, head_dim]` each, overwriting the oldest
      entries (FIFO). A padded token (`False` in the bool `padding_mask`
      `[batch, segment]`) takes a slot but is stored as empty, never
      returned, and does not advance its lane's document position; so is
      a token whose key or value is not finite. A loaded state's
      non-finite entries are stored as empty too: every key and value a
      memory holds is finite.
    - `reset_state()` empties every lane and rewinds.

    The contents are runtime state, not weights (a `LaneState`): a saved
    model loads with empty memories, and `save(path)` / `load(path)` store
    and restore them to resume long documents. The file holds the memory's
    class name (`memory_class`), its four sizes (`batch_size`, ...) and the
    ring buffer of every lane: `keys` and `values`
    `[batch, heads, memory_size, head_dim]` float32, `positions`
    `[batch, memory_size]`, `next_slot` `()` and `document_length`
    `[batch]`, int32, plus the subclass's own arrays; any memory of the
    same sizes loads it (the others' arrays aside). While `read_only` is
    `True` (for instance inside `with memory.frozen():`), `reset` and
    `append` change nothing and `search` works as usual; when the flag is
    read (at call, trace or host-call time) is up to each memory.

    Subclasses implement `reset`, `search`, `append` and `reset_state`, and
    the two hooks of `save`/`load` for the ring-buffer layout above:
    `_state_arrays()` and `_restore_state(arrays)`.

    Args:
        batch_size: int. Number of lanes (the fixed batch size).
        num_heads: int. Number of key and value heads held (the attention's
            `num_key_value_heads`).
        head_dim: int. Size of each key and value vector.
        memory_size: int. Number of (key, value) pairs kept per lane and head.
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> import os, tempfile
    >>> import numpy as np
    >>> from keras import ops
    >>> from keras_memtrans import ExactMemory
    >>> memory = ExactMemory(batch_size=1, num_heads=1, head_dim=2,
    ...                      memory_size=4)
    >>> memory.build()
    >>> keys = np.ones((1, 3, 1, 2), "float32")  # [batch, segment, heads, dim]
    >>> memory.append(keys, keys)
    >>> with memory.frozen():
    ...     memory.append(keys, keys)  # read-only: ignored
    >>> _, _, positions = memory.search(keys[:, :1], 4)
    >>> sorted(ops.convert_to_numpy(positions).ravel().tolist())
    [-1, 0, 1, 2]
    >>> restored = ExactMemory(batch_size=1, num_heads=1, head_dim=2,
    ...                        memory_size=4)
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     memory.save(os.path.join(directory, "memory.npz"))
    ...     restored.load(os.path.join(directory, "memory.npz"))
    >>> _, _, positions = restored.search(keys[:, :1], 4)
    >>> sorted(ops.convert_to_numpy(positions).ravel().tolist())
    [-1, 0, 1, 2]

    Reference:
        Wu et al., "Memorizing Transformers", ICLR 2022
        (https://arxiv.org/abs/2203.08913).
    """

    SIZE_NAMES = ("batch_size", "num_heads", "head_dim", "memory_size")
    CLASS_ARRAY = "memory_class"

    def __init__(self, batch_size, num_heads, head_dim, memory_size, **kwargs):
        super().__init__(
            batch_size=batch_size,
            num_heads=num_heads,
            head_dim=head_dim,
            memory_size=memory_size,
            **kwargs,
        )
        self.read_only = False

    def search(self, queries, num_neighbors):
        """Top-`num_neighbors` inner-product search in each lane's memory.

        Args:
            queries: `[batch, query, heads, head_dim]`.
            num_neighbors: int, `k`, at most `memory_size`.

        Returns:
            `(keys, values, positions)`: `[batch, query, heads, k,
            head_dim]` twice and int32 `[batch, query, heads, k]`, `-1`
            where a lane holds fewer than `k` entries.
        """
        raise NotImplementedError

    def search_and_append(
        self, queries, num_neighbors, keys, values, padding_mask=None
    ):
        """`search`, then `append`: the search sees the memory before the
        segment. The attention layer's one call per segment; a memory may
        do the two in another order when the results are the same.

        Args:
            queries, num_neighbors: as `search`.
            keys, values, padding_mask: as `append`.

        Returns:
            `search`'s `(keys, values, positions)`.
        """
        found = self.search(queries, num_neighbors)
        self.append(keys, values, padding_mask)
        return found

    def append(self, keys, values, padding_mask=None):
        """Writes one segment; the oldest slots are overwritten (FIFO).

        Args:
            keys: `[batch, segment, heads, head_dim]`, stored without gradient.
            values: `[batch, segment, heads, head_dim]`, stored without
                gradient.
            padding_mask: optional bool `[batch, segment]`; padded tokens
                take a slot but are stored as empty and do not advance the
                lane's document position.
        """
        raise NotImplementedError

    def _check_num_neighbors(self, num_neighbors):
        if num_neighbors > self.memory_size:
            raise ValueError(
                f"`num_neighbors` ({num_neighbors}) cannot exceed `memory_size` "
                f"({self.memory_size})."
            )

    @contextlib.contextmanager
    def frozen(self):
        """A context in which the memory is `read_only`.

        Inside it `reset` and `append` change nothing; on exit `read_only`
        gets its previous value back, also when the block raises.
        """
        previous = self.read_only
        self.read_only = True
        try:
            yield self
        finally:
            self.read_only = previous

    def _state_specs(self):
        lanes = self.process_batch_size
        vectors = (lanes, self.num_heads, self.memory_size, self.head_dim)
        return {
            "keys": (vectors, "float32"),
            "values": (vectors, "float32"),
            "positions": ((lanes, self.memory_size), "int32"),
            "next_slot": ((), "int32"),
            "document_length": ((lanes,), "int32"),
        }

    def _loads_saved_class(self, saved_class):
        """Any memory's file: every `KNNMemory` saves the same ring buffer
        (and arrays of its own, which the others ignore), so a memory saved
        by one kind loads into another: the kind is a choice of search, not
        of contents."""
        classes, memory_classes = [KNNMemory], set()
        while classes:
            memory_class = classes.pop()
            memory_classes.add(memory_class.__name__)
            classes.extend(memory_class.__subclasses__())
        return saved_class in memory_classes

    def _read_saved(self, path):
        arrays = super()._read_saved(path)
        if not 0 <= arrays["next_slot"] < self.memory_size:
            raise ValueError(
                f"The saved `next_slot` {arrays['next_slot']} in "
                f"{os.fspath(path)!r} is outside [0, {self.memory_size})."
            )
        return arrays

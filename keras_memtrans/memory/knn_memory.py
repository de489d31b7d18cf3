import contextlib
import errno
import os
import tempfile
import zipfile

import keras
import numpy as np

from keras_memtrans.validation import check_positive_ints

SIZE_NAMES = ("batch_size", "num_heads", "head_dim", "memory_size")


def atomic_save_npz(path, arrays):
    """Writes the NumPy `arrays` (a dict) to the `.npz` file `path` atomically.

    The arrays go to a temporary file in the same directory, which is
    flushed to disk and then renamed onto `path`: a reader sees the old
    file or the complete new one, never a partial write, and a failed write
    leaves no temporary file behind. The file is written at `path` exactly
    (no `.npz` suffix is added).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
    )
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temporary, 0o666 & ~umask)  # an ordinary file, not mkstemp's 0600
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.remove(temporary)
        raise


def read_npz(path):
    """All arrays of the `.npz` file `path`, as a dict.

    Raises:
        FileNotFoundError: there is no file at `path`.
        ValueError: the file is not a readable `.npz` (e.g. truncated).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "No saved memory at", path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path!r} is not a readable .npz file: {error}") from error


def checked_array(arrays, name, shape, dtype):
    """`arrays[name]` as `dtype`, checked against `shape`.

    Raises a ValueError naming `name` if the array is missing, has another
    shape or a dtype of another kind.
    """
    if name not in arrays:
        raise ValueError(f"The saved memory has no `{name}` array.")
    array = np.asarray(arrays[name])
    if array.shape != tuple(shape):
        raise ValueError(
            f"The saved `{name}` has shape {array.shape}, this memory's {tuple(shape)}."
        )
    if not np.can_cast(array.dtype, dtype, casting="same_kind"):
        raise ValueError(f"The saved `{name}` is {array.dtype}, not {dtype}.")
    return array.astype(dtype)


class KNNMemory(keras.layers.Layer):
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
      than `k` entries; the keys and values there are arbitrary and callers
      mask them. `num_neighbors` cannot exceed `memory_size`.
    - `append(keys, values, padding_mask=None)` writes a segment,
      `[batch, segment, heads, head_dim]` each, overwriting the oldest
      entries (FIFO). A padded token (`False` in the bool `padding_mask`
      `[batch, segment]`) takes a slot but is stored as empty, never
      returned, and does not advance its lane's document position.
    - `reset_state()` empties every lane and rewinds.

    The contents are runtime state, not weights: a saved model loads with
    empty memories, and `save(path)` / `load(path)` store and restore them
    to resume long documents. While `read_only` is `True` (for instance
    inside `with memory.frozen():`), `reset` and `append` change nothing
    and `search` works as usual; when the flag is read (at call, trace or
    host-call time) is up to each memory.

    Subclasses implement `reset`, `search`, `append` and `reset_state`, and
    the two hooks of `save`/`load`: `_state_arrays()` and
    `_restore_state(arrays)`.

    Args:
        batch_size: int. Number of lanes (the fixed batch size).
        num_heads: int. Number of attention heads.
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

    def __init__(self, batch_size, num_heads, head_dim, memory_size, **kwargs):
        super().__init__(**kwargs)
        check_positive_ints(
            batch_size=batch_size,
            num_heads=num_heads,
            head_dim=head_dim,
            memory_size=memory_size,
        )
        self.batch_size = batch_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.memory_size = memory_size
        self.read_only = False

    def reset(self, document_start):
        """Empties the lanes whose `document_start` flag `[batch]` is set."""
        raise NotImplementedError

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

    def reset_state(self):
        """Empties every lane and rewinds the ring buffer."""
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

    def save(self, path):
        """Saves the contents to the single `.npz` file `path`, atomically.

        The file holds the memory's class name (`memory_class`), its four
        sizes (`batch_size`, ...), the ring buffer of every lane (`keys` and
        `values` `[batch, heads, memory_size, head_dim]` float32,
        `positions` `[batch, memory_size]`, `next_slot` and
        `document_length` `[batch]`, int32) and the subclass's own arrays.
        An existing file is replaced only once the new one is complete.
        """
        arrays = {"memory_class": np.array(type(self).__name__)}
        arrays.update(
            {name: np.array(getattr(self, name), "int64") for name in SIZE_NAMES}
        )
        arrays.update(self._state_arrays())
        atomic_save_npz(path, arrays)

    def load(self, path):
        """Restores the contents saved by `save(path)`.

        The whole file is read and checked before the memory changes: if
        loading fails the memory is left as it was.

        Raises:
            FileNotFoundError: there is no file at `path`.
            ValueError: the file is unreadable, or holds another kind of
                memory, other sizes or inconsistent contents (the message
                names what differs).
        """
        arrays = read_npz(path)
        saved_class = str(arrays.get("memory_class", "no memory"))
        if saved_class != type(self).__name__:
            raise ValueError(
                f"{os.fspath(path)!r} holds {saved_class}, not {type(self).__name__}."
            )
        for name in SIZE_NAMES:
            saved = int(checked_array(arrays, name, (), "int64"))
            if saved != getattr(self, name):
                raise ValueError(
                    f"The memory saved in {os.fspath(path)!r} has `{name}` "
                    f"{saved}, this one {getattr(self, name)}."
                )
        vectors = (self.batch_size, self.num_heads, self.memory_size, self.head_dim)
        specs = {
            "keys": (vectors, "float32"),
            "values": (vectors, "float32"),
            "positions": ((self.batch_size, self.memory_size), "int32"),
            "next_slot": ((), "int32"),
            "document_length": ((self.batch_size,), "int32"),
        }
        for name, (shape, dtype) in specs.items():
            arrays[name] = checked_array(arrays, name, shape, dtype)
        if not 0 <= arrays["next_slot"] < self.memory_size:
            raise ValueError(f"The saved `next_slot` {arrays['next_slot']} is invalid.")
        self._restore_state(arrays)

    def _state_arrays(self):
        """The contents as a dict of NumPy arrays.

        The ring buffer in the layout `save` documents, plus any arrays of
        the subclass.
        """
        raise NotImplementedError

    def _restore_state(self, arrays):
        """Replaces the contents with `arrays`, as `_state_arrays` made them.

        The ring buffer arrays are already checked and cast; the subclass
        checks its own and raises a ValueError before changing anything.
        """
        raise NotImplementedError

    def save_own_variables(self, store):
        """Saves nothing: memory contents are runtime state, not weights."""

    def load_own_variables(self, store):
        """Loads nothing: a loaded memory starts empty."""

    def get_config(self):
        config = super().get_config()
        config.update({name: getattr(self, name) for name in SIZE_NAMES})
        return config

"""Per-lane state layers, and their files.

`LaneState` is the base of every state an attention layer keeps per lane
(`SegmentCache`, `LastKey`, the kNN memories): sizes fixed at construction,
`reset` / `reset_state`, nothing in a model's weights file, and `save(path)`
/ `load(path)` of one `.npz` file. `save_states` / `load_states` write and
read many states as one save in a directory (the `save_lane_states` of the
attention layers and of the backbone). Every file is written by
`atomic_files.atomic_write`.
"""

import errno
import json
import os
import re
import shutil
import uuid

import keras
import numpy as np

from keras_memtrans.memory import host
from keras_memtrans.memory.atomic_files import atomic_save_npz
from keras_memtrans.memory.atomic_files import atomic_write
from keras_memtrans.memory.atomic_files import checked_array
from keras_memtrans.memory.atomic_files import make_directories
from keras_memtrans.memory.atomic_files import read_npz
from keras_memtrans.validation import check_positive_ints

# The file that names the current save of a directory written by
# `save_states`, and the name of each save's own directory.
MANIFEST = "lane_states.json"
SAVE_DIRECTORY = re.compile(r"save-[0-9a-f]{32}")


class LaneState(keras.layers.Layer):
    """Base of the per-lane state layers: fixed sizes, resets, one file each.

    An attention layer keeps, per mode, state for each of the `batch_size`
    lanes (batch rows) it reads: an XL cache (`SegmentCache`), the last key
    for smeared keys (`LastKey`), a kNN memory (`KNNMemory`). A state is a
    layer driven through methods, not called on tensors:

    - `reset(document_start)` empties the lanes flagged in the bool
      `[batch]`; `reset_state()` empties every lane.
    - `save(path)` writes the contents to one `.npz` file, atomically
      (`atomic_write`); `load(path)` reads and checks the whole file before
      it changes anything, so a failed load leaves the state as it was.

    The contents are runtime state, not weights: `save_own_variables` and
    `load_own_variables` store nothing, so a saved model loads with empty
    states.

    A saved file holds the class name (in the array named by `CLASS_ARRAY`,
    `state_class`), each size of `SIZE_NAMES` (int64 scalars) and the
    arrays of `_state_specs()`. A subclass names its sizes in `SIZE_NAMES`
    (constructor arguments, checked to be positive ints, also in
    `get_config`) and declares its arrays, by name, shape and dtype, in
    `_state_specs()`. By default those are its variables of the same names
    and layouts, which `_state_arrays` reads and `_restore_state` assigns;
    a state stored otherwise (a memory's ring buffer) overrides both.

    Args:
        **kwargs: the sizes named in `SIZE_NAMES` (ints >= 1) and standard
            `keras.layers.Layer` arguments.

    Example:
    >>> import os, tempfile
    >>> import numpy as np
    >>> from keras_memtrans import SegmentCache
    >>> cache = SegmentCache(batch_size=1, cache_length=2, num_heads=1,
    ...                      head_dim=2)
    >>> cache.build()
    >>> keys = np.ones((1, 2, 1, 2), "float32")
    >>> cache.write(keys, keys)
    >>> restored = SegmentCache(batch_size=1, cache_length=2, num_heads=1,
    ...                         head_dim=2)
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     cache.save(os.path.join(directory, "cache.npz"))
    ...     restored.load(os.path.join(directory, "cache.npz"))
    >>> np.asarray(restored.read()[2]).tolist()
    [[True, True]]
    """

    SIZE_NAMES = ("batch_size",)
    CLASS_ARRAY = "state_class"

    def __init__(self, **kwargs):
        sizes = {name: kwargs.pop(name) for name in self.SIZE_NAMES}
        super().__init__(**kwargs)
        check_positive_ints(**sizes)
        for name, value in sizes.items():
            setattr(self, name, value)

    def reset(self, document_start):
        """Empties the lanes whose `document_start` flag `[batch]` is set."""
        raise NotImplementedError

    def reset_state(self):
        """Empties every lane."""
        raise NotImplementedError

    @property
    def process_batch_size(self):
        """The lanes this process holds: `batch_size`, or, where a JAX
        `keras.distribution` shards the lanes over the devices of several
        processes (hosts), this process's share. `save` writes them and
        `load` reads them, so each process saves and restores its own."""
        for variable in self.variables:
            if host.split_across_processes(variable.value):
                return host.process_row_count(variable.value)
        return self.batch_size

    def _sizes(self):
        """The sizes a file holds: `SIZE_NAMES`, with this process's lanes."""
        sizes = {name: getattr(self, name) for name in self.SIZE_NAMES}
        return dict(sizes, batch_size=self.process_batch_size)

    def save(self, path):
        """Saves the contents to the single `.npz` file `path`, atomically.

        Missing directories are created; an existing file is replaced only
        once the new one is complete (`atomic_write`).
        """
        if not self.built:
            self.build()
        arrays = {self.CLASS_ARRAY: np.array(type(self).__name__)}
        arrays.update(
            {name: np.array(size, "int64") for name, size in self._sizes().items()}
        )
        arrays.update(self._state_arrays())
        atomic_save_npz(path, arrays)

    def load(self, path):
        """Restores the contents saved by `save(path)`.

        The whole file is read and checked before the state changes: if
        loading fails the state is left as it was.

        Raises:
            FileNotFoundError: there is no file at `path`.
            ValueError: the file is unreadable, or holds another kind of
                state, other sizes or inconsistent contents (the message
                names what differs).
        """
        arrays = self._read_saved(path)
        if not self.built:
            self.build()
        self._restore_state(arrays)

    def _read_saved(self, path):
        """The arrays of the file `path`, checked against this state and
        cast to its dtypes; changes nothing (the checks of `load`)."""
        path = os.fspath(path)
        arrays = read_npz(path)
        kind = type(self).__name__
        if self.CLASS_ARRAY not in arrays:
            raise ValueError(
                f"{path!r} is not a saved {kind} (it has no `{self.CLASS_ARRAY}`)."
            )
        saved_kind = str(arrays[self.CLASS_ARRAY])
        if not self._loads_saved_class(saved_kind):
            raise ValueError(f"{path!r} holds {saved_kind}, not {kind}.")
        for name, size in self._sizes().items():
            saved = int(checked_array(arrays, name, (), "int64", path))
            if saved != size:
                raise ValueError(
                    f"The {kind} saved in {path!r} has `{name}` {saved}, "
                    f"this one {size}."
                )
        for name, (shape, dtype) in self._state_specs().items():
            arrays[name] = checked_array(arrays, name, shape, dtype, path)
        return arrays

    def _loads_saved_class(self, saved_class):
        """Whether a file saved by the class named `saved_class` loads
        here (by default: this class's own files only)."""
        return saved_class == type(self).__name__

    def _state_specs(self):
        """The saved arrays: a dict from name to `(shape, NumPy dtype)`,
        lanes first (`process_batch_size` of them) where an array has lanes."""
        raise NotImplementedError

    def _state_arrays(self):
        """The contents as a dict of NumPy arrays, as `_state_specs` declares
        them (by default: the variables of those names, as they are)."""
        return {
            name: host.process_rows(getattr(self, name).value).astype(dtype)
            for name, (_, dtype) in self._state_specs().items()
        }

    def _restore_state(self, arrays):
        """Replaces the contents with `arrays`, checked and cast as
        `_state_specs` declares them (by default: assigns the variables).

        An override checks anything further and raises a ValueError before
        it changes anything.
        """
        for name in self._state_specs():
            host.assign_process_rows(getattr(self, name), arrays[name])

    def save_own_variables(self, store):
        """Saves nothing: lane state is runtime state, not weights."""

    def load_own_variables(self, store):
        """Loads nothing: a loaded state starts empty."""

    def get_config(self):
        config = super().get_config()
        config.update({name: getattr(self, name) for name in self.SIZE_NAMES})
        return config


def _state_path(directory, save, name):
    """The file of state `name` (`/` separates subdirectories) in a save."""
    return os.path.join(directory, save, *name.split("/")) + ".npz"


def save_states(states, directory):
    """Saves `states` to `directory` as one save: all of them or none.

    Each state goes to its own file, `<name>.npz` (a `/` in a name makes a
    subdirectory), in a new save directory `save-<32 hex digits>`; then the
    manifest `lane_states.json`, `{"save": ..., "states": [names]}`, is
    replaced to name that save, and the other save directories are
    deleted. Every file is written with `atomic_write`. A save that stops
    at any point (an error, a killed process) leaves the previous complete
    save in force, so `load_states` never reads a mix of two saves. One
    process at a time may save to a directory.

    Args:
        states: dict from name to `LaneState`.
        directory: the directory of the saves, created if missing.

    Example:
    >>> import os, tempfile
    >>> from keras_memtrans.memory.last_key import LastKey
    >>> states = {"a/last_key": LastKey(batch_size=1, num_heads=1, head_dim=2)}
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     save_states(states, directory)
    ...     load_states(states, directory)
    ...     print(sorted(os.listdir(directory))[0])
    lane_states.json
    """
    directory = os.path.abspath(os.fspath(directory))
    save = f"save-{uuid.uuid4().hex}"
    make_directories(os.path.join(directory, save))
    for name, state in states.items():
        state.save(_state_path(directory, save, name))
    manifest = json.dumps({"save": save, "states": sorted(states)}, indent=2)
    atomic_write(
        os.path.join(directory, MANIFEST), lambda file: file.write(manifest.encode())
    )
    for entry in os.listdir(directory):
        if SAVE_DIRECTORY.fullmatch(entry) and entry != save:
            shutil.rmtree(os.path.join(directory, entry))


def _read_manifest(path):
    """`(save, names)` of the manifest file `path`; a ValueError if it is
    not one `save_states` wrote."""
    try:
        with open(path, "rb") as file:
            manifest = json.load(file)
        save, names = manifest["save"], manifest["states"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path!r} is not a lane-state manifest: {error!r}") from error
    if not (
        isinstance(save, str)
        and SAVE_DIRECTORY.fullmatch(save)
        and isinstance(names, list)
        and all(isinstance(name, str) for name in names)
    ):
        raise ValueError(f"{path!r} is not a lane-state manifest: {manifest!r}")
    return save, names


def load_states(states, directory):
    """Restores `states` from the current save of `directory` (`save_states`).

    Everything is checked before any state changes: the manifest, that the
    save holds exactly the states named in `states`, and every file as
    `LaneState.load` checks it. If a restore still fails (a ScaNN searcher
    that does not deserialise), the states restored before it get their
    contents back: a failed load leaves every state as it was.

    Args:
        states: dict from name to `LaneState`, as given to `save_states`.
        directory: the directory of the saves.

    Raises:
        FileNotFoundError: `directory` holds no complete save, or the save
            lacks a file.
        ValueError: the manifest or a file is unreadable, or the save does
            not fit `states` (the message names the states missing on
            either side, or the file and what differs in it).
    """
    directory = os.path.abspath(os.fspath(directory))
    manifest = os.path.join(directory, MANIFEST)
    if not os.path.isfile(manifest):
        raise FileNotFoundError(
            errno.ENOENT, f"No saved lane states (no {MANIFEST}) in", directory
        )
    save, names = _read_manifest(manifest)
    missing, extra = sorted(set(states) - set(names)), sorted(set(names) - set(states))
    if missing or extra:
        raise ValueError(
            f"The lane states saved in {directory!r} do not fit: not saved "
            f"{missing}, saved but not here {extra}."
        )
    arrays = {
        name: state._read_saved(_state_path(directory, save, name))
        for name, state in states.items()
    }
    restored = []
    try:
        for name, state in states.items():
            if not state.built:
                state.build()
            backup = state._state_arrays()
            state._restore_state(arrays[name])
            restored.append((state, backup))
    except BaseException:
        for state, backup in restored:
            state._restore_state(backup)
        raise

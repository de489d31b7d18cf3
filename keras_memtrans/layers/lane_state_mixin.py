from keras_memtrans.memory.lane_state import load_states
from keras_memtrans.memory.lane_state import save_states

# The path of every variable of a lane state that holds one row per lane,
# lanes first: `<layer>/<train|inference>_<state>/<array>` (a memory's
# `next_slot`, shared by its lanes, is not one).
LANE_VARIABLE_PATH = (
    r".*/(train|inference)_(cache|last_key|memory)/"
    r"(keys|values|mask|present|positions|document_length)"
)


class LaneStateMixin:
    """The per-lane state of an attention layer: built, reset, saved, loaded.

    A layer that keeps state per batch lane (an XL cache, the carried
    smeared keys, a kNN memory) keeps one state layer of each kind per mode,
    `train_<name>` for `fit` and `inference_<name>` for every other call,
    created by `_add_lane_state` in `build` (the layer provides
    `batch_size`, `num_key_value_heads` (the heads a state holds),
    `head_dim`, `dtype_policy` and sets
    `_lane_state_names = []` in `__init__`). `lane_states(training)` gives
    one mode's states by name; `reset_state`, `save_lane_states` and
    `load_lane_states` act on them.
    """

    def _add_lane_state(self, make_state, name, **options):
        """Builds `train_<name>` and `inference_<name>`, per-lane state layers.

        Args:
            make_state: a state class or factory, called with the lane and
                head sizes, `dtype`, `name` and `options`.
            name: the state's name in `lane_states()`.
            **options: further arguments of `make_state`.
        """
        for mode in ("train", "inference"):
            state = make_state(
                batch_size=self.batch_size,
                num_heads=self.num_key_value_heads,
                head_dim=self.head_dim,
                dtype=self.dtype_policy,
                name=f"{mode}_{name}",
                **options,
            )
            if not state.built:
                state.build()
            setattr(self, f"{mode}_{name}", state)
        self._lane_state_names.append(name)

    def lane_states(self, training=False):
        """The per-lane state layers of one mode, by name.

        Args:
            training: bool. `True` gives the state `fit` reads and writes,
                `False` the one of `evaluate`, `predict` and generation.

        Returns:
            A dict from name (`"cache"`, `"last_key"`, and `"memory"` in
            `KNNAttention`) to state layer; empty for a stateless layer.
        """
        mode = "train" if training else "inference"
        return {
            name: getattr(self, f"{mode}_{name}") for name in self._lane_state_names
        }

    def reset_state(self, training=None):
        """Empties per-lane state: both modes by default, else one.

        Args:
            training: `None` empties the training and the inference state;
                `True` only the training state (what `fit` reads), `False`
                only the inference state (`evaluate`, `predict`, generation).
        """
        modes = (True, False) if training is None else (bool(training),)
        for mode in modes:
            for state in self.lane_states(mode).values():
                state.reset_state()

    def _built_lane_states(self, training):
        """`lane_states(training)`, or a ValueError if the layer has none yet."""
        if not self.built:
            raise ValueError(
                f"Layer {self.name!r} is not built, so it has no lane state yet: "
                "call it on a segment or `build` it first."
            )
        return self.lane_states(training)

    def save_lane_states(self, directory, training=True):
        """Saves every per-lane state of one mode to `directory`, atomically.

        For checkpoints that resume in the middle of documents: the XL
        cache, the last keys and the memory (those the layer has), one
        `<name>.npz` file each (`cache.npz`, `last_key.npz`, `memory.npz`,
        see each state's `save`) in a new save directory, which the
        manifest `lane_states.json` then names (`save_states`): a save that
        stops half-way leaves the previous one in force. The directory is
        created if missing.

        Args:
            directory: path of the directory.
            training: bool. `True` (the default) saves the state `fit`
                reads, `False` the inference state.

        Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> from keras_memtrans import SegmentAttention
        >>> layer = SegmentAttention(num_heads=2, use_xl_cache=True)
        >>> segment = np.random.rand(2, 16, 8).astype("float32")
        >>> _ = layer(segment, document_start=np.array([True, True]),
        ...           training=True)
        >>> restored = SegmentAttention(num_heads=2, use_xl_cache=True)
        >>> restored.build(segment.shape)
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     layer.save_lane_states(directory)
        ...     restored.load_lane_states(directory)
        >>> cache = restored.lane_states(training=True)["cache"]
        >>> bool(np.asarray(cache.read()[2]).all())  # it holds the segment
        True
        """
        save_states(self._built_lane_states(training), directory)

    def load_lane_states(self, directory, training=True):
        """Restores the per-lane state of one mode saved by `save_lane_states`.

        Every file is checked before any state changes (`load_states`): a
        load that fails leaves the layer's state as it was. The save may
        come from the other mode of a layer of the same configuration.

        Args:
            directory: path of the directory.
            training: bool. `True` (the default) restores the state `fit`
                reads, `False` the inference state.

        Raises:
            FileNotFoundError: `directory` holds no complete save.
            ValueError: the save does not fit this layer (another set of
                states, kind of memory or size: the message names it) or a
                file is unreadable.
        """
        load_states(self._built_lane_states(training), directory)

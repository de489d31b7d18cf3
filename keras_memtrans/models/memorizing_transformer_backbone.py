import keras
import keras_hub

from keras_memtrans.layers.decoder_block import DecoderBlock
from keras_memtrans.layers.direct_call import direct_call
from keras_memtrans.layers.knn_attention import check_memory_options
from keras_memtrans.layers.lane_state_mixin import LANE_VARIABLE_PATH
from keras_memtrans.memory.lane_state import load_states
from keras_memtrans.memory.lane_state import save_states
from keras_memtrans.models.lane_inputs_mixin import LaneInputsMixin
from keras_memtrans.validation import check_positive_ints
from keras_memtrans.validation import checked_memory_layers


@keras.saving.register_keras_serializable(package="keras_memtrans")
class MemorizingTransformerBackbone(LaneInputsMixin, keras_hub.models.Backbone):
    """Decoder-only transformer with kNN memory layers (Memorizing Transformer).

    A token embedding, `num_layers` pre-LayerNorm `DecoderBlock`s with T5
    relative position biases (and an optional Transformer-XL cache), and a
    final layer norm. The blocks at `memory_layer_indices` use
    `KNNAttention`: they read and extend a memory of the last `memory_size`
    tokens of each lane's document.

    The model reads documents segment by segment: the batch size and the
    segment length are fixed, batch row `b` carries consecutive segments of
    one document (a lane), and `document_start[b]` marks the segment where a
    new document begins in lane `b` (its memory and cache are emptied first).

    Args:
        vocabulary_size: int. Size of the token vocabulary.
        num_layers: int. Number of decoder blocks.
        num_heads: int. Attention heads per block.
        head_dim: int. Size of each attention head. Defaults to
            `hidden_dim // num_heads`.
        num_key_value_heads: int. Key and value heads per block, a divisor
            of `num_heads`: each serves a group of query heads
            (grouped-query attention; 1 is multi-query attention), and the
            XL caches and memories hold that many heads. Defaults to
            `num_heads`, as in the paper.
        hidden_dim: int. Model width.
        intermediate_dim: int. Feedforward hidden size.
        batch_size: int. Number of lanes.
        segment_length: int. Tokens per segment.
        memory_layer_indices: tuple of ints. Blocks with kNN memory; negative
            indices count from the top (default: the 4th from the top, the
            9th of 12 as in the paper). Empty: no memory at all.
        memory_options: optional dict of the memory layers' `KNNAttention`
            memory arguments (`memory_size`, `num_neighbors`, `memory_kind`,
            `top_k`, `recall_target`, `scores_per_block`, `num_leaves`,
            `num_leaves_to_search`; see `KNNAttention.memory_options()`),
            passed through unchanged; `None` keeps `KNNAttention`'s
            defaults (8192 tokens, 32 neighbours, `"auto"` kind: ScaNN
            from 32K tokens).
        use_xl_cache: bool. Transformer-XL cache in every block.
        smear_keys: bool. Whether every block mixes each attention key with
            the previous token's key (see `SegmentAttention`): not in the
            paper; it makes copying from memory quick to learn.
        tie_query_key_init: bool. Whether every attention's key projection
            starts as a copy of its query projection (see
            `SegmentAttention`): not in the paper; it speeds up learning to
            copy in small models.
        dropout: float. Dropout rate in every block.
        layer_norm_epsilon: float.
        tie_word_embeddings: bool. Whether the output projection reuses the
            token embedding.
        dtype: dtype policy of the model.
        **kwargs: standard `keras.Model` arguments.

    Call arguments:
        A dict with `"token_ids"` int `[batch, segment]`, `"document_start"`
        bool `[batch]` and `"padding_mask"` bool `[batch, segment]`.

    Returns:
        Final hidden states `[batch, segment, hidden_dim]`.

    Example:
    >>> import numpy as np
    >>> backbone = MemorizingTransformerBackbone(
    ...     vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=16,
    ...     intermediate_dim=32, batch_size=2, segment_length=8,
    ...     memory_layer_indices=(-1,),
    ...     memory_options={"memory_size": 64, "num_neighbors": 4})
    >>> hidden = backbone({
    ...     "token_ids": np.ones((2, 8), "int32"),
    ...     "document_start": np.array([True, True]),
    ...     "padding_mask": np.ones((2, 8), bool),
    ... })
    >>> tuple(hidden.shape)
    (2, 8, 16)

    Reference:
        Wu et al., "Memorizing Transformers", ICLR 2022
        (https://arxiv.org/abs/2203.08913).
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_heads,
        hidden_dim,
        intermediate_dim,
        batch_size,
        segment_length,
        head_dim=None,
        num_key_value_heads=None,
        memory_layer_indices=(-4,),
        memory_options=None,
        use_xl_cache=True,
        smear_keys=False,
        tie_query_key_init=False,
        dropout=0.0,
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=True,
        dtype=None,
        **kwargs,
    ):
        check_positive_ints(
            vocabulary_size=vocabulary_size,
            num_layers=num_layers,
            num_heads=num_heads,
            hidden_dim=hidden_dim,
            intermediate_dim=intermediate_dim,
            batch_size=batch_size,
            segment_length=segment_length,
            head_dim=head_dim,
            optional=("head_dim",),
        )
        memory_layers = checked_memory_layers(memory_layer_indices, num_layers)
        memory_options = check_memory_options(memory_options)

        # === Layers ===
        self.token_embedding = keras_hub.layers.ReversibleEmbedding(
            input_dim=vocabulary_size,
            output_dim=hidden_dim,
            tie_weights=tie_word_embeddings,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02),
            dtype=dtype,
            name="token_embedding",
        )
        self.transformer_layers = [
            DecoderBlock(
                num_heads=num_heads,
                intermediate_dim=intermediate_dim,
                head_dim=head_dim,
                num_key_value_heads=num_key_value_heads,
                memory_options=memory_options if i in memory_layers else None,
                batch_size=batch_size,
                use_xl_cache=use_xl_cache,
                smear_keys=smear_keys,
                tie_query_key_init=tie_query_key_init,
                dropout=dropout,
                layer_norm_epsilon=layer_norm_epsilon,
                dtype=dtype,
                name=f"transformer_layer_{i}",
            )
            for i in range(num_layers)
        ]
        self.layer_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="final_layer_norm"
        )

        # === Functional Model ===
        token_ids = keras.Input(
            (segment_length,), batch_size=batch_size, dtype="int32", name="token_ids"
        )
        document_start = keras.Input(
            (), batch_size=batch_size, dtype="bool", name="document_start"
        )
        padding_mask = keras.Input(
            (segment_length,), batch_size=batch_size, dtype="bool", name="padding_mask"
        )
        x = self.token_embedding(token_ids)  # [batch, segment, hidden]
        for block in self.transformer_layers:
            x = block(x, document_start=document_start, padding_mask=padding_mask)
        outputs = self.layer_norm(x)
        super().__init__(
            inputs={
                "token_ids": token_ids,
                "document_start": document_start,
                "padding_mask": padding_mask,
            },
            outputs=outputs,
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.batch_size = batch_size
        self.segment_length = segment_length
        self.head_dim = head_dim
        self.num_key_value_heads = num_key_value_heads
        self.memory_layer_indices = tuple(memory_layer_indices)
        self.memory_options = memory_options
        self.use_xl_cache = use_xl_cache
        self.smear_keys = smear_keys
        self.tie_query_key_init = tie_query_key_init
        self.dropout = dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.tie_word_embeddings = tie_word_embeddings

    @property
    def memory_layers(self):
        """The `KNNAttention` layers, bottom to top."""
        return [
            block.attention for block in self.transformer_layers if block.use_memory
        ]

    def call_with_cache(
        self,
        token_ids,
        decode_caches,
        cache_update_index,
        token_mask,
        starts_segment=False,
    ):
        """The backbone on new tokens of the segment being generated.

        Each block attends from the tokens to its segment so far through
        its `decode_cache` (see `SegmentAttention.call_with_cache`) and
        writes the tokens into it, reading the inference memories and
        caches and writing none of them.

        Args:
            token_ids: int `[batch, tokens]`: the tokens from position
                `cache_update_index` on.
            decode_caches: one `(keys, values, mask, last_key, last_found,
                position_bias)` of variables per block.
            cache_update_index: int scalar: the first token's position.
            token_mask: bool `[batch, tokens]`: `False` on padding.
            starts_segment: bool. Whether the tokens start a segment
                (`cache_update_index` is 0; see
                `SegmentAttention.call_with_cache`).

        Returns:
            The hidden states `[batch, tokens, hidden_dim]` after the final
            layer norm.
        """
        x = direct_call(self.token_embedding, token_ids)  # [batch, tokens, hidden]
        for block, decode_cache in zip(self.transformer_layers, decode_caches):
            x = block.call_with_cache(
                x, decode_cache, cache_update_index, token_mask, starts_segment
            )
        return direct_call(self.layer_norm, x)

    def reset_state(self, training=None):
        """Empties every memory and cache.

        Args:
            training: `None` empties the training and the inference state;
                `True` only the training state, `False` only the inference
                state.
        """
        for block in self.transformer_layers:
            block.reset_state(training)

    def _lane_states(self, training):
        """Every block's per-lane states of one mode, by `<block>/<name>`."""
        return {
            f"{block.name}/{name}": state
            for block in self.transformer_layers
            for name, state in block.attention.lane_states(training).items()
        }

    def save_lane_states(self, directory, training=True):
        """Saves every block's per-lane state of one mode to `directory`.

        What a checkpoint needs, beside the weights, to resume in the
        middle of documents: each block's XL cache, last keys and memory,
        one file each, `<block name>/<state name>.npz` (e.g.
        `transformer_layer_0/cache.npz`; see each state's `save`) in a new
        save directory, which the manifest `lane_states.json` then names
        (`save_states`). A save that stops half-way leaves the previous one
        in force. The directory is created if missing.

        Args:
            directory: path of the directory.
            training: bool. `True` (the default) saves the state `fit`
                reads, `False` the inference state.

        Example:
        >>> import json, os, tempfile
        >>> import numpy as np
        >>> config = dict(
        ...     vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=16,
        ...     intermediate_dim=32, batch_size=2, segment_length=8,
        ...     memory_layer_indices=(-1,),
        ...     memory_options={"memory_size": 64, "num_neighbors": 4})
        >>> backbone = MemorizingTransformerBackbone(**config)
        >>> _ = backbone({
        ...     "token_ids": np.ones((2, 8), "int32"),
        ...     "document_start": np.array([True, True]),
        ...     "padding_mask": np.ones((2, 8), bool),
        ... }, training=True)
        >>> restored = MemorizingTransformerBackbone(**config)
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     backbone.save_lane_states(directory)
        ...     restored.load_lane_states(directory)
        ...     with open(os.path.join(directory, "lane_states.json")) as file:
        ...         manifest = json.load(file)
        >>> for name in manifest["states"]:
        ...     print(name)
        transformer_layer_0/cache
        transformer_layer_1/cache
        transformer_layer_1/memory
        """
        save_states(self._lane_states(training), directory)

    def load_lane_states(self, directory, training=True):
        """Restores every block's per-lane state saved by `save_lane_states`.

        Every file is checked before any state changes (`load_states`): a
        load that fails, e.g. into a model of another shape, leaves the
        model's state as it was. With the same weights, the model then
        continues its documents as the saved one would.

        Args:
            directory: path of the directory.
            training: bool. `True` (the default) restores the state `fit`
                reads, `False` the inference state.

        Raises:
            FileNotFoundError: `directory` holds no complete save.
            ValueError: the save does not fit this model (the message
                names the blocks' states missing on either side, or the
                file and the size or kind of state that differs) or a file
                is unreadable.
        """
        load_states(self._lane_states(training), directory)

    @classmethod
    def get_layout_map(cls, device_mesh, data_parallel_dim_name="batch"):
        """A `keras.distribution.LayoutMap` for data-parallel training.

        Every per-lane state (XL caches, carried keys, kNN memories) is
        sharded along its lane axis over the mesh axis
        `data_parallel_dim_name`, so each device holds only its own lanes;
        weights (absent from the map) are replicated. Use it, as keras-hub's
        `get_layout_map`, in a `keras.distribution.ModelParallel` whose
        `batch_dim_name` is the same axis, set before the model is built.

        Args:
            device_mesh: a `keras.distribution.DeviceMesh`.
            data_parallel_dim_name: str. The mesh axis the lanes (the input
                batch) are split over.

        Returns:
            A `keras.distribution.LayoutMap`.

        Example:
        >>> import keras
        >>> mesh = keras.distribution.DeviceMesh((1,), ["batch"], ["cpu:0"])
        >>> layout_map = MemorizingTransformerBackbone.get_layout_map(mesh)
        >>> layout_map["transformer_layer_1/attention/train_memory/keys"].axes
        ('batch',)
        """
        if data_parallel_dim_name not in device_mesh.axis_names:
            raise ValueError(
                f"`data_parallel_dim_name` {data_parallel_dim_name!r} is not an "
                f"axis of the device mesh {tuple(device_mesh.axis_names)}."
            )
        layout_map = keras.distribution.LayoutMap(device_mesh)
        # Only the lane axis is named: the other axes stay whole on a device.
        layout_map[LANE_VARIABLE_PATH] = (data_parallel_dim_name,)
        return layout_map

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "batch_size": self.batch_size,
                "segment_length": self.segment_length,
                "head_dim": self.head_dim,
                "num_key_value_heads": self.num_key_value_heads,
                "memory_layer_indices": list(self.memory_layer_indices),
                "memory_options": dict(self.memory_options),
                "use_xl_cache": self.use_xl_cache,
                "smear_keys": self.smear_keys,
                "tie_query_key_init": self.tie_query_key_init,
                "dropout": self.dropout,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "tie_word_embeddings": self.tie_word_embeddings,
            }
        )
        return config

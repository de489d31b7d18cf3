import math

import keras
from keras import ops

from keras_memtrans.layers.attention_functions import attend_to_keys
from keras_memtrans.layers.attention_functions import broadcast_over_batch
from keras_memtrans.layers.attention_functions import check_hidden_rank
from keras_memtrans.layers.attention_functions import check_lane_inputs
from keras_memtrans.layers.attention_functions import l2_normalize
from keras_memtrans.layers.attention_functions import mask_logits
from keras_memtrans.layers.initializers import clone_initializer
from keras_memtrans.layers.lane_state_mixin import LaneStateMixin
from keras_memtrans.layers.relative_position_bias import RelativePositionBias
from keras_memtrans.layers.segment_decoding_mixin import SegmentDecodingMixin
from keras_memtrans.memory.last_key import LastKey
from keras_memtrans.memory.last_key import smeared_keys
from keras_memtrans.memory.segment_cache import SegmentCache
from keras_memtrans.validation import check_positive_ints
from keras_memtrans.validation import checked_key_value_heads


@keras.saving.register_keras_serializable(package="keras_memtrans")
class SegmentAttention(SegmentDecodingMixin, LaneStateMixin, keras.layers.Layer):
    """Causal multi-head attention over a segment, optionally Transformer-XL.

    The local attention of the Memorizing Transformer, used on its own in
    every layer without memory: queries and keys are L2-normalised and
    scaled by a learned per-head factor, a T5 relative position bias is
    added, and each token attends causally to its segment, optionally
    prefixed by a cache of the previous segment's keys and values (no
    gradient). The cache is per batch lane, so with `use_xl_cache=True` the
    batch size is fixed and batch row `b` must carry consecutive segments of
    one document; training and inference calls keep separate caches, and a
    saved model holds none.

    Args:
        num_heads: int. Number of attention (query) heads.
        head_dim: int. Size of each head. Defaults to
            `hidden_dim // num_heads`.
        num_key_value_heads: int. Number of key and value heads, a divisor
            of `num_heads`: each shares its keys and values with a group of
            `num_heads // num_key_value_heads` consecutive query heads
            (grouped-query attention; 1 is multi-query attention). Fewer
            heads project less and keep proportionally smaller caches and
            memories. Defaults to `num_heads` (multi-head attention, as in
            the paper).
        batch_size: int. Number of lanes (needed with `use_xl_cache`).
            Defaults to the static batch size of the input.
        use_xl_cache: bool. Whether each segment also attends to the
            previous one of its lane.
        num_buckets: int. Relative position buckets (T5).
        max_distance: int. Relative distance of the last bucket (T5).
        kernel_initializer: initializer of the projection kernels; each
            projection gets its own copy (`clone_initializer`).
        smear_keys: bool. Whether each key is mixed with the key of the
            previous token, `sigmoid(a) * k[t] + (1 - sigmoid(a)) * k[t-1]`
            with a learned per-head `a` (Olsson et al.'s "smeared keys"),
            before normalisation. A query can then find the tokens that
            *follow* its own token, which lets a single layer copy what came
            next (an induction head) and speeds up learning it. The previous
            token is the previous real (unpadded) token of the document:
            padding never enters a key. For the first real token of a
            segment it is the last real token of the lane's previous
            segment when the layer keeps per-lane state (XL cache or
            memory) and the document continues; otherwise the key is not
            mixed.
        tie_query_key_init: bool. Whether the key projection starts as a
            copy of the query projection (the two then train apart; values
            and outputs are drawn on their own). Every query then matches
            its own and similar tokens from the first step, which speeds up
            learning to copy in small models (docs/results.md measures it
            against independent initialisation). Off by default, as in the
            paper.
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        hidden_states: `[batch, segment, hidden_dim]` layer input.
        document_start: optional bool `[batch]`: `True` where a new document
            starts in this segment, emptying that lane's cache first.
        padding_mask: optional bool `[batch, segment]`: `False` marks padded
            tokens, which are never attended to.
        training: bool. Selects the training or the inference cache.

    Returns:
        `[batch, segment, hidden_dim]`.

    Example:
    >>> import numpy as np
    >>> layer = SegmentAttention(num_heads=2, use_xl_cache=True)
    >>> segment = np.random.rand(2, 16, 8).astype("float32")
    >>> tuple(layer(segment, document_start=np.array([True, True])).shape)
    (2, 16, 8)

    Reference:
        Wu et al., "Memorizing Transformers", ICLR 2022
        (https://arxiv.org/abs/2203.08913); Dai et al., "Transformer-XL",
        ACL 2019 (https://arxiv.org/abs/1901.02860); Olsson et al.,
        "In-context Learning and Induction Heads", 2022
        (https://arxiv.org/abs/2209.11895), for `smear_keys`.
    """

    def __init__(
        self,
        num_heads,
        head_dim=None,
        num_key_value_heads=None,
        batch_size=None,
        use_xl_cache=False,
        num_buckets=32,
        max_distance=128,
        kernel_initializer="glorot_uniform",
        smear_keys=False,
        tie_query_key_init=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_positive_ints(
            num_heads=num_heads,
            head_dim=head_dim,
            num_key_value_heads=num_key_value_heads,
            batch_size=batch_size,
            optional=("head_dim", "num_key_value_heads", "batch_size"),
        )
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_key_value_heads = checked_key_value_heads(
            num_heads, num_key_value_heads
        )
        self.batch_size = batch_size
        self.use_xl_cache = use_xl_cache
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.smear_keys = smear_keys
        self.tie_query_key_init = tie_query_key_init
        self._lane_state_names = []  # filled by `build`

    @property
    def needs_fixed_batch(self):
        """Whether the layer keeps per-lane state (here: the XL cache)."""
        return self.use_xl_cache

    def build(self, input_shape):
        check_hidden_rank(input_shape)
        batch_size, segment_length, hidden_dim = input_shape
        if self.batch_size is None and self.needs_fixed_batch:
            if batch_size is None:
                raise ValueError(
                    f"{type(self).__name__} keeps state per batch lane and "
                    "needs a fixed batch size: pass `batch_size=` or build it "
                    "on an input with a static batch size "
                    "(`keras.Input(..., batch_size=B)`)."
                )
            self.batch_size = batch_size
        if self.use_xl_cache and segment_length is None:
            raise ValueError(
                "`use_xl_cache=True` needs a static segment length (the cache "
                f"length); got hidden_states of shape {tuple(input_shape)}."
            )
        self._check_batch(batch_size)
        if self.head_dim is None:
            if hidden_dim % self.num_heads:
                raise ValueError(
                    f"`num_heads` ({self.num_heads}) must divide the hidden size "
                    f"({hidden_dim}), or pass `head_dim`."
                )
            self.head_dim = hidden_dim // self.num_heads
        heads = (self.num_heads, self.head_dim)
        for name in ("query", "key", "value"):
            projected = self.num_heads if name == "query" else self.num_key_value_heads
            projection = keras.layers.EinsumDense(
                "btd,dnh->btnh",
                output_shape=(None, projected, self.head_dim),
                kernel_initializer=clone_initializer(
                    self.kernel_initializer, f"{name}_projection"
                ),
                dtype=self.dtype_policy,
                name=f"{name}_projection",
            )
            projection.build(input_shape)
            setattr(self, f"{name}_projection", projection)
        if self.tie_query_key_init:  # a copy: each variable owns its buffer
            # Each key head starts as its group's first query head.
            query_kernel = ops.reshape(
                self.query_projection.kernel.value,
                (hidden_dim, self.num_key_value_heads, -1, self.head_dim),
            )  # [hidden, key heads, group, head_dim]
            self.key_projection.kernel.assign(ops.copy(query_kernel[:, :, 0]))
        self.output_projection = keras.layers.EinsumDense(
            "btnh,nhd->btd",
            output_shape=(None, hidden_dim),
            kernel_initializer=clone_initializer(
                self.kernel_initializer, "output_projection"
            ),
            dtype=self.dtype_policy,
            name="output_projection",
        )
        self.output_projection.build((batch_size, segment_length, *heads))
        self.relative_position_bias = RelativePositionBias(
            num_heads=self.num_heads,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
            dtype=self.dtype_policy,
            name="relative_position_bias",
        )
        self.relative_position_bias.build()
        self.attention_scale = self.add_weight(
            name="attention_scale",
            shape=(self.num_heads,),
            initializer=keras.initializers.Constant(math.sqrt(self.head_dim)),
        )
        if self.smear_keys:
            self.key_smear_logit = self.add_weight(
                name="key_smear_logit",
                shape=(self.num_key_value_heads,),
                initializer="zeros",
            )
        if self.use_xl_cache:
            self.cache_length = segment_length
            self._add_lane_state(SegmentCache, "cache", cache_length=segment_length)
        if self.smear_keys and self.needs_fixed_batch:
            self._add_lane_state(LastKey, "last_key")
        self.built = True

    def _check_batch(self, batch_size):
        if (
            self.batch_size is not None
            and batch_size is not None
            and batch_size != self.batch_size
        ):
            raise ValueError(
                f"Got a batch of {batch_size} lanes but the layer keeps state "
                f"for `batch_size={self.batch_size}` lanes: feed full batches "
                "of the fixed batch size."
            )

    def _check_inputs(self, hidden_states, document_start, padding_mask):
        """Checks a segment's inputs; returns `(document_start, padding_mask)`
        as bool tensors (see `check_lane_inputs`)."""
        shape = tuple(hidden_states.shape)
        check_hidden_rank(shape)
        self._check_batch(shape[0])
        if self.use_xl_cache and shape[1] != self.cache_length:
            raise ValueError(
                f"With `use_xl_cache=True` every segment must have the length "
                f"the layer was built with ({self.cache_length}), got {shape[1]}."
            )
        return check_lane_inputs(shape, document_start, padding_mask)

    def _project(self, hidden_states, padding_mask=None, last_key=None):
        """Normalised queries `[batch, seg, heads, dim]`, and normalised keys
        and values `[batch, seg, key_value_heads, dim]`.

        With `smear_keys`, reads and then advances the `last_key` state.
        """
        queries = l2_normalize(self.query_projection(hidden_states))
        keys = self.key_projection(hidden_states)  # [batch, seg, heads, dim]
        if self.smear_keys:
            carried = None if last_key is None else last_key.read()[0]
            keys, last, found = smeared_keys(
                keys, padding_mask, carried, self.key_smear_logit
            )
            if last_key is not None:
                last_key.write(last, found)
        return queries, l2_normalize(keys), self.value_projection(hidden_states)

    def _local_attention(self, queries, keys, values, padding_mask, cache):
        """Causal attention over the segment (and cache) with relative bias."""
        batch_size, segment_length = ops.shape(keys)[:2]
        if padding_mask is None:
            key_mask = ops.ones((batch_size, segment_length), dtype="bool")
        else:
            key_mask = ops.cast(padding_mask, "bool")
        cache_length = 0
        if cache is not None:
            cache_keys, cache_values, cache_mask = cache.read()
            cache_length = self.cache_length
            keys = ops.concatenate([ops.cast(cache_keys, keys.dtype), keys], 1)
            values = ops.concatenate([ops.cast(cache_values, values.dtype), values], 1)
            key_mask = ops.concatenate([cache_mask, key_mask], axis=1)
        # Key j sits at position j - cache_length relative to segment start.
        key_positions = ops.arange(cache_length + segment_length)[None, :]
        query_positions = ops.arange(segment_length)[:, None]
        relative = key_positions - cache_length - query_positions  # [query, key]
        bias = self.relative_position_bias.segment_bias(
            segment_length, cache_length
        )  # [heads, query, key]
        # The causal mask goes into the bias and the padding into one logit
        # per key, so the whole-size work is two additions and the softmax.
        causal = relative <= 0  # [query, key]
        bias = ops.cast(bias, "float32") + mask_logits(causal)  # [heads, q, k]
        key_bias = mask_logits(key_mask)[:, None, None, :]  # [batch, 1, 1, key]
        sees_a_key = ops.any(
            ops.logical_and(causal[None], key_mask[:, None, :]), axis=-1
        )  # [batch, query]
        return attend_to_keys(
            queries,
            # [batch, key_heads, key, head_dim] twice
            ops.transpose(keys, (0, 2, 1, 3)),
            ops.transpose(values, (0, 2, 1, 3)),
            self.attention_scale,
            broadcast_over_batch(bias, batch_size),  # [batch, heads, q, k]
            key_bias,
            sees_a_key,
        )

    def call(
        self, hidden_states, document_start=None, padding_mask=None, training=None
    ):
        outputs, _ = self._attend(hidden_states, document_start, padding_mask, training)
        return outputs

    def _attend(self, hidden_states, document_start, padding_mask, training):
        """The attention skeleton, with three hooks for subclasses.

        Resets the lanes whose document starts, projects, attends locally,
        lets `_mix_extra_attention` mix in any other attention (and record
        the segment in a state it reads), lets `_write_lane_states` record
        this segment, and projects the output.

        Returns:
            `(outputs, extra)`: `[batch, segment, hidden_dim]` and what
            `_mix_extra_attention` returned beside the mixed attention.
        """
        document_start, padding_mask = self._check_inputs(
            hidden_states, document_start, padding_mask
        )
        states = self.lane_states(training)
        if document_start is not None:
            for state in states.values():
                state.reset(document_start)
        queries, keys, values = self._project(
            hidden_states, padding_mask, states.get("last_key")
        )
        attended = self._local_attention(
            queries, keys, values, padding_mask, states.get("cache")
        )
        attended, extra = self._mix_extra_attention(
            queries, attended, states, (keys, values, padding_mask)
        )
        self._write_lane_states(states, keys, values, padding_mask)
        return self.output_projection(attended), extra

    def _mix_extra_attention(self, queries, local, states, segment=None):
        """Hook: mixes other attention into the local one.

        Args:
            queries: normalised `[batch, query, heads, head_dim]`.
            local: the local attention `[batch, query, heads, head_dim]`.
            states: this mode's `lane_states()`.
            segment: this segment's `(keys, values, padding_mask)`, which
                the hook may record in a state it reads (`KNNAttention`'s
                memory); `None` while generating (nothing is written).

        Returns:
            `(attended, extra)`: the mixed `[batch, query, heads, head_dim]`
            and anything the subclass reports beside it (here: `None`).
        """
        return local, None

    def _write_lane_states(self, states, keys, values, padding_mask):
        """Hook: records this segment's keys and values (here: the XL cache)."""
        if "cache" in states:
            states["cache"].write(keys, values, padding_mask)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "head_dim": self.head_dim,
                "num_key_value_heads": self.num_key_value_heads,
                "batch_size": self.batch_size,
                "use_xl_cache": self.use_xl_cache,
                "num_buckets": self.num_buckets,
                "max_distance": self.max_distance,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "smear_keys": self.smear_keys,
                "tie_query_key_init": self.tie_query_key_init,
            }
        )
        return config

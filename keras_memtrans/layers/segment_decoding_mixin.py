from keras import ops

from keras_memtrans.layers.attention_functions import attend_to_keys
from keras_memtrans.layers.attention_functions import l2_normalize
from keras_memtrans.layers.attention_functions import mask_logits
from keras_memtrans.layers.direct_call import direct_call
from keras_memtrans.memory.host import slice_update_variable
from keras_memtrans.memory.last_key import smeared_keys


class SegmentDecodingMixin:
    """Generation's incremental step of a `SegmentAttention`.

    `call_with_cache` computes only the new tokens of the segment being
    generated, with the keys and values of its earlier tokens kept in a
    decode cache (keras-hub's name and arguments for it, the cache held in
    the generation step's variables and written in place). It uses the
    layer's own pieces (its projections, `smeared_keys`, its relative
    position bias, `_mix_extra_attention` and `lane_states`), so that
    `KNNAttention`'s memory joins in as in `call`.
    """

    @property
    def decode_prefix_length(self):
        """The XL cache's length, held ahead of the segment in the decode
        cache (0 without an XL cache)."""
        return self.cache_length if self.use_xl_cache else 0

    def call_with_cache(
        self,
        hidden_states,
        decode_cache,
        cache_update_index,
        token_mask,
        starts_segment=False,
    ):
        """Attends from new tokens of the segment being generated.

        Generation's incremental step: the tokens from position
        `cache_update_index` on (the rest of a prompt's segment, then one
        new token per step) attend, as in `call`, to the segment's real
        tokens up to themselves (and the XL cache and memory), whose keys
        and values `decode_cache` holds, so earlier tokens are not computed
        again. Reads the inference state (XL cache, memory, carried key)
        and writes none of it: a segment is committed by `call` once
        complete.

        The decode cache is the generation step's variables, written in
        place here (keras-hub's `call_with_cache` returns a new cache
        instead: eager torch then copied the whole cache twice per token,
        in the scatter and in the assignment). It holds the XL cache's
        keys and values ahead of the segment's, head-major (each (lane,
        head) reads its keys as one matrix, no copy), and the relative
        position bias of every position of the segment: the step that
        starts a segment (`starts_segment`) writes both, the later steps
        only read them.

        Args:
            hidden_states: `[batch, tokens, hidden_dim]`: the new tokens.
            decode_cache: `(keys, values, mask, last_key, last_found,
                position_bias)`, `keras.Variable`s: float32 keys (smeared
                and normalised, as attended to) and values `[batch,
                key_heads, prefix + segment, head_dim]` of the XL cache
                (`decode_prefix_length` entries) and then of the segment's
                tokens so far, their bool mask `[batch, prefix + segment]`
                (what lies beyond the tokens so far is never read), the
                raw key `[batch, key_heads, head_dim]` of each lane's last
                real token so far in the segment, where the bool
                `last_found` `[batch]` says there is one (read from
                position 1 on), and the float32 bias `[heads, segment,
                prefix + segment]` of each query position over those keys.
            cache_update_index: int scalar: the first new token's position.
            token_mask: bool `[batch, tokens]`: `False` on padding.
            starts_segment: bool. Whether the new tokens start a segment
                (`cache_update_index` is 0): the XL cache and the bias are
                then written into the decode cache first. A step that
                starts a segment without it reads what an earlier segment
                left there.

        Returns:
            `[batch, tokens, hidden_dim]`; the new tokens' keys, values and
            mask are written into the decode cache.
        """
        states = self.lane_states(training=False)
        keys_cache, values_cache, mask_cache, last_key, last_found, position_bias = (
            decode_cache
        )
        prefix = self.decode_prefix_length
        if starts_segment:
            self._start_segment(states, decode_cache)
        token_mask = ops.cast(token_mask, "bool")  # [batch, tokens]
        queries = l2_normalize(direct_call(self.query_projection, hidden_states))
        keys = direct_call(self.key_projection, hidden_states)  # [b, t, heads, d]
        if self.smear_keys:
            # The key before the first new token: the segment's last real
            # one so far, else the lane's carried one (zero: none).
            found = ops.logical_and(last_found.value, cache_update_index > 0)
            carried = ops.zeros_like(last_key.value)
            if "last_key" in states:
                carried = ops.cast(states["last_key"].read()[0], "float32")
            carried = ops.where(found[:, None, None], last_key.value, carried)
            keys, last, found_now = smeared_keys(
                keys, token_mask, carried, self.key_smear_logit
            )
            last_key.assign(
                ops.where(
                    found_now[:, None, None], ops.cast(last, "float32"), last_key.value
                )
            )
            last_found.assign(ops.logical_or(found_now, found))
        values = direct_call(self.value_projection, hidden_states)
        start = cache_update_index + prefix
        for cache, tokens in ((keys_cache, l2_normalize(keys)), (values_cache, values)):
            # [batch, key_heads, tokens, head_dim]
            tokens = ops.transpose(ops.cast(tokens, "float32"), (0, 2, 1, 3))
            slice_update_variable(cache, start, 2, tokens)
        slice_update_variable(mask_cache, start, 1, token_mask)
        # [tokens]: the new tokens' positions in the segment
        query_positions = cache_update_index + ops.arange(ops.shape(queries)[1])
        attended = self._cached_attention(
            queries,
            ops.cast(keys_cache.value, queries.dtype),
            ops.cast(values_cache.value, queries.dtype),
            mask_cache.value,
            # [heads, tokens, prefix + segment]
            ops.take(position_bias.value, query_positions, axis=1),
            query_positions,
        )  # [batch, tokens, heads, head_dim]
        attended, _ = self._mix_extra_attention(queries, attended, states)
        return direct_call(self.output_projection, attended)  # [b, t, hidden]

    def _start_segment(self, states, decode_cache):
        """Writes the XL cache and the position bias of a new segment into
        the decode cache."""
        keys, values, mask, _, _, position_bias = decode_cache
        if "cache" in states:
            cache_keys, cache_values, cache_mask = states["cache"].read()
            for cache, entries in ((keys, cache_keys), (values, cache_values)):
                # [batch, key_heads, prefix, head_dim]
                entries = ops.transpose(ops.cast(entries, "float32"), (0, 2, 1, 3))
                slice_update_variable(cache, 0, 2, entries)
            slice_update_variable(mask, 0, 1, ops.cast(cache_mask, "bool"))
        bias = self.relative_position_bias.segment_bias(
            position_bias.shape[1], self.decode_prefix_length
        )  # [heads, segment, prefix + segment]
        position_bias.assign(ops.cast(bias, "float32"))

    def _cached_attention(
        self, queries, keys, values, key_mask, position_bias, query_positions
    ):
        """`_local_attention` of the new tokens over the decode cache.

        Args:
            queries: `[batch, tokens, heads, head_dim]`.
            keys, values: `[batch, key_heads, prefix + segment, head_dim]`.
            key_mask: bool `[batch, prefix + segment]`.
            position_bias: float32 `[heads, tokens, prefix + segment]`.
            query_positions: int `[tokens]`, in the segment.
        """
        prefix = self.decode_prefix_length
        key_positions = ops.arange(ops.shape(keys)[2]) - prefix  # [keys]
        causal = key_positions[None, :] <= query_positions[:, None]  # [t, keys]
        seen = ops.logical_and(causal[None], key_mask[:, None, :])  # [b, t, keys]
        return attend_to_keys(
            queries,
            keys,
            values,
            self.attention_scale,
            position_bias[None],
            mask_logits(seen)[:, None],
            ops.any(seen, axis=-1),
        )

from keras import ops

from keras_memtrans.layers.attention_functions import l2_normalize
from keras_memtrans.layers.attention_functions import mask_logits
from keras_memtrans.layers.direct_call import direct_call
from keras_memtrans.memory.last_key import smeared_keys


class SegmentDecodingMixin:
    """Generation's incremental step of a `SegmentAttention`.

    `call_with_cache` computes only the new tokens of the segment being
    generated, with the keys and values of its earlier tokens kept in a
    decode cache (keras-hub's name and arguments for it). It uses the
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

        The decode cache holds the XL cache's keys and values ahead of the
        segment's, and the relative position bias of every position of
        the segment: the step that starts a segment (`starts_segment`)
        writes both, the later steps only read them (eager torch spent
        more on joining the XL cache to the segment and on looking up the
        bias than on the attention itself).

        Args:
            hidden_states: `[batch, tokens, hidden_dim]`: the new tokens.
            decode_cache: `(keys, values, mask, last_key, last_found,
                position_bias)`: float32 keys (smeared and normalised, as
                attended to) and values `[batch, prefix + segment, heads,
                head_dim]` of the XL cache (`decode_prefix_length`
                entries) and then of the segment's tokens so far, their
                bool mask `[batch, prefix + segment]` (what lies beyond the
                tokens so far is never read), the raw key `[batch, heads,
                head_dim]` of each lane's last real token so far in the
                segment, where the bool `last_found` `[batch]` says there
                is one (read from position 1 on), and the float32 bias
                `[heads, segment, prefix + segment]` of each query
                position over those keys.
            cache_update_index: int scalar: the first new token's position.
            token_mask: bool `[batch, tokens]`: `False` on padding.
            starts_segment: bool. Whether the new tokens start a segment
                (`cache_update_index` is 0): the XL cache and the bias are
                then written into the decode cache first. A step that
                starts a segment without it reads what an earlier segment
                left there.

        Returns:
            `(outputs, decode_cache)`: `[batch, tokens, hidden_dim]` and
            the cache with the new tokens written in.
        """
        states = self.lane_states(training=False)
        cached_keys, cached_values, mask, last_key, last_found, position_bias = (
            decode_cache
        )
        prefix = self.decode_prefix_length
        if starts_segment:
            cached_keys, cached_values, mask, position_bias = self._start_segment(
                states, cached_keys, cached_values, mask, position_bias
            )
        token_mask = ops.cast(token_mask, "bool")  # [batch, tokens]
        queries = l2_normalize(direct_call(self.query_projection, hidden_states))
        keys = direct_call(self.key_projection, hidden_states)  # [b, t, heads, d]
        if self.smear_keys:
            # The key before the first new token: the segment's last real
            # one so far, else the lane's carried one (zero: none).
            found = ops.logical_and(last_found, cache_update_index > 0)
            carried = ops.zeros_like(last_key)
            if "last_key" in states:
                carried = ops.cast(states["last_key"].read()[0], "float32")
            carried = ops.where(found[:, None, None], last_key, carried)
            keys, last, found_now = smeared_keys(
                keys, token_mask, carried, self.key_smear_logit
            )
            last_key = ops.where(
                found_now[:, None, None], ops.cast(last, "float32"), last_key
            )
            last_found = ops.logical_or(found_now, found)
        # [batch, prefix + segment, heads, dim] twice, and [b, prefix + segment]
        cached_keys, cached_values, mask = write_tokens(
            cache_update_index + prefix,
            (cached_keys, ops.cast(l2_normalize(keys), "float32")),
            (
                cached_values,
                ops.cast(direct_call(self.value_projection, hidden_states), "float32"),
            ),
            (mask, token_mask),
        )
        # [tokens]: the new tokens' positions in the segment
        query_positions = cache_update_index + ops.arange(ops.shape(queries)[1])
        attended = self._cached_attention(
            queries,
            ops.cast(cached_keys, queries.dtype),
            ops.cast(cached_values, queries.dtype),
            mask,
            ops.take(position_bias, query_positions, axis=1),  # [heads, t, keys]
            query_positions,
        )  # [batch, tokens, heads, head_dim]
        attended, _ = self._mix_extra_attention(queries, attended, states)
        # [batch, tokens, hidden_dim]
        outputs = direct_call(self.output_projection, attended)
        decode_cache = (
            cached_keys,
            cached_values,
            mask,
            last_key,
            last_found,
            position_bias,
        )
        return outputs, decode_cache

    def _start_segment(self, states, keys, values, mask, position_bias):
        """The decode cache's XL cache part and position bias, written for a
        new segment; the keys, values, mask and bias, in that order."""
        if "cache" in states:
            cache_keys, cache_values, cache_mask = states["cache"].read()
            keys, values, mask = (
                ops.slice_update(cache, [0] * len(cache.shape), ops.cast(new, dtype))
                for cache, new, dtype in (
                    (keys, cache_keys, "float32"),
                    (values, cache_values, "float32"),
                    (mask, cache_mask, "bool"),
                )
            )
        bias = self.relative_position_bias.segment_bias(
            position_bias.shape[1], self.decode_prefix_length
        )  # [heads, segment, prefix + segment]
        return keys, values, mask, ops.cast(bias, "float32")

    def _cached_attention(
        self, queries, keys, values, key_mask, position_bias, query_positions
    ):
        """`_local_attention` of the new tokens over the decode cache.

        Args:
            queries: `[batch, tokens, heads, head_dim]`.
            keys, values: `[batch, prefix + segment, key_heads, head_dim]`.
            key_mask: bool `[batch, prefix + segment]`.
            position_bias: float32 `[heads, tokens, prefix + segment]`.
            query_positions: int `[tokens]`, in the segment.
        """
        prefix = self.decode_prefix_length
        key_positions = ops.arange(ops.shape(keys)[1]) - prefix  # [keys]
        causal = key_positions[None, :] <= query_positions[:, None]  # [t, keys]
        seen = ops.logical_and(causal[None], key_mask[:, None, :])  # [b, t, keys]
        return self._attend_to_keys(
            queries,
            keys,
            values,
            position_bias[None],
            mask_logits(seen)[:, None],
            ops.any(seen, axis=-1),
        )


def write_tokens(start, *caches_and_tokens):
    """Each `cache` `[batch, segment, ...]` of the `(cache, tokens)` pairs
    with its `tokens` `[batch, new, ...]` written at positions `start` (an
    int scalar) to `start + new - 1`; the caches, in order.

    One new token (each generated one) is written by a scatter at `(lane,
    start)`, the same indices for every cache: a handful of operations,
    where a slice update from a tensor start runs about thirty under torch,
    each dispatched from Python there (and a select over the whole cache
    costs XLA more than the scatter).
    """
    caches, tokens = zip(*caches_and_tokens)
    if tokens[0].shape[1] != 1:
        return tuple(
            ops.slice_update(cache, [0, start] + [0] * (len(cache.shape) - 2), new)
            for cache, new in caches_and_tokens
        )
    lanes = ops.arange(ops.shape(caches[0])[0], dtype="int32")
    indices = ops.stack([lanes, ops.zeros_like(lanes) + start], axis=1)  # [batch, 2]
    return tuple(
        ops.scatter_update(cache, indices, new[:, 0])
        for cache, new in caches_and_tokens
    )

from keras import ops

from keras_memtrans.layers.attention_functions import l2_normalize
from keras_memtrans.layers.direct_call import direct_call
from keras_memtrans.memory.last_key import smeared_keys


class SegmentDecodingMixin:
    """Generation's incremental step of a `SegmentAttention`.

    `call_with_cache` computes only the new tokens of the segment being
    generated, with the keys and values of its earlier tokens kept in a
    decode cache (keras-hub's name and arguments for it). It uses the
    layer's own pieces (its projections, `smeared_keys`, `_local_attention`,
    `_mix_extra_attention` and `lane_states`), so that `KNNAttention`'s
    memory joins in as in `call`.
    """

    def call_with_cache(
        self, hidden_states, decode_cache, cache_update_index, token_mask
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

        Args:
            hidden_states: `[batch, tokens, hidden_dim]`: the new tokens.
            decode_cache: `(keys, values, mask, last_key, last_found)`:
                float32 keys (smeared and normalised, as attended to) and
                values `[batch, segment, heads, head_dim]` of the segment's
                tokens so far, their bool mask `[batch, segment]` (what
                lies beyond them is never read), and the raw key `[batch,
                heads, head_dim]` of each lane's last real token so far in
                the segment, where the bool `last_found` `[batch]` says
                there is one (read from position 1 on).
            cache_update_index: int scalar: the first new token's position.
            token_mask: bool `[batch, tokens]`: `False` on padding.

        Returns:
            `(outputs, decode_cache)`: `[batch, tokens, hidden_dim]` and
            the cache with the new tokens written in.
        """
        states = self.lane_states(training=False)
        cached_keys, cached_values, mask, last_key, last_found = decode_cache
        token_mask = ops.cast(token_mask, "bool")  # [batch, tokens]
        queries = l2_normalize(
            direct_call(self.query_projection, hidden_states)
        )  # [b, t, h, d]
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
        # [batch, segment, heads, dim] twice, and [batch, segment]
        cached_keys, cached_values, mask = write_tokens(
            cache_update_index,
            (cached_keys, ops.cast(l2_normalize(keys), "float32")),
            (
                cached_values,
                ops.cast(direct_call(self.value_projection, hidden_states), "float32"),
            ),
            (mask, token_mask),
        )
        attended = self._local_attention(
            queries,
            ops.cast(cached_keys, queries.dtype),
            ops.cast(cached_values, queries.dtype),
            mask,
            states.get("cache"),
            query_positions=cache_update_index + ops.arange(ops.shape(queries)[1]),
        )  # [batch, tokens, heads, head_dim]
        attended, _ = self._mix_extra_attention(queries, attended, states)
        # [batch, tokens, hidden_dim]
        outputs = direct_call(self.output_projection, attended)
        return outputs, (cached_keys, cached_values, mask, last_key, last_found)


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

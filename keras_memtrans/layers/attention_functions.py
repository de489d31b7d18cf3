"""Stateless pieces of the attention layers: normalisation, masked softmax,
grouped-query scores and mixing, the softmax attention over keys, and
the checks of a segment's inputs."""

from keras import ops
from keras.backend import standardize_dtype

from keras_memtrans.memory.host import full_like
from keras_memtrans.memory.host import on_accelerator

_MASKED_LOGIT = -1e9


def l2_normalize(x):
    """L2-normalises the last axis (in float32), keeping the dtype of `x`."""
    x32 = ops.cast(x, "float32")
    norm = ops.sqrt(ops.sum(ops.square(x32), axis=-1, keepdims=True) + 1e-12)
    return ops.cast(x32 / norm, x.dtype)


def mask_logits(mask):
    """The float32 logit to add for a bool `mask`, at its own shape.

    0 where `mask` is `True`, a large negative number where it is `False`;
    float32 whatever `floatx` is (in float16 the number would be `-inf`).
    """
    return ops.cast(ops.logical_not(mask), "float32") * _MASKED_LOGIT


def masked_softmax(logits, mask, axis=-1):
    """Softmax in float32 over `axis`; masked entries get weight 0."""
    logits = ops.cast(logits, "float32")
    logits = ops.where(mask, logits, full_like(logits, _MASKED_LOGIT))
    return ops.where(mask, ops.softmax(logits, axis=axis), ops.zeros_like(logits))


def broadcast_over_batch(x, batch_size):
    """`x` repeated along a new leading axis: `[batch_size, *x.shape]`.

    On the CPU, made as a matmul with a column of ones, so that its
    gradient is a matmul too, where a broadcast's is a sum over the leading
    axis alone. XLA's CPU compiler in JAX 0.10 (its YNNPACK fusions) takes
    30-60 times as long for that sum as for one over any other axis (4.4
    ms against 0.07-0.14 ms for `[4, 4, 256, 256]` float32): the relative
    position bias's gradient, once per layer and step (docs/performance.md,
    "A sum over the batch alone"). On a GPU or TPU, whose float32 matmuls
    may round their inputs to TF32 or bfloat16, a broadcast.
    """
    shape = (batch_size, *x.shape)
    if on_accelerator():
        return ops.broadcast_to(x[None], shape)
    ones = ops.ones((batch_size, 1), x.dtype)
    repeated = ops.matmul(ones, ops.reshape(x, (1, -1)))  # [batch, size of x]
    return ops.reshape(repeated, shape)  # [batch, *x.shape]


def grouped_scores(queries, keys):
    """Scores `[batch, heads, query, key]` of each query head against the
    keys of its group.

    Args:
        queries: `[batch, query, heads, dim]`.
        keys: `[batch, key_heads, key, dim]` (head-major: each head's keys
            one matrix), `key_heads` a divisor of `heads`: query head `h`
            reads key head `h // (heads // key_heads)`.
    """
    heads, key_heads = queries.shape[2], keys.shape[1]
    if heads == key_heads:
        return ops.einsum("bqhd,bhkd->bhqk", queries, keys)
    batch_size, num_queries = ops.shape(queries)[:2]
    # [batch, query, key heads, group, dim]
    queries = ops.reshape(
        queries, (batch_size, num_queries, key_heads, -1, queries.shape[3])
    )
    scores = ops.einsum("bqngd,bnkd->bngqk", queries, keys)  # [b, n, g, q, k]
    return ops.reshape(scores, (batch_size, heads, num_queries, -1))


def grouped_mix(weights, values):
    """The values `[batch, query, heads, dim]` mixed by `weights` `[batch,
    heads, query, key]`, each query head from the values `[batch,
    key_heads, key, dim]` of its group (see `grouped_scores`)."""
    heads, key_heads = weights.shape[1], values.shape[1]
    if heads == key_heads:
        return ops.einsum("bhqk,bhkd->bqhd", weights, values)
    batch_size, _, num_queries, num_keys = ops.shape(weights)
    # [batch, key heads, group, query, key]
    weights = ops.reshape(weights, (batch_size, key_heads, -1, num_queries, num_keys))
    mixed = ops.einsum("bngqk,bnkd->bqngd", weights, values)  # [b, q, n, g, d]
    return ops.reshape(mixed, (batch_size, num_queries, heads, values.shape[3]))


def attend_to_keys(queries, keys, values, scale, bias, mask_bias, sees_a_key):
    """The softmax attention of `queries` over `keys` and `values`.

    Args:
        queries: `[batch, query, heads, head_dim]`.
        keys, values: `[batch, key_heads, key, head_dim]`.
        scale: `[heads]`: each head's scale of its scores.
        bias, mask_bias: float32, each broadcast to `[batch, heads, query,
            key]`: added to the scaled scores, in that order.
        sees_a_key: bool `[batch, query]`: `False` where a query sees no key
            (padding with no real token before it), which then attends to
            nothing.

    Returns:
        `[batch, query, heads, head_dim]`.
    """
    scale = ops.cast(scale, queries.dtype)[:, None]  # [heads, 1]
    # [batch, heads, query, key]
    logits = grouped_scores(queries * scale, keys)
    logits = ops.cast(logits, "float32") + bias + mask_bias
    weights = ops.softmax(logits, axis=-1)  # [batch, heads, query, key]
    # [batch, query, heads, head_dim]
    attended = grouped_mix(ops.cast(weights, values.dtype), values)
    return attended * ops.cast(sees_a_key, attended.dtype)[:, :, None, None]


def check_hidden_rank(shape):
    """Raises a ValueError unless `shape` is `[batch, segment, hidden_dim]`."""
    if len(shape) != 3:
        raise ValueError(
            "`hidden_states` must have rank 3 [batch, segment, hidden_dim], "
            f"got shape {tuple(shape)}."
        )


def check_lane_inputs(shape, document_start, padding_mask):
    """Checks a segment's lane inputs and returns them as bool arrays.

    `document_start` must be bool `[batch]` and `padding_mask` bool
    `[batch, segment]` of `shape`: a bool array or tensor (a symbolic one
    inside a compiled step), a list of Python bools, or one bool (Python,
    NumPy or a 0-d tensor), which stands for every lane (and token).
    `None` stays `None`.

    Args:
        shape: the `[batch, segment, hidden_dim]` shape of the segment.
        document_start: the lanes' document starts, or `None`.
        padding_mask: the tokens' padding mask, or `None`.

    Returns:
        `(document_start, padding_mask)`: one bool or a list as a bool
        tensor of the full shape, any other value unchanged.

    Raises:
        ValueError: naming `document_start` or `padding_mask` when its dtype
            is not bool (a float or int flag is not read as a bool), or its
            shape is not `[batch]` or `[batch, segment]`.
    """
    return (
        _lane_input("document_start", document_start, tuple(shape[:1])),
        _lane_input("padding_mask", padding_mask, tuple(shape[:2])),
    )


def _lane_input(name, value, expected):
    """`value` checked as the bool lane input `name` of shape `expected`."""
    if value is None:
        return None
    if isinstance(value, (bool, list, tuple)):
        value = ops.convert_to_tensor(value)
    dtype = getattr(value, "dtype", None)
    dtype = type(value).__name__ if dtype is None else standardize_dtype(dtype)
    if dtype != "bool":
        raise ValueError(
            f"`{name}` must be bool (a bool array of shape {expected} or one "
            f"bool), got {dtype}."
        )
    if len(value.shape) == 0:  # one flag for every lane (and token)
        if None in expected:
            raise ValueError(
                f"`{name}` is one bool, to broadcast to the shape {expected}, "
                "which is not static here: pass a bool array instead."
            )
        return ops.broadcast_to(value, expected)
    shape_ok = len(value.shape) == len(expected) and all(
        got is None or want is None or got == want
        for got, want in zip(value.shape, expected)
    )
    if not shape_ok:
        raise ValueError(
            f"`{name}` must have shape {expected} (rank {len(expected)}), "
            f"got {tuple(value.shape)}."
        )
    return value

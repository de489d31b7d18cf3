"""Stateless pieces of the attention layers: normalisation, masked softmax
and the checks of a segment's inputs."""

from keras import ops

_MASKED_LOGIT = -1e9


def l2_normalize(x):
    """L2-normalises the last axis (in float32), keeping the dtype of `x`."""
    x32 = ops.cast(x, "float32")
    norm = ops.sqrt(ops.sum(ops.square(x32), axis=-1, keepdims=True) + 1e-12)
    return ops.cast(x32 / norm, x.dtype)


def masked_softmax(logits, mask, axis=-1):
    """Softmax in float32 over `axis`; masked entries get weight 0."""
    logits = ops.where(mask, ops.cast(logits, "float32"), _MASKED_LOGIT)
    return ops.where(mask, ops.softmax(logits, axis=axis), 0.0)


def check_hidden_rank(shape):
    """Raises a ValueError unless `shape` is `[batch, segment, hidden_dim]`."""
    if len(shape) != 3:
        raise ValueError(
            "`hidden_states` must have rank 3 [batch, segment, hidden_dim], "
            f"got shape {tuple(shape)}."
        )


def check_lane_inputs(shape, document_start, padding_mask):
    """Raises a ValueError naming `document_start` or `padding_mask` when
    its shape is not `[batch]` or `[batch, segment]` of `shape`."""
    for name, value, expected in (
        ("document_start", document_start, tuple(shape[:1])),
        ("padding_mask", padding_mask, tuple(shape[:2])),
    ):
        if value is None:
            continue
        shape_ok = len(value.shape) == len(expected) and all(
            got is None or want is None or got == want
            for got, want in zip(value.shape, expected)
        )
        if not shape_ok:
            raise ValueError(
                f"`{name}` must have shape {expected} (rank {len(expected)}), "
                f"got {tuple(value.shape)}."
            )

"""Argument checks shared by the layers, memories and data pipeline."""

import numbers


def is_int(value):
    """Whether `value` is an integer (NumPy integers included), not a bool.

    Example:
    >>> import numpy as np
    >>> is_int(3), is_int(np.int64(3)), is_int(True), is_int(3.0)
    (True, True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_ints(optional=(), **values):
    """Raises a ValueError naming the first argument that is not an int >= 1.

    Python ints only (NumPy integers are refused): these are layer
    arguments, which `get_config` must return as JSON-serialisable values.

    Args:
        optional: names among `values` that may also be `None`.
        **values: the arguments to check, by name.

    Example:
    >>> check_positive_ints(num_heads=4, head_dim=None, optional=("head_dim",))
    >>> check_positive_ints(num_heads=4, memory_size=0)
    Traceback (most recent call last):
    ...
    ValueError: `memory_size` must be a positive int, got 0.
    """
    for name, value in values.items():
        if value is None and name in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def checked_scores_per_block(scores_per_block):
    """`scores_per_block` as an int (or `None`, or `"auto"`); a ValueError
    unless it is a positive integer, `None` or `"auto"`."""
    if scores_per_block is None or scores_per_block == "auto":
        return scores_per_block
    if (
        isinstance(scores_per_block, bool)
        or not isinstance(scores_per_block, numbers.Integral)
        or scores_per_block < 1
    ):
        raise ValueError(
            "`scores_per_block` must be a positive int, None or 'auto', "
            f"got {scores_per_block!r}."
        )
    return int(scores_per_block)


def check_top_k(top_k, recall_target):
    """A ValueError unless `top_k` is `"exact"` or `"approx"` and
    `recall_target` a number in (0, 1]."""
    if top_k not in ("exact", "approx"):
        raise ValueError(f'`top_k` must be "exact" or "approx", got {top_k!r}.')
    if (
        isinstance(recall_target, bool)
        or not isinstance(recall_target, numbers.Real)
        or not 0.0 < recall_target <= 1.0
    ):
        raise ValueError(f"`recall_target` must be in (0, 1], got {recall_target!r}.")


def checked_key_value_heads(num_heads, num_key_value_heads):
    """`num_key_value_heads` resolved (`None`: `num_heads`); a ValueError
    unless it divides `num_heads` (an equal group of query heads each).

    Example:
    >>> checked_key_value_heads(8, None), checked_key_value_heads(8, 2)
    (8, 2)
    """
    num_key_value_heads = num_key_value_heads or num_heads
    if num_heads % num_key_value_heads:
        raise ValueError(
            f"`num_key_value_heads` ({num_key_value_heads}) must divide "
            f"`num_heads` ({num_heads}): each key and value head serves an "
            "equal group of query heads."
        )
    return num_key_value_heads


def checked_memory_layers(memory_layer_indices, num_layers):
    """The set of layers (`0..num_layers - 1`) that `memory_layer_indices`
    name (negative indices count from the top); a ValueError for an index
    that is not an int, lies outside the layers or names a layer twice."""
    memory_layers = set()
    for index in memory_layer_indices:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"`memory_layer_indices` must hold ints, got {index!r}.")
        if not -num_layers <= index < num_layers:
            raise ValueError(
                f"`memory_layer_indices` holds {index}, outside the "
                f"{num_layers} layers (valid: -{num_layers}..{num_layers - 1})."
            )
        if index % num_layers in memory_layers:
            raise ValueError(
                f"`memory_layer_indices` {tuple(memory_layer_indices)} names "
                f"layer {index % num_layers} twice."
            )
        memory_layers.add(index % num_layers)
    return memory_layers

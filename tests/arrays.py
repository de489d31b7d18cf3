"""Backend tensors as NumPy arrays, for comparisons in tests."""

import numpy as np
from keras import ops


def to_numpy(x):
    """`x` (a backend tensor, variable or array) as a NumPy array."""
    return np.asarray(ops.convert_to_numpy(x))


def attention_weights(layer):
    """A `SegmentAttention`'s or `KNNAttention`'s weights, as NumPy arrays.

    Keyed as `tests.numpy_reference.NumpyKNNAttention` takes them; a layer
    without memory gets zero gate biases (the reference then ignores memory).
    """
    weights = {
        "query": to_numpy(layer.query_projection.kernel),
        "key": to_numpy(layer.key_projection.kernel),
        "value": to_numpy(layer.value_projection.kernel),
        "output": to_numpy(layer.output_projection.kernel),
        "relative_bias": to_numpy(layer.relative_position_bias.embeddings),
        "scale": to_numpy(layer.attention_scale),
        "gate_bias": np.zeros(layer.num_heads),
    }
    if hasattr(layer, "gate_bias"):
        weights["gate_bias"] = to_numpy(layer.gate_bias)
    if layer.smear_keys:
        weights["key_smear_logit"] = to_numpy(layer.key_smear_logit)
    return weights


def stored_tokens(layer, training=False):
    """What a layer's XL cache and memory of one mode hold, as NumPy arrays.

    Only the slots that hold a token (the contents of empty slots are
    arbitrary): a dict of the cache's mask and its keys and values where
    the mask is set, and the memory's positions and keys and values where
    a position is set (slot order).
    """
    stored = {}
    states = layer.lane_states(training)
    cache = states.get("cache")
    if cache is not None:
        keys, values, mask = (to_numpy(x) for x in cache.read())
        stored.update(cache_mask=mask, cache_keys=keys[mask], cache_values=values[mask])
    memory = states.get("memory")
    if memory is not None:
        positions = to_numpy(memory.positions)  # [batch, slots]
        filled = positions >= 0
        stored.update(
            memory_positions=positions,
            # [batch, heads, slots, dim] -> [batch, slots, heads, dim]
            memory_keys=to_numpy(memory.keys).transpose(0, 2, 1, 3)[filled],
            memory_values=to_numpy(memory.values).transpose(0, 2, 1, 3)[filled],
        )
    return stored


def filled_lanes(layer, training=False):
    """Which lanes each per-lane state of one mode holds a token for.

    A dict from state name (as `layer.lane_states` names them) to a bool
    `[batch]`: the XL cache holds a token, the carried last key is present,
    the memory has a filled slot.
    """
    lanes = {}
    for name, state in layer.lane_states(training).items():
        if name == "cache":
            lanes[name] = to_numpy(state.read()[2]).any(axis=1)  # [batch, cache]
        elif name == "last_key":
            lanes[name] = to_numpy(state.read()[1])
        else:  # a memory: positions [batch, slots], -1 in an empty slot
            lanes[name] = (to_numpy(state.positions) >= 0).any(axis=1)
    return lanes

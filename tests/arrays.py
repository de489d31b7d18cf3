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

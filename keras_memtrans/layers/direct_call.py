"""Generation's sublayer calls, without Keras' per-call bookkeeping where
it changes nothing."""

from keras.backend import is_float_dtype
from keras.backend import standardize_dtype


def direct_call(layer, inputs, **kwargs):
    """`layer(inputs, **kwargs)`, by the layer's `call` where that is the same.

    `Layer.__call__` casts float inputs to the compute dtype, opens an
    autocast scope for a mixed dtype policy, dispatches a quantized
    layer's call, builds, resolves `training` and masks, and opens a name
    scope (and, under torch, runs `torch.nn.Module`'s call). Eager torch
    pays about 60 us a call for this, a third of generation's one-token
    step (docs/performance.md, "Sublayers called directly"). For a built,
    unquantized layer whose variables are in its compute dtype and read in
    it here (no autocast scope of another dtype is open: an enclosing mixed
    layer's would read them in its own), given `inputs` already in that
    dtype (or not float), none of it changes the result, and `call` runs
    alone. Any other layer is called normally.

    Generation's step calls its layers through this; `NextTokenStep` runs
    in float32, so it opens no autocast scope around them.

    Args:
        layer: a `keras.layers.Layer`.
        inputs: its one positional input, a tensor.
        **kwargs: its other call arguments.

    Returns:
        What `layer(inputs, **kwargs)` returns.
    """
    dtype = standardize_dtype(inputs.dtype)
    compute_dtype = layer.compute_dtype
    if (
        layer.built
        and layer.quantization_mode is None
        and compute_dtype == layer.variable_dtype
        and (dtype == compute_dtype or not is_float_dtype(dtype))
        # A variable's dtype is the one it is read in, under any autocast scope
        and all(
            standardize_dtype(weight.dtype) == compute_dtype
            for weight in layer.weights
            if is_float_dtype(weight.dtype)
        )
    ):
        return layer.call(inputs, **kwargs)
    return layer(inputs, **kwargs)

import numpy as np
from keras import ops

from keras_memtrans.layers.attention_functions import check_lane_inputs


class LaneInputsMixin:
    """Checks a functional model's lane inputs before Keras converts them.

    A functional model casts each input to its `keras.Input`'s dtype, so a
    float `document_start` of 0.5 would become `True` (a reset) without a
    word. A model with the inputs `token_ids [batch, segment]`,
    `document_start [batch]` and `padding_mask [batch, segment]` mixes this
    class in before `keras.Model`: `document_start` and `padding_mask` must
    then be bool arrays of their shapes, or one bool (Python, NumPy or a 0-d
    tensor) or a list of bools, which stand for every lane (and token).
    Anything else raises a ValueError that names the input
    (`check_lane_inputs`). The check runs in `__call__`, before Keras reads
    the input structure, and in `call`, which a compiled training step runs
    directly.
    """

    def __call__(self, inputs, *args, **kwargs):
        return super().__call__(checked_lane_inputs(inputs), *args, **kwargs)

    def call(self, inputs, training=None, mask=None, **kwargs):
        inputs = checked_lane_inputs(inputs)
        return super().call(inputs, training=training, mask=mask, **kwargs)


def checked_lane_inputs(inputs):
    """The input dict with `document_start` and `padding_mask` checked and
    broadcast to full bool arrays (NumPy ones when `token_ids` is a NumPy
    array, as Keras refuses a mix); any other `inputs` unchanged."""
    if not isinstance(inputs, dict) or "token_ids" not in inputs:
        return inputs
    shape = tuple(ops.shape(inputs["token_ids"]))  # [batch, segment]
    checked = check_lane_inputs(
        shape, inputs.get("document_start"), inputs.get("padding_mask")
    )
    inputs = dict(inputs)
    for name, value in zip(("document_start", "padding_mask"), checked):
        if value is not None:
            if isinstance(inputs["token_ids"], np.ndarray):
                value = ops.convert_to_numpy(value)
            inputs[name] = value
    return inputs

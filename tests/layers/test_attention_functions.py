"""What the stateless pieces of the attention layers compute."""

import keras
import numpy as np
import pytest

from keras_memtrans.layers.attention_functions import mask_logits
from tests.arrays import to_numpy


@pytest.mark.parametrize("floatx", ["float32", "float16", "bfloat16"])
def test_mask_logits_are_a_finite_float32_whatever_floatx(floatx):
    # In float16 the masked logit would round to -inf, and a query whose
    # every key is masked would then take a softmax of -inf only: NaN.
    mask = np.array([[True, False], [False, False]])
    previous = keras.config.floatx()
    keras.config.set_floatx(floatx)
    try:
        logits = mask_logits(mask)
    finally:
        keras.config.set_floatx(previous)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    logits = to_numpy(logits)
    assert np.all(np.isfinite(logits))
    np.testing.assert_array_equal(logits[mask], 0.0)
    assert np.all(logits[~mask] <= -1e8)

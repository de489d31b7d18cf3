"""What only `SegmentAttention` does; the contract it shares with the other
attention layers (NumPy reference, smeared keys, padding, XL cache, lane
state, gradients, config) is in `test_attention_contract`, bad inputs in
`test_attention_bad_input`."""

import numpy as np
import pytest

from keras_memtrans.layers.segment_attention import SegmentAttention


def test_without_cache_any_batch_size_works():
    layer = SegmentAttention(num_heads=2, smear_keys=True)
    assert layer(np.ones((1, 4, 8), "float32")).shape == (1, 4, 8)
    assert layer(np.ones((5, 4, 8), "float32")).shape == (5, 4, 8)
    assert not layer.needs_fixed_batch
    assert layer.lane_states(True) == layer.lane_states(False) == {}


@pytest.mark.parametrize(
    "value, match",
    [
        (0, "num_key_value_heads.*positive"),
        (3, "`num_key_value_heads` \\(3\\) must divide"),
    ],
)
def test_rejects_bad_key_value_heads(value, match):
    with pytest.raises(ValueError, match=match):
        SegmentAttention(num_heads=4, num_key_value_heads=value)

"""What only `KNNAttention` does: memory, gate, neighbours, memory options.

The contract it shares with the other attention layers (NumPy reference
with retrieval over a wrapping memory, smeared keys, padding, lane state,
gradients, bad inputs, config) is in `test_attention_contract`.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_memtrans import KNNAttention
from tests.arrays import to_numpy
from tests.layers.test_attention_contract import HEADS
from tests.layers.test_attention_contract import STARTS
from tests.layers.test_attention_contract import segments


def test_gate_starts_at_one_half():
    layer = KNNAttention(num_heads=4, memory_size=16, num_neighbors=2)
    layer.build((2, 4, 8))
    np.testing.assert_allclose(to_numpy(ops.sigmoid(layer.gate_bias)), 0.5)


def test_mixed_bfloat16_runs_and_stays_finite():
    layer = KNNAttention(
        num_heads=HEADS,
        memory_size=20,
        num_neighbors=5,
        use_xl_cache=True,
        dtype="mixed_bfloat16",
    )
    for x, start in zip(segments(3), STARTS):
        out = layer(x, document_start=start)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert layer.attention_scale.dtype == "float32"
    assert layer.inference_memory.keys.dtype == "bfloat16"
    assert np.all(np.isfinite(to_numpy(ops.cast(out, "float32"))))


def test_config_keeps_the_memory_size_and_neighbors():
    layer = KNNAttention(num_heads=4, memory_size=64, num_neighbors=8)
    config = KNNAttention.from_config(layer.get_config()).get_config()
    assert (config["memory_size"], config["num_neighbors"]) == (64, 8)


def test_symbolic_call_gives_neighbor_positions():
    layer = KNNAttention(num_heads=2, memory_size=32, num_neighbors=4)
    hidden = keras.Input((8, 12), batch_size=2)
    outputs, neighbors = layer(hidden, return_neighbors=True)
    assert outputs.shape == (2, 8, 12)
    assert neighbors.shape == (2, 8, 2, 4)
    assert neighbors.dtype == "int32"


class TestBadMemoryOptions:
    def test_segment_longer_than_memory(self):
        layer = KNNAttention(num_heads=2, memory_size=4, num_neighbors=2)
        with pytest.raises(ValueError, match="memory_size"):
            layer(np.zeros((2, 8, 4), "float32"))

    def test_num_neighbors_above_memory_size(self):
        with pytest.raises(ValueError, match="num_neighbors"):
            KNNAttention(num_heads=2, memory_size=8, num_neighbors=9)

    @pytest.mark.parametrize("name, value", [("memory_size", -1), ("num_neighbors", 0)])
    def test_non_positive_sizes(self, name, value):
        options = dict(num_heads=2, memory_size=16, num_neighbors=2)
        options[name] = value
        with pytest.raises(ValueError, match=name):
            KNNAttention(**options)

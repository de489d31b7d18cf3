import keras
import keras_hub
import numpy as np
import pytest
from keras import ops

from keras_memtrans.layers.direct_call import direct_call
from tests.arrays import to_numpy


class CountedCalls:
    """Counts a layer's `Layer.__call__`s (its `call` runs either way)."""

    def __init__(self, monkeypatch, layer):
        self.count = 0
        original = type(layer).__call__

        def counted(instance, *args, **kwargs):
            if instance is layer:
                self.count += 1
            return original(instance, *args, **kwargs)

        monkeypatch.setattr(type(layer), "__call__", counted)


def built(layer, shape):
    layer.build(shape)
    return layer


def layers_and_inputs(dtype):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 2, 8)).astype("float32")
    return [
        (built(keras.layers.Dense(5, dtype=dtype), (3, 2, 8)), hidden, {}),
        (
            built(
                keras.layers.EinsumDense(
                    "btd,dhk->bthk", (None, 2, 4), bias_axes="hk", dtype=dtype
                ),
                (3, 2, 8),
            ),
            hidden,
            {},
        ),
        (built(keras.layers.LayerNormalization(dtype=dtype), (3, 2, 8)), hidden, {}),
        (
            built(keras_hub.layers.ReversibleEmbedding(11, 8, dtype=dtype), (3, 2)),
            rng.integers(0, 11, (3, 2)).astype("int32"),
            {},
        ),
        (
            built(keras_hub.layers.ReversibleEmbedding(11, 8, dtype=dtype), (3, 2)),
            hidden,
            {"reverse": True},
        ),
    ]


@pytest.mark.parametrize("index", range(5))
def test_a_float32_layer_runs_its_call_alone_with_the_same_result(monkeypatch, index):
    layer, inputs, kwargs = layers_and_inputs("float32")[index]
    inputs = ops.convert_to_tensor(inputs)
    expected = to_numpy(layer(inputs, **kwargs))
    calls = CountedCalls(monkeypatch, layer)
    got = direct_call(layer, inputs, **kwargs)
    assert calls.count == 0
    np.testing.assert_array_equal(to_numpy(got), expected)


@pytest.mark.parametrize("index", range(5))
def test_a_mixed_precision_layer_is_called_normally(monkeypatch, index):
    # Called alone, its float32 variables would meet bfloat16 inputs: float32
    # outputs, not the bfloat16 ones of its autocast scope.
    layer, inputs, kwargs = layers_and_inputs("mixed_bfloat16")[index]
    inputs = ops.convert_to_tensor(inputs)
    if kwargs.get("reverse"):
        inputs = ops.cast(inputs, "bfloat16")
    expected = layer(inputs, **kwargs)
    calls = CountedCalls(monkeypatch, layer)
    got = direct_call(layer, inputs, **kwargs)
    assert calls.count == 1
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(to_numpy(got), to_numpy(expected))


def test_inputs_of_another_float_dtype_are_cast_by_a_normal_call(monkeypatch):
    layer = built(keras.layers.Dense(5), (3, 8))
    inputs = ops.convert_to_tensor(np.ones((3, 8)), "float16")
    calls = CountedCalls(monkeypatch, layer)
    outputs = direct_call(layer, inputs)
    assert calls.count == 1
    assert keras.backend.standardize_dtype(outputs.dtype) == "float32"


def test_an_unbuilt_layer_is_built_by_a_normal_call(monkeypatch):
    layer = keras.layers.Dense(5)
    calls = CountedCalls(monkeypatch, layer)
    outputs = direct_call(layer, ops.ones((3, 8)))
    assert calls.count == 1 and layer.built
    assert tuple(outputs.shape) == (3, 5)


def test_a_quantized_layer_is_called_normally(monkeypatch):
    layer = built(keras.layers.Dense(5), (3, 8))
    layer.quantize("int8")
    inputs = ops.convert_to_tensor(np.random.default_rng(0).normal(size=(3, 8)))
    inputs = ops.cast(inputs, "float32")
    expected = to_numpy(layer(inputs))
    calls = CountedCalls(monkeypatch, layer)
    got = direct_call(layer, inputs)
    assert calls.count == 1
    np.testing.assert_array_equal(to_numpy(got), expected)


def test_a_float32_layer_inside_a_mixed_layers_call_is_called_normally(monkeypatch):
    # The mixed layer's autocast scope would read the float32 kernel in
    # bfloat16 during a call alone; the float32 layer's own call resets it.
    inner = built(keras.layers.Dense(5), (3, 8))

    class Outer(keras.layers.Layer):
        def __init__(self, through, **kwargs):
            super().__init__(**kwargs)
            self.through = through

        def call(self, inputs):
            return self.through(inner, ops.cast(inputs, "float32"))

    inputs = np.random.default_rng(0).normal(size=(3, 8)).astype("float32")

    def normal_call(layer, inputs):
        return layer(inputs)

    expected = to_numpy(Outer(normal_call, dtype="mixed_bfloat16")(inputs))
    calls = CountedCalls(monkeypatch, inner)
    got = Outer(direct_call, dtype="mixed_bfloat16")(inputs)
    assert calls.count == 1
    np.testing.assert_array_equal(to_numpy(got), expected)

import math

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_memtrans import DecoderBlock
from keras_memtrans.layers.decoder_block import fusion_boundary
from keras_memtrans.layers.decoder_block import run_time_one
from tests.arrays import to_numpy

BATCH, SEGMENT, HIDDEN = 2, 8, 16


def block(**overrides):
    config = dict(
        num_heads=2,
        intermediate_dim=32,
        memory_options=dict(memory_size=32, num_neighbors=4),
        batch_size=BATCH,
    )
    config.update(overrides)
    return DecoderBlock(**config)


def segments(count, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(count, BATCH, SEGMENT, HIDDEN)).astype("float32")


def reference_block(layer, x, attended):
    """Pre-LN residual block in NumPy around a given attention output."""

    def norm(norm_layer, h):
        mean = h.mean(-1, keepdims=True)
        variance = h.var(-1, keepdims=True)
        gamma, beta = (to_numpy(w) for w in norm_layer.weights)
        return (h - mean) / np.sqrt(variance + layer.layer_norm_epsilon) * gamma + beta

    def dense(dense_layer, h):
        kernel, bias = (to_numpy(w) for w in dense_layer.weights)
        return h @ kernel + bias

    h = x + attended
    inner = dense(layer.feedforward_intermediate, norm(layer.feedforward_norm, h))
    inner = 0.5 * inner * (1.0 + np.vectorize(math.erf)(inner / math.sqrt(2.0)))
    return h + dense(layer.feedforward_output, inner)


def test_block_is_pre_layer_norm_residual_around_its_attention():
    layer = block()
    for i, x in enumerate(segments(2)):
        layer(x, document_start=np.array([True, True]) if i == 0 else None)
    x = segments(1, seed=1)[0]
    memory = layer.attention.inference_memory
    saved = [to_numpy(v) for v in memory.weights]
    attended = to_numpy(layer.attention(layer.attention_norm(x)))
    for variable, value in zip(memory.weights, saved):  # undo that call's writes
        variable.assign(value)
    np.testing.assert_allclose(
        to_numpy(layer(x)), reference_block(layer, x, attended), atol=1e-4
    )


def test_neighbors_come_from_earlier_segments():
    layer = block()
    for i, x in enumerate(segments(3)):
        document_start = np.array([True, True]) if i == 0 else None
        outputs, positions = layer(
            x, document_start=document_start, return_neighbors=True
        )
        positions = to_numpy(positions)  # [batch, segment, heads, k]
        assert to_numpy(outputs).shape == (BATCH, SEGMENT, HIDDEN)
        assert positions.shape == (BATCH, SEGMENT, 2, 4)
        if i == 0:
            assert (positions == -1).all()
        else:
            assert ((positions >= 0) & (positions < i * SEGMENT)).all()


def test_without_memory_return_neighbors_raises():
    with pytest.raises(ValueError, match="without `memory_options`"):
        block(memory_options=None)(segments(1)[0], return_neighbors=True)


def test_symbolic_call_gives_output_and_neighbor_specs():
    x = keras.Input((SEGMENT, HIDDEN), batch_size=BATCH)
    outputs, positions = block()(x, return_neighbors=True)
    assert outputs.shape == (BATCH, SEGMENT, HIDDEN)
    assert positions.shape == (BATCH, SEGMENT, 2, 4)
    assert positions.dtype == "int32"


def test_config_round_trip():
    layer = block(use_xl_cache=True, dropout=0.1)
    clone = DecoderBlock.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


@settings(max_examples=25, deadline=None)
@given(
    hnp.arrays(
        np.float32, (2, 3, 4), elements=st.floats(width=32, allow_subnormal=False)
    ),
    st.sampled_from(["float32", "bfloat16", "float16"]),
)
def test_the_fusion_boundary_changes_no_value(x, dtype):
    # Infinities, NaNs and zeros of either sign included, in the first
    # element too (the one the run-time 1 is computed from). Subnormals are
    # left out: JAX's and torch's CPU arithmetic flushes them to zero, in
    # this division as in every other operation.
    x = to_numpy(keras.ops.cast(x, dtype)).astype("float32")
    x_in = keras.ops.cast(x, dtype)
    got = to_numpy(fusion_boundary(x_in, run_time_one(x_in))).astype("float32")
    np.testing.assert_array_equal(got, x)  # NaN where x is NaN
    number = ~np.isnan(x)  # the sign of a NaN means nothing
    np.testing.assert_array_equal(np.signbit(got)[number], np.signbit(x)[number])

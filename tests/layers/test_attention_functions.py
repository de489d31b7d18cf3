"""What the stateless pieces of the attention layers compute."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_memtrans.layers import attention_functions
from keras_memtrans.layers.attention_functions import broadcast_over_batch
from keras_memtrans.layers.attention_functions import mask_logits
from keras_memtrans.layers.segment_attention import SegmentAttention
from keras_memtrans.memory.host import on_accelerator
from tests.arrays import to_numpy
from tests.gradients import function_gradient


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


@pytest.mark.parametrize("accelerator", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_broadcast_over_batch_repeats_x_and_sums_its_gradient(
    batch_size, accelerator, monkeypatch
):
    # A matmul on the CPU, a broadcast on an accelerator: the same values.
    if on_accelerator() and not accelerator:
        pytest.skip(
            "an accelerator never takes the matmul path (its float32 matmul "
            "may round to TF32), so that path is checked on the CPU"
        )
    monkeypatch.setattr(attention_functions, "on_accelerator", lambda: accelerator)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4)).astype("float32")
    weights = rng.normal(size=(batch_size, 2, 3, 4)).astype("float32")
    np.testing.assert_array_equal(
        to_numpy(broadcast_over_batch(x, batch_size)),
        np.broadcast_to(x, (batch_size, 2, 3, 4)),
    )
    grad = function_gradient(
        lambda x: ops.sum(ops.multiply(broadcast_over_batch(x, batch_size), weights)),
        x,
    )
    np.testing.assert_allclose(grad, weights.sum(axis=0), rtol=1e-6, atol=1e-6)


def _sums_over_the_leading_axis_alone(jaxpr):
    """The `reduce_sum`s of a 4-D operand over its axis 0 alone, in `jaxpr`
    and the jaxprs inside it."""
    import jax.extend

    found = []
    for equation in jaxpr.eqns:
        operand = equation.invars[0] if equation.invars else None
        if (
            equation.primitive.name == "reduce_sum"
            and tuple(equation.params["axes"]) == (0,)
            and len(operand.aval.shape) == 4
        ):
            found.append(operand.aval.shape)
        for sub in jax.extend.core.jaxprs_in_params(equation.params):
            found += _sums_over_the_leading_axis_alone(sub)
    return found


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="the slow sum is XLA's CPU code under JAX (YNNPACK); jaxprs are JAX's",
)
def test_the_position_bias_gradient_sums_no_leading_axis_alone(monkeypatch):
    import jax

    monkeypatch.setattr(attention_functions, "on_accelerator", lambda: False)
    layer = SegmentAttention(num_heads=2)
    x = np.random.default_rng(0).normal(size=(3, 8, 16)).astype("float32")
    layer(x)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(trainable):
        outputs, _ = layer.stateless_call(trainable, non_trainable, x, training=True)
        return jax.numpy.sum(outputs**2)

    jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr
    assert _sums_over_the_leading_axis_alone(jaxpr) == []

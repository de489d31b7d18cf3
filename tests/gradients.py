"""Gradients through consecutive stateful calls, on whichever backend runs.

Tests may import backends; the library may not.
"""

import keras
import numpy as np


def segment_gradients(layer, segments, document_starts, output_weights):
    """Gradients of `sum(last_output * output_weights)` after all segments.

    The layer's state is threaded through every call (functionally on JAX),
    so a gradient path from an earlier segment into memory would show up.

    Returns:
        `(variable_grads, segment_grads)`: NumPy arrays for each trainable
        variable of `layer` and for each segment input.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(trainable, inputs):
            state = non_trainable
            for x, start in zip(inputs, document_starts):
                out, state = layer.stateless_call(
                    trainable, state, x, document_start=start, training=True
                )
            return jnp.sum(out * output_weights)

        trainable = [v.value for v in layer.trainable_variables]
        inputs = [jnp.asarray(s) for s in segments]
        grads = jax.grad(loss, argnums=(0, 1))(trainable, inputs)
    elif backend == "tensorflow":
        import tensorflow as tf

        inputs = [tf.constant(s) for s in segments]
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(inputs)
            for x, start in zip(inputs, document_starts):
                out = layer(x, document_start=start, training=True)
            loss = tf.reduce_sum(out * output_weights)
        sources = [v.value for v in layer.trainable_variables]
        grads = (tape.gradient(loss, sources), tape.gradient(loss, inputs))
    else:
        import torch

        inputs = [torch.tensor(s, requires_grad=True) for s in segments]
        for v in layer.trainable_variables:
            v.value.grad = None
        for x, start in zip(inputs, document_starts):
            out = layer(x, document_start=torch.tensor(start), training=True)
        torch.sum(out * torch.tensor(output_weights)).backward()
        grads = (
            [v.value.grad for v in layer.trainable_variables],
            [x.grad for x in inputs],
        )

    def as_numpy(grad, like):
        if grad is None:
            return np.zeros(np.shape(like), "float32")
        return np.asarray(keras.ops.convert_to_numpy(grad))

    variable_grads = [
        as_numpy(g, v) for g, v in zip(grads[0], layer.trainable_variables)
    ]
    segment_grads = [as_numpy(g, s) for g, s in zip(grads[1], segments)]
    return variable_grads, segment_grads


def function_gradient(function, x):
    """The gradient of the scalar `function(x)` with respect to the NumPy
    array `x`, as a NumPy array, on whichever backend runs."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        grad = jax.grad(function)(jax.numpy.asarray(x))
    elif backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = function(x)
        grad = tape.gradient(y, x)
    else:
        import torch

        x = torch.tensor(x, requires_grad=True)
        function(x).backward()
        grad = x.grad
    return np.asarray(keras.ops.convert_to_numpy(grad))

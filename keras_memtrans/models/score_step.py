import keras


class ScoreStep(keras.Model):
    """`MemorizingTransformerCausalLM._score_step` as a model, so that its
    `predict_on_batch` compiles the step the way the causal LM's own is
    compiled (XLA where the layers allow it; memory updates kept on JAX).

    Not a functional model: a functional graph cannot call the memory blocks
    with another number of outputs than their first call had (Keras checks
    every call of a layer against its first).

    Built when its causal LM is: it adds no weights of its own, and an
    unbuilt model's first `predict_on_batch` would run the step once more,
    eagerly, to build it (op by op, each compiled on its own on JAX).
    """

    def __init__(self, causal_lm):
        super().__init__(name=f"{causal_lm.name}_score")
        self.causal_lm = causal_lm
        self.built = causal_lm.built

    def call(self, inputs):
        return self.causal_lm._score_step(inputs)

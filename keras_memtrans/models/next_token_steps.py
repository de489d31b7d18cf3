import numpy as np

from keras_memtrans.models.next_token_step import NextTokenStep


class NextTokenSteps:
    """A causal LM's `NextTokenStep`s, one per number of new tokens and
    per start of a segment or not, all decoding into one shared decode
    cache.

    A plain object, not a layer: the causal LM keeps it without Keras
    tracking the steps' decode caches as the model's own variables (they
    are generation's scratch state, never saved).

    Args:
        causal_lm: a `MemorizingTransformerCausalLM`.

    Call arguments:
        inputs: a `NextTokenStep`'s input dict.

    Returns:
        The step's logits `[batch, vocabulary_size]`, from the step built
        (and compiled) for `inputs`' number of new tokens, the one that
        `starts_segment` where they are at position 0.
    """

    def __init__(self, causal_lm):
        self.causal_lm = causal_lm
        self.steps = {}  # (new tokens, starts a segment) -> NextTokenStep

    def __call__(self, inputs):
        tokens = np.shape(inputs["token_ids"])[1]
        key = (tokens, bool(np.asarray(inputs["cache_update_index"])[0] == 0))
        if key not in self.steps:
            shared = next(iter(self.steps.values()), None)
            self.steps[key] = NextTokenStep(
                self.causal_lm,
                decode_caches=shared and shared.decode_caches,
                starts_segment=key[1],
            )
        return self.steps[key].predict_on_batch(inputs)

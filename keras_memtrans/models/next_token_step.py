import keras
from keras import ops

from keras_memtrans.layers.direct_call import direct_call


class NextTokenStep(keras.Model):
    """The next token's logits, from the segment's cached keys and values.

    `generate()`'s compiled step. It keeps, as its own variables, every
    block's decode cache of the segment being generated (keys, values and
    mask of its tokens so far, see `SegmentAttention.call_with_cache`),
    so each call runs the model on the new tokens only: the rest of a
    prompt's segment in one call, then one generated token per call. They
    attend to the cached tokens, the XL cache and the memory, and their
    keys and values join the cache. The causal LM's own state (memories,
    XL caches, carried keys) is read, never written: a segment is
    committed once complete, by the backbone's predict step. A segment is decoded from
    position 0 up, each position once (padding too, with `token_mask`
    `False`); what lies beyond the positions decoded so far is never read,
    so a new segment needs no reset. `predict_on_batch` compiles the step
    once per number of new tokens, as the causal LM's own predict step is
    compiled (XLA where the layers allow it); the step calls its sublayers
    through `direct_call` (a third of an eager torch step is Keras' per-call
    bookkeeping otherwise).

    Args:
        causal_lm: a `MemorizingTransformerCausalLM`.
        decode_caches: optional, another `NextTokenStep`'s `decode_caches`,
            to share: a step compiled for a prompt's tokens and one for a
            single token then decode the same segment (TensorFlow traces
            one step for every number of tokens with an unknown one, which
            host memories cannot take).

    Call arguments:
        inputs: dict of `token_ids`, int `[batch, tokens]`, the new tokens
            of each lane from position `cache_update_index`, int `[batch]`
            (the same in every lane), on, and `token_mask`, bool
            `[batch, tokens]`, `False` on padding.

    Returns:
        float32 logits `[batch, vocabulary_size]` of the token after the
        last new one.

    Example:
    >>> import numpy as np
    >>> from keras_memtrans.models import MemorizingTransformerBackbone
    >>> from keras_memtrans.models import MemorizingTransformerCausalLM
    >>> backbone = MemorizingTransformerBackbone(
    ...     vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=16,
    ...     intermediate_dim=32, batch_size=2, segment_length=8,
    ...     memory_layer_indices=(-1,),
    ...     memory_options={"memory_size": 64, "num_neighbors": 4})
    >>> step = NextTokenStep(MemorizingTransformerCausalLM(backbone))
    >>> logits = step.predict_on_batch({  # a prompt's 3 tokens in one call
    ...     "token_ids": np.array([[5, 17, 3], [0, 8, 9]], "int32"),
    ...     "cache_update_index": np.zeros((2,), "int32"),
    ...     "token_mask": np.array([[True, True, True], [False, True, True]])})
    >>> logits = step.predict_on_batch({  # then one token at position 3
    ...     "token_ids": np.array([[42], [7]], "int32"),
    ...     "cache_update_index": np.full((2,), 3, "int32"),
    ...     "token_mask": np.ones((2, 1), bool)})
    >>> logits.shape
    (2, 100)

    Reference:
        Wu et al., "Memorizing Transformers", ICLR 2022
        (https://arxiv.org/abs/2203.08913).
    """

    def __init__(self, causal_lm, decode_caches=None):
        # float32, whatever the global policy: a mixed one would open an
        # autocast scope around the layers that `direct_call` calls.
        super().__init__(name=f"{causal_lm.name}_next_token", dtype="float32")
        self.causal_lm = causal_lm
        # Built with its decode caches: an unbuilt model's first
        # `predict_on_batch` would run the step once more, eagerly, to build
        # it (op by op, each compiled on its own on JAX).
        self.built = causal_lm.built
        if decode_caches is not None:
            self.decode_caches = decode_caches
            return
        backbone = causal_lm.backbone
        lanes = (backbone.batch_size, backbone.segment_length)
        self.decode_caches = []
        for block in backbone.transformer_layers:
            attention = block.attention
            vectors = (*lanes, attention.num_key_value_heads, attention.head_dim)
            self.decode_caches.append(
                [
                    self.add_weight(
                        shape=shape,
                        dtype=dtype,
                        initializer="zeros",
                        trainable=False,
                        name=f"{block.name}_{name}",
                    )
                    for name, shape, dtype in (
                        ("keys", vectors, "float32"),
                        ("values", vectors, "float32"),
                        ("mask", lanes, "bool"),
                        ("last_key", (lanes[0], *vectors[2:]), "float32"),
                        ("last_found", lanes[:1], "bool"),
                    )
                ]
            )

    def call(self, inputs):
        backbone = self.causal_lm.backbone
        hidden_states, decode_caches = backbone.call_with_cache(
            inputs["token_ids"],
            [[variable.value for variable in cache] for cache in self.decode_caches],
            ops.cast(inputs["cache_update_index"], "int32")[0],
            inputs["token_mask"],
        )  # [batch, tokens, hidden]
        for variables, values in zip(self.decode_caches, decode_caches):
            for variable, value in zip(variables, values):
                variable.assign(value)
        # [batch, vocab]
        logits = direct_call(
            backbone.token_embedding, hidden_states[:, -1:], reverse=True
        )[:, 0]
        return ops.cast(logits, "float32")

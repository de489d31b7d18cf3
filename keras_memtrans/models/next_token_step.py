import keras
from keras import ops

from keras_memtrans.layers.direct_call import direct_call


class NextTokenStep(keras.Model):
    """The next token's logits, from the segment's cached keys and values.

    `generate()`'s compiled step. It keeps, as its own variables, every
    block's decode cache of the segment being generated (the XL cache's
    keys and values and then those of the segment's tokens so far, their
    mask, and the position bias; see `SegmentAttention.call_with_cache`),
    so each call runs the model on the new tokens only: the rest of a
    prompt's segment in one call, then one generated token per call. They
    attend to the cached tokens, the XL cache and the memory, and their
    keys and values are written into the cache (in place on torch). The
    causal LM's own state (memories,
    XL caches, carried keys) is read, never written: a segment is
    committed once complete, by the backbone's predict step. A segment is
    decoded from position 0 up, each position once (padding too, with
    `token_mask` `False`), its first call by a step that `starts_segment`
    (it writes the XL cache and the bias into the decode cache); what lies
    beyond the positions decoded so far is never read. `predict_on_batch`
    compiles the step once per number of new tokens, as the causal LM's
    own predict step is compiled (XLA where the layers allow it); the step
    calls its sublayers through `direct_call` (a third of an eager torch
    step is Keras' per-call bookkeeping otherwise).

    Args:
        causal_lm: a `MemorizingTransformerCausalLM`.
        decode_caches: optional, another `NextTokenStep`'s `decode_caches`,
            to share: steps compiled for a prompt's tokens, for a
            segment's first token and for the tokens after it then decode
            the same segment (TensorFlow traces one step for every number
            of tokens with an unknown one, which host memories cannot
            take).
        starts_segment: bool. Whether this step decodes from position 0
            only, the start of a segment (see `NextTokenSteps`).

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
    >>> causal_lm = MemorizingTransformerCausalLM(backbone)
    >>> start = NextTokenStep(causal_lm, starts_segment=True)
    >>> logits = start.predict_on_batch({  # a prompt's 3 tokens in one call
    ...     "token_ids": np.array([[5, 17, 3], [0, 8, 9]], "int32"),
    ...     "cache_update_index": np.zeros((2,), "int32"),
    ...     "token_mask": np.array([[True, True, True], [False, True, True]])})
    >>> step = NextTokenStep(causal_lm, decode_caches=start.decode_caches)
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

    def __init__(self, causal_lm, decode_caches=None, starts_segment=False):
        # float32, whatever the global policy: a mixed one would open an
        # autocast scope around the step's layers, and `direct_call` calls
        # a layer normally (slowly) inside another dtype's scope.
        super().__init__(name=f"{causal_lm.name}_next_token", dtype="float32")
        self.causal_lm = causal_lm
        self.starts_segment = starts_segment
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
            # The XL cache's keys ahead of the segment's
            keys = (lanes[0], attention.decode_prefix_length + lanes[1])
            heads = (lanes[0], attention.num_key_value_heads)
            vectors = (*heads, keys[1], attention.head_dim)  # head-major
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
                        ("mask", keys, "bool"),
                        ("last_key", (*heads, attention.head_dim), "float32"),
                        ("last_found", lanes[:1], "bool"),
                        (
                            "position_bias",
                            (attention.num_heads, lanes[1], keys[1]),
                            "float32",
                        ),
                    )
                ]
            )

    def call(self, inputs):
        backbone = self.causal_lm.backbone
        hidden_states = backbone.call_with_cache(
            inputs["token_ids"],
            self.decode_caches,
            ops.cast(inputs["cache_update_index"], "int32")[0],
            inputs["token_mask"],
            self.starts_segment,
        )  # [batch, tokens, hidden]
        # [batch, vocab]
        logits = direct_call(
            backbone.token_embedding, hidden_states[:, -1:], reverse=True
        )[:, 0]
        return ops.cast(logits, "float32")

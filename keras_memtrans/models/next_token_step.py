import keras
from keras import ops


class NextTokenStep(keras.Model):
    """One generated token's logits, from the segment's cached keys and values.

    `generate()`'s compiled per-token step. It keeps, as its own variables,
    every block's decode cache of the segment being generated (raw keys,
    values and mask of its tokens so far, see
    `SegmentAttention.call_with_cache`), so each call runs the model on one
    token per lane: that token attends to the cached tokens, the XL cache
    and the memory, and its key and value join the cache. The causal LM's
    own state (memories, XL caches, carried keys) is read, never written:
    a segment is committed by an ordinary call once complete. A segment is
    decoded from position 0 up, one position per call (padding too, with
    `token_mask` `False`); entries beyond the current position are never
    read, so a new segment needs no reset. `predict_on_batch` compiles the
    step once, as the causal LM's own predict step is compiled (XLA where
    the layers allow it).

    Args:
        causal_lm: a `MemorizingTransformerCausalLM`.

    Call arguments:
        inputs: dict of `token_ids`, int `[batch, 1]`, the token of each
            lane at the position `cache_update_index`, int `[batch]` (the
            same in every lane), and `token_mask`, bool `[batch]`, `False`
            where the token is padding.

    Returns:
        float32 logits `[batch, vocabulary_size]` of the next token.

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
    >>> for position, token in enumerate([5, 17, 3]):
    ...     logits = step.predict_on_batch({
    ...         "token_ids": np.full((2, 1), token, "int32"),
    ...         "cache_update_index": np.full((2,), position, "int32"),
    ...         "token_mask": np.ones((2,), bool)})
    >>> logits.shape
    (2, 100)

    Reference:
        Wu et al., "Memorizing Transformers", ICLR 2022
        (https://arxiv.org/abs/2203.08913).
    """

    def __init__(self, causal_lm):
        super().__init__(name=f"{causal_lm.name}_next_token")
        self.causal_lm = causal_lm
        backbone = causal_lm.backbone
        lanes = (backbone.batch_size, backbone.segment_length)
        self.decode_caches = []
        for block in backbone.transformer_layers:
            attention = block.attention
            vectors = (*lanes, attention.num_heads, attention.head_dim)
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
        )  # [batch, 1, hidden]
        for variables, values in zip(self.decode_caches, decode_caches):
            for variable, value in zip(variables, values):
                variable.assign(value)
        logits = backbone.token_embedding(hidden_states, reverse=True)  # [b, 1, v]
        return ops.cast(logits[:, 0], "float32")

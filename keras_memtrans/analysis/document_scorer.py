import numpy as np

from keras_memtrans.data.lane_streamer import LaneStreamer


class DocumentScorer:
    """Per-token losses and memory retrievals of a causal LM over documents.

    Reads documents exactly as evaluation does: in lanes of consecutive
    segments (a `LaneStreamer`), each lane's memory emptied where its
    document starts, one `MemorizingTransformerCausalLM.score` call per
    batch of segments. For every token it records the negative
    log-likelihood the model gave it and, for every memory layer, the
    document positions each head retrieved while predicting it.

    Subtracting the losses of a model with memory from those of one without
    shows which tokens memory helps; the retrieved positions show what those
    tokens looked up (the two analyses of Wu et al., Sec. 5). `score` reads
    the inference memory only, so a model's training memory is untouched.

    Args:
        causal_lm: a `MemorizingTransformerCausalLM`, with or without
            memory layers.

    Call arguments:
        documents: a list of 1-D int token arrays, or of strings when the
            model has a preprocessor. Documents shorter than 2 tokens have
            no next-token target and raise.

    Returns:
        A list with one dict per document:

        - `"token_ids"`: int32 `[n]`, the document.
        - `"losses"`: float32 `[n - 1]`; entry `i` is the loss of token
          `i + 1` given tokens `0..i`, in nats.
        - `"neighbors"`: a list, one entry per memory layer (bottom to top),
          of int32 `[n - 1, num_heads, num_neighbors]` document positions
          retrieved by the query at position `i` (`-1`: no entry).

    Example:
    >>> from keras_memtrans.models import MemorizingTransformerBackbone
    >>> from keras_memtrans.models import MemorizingTransformerCausalLM
    >>> backbone = MemorizingTransformerBackbone(
    ...     vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=16,
    ...     intermediate_dim=32, batch_size=2, segment_length=8,
    ...     memory_layer_indices=(-1,),
    ...     memory_options={"memory_size": 64, "num_neighbors": 4})
    >>> scorer = DocumentScorer(MemorizingTransformerCausalLM(backbone))
    >>> scores = scorer([np.arange(1, 30), np.arange(5, 17)])
    >>> scores[0]["losses"].shape, scores[0]["neighbors"][0].shape
    ((28,), (28, 2, 4))

    Reference:
        Wu et al., "Memorizing Transformers", ICLR 2022
        (https://arxiv.org/abs/2203.08913).
    """

    def __init__(self, causal_lm):
        self.causal_lm = causal_lm
        self.batch_size = causal_lm.backbone.batch_size
        self.segment_length = causal_lm.backbone.segment_length

    def __call__(self, documents):
        documents = list(documents)
        if documents and isinstance(documents[0], str):
            if self.causal_lm.preprocessor is None:
                raise ValueError(
                    "String documents need a model with a preprocessor; pass "
                    "token arrays instead."
                )
            documents = self.causal_lm.preprocessor(documents)
        documents = [np.asarray(document) for document in documents]
        for index, document in enumerate(documents):
            if document.ndim != 1 or document.size < 2:
                raise ValueError(
                    f"Document {index} must be a 1-D token array of at least 2 "
                    f"tokens, got shape {document.shape}."
                )
        # Validates the token ids (integers in range) before anything runs.
        streamer = LaneStreamer(
            documents, self.batch_size, self.segment_length, shuffle=False
        )
        memory_layers = self.causal_lm.backbone.memory_layers
        scores = [
            {
                "token_ids": document.astype("int32"),
                "losses": np.zeros(document.size - 1, dtype="float32"),
                "neighbors": [
                    np.full(
                        (document.size - 1, layer.num_heads, layer.num_neighbors),
                        -1,
                        dtype="int32",
                    )
                    for layer in memory_layers
                ],
            }
            for document in documents
        ]
        for index in range(len(streamer)):
            inputs, targets, _ = streamer[index]
            losses, neighbors = self.causal_lm.score(
                inputs["token_ids"],
                padding_mask=inputs["padding_mask"],
                scoring_mode="loss",
                target_ids=targets,
                document_start=inputs["document_start"],
                return_neighbors=True,
            )
            lane_documents, lane_segments = streamer.batch_contents(index)
            widths = inputs["padding_mask"].sum(axis=1)
            for lane, document in enumerate(lane_documents):
                if document < 0:
                    continue
                begin = lane_segments[lane] * self.segment_length
                span = slice(begin, begin + widths[lane])
                score = scores[document]
                score["losses"][span] = losses[lane, : widths[lane]]
                for layer, positions in enumerate(neighbors):
                    score["neighbors"][layer][span] = positions[lane, : widths[lane]]
        return scores

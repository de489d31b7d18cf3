import keras
import numpy as np

from keras_memtrans.models.segment_generator import SegmentGenerator


@keras.saving.register_keras_serializable(package="keras_memtrans")
class MemorizingTransformerCausalLM(keras.Model):
    """Next-token language model on a `MemorizingTransformerBackbone`.

    Maps the backbone's hidden states to vocabulary logits (through the tied
    token embedding by default). It follows keras-hub's `CausalLM`
    conventions (`backbone`, `preprocessor`, a default `compile()`,
    `generate()`), but is a plain functional `keras.Model`: keras-hub's task
    `fit()` re-batches its inputs into a dataset, which would break the lane
    order a memory model depends on, and its JAX `generate()` drops state
    updates, which would lose the memory.

    Training data are lanes of consecutive segments, as produced by
    `keras_memtrans.data.LaneStreamer`: `fit(streamer)` with `shuffle`
    irrelevant (a `PyDataset` is read in order).

    Args:
        backbone: a `MemorizingTransformerBackbone`.
        preprocessor: optional `MemorizingTransformerPreprocessor`, saved with
            the model; needed by `generate()` on strings.
        **kwargs: standard `keras.Model` arguments.

    Call arguments:
        The backbone's input dict (`token_ids`, `document_start`,
        `padding_mask`).

    Returns:
        Logits `[batch, segment, vocabulary_size]`.

    Example:
    >>> from keras_memtrans.models import MemorizingTransformerBackbone
    >>> backbone = MemorizingTransformerBackbone(
    ...     vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=16,
    ...     intermediate_dim=32, batch_size=2, segment_length=8,
    ...     memory_layer_indices=(-1,), memory_size=64, num_neighbors=4)
    >>> causal_lm = MemorizingTransformerCausalLM(backbone)
    >>> causal_lm.output_shape
    (2, 8, 100)

    Reference:
        Wu et al., "Memorizing Transformers", ICLR 2022
        (https://arxiv.org/abs/2203.08913).
    """

    def __init__(self, backbone, preprocessor=None, **kwargs):
        inputs = backbone.input
        hidden_states = backbone(inputs)
        logits = backbone.token_embedding(hidden_states, reverse=True)
        logits = keras.layers.Activation("linear", dtype="float32", name="logits")(
            logits
        )
        super().__init__(inputs=inputs, outputs=logits, **kwargs)
        self.backbone = backbone
        self._preprocessor = preprocessor
        _ = self.preprocessor  # checks a trained tokenizer's vocabulary now

    @property
    def preprocessor(self):
        """The preprocessor, checked against the model's vocabulary.

        The check runs at construction and on every access once the
        tokenizer holds a vocabulary: on `load_model` the vocabulary arrives
        after the model is constructed, so a loaded pair is checked on first
        use.
        """
        preprocessor = self._preprocessor
        if preprocessor is not None and preprocessor.tokenizer.proto is not None:
            preprocessor.check_vocabulary(self.backbone.vocabulary_size)
        return preprocessor

    def compile(
        self,
        optimizer="auto",
        loss="auto",
        weighted_metrics="auto",
        **kwargs,
    ):
        """Configures training, with keras-hub `CausalLM` defaults.

        `"auto"` gives AdamW (learning rate 1e-3, weight decay 0.01), sparse
        categorical cross-entropy on logits averaged over the real target
        tokens (`reduction="mean_with_sample_weight"`: padding, weighted 0
        by the streamer, neither counts nor scales the gradient), and token
        accuracy weighted the same way.

        Weight decay, when the optimizer has one, applies to the matmul
        kernels and the token embedding only: biases, layer norms, the
        attention scales, memory gates, key-smear logits and relative
        position biases are excluded, as in the reference trainers.
        """
        if optimizer == "auto":
            optimizer = keras.optimizers.AdamW(1e-3, weight_decay=0.01)
        optimizer = keras.optimizers.get(optimizer)
        if getattr(optimizer, "weight_decay", None) and not optimizer.built:
            optimizer.exclude_from_weight_decay(var_list=self._not_decayed())
        if loss == "auto":
            loss = keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction="mean_with_sample_weight"
            )
        if weighted_metrics == "auto":
            weighted_metrics = [keras.metrics.SparseCategoricalAccuracy("accuracy")]
        super().compile(
            optimizer=optimizer,
            loss=loss,
            weighted_metrics=weighted_metrics,
            **kwargs,
        )

    def _not_decayed(self):
        """Trainable variables other than matmul kernels and embeddings."""
        decayed = set()
        for layer in self._flatten_layers():
            if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
                decayed.add(id(layer.kernel))
            elif isinstance(layer, keras.layers.Embedding):
                decayed.add(id(layer.embeddings))
                if getattr(layer, "reverse_embeddings", None) is not None:
                    decayed.add(id(layer.reverse_embeddings))
        return [v for v in self.trainable_variables if id(v) not in decayed]

    def compile_from_config(self, config):
        """Re-compiles on `load_model`, so a checkpoint resumes its optimizer."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def reset_state(self, training=None):
        """Empties the backbone's memories and caches (see the backbone's)."""
        self.backbone.reset_state(training)

    def generate(self, prompts, max_new_tokens=32, temperature=0.0, seed=None):
        """Continues prompts after reading them, segment by segment, into memory.

        Each prompt goes to its own lane; a prompt longer than the segment
        length is read into memory (and the XL cache) segment by segment
        first, so the continuation can draw on all of it. See
        `SegmentGenerator` for how the memory is kept across steps.

        Args:
            prompts: a string or a list of at most `batch_size` strings; or,
                without a preprocessor, 1-D int token sequences.
            max_new_tokens: int. Tokens to generate per prompt.
            temperature: float. 0 is greedy; above 0 samples.
            seed: int. Sampling seed.

        Returns:
            The continuation text of each prompt (a string for a string
            prompt), or int token arrays `[prompts, max_new_tokens]` without
            a preprocessor. The inference memory is left holding the prompts.
        """
        if not isinstance(prompts, str) and len(prompts) == 0:
            raise ValueError("`prompts` is empty: pass a prompt or a list of them.")
        single = isinstance(prompts, str) or (
            self.preprocessor is None and np.isscalar(prompts[0])
        )
        batch = [prompts] if single else list(prompts)
        if self.preprocessor is not None:
            batch = self.preprocessor(batch)
        generator = SegmentGenerator(self, temperature=temperature, seed=seed)
        continuations = generator(batch, max_new_tokens)
        if self.preprocessor is not None:
            continuations = [self.preprocessor.detokenize(c) for c in continuations]
        return continuations[0] if single else continuations

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "preprocessor": keras.saving.serialize_keras_object(self._preprocessor),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        if config.get("preprocessor") is not None:
            config["preprocessor"] = keras.saving.deserialize_keras_object(
                config["preprocessor"]
            )
        return cls(**config)

import keras
import numpy as np
from keras import ops
from keras_hub.src.utils import preset_utils

from keras_memtrans.models.lane_inputs_mixin import LaneInputsMixin
from keras_memtrans.models.memorizing_transformer_backbone import (
    MemorizingTransformerBackbone,
)
from keras_memtrans.models.memorizing_transformer_preprocessor import (
    MemorizingTransformerPreprocessor,
)
from keras_memtrans.models.next_token_steps import NextTokenSteps
from keras_memtrans.models.preset_directory import save_task_preset
from keras_memtrans.models.score_step import ScoreStep
from keras_memtrans.models.segment_generator import SegmentGenerator


@keras.saving.register_keras_serializable(package="keras_memtrans")
class MemorizingTransformerCausalLM(LaneInputsMixin, keras.Model):
    """Next-token language model on a `MemorizingTransformerBackbone`.

    Maps the backbone's hidden states to vocabulary logits (through the tied
    token embedding by default). It follows keras-hub's `CausalLM`
    conventions (`backbone`, `preprocessor`, a default `compile()`,
    `generate()`, `score()`, `save_to_preset()` / `from_preset()`), but is a
    plain functional `keras.Model`: keras-hub's task `fit()` re-batches its
    inputs into a dataset, which would break the lane order a memory model
    depends on, and its JAX `generate()` drops state updates, which would
    lose the memory.

    Training data are lanes of consecutive segments, as produced by
    `keras_memtrans.data.LaneStreamer`: `fit(streamer)` with `shuffle`
    irrelevant (a `PyDataset` is read in order).

    Presets are keras-hub's: `save_to_preset()` and `from_preset()` run
    keras-hub's own preset saver and loader, so the directory holds what a
    keras-hub task writes (`config.json`, `model.weights.h5`,
    `metadata.json`, `task.json`, `preprocessor.json`, `tokenizer.json`,
    `assets/tokenizer/`) and the backbone, tokenizer and preprocessor load
    from it too. Subclassing `keras_hub.models.CausalLM` for them would
    route `fit`, `evaluate`, `predict` and `*_on_batch` through keras-hub's
    preprocessing pipeline and bring its sampler-based `generate()`: all
    would have to be overridden back, under an API the model does not
    honour. So `keras_hub.models.CausalLM.from_preset` does not find this
    class, and `metadata.json` lists no tasks. Memories are not weights: a
    preset holds none, and a loaded model starts with empty memories.

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
    ...     memory_layer_indices=(-1,),
    ...     memory_options={"memory_size": 64, "num_neighbors": 4})
    >>> causal_lm = MemorizingTransformerCausalLM(backbone)
    >>> causal_lm.output_shape
    (2, 8, 100)

    Reference:
        Wu et al., "Memorizing Transformers", ICLR 2022
        (https://arxiv.org/abs/2203.08913).
    """

    backbone_cls = MemorizingTransformerBackbone
    preprocessor_cls = MemorizingTransformerPreprocessor

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
        self._score_function = None  # `ScoreStep.predict_on_batch`, once built
        self._next_token_steps = NextTokenSteps(self)  # generation's steps

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
        position biases are excluded, as in the reference trainers, beside
        what the optimizer already excluded.
        """
        if optimizer == "auto":
            optimizer = keras.optimizers.AdamW(1e-3, weight_decay=0.01)
        optimizer = keras.optimizers.get(optimizer)
        if getattr(optimizer, "weight_decay", None) and not optimizer.built:
            # `exclude_from_weight_decay` replaces the optimizer's exclusions:
            # the variables it already excluded are kept in the new list.
            excluded = [
                variable
                for variable in self.trainable_variables
                if not optimizer._use_weight_decay(variable)
            ]
            optimizer.exclude_from_weight_decay(var_list=self._not_decayed() + excluded)
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

    def score(
        self,
        token_ids,
        padding_mask=None,
        scoring_mode="logits",
        target_ids=None,
        document_start=None,
        return_neighbors=False,
    ):
        """Scores one batch of segments, as keras-hub's `CausalLM.score`.

        Reads one segment per lane exactly as `predict_on_batch` does: with
        the inference memories and XL caches (`training=False`), which it
        extends, the training state untouched. Calling it on consecutive
        segments of each lane scores whole documents with their memory.
        The step is compiled once per model, as `predict_on_batch` is.

        Args:
            token_ids: int `[batch_size, segment_length]`.
            padding_mask: optional bool `[batch_size, segment_length]`;
                `False` marks padding (neither attended to nor stored).
                Defaults to all `True`.
            scoring_mode: `"logits"` or `"loss"`: the logits of every
                position, or the cross-entropy of `target_ids` there.
            target_ids: int `[batch_size, segment_length]`, the token each
                position predicts; needed for `"loss"`.
            document_start: optional bool `[batch_size]`: `True` where a
                lane starts a new document (its memory and cache are
                emptied first). `None` continues every lane.
            return_neighbors: bool. Also return what each memory layer
                retrieved.

        Returns:
            NumPy float32 logits `[batch, segment, vocabulary_size]`, or
            losses `[batch, segment]` in nats (meaningless where
            `padding_mask` is `False`). With `return_neighbors=True`, a
            tuple of these and a list, one entry per memory layer (bottom
            to top), of int32 `[batch, segment, num_heads, num_neighbors]`
            document positions each query retrieved (`-1`: none).

        Example:
        >>> backbone = MemorizingTransformerBackbone(
        ...     vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=16,
        ...     intermediate_dim=32, batch_size=2, segment_length=8,
        ...     memory_layer_indices=(-1,),
        ...     memory_options={"memory_size": 64, "num_neighbors": 4})
        >>> causal_lm = MemorizingTransformerCausalLM(backbone)
        >>> token_ids = np.arange(1, 17, dtype="int32").reshape(2, 8)
        >>> losses, (positions,) = causal_lm.score(
        ...     token_ids, scoring_mode="loss", target_ids=token_ids + 1,
        ...     document_start=np.array([True, True]), return_neighbors=True)
        >>> losses.shape, positions.shape
        ((2, 8), (2, 8, 2, 4))
        """
        if scoring_mode not in ("logits", "loss"):
            raise ValueError(
                f"`scoring_mode` must be 'logits' or 'loss', got {scoring_mode!r}."
            )
        if scoring_mode == "loss" and target_ids is None:
            raise ValueError(
                "Cannot compute a loss without targets: pass `target_ids`."
            )
        if document_start is None:
            document_start = np.zeros(np.shape(token_ids)[:1], bool)
        if padding_mask is None:
            padding_mask = np.ones(np.shape(token_ids), bool)
        inputs = dict(
            token_ids=token_ids,
            document_start=document_start,
            padding_mask=padding_mask,
        )
        if scoring_mode == "loss":
            inputs["target_ids"] = target_ids
        if self._score_function is None:
            self._score_function = ScoreStep(self).predict_on_batch
        scores, neighbors = self._score_function(inputs)
        return (scores, list(neighbors)) if return_neighbors else scores

    def _score_step(self, inputs):
        """`score`'s forward pass: the backbone's layers with `training=False`.

        Returns logits (or, given `inputs["target_ids"]`, losses) and the
        list of every memory layer's retrieved positions.
        """
        backbone = self.backbone
        options = dict(
            document_start=inputs["document_start"],
            padding_mask=inputs["padding_mask"],
            training=False,
        )
        x = backbone.token_embedding(inputs["token_ids"])  # [batch, segment, hidden]
        neighbors = []
        for block in backbone.transformer_layers:
            if block.use_memory:
                # positions: [batch, segment, heads, k]
                x, positions = block(x, return_neighbors=True, **options)
                neighbors.append(positions)
            else:
                x = block(x, **options)
        x = backbone.layer_norm(x)
        logits = backbone.token_embedding(x, reverse=True)  # [batch, segment, vocab]
        logits = ops.cast(logits, "float32")
        if "target_ids" not in inputs:
            return logits, neighbors
        losses = keras.losses.sparse_categorical_crossentropy(
            inputs["target_ids"], logits, from_logits=True
        )  # [batch, segment]
        return losses, neighbors

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

    def has_task_weights(self):
        """False: the output projection is the backbone's token embedding
        (keras-hub's preset saver asks)."""
        return False

    def save_to_preset(self, preset_dir, max_shard_size=10):
        """Saves the model to a keras-hub preset directory.

        keras-hub's own preset saver writes the backbone's config, weights
        and metadata, the model's `task.json` and the preprocessor with its
        tokenizer; memories are not saved. The directory is written whole
        (`atomic_files.atomic_directory`): a save that fails or is killed
        leaves the preset that was there.

        Args:
            preset_dir: path of the preset directory: replaced if it holds a
                preset; a directory holding other files is refused
                (`FileExistsError`), never emptied.
            max_shard_size: int or float. Maximum size in GB of each weights
                file; `None`: no sharding.
        """
        save_task_preset(self, preset_dir, max_shard_size)

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Loads a model saved by `save_to_preset`, with keras-hub's loader.

        Restores the config, the weights (unless `load_weights=False`) and
        the preprocessor with its tokenizer; the memories start empty.

        Args:
            preset: a preset directory, or any handle keras-hub's
                `from_preset` takes (`"kaggle://..."`, `"hf://..."`).
            load_weights: bool. Whether to load the saved weights.
            **kwargs: constructor arguments that replace the saved ones
                (e.g. `dtype`).

        Example:
        >>> import tempfile
        >>> backbone = MemorizingTransformerBackbone(
        ...     vocabulary_size=100, num_layers=4, num_heads=2, hidden_dim=16,
        ...     intermediate_dim=32, batch_size=2, segment_length=8)
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     MemorizingTransformerCausalLM(backbone).save_to_preset(directory)
        ...     loaded = MemorizingTransformerCausalLM.from_preset(directory)
        >>> loaded.output_shape
        (2, 8, 100)
        """
        loader = preset_utils.get_preset_loader(str(preset))
        backbone_cls = loader.check_backbone_class()
        if not issubclass(backbone_cls, cls.backbone_cls):
            raise ValueError(
                f"The preset {preset!r} holds a {backbone_cls.__name__}, not a "
                f"{cls.backbone_cls.__name__}."
            )
        causal_lm = loader.load_task(
            cls, load_weights=load_weights, load_task_weights=True, **kwargs
        )
        _ = causal_lm.preprocessor  # checks the loaded tokenizer's vocabulary
        return causal_lm

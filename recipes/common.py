"""What the recipes share: training defaults per preset, the corpus split,
building and compiling a model, and the run directories.

The architectures are `keras_memtrans.models.PRESETS`; how long and how fast
a recipe trains each of them is recipe policy, so it lives here.
"""

import keras

from keras_memtrans.data import TextCorpus
from keras_memtrans.models import MemorizingTransformerBackbone
from keras_memtrans.models import MemorizingTransformerCausalLM
from keras_memtrans.models import MemorizingTransformerPreprocessor
from keras_memtrans.models import MemorizingTransformerTokenizer

# `recipes.train`'s defaults for each architecture preset: training steps,
# peak learning rate, warm-up steps and the cap on corpus documents (`None`:
# all of them).
TRAINING = {
    # Tests: a model that builds and steps in seconds.
    "tiny": dict(steps=20, learning_rate=3e-3, warmup_steps=5, max_documents=20),
    # The README's main job: with and without memory in under 15 min on 2
    # CPU cores.
    "quick": dict(steps=600, learning_rate=2e-3, warmup_steps=60, max_documents=300),
    # The CPU recipe: the whole corpus, longer.
    "small": dict(steps=2000, learning_rate=2e-3, warmup_steps=100, max_documents=None),
    # The paper trained 500K steps with Adafactor; the recipe's AdamW takes a
    # smaller peak rate (not yet run at this scale).
    "paper": dict(
        steps=500_000, learning_rate=1e-3, warmup_steps=1000, max_documents=None
    ),
}


def split_corpus(settings):
    """The corpus a run reads and its training and validation parts.

    Args:
        settings: the `"corpus"` dict of a run's `results.json` (`source`,
            `min_chars`, `max_documents`, `validation_fraction`, `seed`):
            the same settings give the same documents in the same parts.

    Returns:
        `(corpus, train_corpus, validation_corpus)`, split by document.
    """
    corpus = TextCorpus(
        settings["source"],
        min_chars=settings["min_chars"],
        max_documents=settings["max_documents"],
    )
    train_corpus, validation_corpus = corpus.split(
        settings["validation_fraction"], settings["seed"]
    )
    return corpus, train_corpus, validation_corpus


def prepare_documents(train_corpus, validation_corpus, vocabulary_size, seed):
    """Learns a SentencePiece vocabulary on the training part; tokenizes both.

    Returns:
        `(preprocessor, train_docs, validation_docs)`: the preprocessor holds
        the tokenizer; the documents are lists of int32 token-id arrays.
    """
    tokenizer = MemorizingTransformerTokenizer.from_documents(
        train_corpus.texts, vocabulary_size, seed=seed
    )
    preprocessor = MemorizingTransformerPreprocessor(tokenizer)
    return (
        preprocessor,
        preprocessor(train_corpus.texts),
        preprocessor(validation_corpus.texts),
    )


def build_causal_lm(
    backbone_config, vocabulary_size, preprocessor, use_memory, seed, dtype=None
):
    """A `MemorizingTransformerCausalLM` of a preset's backbone arguments.

    The same `seed` gives the model without memory (`use_memory=False`: no
    memory layers) the same initial weights as the one with memory.
    """
    keras.utils.set_random_seed(seed)
    config = dict(backbone_config)
    if not use_memory:
        config["memory_layer_indices"] = ()
    backbone = MemorizingTransformerBackbone(
        vocabulary_size=vocabulary_size, dtype=dtype, **config
    )
    return MemorizingTransformerCausalLM(backbone, preprocessor)


def jit_compile_flag(value):
    """A `--jit-compile` flag's value (`auto`, `true` or `false`) as
    `Model.compile`'s `jit_compile` (`"auto"`, `True` or `False`)."""
    return {"auto": "auto", "true": True, "false": False}[value]


def recipe_jit_compile(jit_compile):
    """`Model.compile`'s `jit_compile` for the recipe and its benchmarks:
    `"auto"` is XLA on TensorFlow too.

    Keras resolves `"auto"` to no XLA for TensorFlow on a machine without
    a GPU or TPU, where XLA made the peer configuration's step 7-15% faster
    (docs/performance.md). JAX compiles with XLA anyway and torch stays
    eager (`torch.compile` gained nothing on CPU). A model whose host
    memory XLA cannot compile still runs without it: Keras turns
    `jit_compile=True` off, with a warning.
    """
    if jit_compile == "auto" and keras.backend.backend() == "tensorflow":
        return True
    return jit_compile


def compile_for_training(causal_lm, training, jit_compile="auto", loss="auto"):
    """AdamW with warm-up and cosine decay, clipped gradients, and token
    accuracy and NLL metrics (the recipe's held-out perplexity); `loss` is
    the causal LM's own (`"auto"`) unless given; `jit_compile` as
    `recipe_jit_compile` resolves it. The optimizer's variables are made
    here: made inside the first step, they make TensorFlow trace the step
    twice (once to create them, once to run it)."""
    steps = training["steps"]
    warmup = min(training["warmup_steps"], max(steps // 2, 1))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        warmup_target=training["learning_rate"],
        warmup_steps=warmup,
        decay_steps=max(steps - warmup, 1),
        alpha=0.1,
    )
    causal_lm.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01, clipnorm=1.0),
        loss=loss,
        weighted_metrics=[
            keras.metrics.SparseCategoricalAccuracy("accuracy"),
            keras.metrics.SparseCategoricalCrossentropy("token_nll", from_logits=True),
        ],
        jit_compile=recipe_jit_compile(jit_compile),
    )
    causal_lm.optimizer.build(causal_lm.trainable_variables)


def save_preset(causal_lm, directory):
    """Saves `causal_lm` as a keras-hub preset at `directory`, which must
    not exist: a run never replaces a model (the save itself is all or
    nothing, `MemorizingTransformerCausalLM.save_to_preset`).

    Raises:
        FileExistsError: `directory` exists.
    """
    if directory.exists():
        raise FileExistsError(f"{directory} exists: a run never replaces a model.")
    causal_lm.save_to_preset(directory)

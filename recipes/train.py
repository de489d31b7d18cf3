"""Train a Memorizing Transformer with `model.fit` and report held-out perplexity.

The backend is whatever `KERAS_BACKEND` names (tensorflow, jax or torch). The
default corpus is the running Python's own standard library: long, real
source files. Documents are split into training and validation by document;
a SentencePiece vocabulary is learnt on the training part; the model reads
each document segment by segment, in lanes, with its kNN memory.

    KERAS_BACKEND=jax python -m recipes.train --preset quick --compare

`--compare` trains the same model twice, with and without memory (same
tokenizer, data order and initial seed), and prints both perplexities;
`--no-memory` trains only the model without memory. Each run writes a
`.keras` checkpoint, a CSV log and TensorBoard logs; the whole job writes
`results.json` and `results.md` to the output directory, which is never
overwritten (a new `-N` suffix is chosen instead).
"""

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import time

import keras

from keras_memtrans.data import LaneStreamer
from keras_memtrans.data import TextCorpus
from keras_memtrans.models import PRESETS
from keras_memtrans.models import MemorizingTransformerBackbone
from keras_memtrans.models import MemorizingTransformerCausalLM
from keras_memtrans.models import MemorizingTransformerPreprocessor
from keras_memtrans.models import MemorizingTransformerTokenizer
from keras_memtrans.models import get_preset
from recipes.reporting import HeldOutCurve
from recipes.reporting import held_out_scores
from recipes.reporting import markdown_table


def positive_int(text):
    """argparse type: an int of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    parser.add_argument(
        "--corpus",
        default=None,
        help="directory, glob, file or JSONL of documents "
        "(default: the Python standard library's source files)",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--no-memory", action="store_true", help="train without memory")
    group.add_argument(
        "--compare", action="store_true", help="train with and without memory"
    )
    parser.add_argument(
        "--steps", type=positive_int, help="training steps (preset default)"
    )
    parser.add_argument(
        "--memory",
        choices=("auto", "exact", "scann"),
        help="memory kind (preset default: auto, ScaNN from 32K tokens)",
    )
    parser.add_argument(
        "--jit-compile",
        default="auto",
        choices=("auto", "true", "false"),
        help="XLA (TensorFlow, JAX): auto uses it on accelerators where the "
        "memory allows",
    )
    parser.add_argument(
        "--memory-size", type=positive_int, help="tokens per memory lane"
    )
    parser.add_argument(
        "--num-neighbors", type=positive_int, help="k of the kNN lookup"
    )
    parser.add_argument(
        "--top-k",
        choices=("exact", "approx"),
        help="the exact memory's top-k (approx: approx_max_k, fast on TPU)",
    )
    parser.add_argument(
        "--recall-target", type=float, help="recall target of --top-k approx"
    )
    parser.add_argument(
        "--num-leaves", type=positive_int, help="ScaNN tree partitions per searcher"
    )
    parser.add_argument(
        "--num-leaves-to-search",
        type=positive_int,
        help="ScaNN partitions a search visits",
    )
    parser.add_argument("--head-dim", type=positive_int, help="size of each head")
    parser.add_argument(
        "--memory-layers",
        type=int,
        nargs="+",
        help="indices of the memory layers (negative: from the top)",
    )
    parser.add_argument(
        "--smear-keys",
        choices=("true", "false"),
        help="mix each key with the previous token's key (preset default)",
    )
    parser.add_argument(
        "--tie-query-key-init",
        choices=("true", "false"),
        help="start each key projection as a copy of the query projection "
        "(preset default)",
    )
    parser.add_argument("--batch-size", type=positive_int, help="number of lanes")
    parser.add_argument(
        "--segment-length", type=positive_int, help="tokens per segment"
    )
    parser.add_argument(
        "--vocabulary-size", type=positive_int, help="SentencePiece vocabulary"
    )
    parser.add_argument("--learning-rate", type=float, help="peak learning rate")
    parser.add_argument(
        "--eval-every",
        type=positive_int,
        help="also evaluate on the held-out documents every this many steps "
        "(a learning curve, with the memory gates, in the results)",
    )
    parser.add_argument(
        "--max-documents", type=positive_int, help="cap on corpus documents"
    )
    parser.add_argument("--min-chars", type=int, default=2000)
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=pathlib.Path, default=None)
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    return parser.parse_args(argv)


def resolve_config(args):
    """The preset, with every flag that was given taking precedence."""
    preset = get_preset(args.preset)
    backbone = dict(preset["backbone"])
    training = dict(preset["training"])
    for flag in (
        "memory",
        "memory_size",
        "num_neighbors",
        "top_k",
        "recall_target",
        "num_leaves",
        "num_leaves_to_search",
        "head_dim",
        "batch_size",
        "segment_length",
    ):
        if getattr(args, flag) is not None:
            backbone[flag] = getattr(args, flag)
    if args.memory_layers is not None:
        backbone["memory_layer_indices"] = tuple(args.memory_layers)
    for flag in ("smear_keys", "tie_query_key_init"):
        if getattr(args, flag) is not None:
            backbone[flag] = getattr(args, flag) == "true"
    for flag in ("steps", "learning_rate", "max_documents"):
        if getattr(args, flag) is not None:
            training[flag] = getattr(args, flag)
    vocabulary_size = args.vocabulary_size
    if vocabulary_size is None:
        vocabulary_size = preset["vocabulary_size"]
    return backbone, training, vocabulary_size


def fresh_directory(path):
    """`path`, or `path-2`, `path-3`, ...: never one that already has files."""
    candidate, n = path, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def prepare_documents(corpus, vocabulary_size, validation_fraction, seed):
    """Splits `corpus` by document and tokenizes both parts.

    The SentencePiece vocabulary is learnt on the training documents only.

    Returns:
        `(preprocessor, train_docs, validation_docs)`: the preprocessor holds
        the tokenizer; the documents are lists of int32 token-id arrays.
    """
    train_corpus, validation_corpus = corpus.split(validation_fraction, seed)
    tokenizer = MemorizingTransformerTokenizer.from_documents(
        train_corpus.texts, vocabulary_size, seed=seed
    )
    preprocessor = MemorizingTransformerPreprocessor(tokenizer)
    train_docs = preprocessor(train_corpus.texts)
    validation_docs = preprocessor(validation_corpus.texts)
    return preprocessor, train_docs, validation_docs


def build_causal_lm(backbone_config, vocabulary_size, preprocessor, use_memory, seed):
    keras.utils.set_random_seed(seed)
    config = dict(backbone_config)
    if not use_memory:
        config["memory_layer_indices"] = ()
    backbone = MemorizingTransformerBackbone(vocabulary_size=vocabulary_size, **config)
    return MemorizingTransformerCausalLM(backbone, preprocessor)


def compile_for_training(causal_lm, training, jit_compile="auto"):
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
        weighted_metrics=[
            keras.metrics.SparseCategoricalAccuracy("accuracy"),
            keras.metrics.SparseCategoricalCrossentropy("token_nll", from_logits=True),
        ],
        jit_compile=jit_compile,
    )


class StopAfterSteps(keras.callbacks.Callback):
    """Ends `fit` after exactly `steps` batches, mid-epoch if need be."""

    def __init__(self, steps):
        super().__init__()
        self.steps, self.done = steps, 0

    def on_train_batch_end(self, batch, logs=None):
        self.done += 1
        if self.done >= self.steps:
            self.model.stop_training = True


def train_and_evaluate(
    name, causal_lm, training, train_docs, validation_docs, args, run_dir
):
    lanes = causal_lm.backbone.batch_size
    length = causal_lm.backbone.segment_length
    # Training reads passes endlessly (no lane idles at a pass's end) and
    # `fit` continues the stream across its epochs; evaluation, one pass.
    train_stream = LaneStreamer(
        train_docs, lanes, length, shuffle=True, repeat=True, seed=args.seed
    )
    validation_stream = LaneStreamer(validation_docs, lanes, length, shuffle=False)
    steps = training["steps"]
    steps_per_epoch = min(steps, args.eval_every or train_stream.steps_per_pass)
    epochs = math.ceil(steps / steps_per_epoch)
    stop = StopAfterSteps(steps)
    curve = HeldOutCurve(validation_stream, steps_per_epoch, steps)
    callbacks = [
        stop,
        *([curve] if args.eval_every else []),
        keras.callbacks.ModelCheckpoint(run_dir / "checkpoint.keras"),
        keras.callbacks.CSVLogger(str(run_dir / "log.csv")),
        keras.callbacks.TensorBoard(str(run_dir / "tensorboard")),
    ]
    print(
        f"\n[{name}] {steps} steps: {epochs} epoch(s) of at most {steps_per_epoch}; "
        f"padding: {train_stream.padding_fraction(steps):.1%} of training token slots",
        flush=True,
    )
    start = time.perf_counter()
    history = causal_lm.fit(
        train_stream,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        shuffle=False,  # a PyDataset shuffled by fit would break the lanes
        callbacks=callbacks,
        verbose=args.verbose,
    )
    train_seconds = time.perf_counter() - start
    if args.eval_every:  # the curve's last point is the trained model's
        final = curve.rows[-1]
    else:
        final = held_out_scores(causal_lm, validation_stream)
    return {
        "run": name,
        "memory_layers": list(causal_lm.backbone.memory_layer_indices),
        "memory_size": causal_lm.backbone.memory_size,
        "train_loss": history.history["token_nll"][-1],
        "validation_nll": final["validation_nll"],
        "validation_perplexity": final["validation_perplexity"],
        "validation_accuracy": final["validation_accuracy"],
        "gates": final["gates"],
        "curve": curve.rows,
        "train_seconds": round(train_seconds, 1),
        "steps": stop.done,
        "jit_compile": bool(causal_lm.jit_compile),
        "checkpoint": str((run_dir / "checkpoint.keras").resolve()),
    }


def main(argv=None):
    args = parse_args(argv)
    backbone_config, training, vocabulary_size = resolve_config(args)
    backend = keras.backend.backend()
    output_dir = fresh_directory(
        args.output_dir or pathlib.Path("runs") / f"{args.preset}-{backend}"
    )
    corpus = TextCorpus(
        args.corpus, min_chars=args.min_chars, max_documents=training["max_documents"]
    )
    print(corpus.summary())
    preprocessor, train_docs, validation_docs = prepare_documents(
        corpus, vocabulary_size, args.validation_fraction, args.seed
    )
    tokenizer = preprocessor.tokenizer
    print(
        f"{len(train_docs)} training / {len(validation_docs)} validation documents, "
        f"{sum(map(len, train_docs))} / {sum(map(len, validation_docs))} tokens, "
        f"vocabulary {tokenizer.vocabulary_size()}, backend {backend}"
    )
    runs = [("memory", True), ("no_memory", False)]
    if args.no_memory:
        runs = runs[1:]
    elif not args.compare:
        runs = runs[:1]
    results = []
    jit_compile = {"auto": "auto", "true": True, "false": False}[args.jit_compile]
    for name, use_memory in runs:
        causal_lm = build_causal_lm(
            backbone_config,
            tokenizer.vocabulary_size(),
            preprocessor,
            use_memory,
            args.seed,
        )
        compile_for_training(causal_lm, training, jit_compile)
        run_dir = output_dir / name
        run_dir.mkdir()
        results.append(
            train_and_evaluate(
                name, causal_lm, training, train_docs, validation_docs, args, run_dir
            )
        )
    header = (
        f"Preset `{args.preset}`, backend {backend}, corpus: {corpus.summary()}\n\n"
        f"Command: `KERAS_BACKEND={backend} python -m recipes.train "
        f"{' '.join(sys.argv[1:] if argv is None else argv)}`"
    )
    table = markdown_table(results, header)
    (output_dir / "results.md").write_text(table)
    (output_dir / "results.json").write_text(
        json.dumps(
            {
                "preset": args.preset,
                "backend": backend,
                "backbone": backbone_config,
                "training": training,
                "vocabulary_size": tokenizer.vocabulary_size(),
                "corpus": {
                    "source": args.corpus and os.path.abspath(args.corpus),
                    "python": platform.python_version(),
                    "min_chars": args.min_chars,
                    "max_documents": training["max_documents"],
                    "validation_fraction": args.validation_fraction,
                    "seed": args.seed,
                },
                "results": results,
            },
            indent=2,
        )
    )
    print("\n" + table)
    print(f"Results in {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

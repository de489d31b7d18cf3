"""Train a Memorizing Transformer with `model.fit` and report held-out perplexity.

The backend is whatever `KERAS_BACKEND` names (tensorflow, jax or torch). The
default corpus is the running Python's own standard library: long, real
source files. Documents are split into training and validation by document;
a SentencePiece vocabulary is learnt on the training part; the model reads
each document segment by segment, in lanes, with its kNN memory.

    KERAS_BACKEND=jax python -m recipes.train --preset quick --compare

`--compare` trains the same model twice, with and without memory (same
tokenizer, data order and initial seed), and prints both perplexities;
`--no-memory` trains only the model without memory. The output directory,
never overwritten (a new `-N` suffix is chosen instead), gets:

- `memory/`, `no_memory/`: each trained model as a keras-hub preset
  (`MemorizingTransformerCausalLM.from_preset("runs/quick-jax/memory")`);
- `training/memory/`, `training/no_memory/`: a `.keras` checkpoint, a CSV
  log and TensorBoard logs of each run;
- `results.json` and `results.md`.
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

from keras_memtrans import KNNAttention
from keras_memtrans.data import LaneStreamer
from keras_memtrans.memory.factory import MEMORY_KINDS
from keras_memtrans.models import PRESETS
from keras_memtrans.models import get_preset
from recipes.common import TRAINING
from recipes.common import build_causal_lm
from recipes.common import compile_for_training
from recipes.common import fresh_directory
from recipes.common import prepare_documents
from recipes.common import save_preset
from recipes.common import split_corpus
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
        "--memory-kind",
        choices=MEMORY_KINDS,
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
    """The preset and its training defaults, with every flag that was given
    taking precedence."""
    preset = get_preset(args.preset)
    backbone = dict(preset["backbone"])
    backbone["memory_options"] = dict(backbone.get("memory_options") or {})
    training = dict(TRAINING[args.preset])
    for flag in KNNAttention.memory_options():
        if getattr(args, flag) is not None:
            backbone["memory_options"][flag] = getattr(args, flag)
    for flag in ("head_dim", "batch_size", "segment_length"):
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
    name, causal_lm, training, train_docs, validation_docs, args, output_dir
):
    """Trains one model, scores it on the held-out documents and saves it as
    the preset `output_dir / name` (logs and checkpoint under `training/`)."""
    log_dir = output_dir / "training" / name
    log_dir.mkdir(parents=True)
    lanes = causal_lm.backbone.batch_size
    length = causal_lm.backbone.segment_length
    memory_layers = causal_lm.backbone.memory_layers
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
        keras.callbacks.ModelCheckpoint(log_dir / "checkpoint.keras"),
        keras.callbacks.CSVLogger(str(log_dir / "log.csv")),
        keras.callbacks.TensorBoard(str(log_dir / "tensorboard")),
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
    save_preset(causal_lm, output_dir / name)
    return {
        "run": name,
        "memory_layers": list(causal_lm.backbone.memory_layer_indices),
        "memory_size": memory_layers[0].memory_size if memory_layers else None,
        "train_loss": history.history["token_nll"][-1],
        "validation_nll": final["validation_nll"],
        "validation_perplexity": final["validation_perplexity"],
        "validation_accuracy": final["validation_accuracy"],
        "gates": final["gates"],
        "curve": curve.rows,
        "train_seconds": round(train_seconds, 1),
        "steps": stop.done,
        "jit_compile": bool(causal_lm.jit_compile),
        "preset_dir": str((output_dir / name).resolve()),
        "checkpoint": str((log_dir / "checkpoint.keras").resolve()),
    }


def main(argv=None):
    args = parse_args(argv)
    backbone_config, training, vocabulary_size = resolve_config(args)
    backend = keras.backend.backend()
    output_dir = fresh_directory(
        args.output_dir or pathlib.Path("runs") / f"{args.preset}-{backend}"
    )
    corpus_settings = {
        "source": args.corpus and os.path.abspath(args.corpus),
        "python": platform.python_version(),
        "min_chars": args.min_chars,
        "max_documents": training["max_documents"],
        "validation_fraction": args.validation_fraction,
        "seed": args.seed,
    }
    corpus, train_corpus, validation_corpus = split_corpus(corpus_settings)
    print(corpus.summary())
    preprocessor, train_docs, validation_docs = prepare_documents(
        train_corpus, validation_corpus, vocabulary_size, args.seed
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
        results.append(
            train_and_evaluate(
                name, causal_lm, training, train_docs, validation_docs, args, output_dir
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
                "corpus": corpus_settings,
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

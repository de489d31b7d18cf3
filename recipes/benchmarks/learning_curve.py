"""Held-out perplexity during training, with and without memory.

Trains a preset's model twice in one process, with its kNN memory and
without (same tokenizer, seed and data order), and evaluates both on the
held-out documents every `--every` steps. Each interval of `--every` steps is
one Keras epoch, so the lanes start a fresh seeded document order at every
evaluation; both models see the same batches. Prints (and writes to
`--output`) a markdown table of perplexity by step, the ratio, and the
memory layers' gates `sigmoid(b)` (the share of memory in each head).

    KERAS_BACKEND=jax python -m recipes.benchmarks.learning_curve --preset quick
"""

import argparse
import ast
import inspect
import math
import pathlib
import sys

import keras
import numpy as np

from keras_memtrans.data import LaneStreamer
from keras_memtrans.data import TextCorpus
from keras_memtrans.models import PRESETS
from keras_memtrans.models import MemorizingTransformerBackbone
from keras_memtrans.models import get_preset
from recipes.train import build_causal_lm
from recipes.train import compile_for_training
from recipes.train import prepare_documents


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--every", type=int, default=400)
    parser.add_argument("--validation-documents", type=int, default=15)
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="backbone overrides, e.g. smear_keys=True 'memory_layer_indices=(0,)'",
    )
    parser.add_argument("--output", type=pathlib.Path)
    return parser.parse_args(argv)


def backbone_config(preset, overrides):
    config = dict(preset["backbone"])
    for override in overrides:
        name, _, value = override.partition("=")
        if name not in inspect.signature(MemorizingTransformerBackbone).parameters:
            raise SystemExit(f"Unknown backbone argument {name!r} in --set.")
        config[name] = ast.literal_eval(value)
    return config


class HeldOutPerplexity(keras.callbacks.Callback):
    """Evaluates on held-out lanes at every epoch end."""

    def __init__(self, stream, every):
        super().__init__()
        self.stream, self.every, self.rows = stream, every, []

    def on_epoch_end(self, epoch, logs=None):
        scores = self.model.evaluate(self.stream, return_dict=True, verbose=0)
        gates = []
        for layer in self.model.backbone.memory_layers:
            bias = keras.ops.convert_to_numpy(layer.gate_bias).astype("float64")
            gates.append(np.round(1 / (1 + np.exp(-bias)), 2).tolist())
        row = ((epoch + 1) * self.every, math.exp(scores["token_nll"]), gates)
        self.rows.append(row)
        print(f"step {row[0]}: perplexity {row[1]:.3f} gates {gates}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    preset = get_preset(args.preset)
    config = backbone_config(preset, args.set)
    training = dict(preset["training"], steps=args.steps)
    corpus = TextCorpus(None, max_documents=training["max_documents"])
    preprocessor, train_docs, validation_docs = prepare_documents(
        corpus, preset["vocabulary_size"], validation_fraction=0.1, seed=0
    )
    validation_docs = validation_docs[: args.validation_documents]
    lanes, length = config["batch_size"], config["segment_length"]
    curves = {}
    for name, use_memory in (("memory", True), ("no_memory", False)):
        causal_lm = build_causal_lm(
            config,
            preprocessor.tokenizer.vocabulary_size(),
            preprocessor,
            use_memory,
            seed=0,
        )
        compile_for_training(causal_lm, training)
        callback = HeldOutPerplexity(
            LaneStreamer(validation_docs, lanes, length, shuffle=False), args.every
        )
        print(f"[{name}]", flush=True)
        causal_lm.fit(
            LaneStreamer(train_docs, lanes, length, shuffle=True, seed=0),
            epochs=args.steps // args.every,
            steps_per_epoch=args.every,
            shuffle=False,
            callbacks=[callback],
            verbose=0,
        )
        curves[name] = callback.rows
    lines = [
        f"Preset `{args.preset}` with {' '.join(args.set) or 'no overrides'}, "
        f"backend {keras.backend.backend()}; {len(validation_docs)} held-out "
        "documents.",
        "",
        "| step | perplexity, memory | perplexity, no memory | ratio | gates |",
        "|---|---|---|---|---|",
    ]
    for (step, with_memory, gates), (_, without, _) in zip(
        curves["memory"], curves["no_memory"]
    ):
        gates = "; ".join(" ".join(f"{g:.2f}" for g in layer) for layer in gates)
        lines.append(
            f"| {step} | {with_memory:.3f} | {without:.3f} | "
            f"{with_memory / without:.3f} | {gates} |"
        )
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.output:
        args.output.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

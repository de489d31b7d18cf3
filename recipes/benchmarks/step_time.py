"""Training step time of a preset with its kNN memory against the same model without.

Both models are built, compiled and timed in one process on the same random
token segments (the step does not depend on the values) within ONE `fit` of
`warmup + steps` steps: a callback waits for each step's loss and stamps the
time, and the last `steps` intervals are averaged. (Separate `fit` calls
recompile under JAX, and `train_on_batch` has a per-call overhead that
dwarfs a step.) Prints a markdown table with the ratio; the paper reports +25%
for an 8K memory on TPUv3 (0.2 s -> 0.25 s per step).

    KERAS_BACKEND=jax python -m recipes.benchmarks.step_time --preset paper
"""

import argparse
import sys
import time

import keras
import numpy as np

from keras_memtrans.models import PRESETS
from keras_memtrans.models import get_preset
from recipes.common import build_causal_lm


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    parser.add_argument("--memory-sizes", type=int, nargs="+", help="default: preset's")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="at least 1")
    parser.add_argument("--dtype", default="float32", help="e.g. mixed_bfloat16")
    return parser.parse_args(argv)


def seconds_per_step(preset, memory_size, args):
    config = dict(preset["backbone"])
    if memory_size is not None:
        config["memory_options"] = dict(
            config.get("memory_options") or {}, memory_size=memory_size
        )
    causal_lm = build_causal_lm(
        config,
        preset["vocabulary_size"],
        preprocessor=None,
        use_memory=memory_size is not None,
        seed=0,
        dtype=args.dtype,
    )
    causal_lm.compile(optimizer=keras.optimizers.AdamW(1e-4))
    lanes, length = config["batch_size"], config["segment_length"]
    rng = np.random.default_rng(0)
    vocabulary = preset["vocabulary_size"]
    rows = (args.warmup + args.steps) * lanes
    x = {
        "token_ids": rng.integers(0, vocabulary, (rows, length), "int32"),
        "document_start": np.zeros((rows,), bool),
        "padding_mask": np.ones((rows, length), bool),
    }
    y = rng.integers(0, vocabulary, (rows, length), "int32")
    stamps = StepStamps()
    causal_lm.fit(
        x, y, batch_size=lanes, epochs=1, shuffle=False, verbose=0, callbacks=[stamps]
    )
    timed = stamps.times[args.warmup - 1 :]
    return (timed[-1] - timed[0]) / args.steps


class StepStamps(keras.callbacks.Callback):
    """Records when each training step has finished (waits for its loss)."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_end(self, batch, logs=None):
        float(logs["loss"])
        self.times.append(time.perf_counter())


def main(argv=None):
    args = parse_args(argv)
    preset = get_preset(args.preset)
    sizes = args.memory_sizes or [preset["backbone"]["memory_options"]["memory_size"]]
    print(
        f"preset {args.preset}, backend {keras.backend.backend()}, dtype {args.dtype}, "
        f"mean of {args.steps} fit steps after {args.warmup} warm-up steps\n"
    )
    print("| memory | seconds / step | vs no memory |")
    print("|---|---|---|", flush=True)
    baseline = seconds_per_step(preset, None, args)
    print(f"| none | {baseline:.4f} | 1.00 |", flush=True)
    for size in sizes:
        seconds = seconds_per_step(preset, size, args)
        print(f"| {size} | {seconds:.4f} | {seconds / baseline:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

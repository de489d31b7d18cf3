"""Tokens per second of `generate()`, per preset and backend.

For each preset of `--presets`, every backend of `--backends` builds the
untrained model with memory in its own process (this one for its own
backend) and continues one random prompt per lane (`batch_size` lanes)
of a segment and one token: the segment is read into memory, and
generation goes on from the token.
`generate` is timed for 1 new token (the prompt's reading and the first
token) and for `1 + new_tokens`, the fastest of `--repeats` calls each
after one untimed call of the same length (compilation): decoding runs at
`lanes x new_tokens / (difference)` tokens/s, or `-` where the difference
is within the timer's noise (a generation longer than the rest of the
segment also reads the full segment into memory, as a long one does).
The digest of the greedy tokens lets runs before and after a change check
that the outputs stay the same.

    python -m recipes.benchmarks.generate --presets quick paper
"""

import argparse
import hashlib
import sys

import numpy as np

from keras_memtrans.models import PRESETS
from keras_memtrans.models import get_preset
from recipes.benchmarks.timing import call_times
from recipes.benchmarks.workers import free_previous_model
from recipes.benchmarks.workers import print_measurements
from recipes.benchmarks.workers import worker_lines
from recipes.common import build_causal_lm
from recipes.flags import add_keep_freed_memory
from recipes.flags import keep_freed_memory_flag
from recipes.flags import positive_int
from recipes.host_memory import keep_freed_memory

BACKENDS = ("tensorflow", "jax", "torch")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--presets", nargs="+", default=["quick", "paper"], choices=sorted(PRESETS)
    )
    parser.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--dtype", default="float32", help="e.g. mixed_bfloat16")
    add_keep_freed_memory(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure(preset_name, args):
    """`{"preset", "prompt_seconds", "tokens_per_second", "digest"}` of one
    preset in this process's backend."""
    preset = get_preset(preset_name)
    backbone = preset["backbone"]
    causal_lm = build_causal_lm(
        backbone,
        preset["vocabulary_size"],
        preprocessor=None,
        use_memory=True,
        seed=0,
        dtype=args.dtype,
    )
    lanes, length = backbone["batch_size"], backbone["segment_length"]
    rng = np.random.default_rng(0)
    prompts = list(rng.integers(1, preset["vocabulary_size"], (lanes, length + 1)))

    def fastest(max_new_tokens):
        times, tokens = call_times(  # after a warm-up call of this length
            lambda: causal_lm.generate(prompts, max_new_tokens=max_new_tokens),
            args.repeats,
        )
        return min(times), tokens

    prompt_seconds, _ = fastest(1)
    seconds, tokens = fastest(1 + args.new_tokens)
    decode_seconds = seconds - prompt_seconds
    return {
        "preset": preset_name,
        "prompt_seconds": prompt_seconds,
        # None where decoding took less than the timer's noise
        "tokens_per_second": (
            lanes * args.new_tokens / decode_seconds if decode_seconds > 0 else None
        ),
        "digest": hashlib.sha1(np.asarray(tokens, "int32").tobytes()).hexdigest()[:12],
    }


def measurements(args):
    """`measure` of each preset of `--presets`, in this process."""
    for preset in args.presets:
        free_previous_model()
        yield measure(preset, args)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.worker:
        print_measurements(measurements(args))
        return 0
    print(
        f"dtype {args.dtype}; decoding rate over {args.new_tokens} new tokens per "
        f"lane after a prompt of a segment and a token, fastest of {args.repeats}\n"
    )
    print("| backend | preset | prompt + 1st token (s) | tokens / s | greedy digest |")
    print("|---|---|---|---|---|", flush=True)
    argv = [
        *("--presets", *args.presets, "--new-tokens", str(args.new_tokens)),
        *("--repeats", str(args.repeats)),
        *("--dtype", args.dtype, "--worker"),
        keep_freed_memory_flag(args),
    ]
    for backend in args.backends:
        lines = worker_lines(
            "recipes.benchmarks.generate", backend, argv, {"KERAS_BACKEND": backend}
        )
        for line in lines:
            rate = line["tokens_per_second"]
            print(
                f"| {backend} | {line['preset']} | {line['prompt_seconds']:.3f} "
                f"| {'-' if rate is None else f'{rate:,.1f}'} | {line['digest']} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

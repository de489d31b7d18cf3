"""The accelerator benchmark: the `paper` preset's numbers in one command.

Prints, on JAX and torch, in `mixed_bfloat16`: the training step of the
`paper` preset (`train_step`) without memory and with an 8K exact, a 65K
exact and a 65K ScaNN memory (ScaNN is a CPU library that needs
TensorFlow; where it is not installed, as on a GPU image, that row is left
out and the reason printed), the exact search's throughput up to a 262K
memory beside a dense matmul (`memory_lookup`), and the decoding rate of
`generate` on the `quick` and `paper` presets (`generate`). Each backend
runs in its own process (this one for its own backend), and each row is
printed as soon as it is measured. Sized for one H100 in under 8
minutes: there its parts took 464 s in all (docs/performance.md, "On
an accelerator"):

    KERAS_BACKEND=jax python -m recipes.benchmarks.accelerator

(`KERAS_BACKEND` is set because Keras' default backend, TensorFlow, is
not on a GPU image; each backend's worker sets its own.)

`--tiny` runs the same benchmarks at test size (the `tiny` preset, small
memories), on any machine.
"""

import argparse
import sys

from keras_memtrans.memory.scann_memory import scann_installed
from recipes.benchmarks import generate
from recipes.benchmarks import train_step
from recipes.benchmarks.workers import run_main
from recipes.flags import add_keep_freed_memory
from recipes.flags import keep_freed_memory_flag

SIZES = {
    "paper": {
        "config": "paper",
        "memories": ["none", "8192:exact", "65536:exact", "65536:scann"],
        "steps": 5,
        "warmup": 2,
        "search_sizes": [8192, 65536, 262144],
        "dense_size": 8192,
        "presets": ["quick", "paper"],
        "new_tokens": 32,
        "repeats": 3,
    },
    "tiny": {
        "config": "tiny",
        "memories": ["none", "64:exact"],
        "steps": 2,
        "warmup": 1,
        "search_sizes": [256],
        "dense_size": 64,
        "presets": ["tiny"],
        "new_tokens": 16,
        "repeats": 3,
    },
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", action="store_true", help="test size, for any machine"
    )
    parser.add_argument(
        "--backends", nargs="+", default=["jax", "torch"], choices=generate.BACKENDS
    )
    parser.add_argument("--dtype", default="mixed_bfloat16")
    add_keep_freed_memory(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    size = SIZES["tiny" if args.tiny else "paper"]
    memories = size["memories"]
    if not scann_installed():
        memories = [m for m in memories if not m.endswith(":scann")]
        print("scann is not installed here: no ScaNN memory row\n")
    print("## Training step\n", flush=True)
    train_step.main(
        [
            *("--config", size["config"], "--backends", *args.backends),
            *("--memories", *memories, "--dtype", args.dtype),
            *("--steps", str(size["steps"]), "--warmup", str(size["warmup"])),
            keep_freed_memory_flag(args),
        ]
    )
    lookup = [
        "--memory-sizes",
        *("--throughput-sizes", *map(str, size["search_sizes"])),
        *("--dense-size", str(size["dense_size"]), "--repeats", "3"),
        keep_freed_memory_flag(args),
    ]
    for backend in args.backends:
        print(f"\n## Exact search throughput, {backend}\n", flush=True)
        run_main("recipes.benchmarks.memory_lookup", lookup, backend)
    print("\n## Generation\n", flush=True)
    generate.main(
        [
            *("--presets", *size["presets"], "--backends", *args.backends),
            *("--new-tokens", str(size["new_tokens"]), "--dtype", args.dtype),
            *("--repeats", str(size["repeats"])),
            keep_freed_memory_flag(args),
        ]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a training step's time goes, per backend: forward against the rest,
and the operations that take it.

For one model (`--config peer`, the PyTorch peer's configuration, or a
preset) and one memory (`--memory`: `none`, `SIZE`, `SIZE:exact`), filled
with random keys as `train_step` fills it, every backend of `--backends`
runs in its own process (this one for its own backend): the compiled
forward step with its loss (`test_on_batch`, which returns the loss, not
the logits: `predict_on_batch` copied the paper preset's `[8, 512, 32000]`
logits to the host on a GPU, longer than its whole training step took) and
the whole training step (`train_on_batch`: forward, backward and
optimizer) are each timed as the fastest of `--repeats` calls after
warm-up, and their difference is the backward pass with the optimizer.
On torch, the tensors one step makes from host data are counted (on a GPU
each is a copy that waits for the device). Then the profiler of the
backend, where it has one this script reads, records two training steps
and the operation kinds that took the most time are printed, per step:
XLA's fused operations on JAX (from `jax.profiler`'s trace, kinds named
without their numeric suffix), torch's operators by self CPU time
(`torch.profiler`; with `--shapes`, one row per operator and input
shapes). TensorFlow gets the timings only.

    python -m recipes.benchmarks.step_profile --config peer
"""

import argparse
import collections
import functools
import glob
import gzip
import json
import re
import sys
import tempfile
from unittest import mock

import keras

from keras_memtrans.models import PRESETS
from recipes.benchmarks.timing import call_times
from recipes.benchmarks.train_step import BACKENDS
from recipes.benchmarks.train_step import add_scores_per_block
from recipes.benchmarks.train_step import compiled_model
from recipes.benchmarks.train_step import model_config
from recipes.benchmarks.train_step import random_batch
from recipes.benchmarks.workers import print_measurements
from recipes.benchmarks.workers import worker_lines
from recipes.flags import add_keep_freed_memory
from recipes.flags import keep_freed_memory_flag
from recipes.flags import positive_int
from recipes.host_memory import keep_freed_memory


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="peer", choices=["peer", *sorted(PRESETS)])
    parser.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS)
    parser.add_argument("--memory", default="none", help="none, SIZE or SIZE:KIND")
    parser.add_argument("--dtype", default="float32", help="e.g. mixed_bfloat16")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--top", type=int, default=8, help="operation kinds shown")
    parser.add_argument(
        "--shapes",
        action="store_true",
        help="torch: one row per operator and input shapes",
    )
    add_scores_per_block(parser)
    add_keep_freed_memory(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def fastest(function, repeats):
    """The fastest of `repeats` calls, after a warm-up."""
    return min(call_times(function, repeats)[0])


def jax_operations(step):
    """`{kind: (seconds, count)}` per step of XLA's operations in 2 steps."""
    import jax

    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory, create_perfetto_trace=True)
        for _ in range(2):
            step()
        jax.profiler.stop_trace()
        (trace,) = glob.glob(f"{directory}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(trace) as file:
            events = json.load(file)["traceEvents"]
    kinds = collections.defaultdict(lambda: [0.0, 0])
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or name.startswith("$") or "::" in name:
            continue  # Python frames and the runtime's own spans
        if name.startswith(("PjitFunction", "SlinkyThreadPool")):
            continue
        kind = kinds[re.sub(r"\.\d+$", "", name)]
        kind[0] += event["dur"] / 1e6 / 2
        kind[1] += 1 / 2
    return kinds


def torch_operations(step, shapes=False):
    """`{operator: (seconds, count)}` per step, by self CPU time, in 2 steps;
    with `shapes`, one entry per operator and input shapes."""
    import torch.profiler

    with torch.profiler.profile(record_shapes=shapes) as profile:
        for _ in range(2):
            step()
    return {
        f"{event.key} {event.input_shapes}" if shapes else event.key: [
            event.self_cpu_time_total / 1e6 / 2,
            event.count / 2,
        ]
        for event in profile.key_averages(group_by_input_shape=shapes)
    }


def torch_host_tensors(step):
    """How many tensors one step makes from host data (Python numbers,
    NumPy arrays) with `torch.as_tensor` or `torch.tensor`, as Keras' torch
    backend does for an operation's Python number: on a GPU, each is a copy
    from the host that waits for the device."""
    import torch

    made = 0

    def counted(make):
        def make_counted(data, *args, **kwargs):
            nonlocal made
            made += not isinstance(data, torch.Tensor)
            return make(data, *args, **kwargs)

        return make_counted

    with (
        mock.patch.object(torch, "as_tensor", counted(torch.as_tensor)),
        mock.patch.object(torch, "tensor", counted(torch.tensor)),
    ):
        step()
    return made


def measurements(args):
    """Yields the step's `{"forward": ..., "step": ...}` seconds, on torch
    `{"host_tensors": ...}` (`torch_host_tensors`), then `{"kind",
    "seconds", "count"}` of its `--top` operation kinds (JAX and torch)."""
    config = model_config(args.config)
    causal_lm = compiled_model(
        config, args.memory, args.dtype, "auto", args.scores_per_block
    )
    x, y = random_batch(config, 1)
    forward = fastest(lambda: causal_lm.test_on_batch(x, y), args.repeats)
    step = fastest(lambda: causal_lm.train_on_batch(x, y), args.repeats)
    yield {"forward": forward, "step": step}

    def train_step():
        return causal_lm.train_on_batch(x, y)

    if keras.backend.backend() == "torch":
        yield {"host_tensors": torch_host_tensors(train_step)}
    profilers = {
        "jax": jax_operations,
        "torch": functools.partial(torch_operations, shapes=args.shapes),
    }
    backend = keras.backend.backend()
    if backend in profilers:
        kinds = profilers[backend](train_step)
        top = sorted(kinds.items(), key=lambda item: -item[1][0])[: args.top]
        for kind, (seconds, count) in top:
            yield {"kind": kind, "seconds": seconds, "count": count}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.worker:
        print_measurements(measurements(args))
        return 0
    argv = [
        *("--config", args.config, "--memory", args.memory, "--dtype", args.dtype),
        *("--repeats", str(args.repeats), "--top", str(args.top), "--worker"),
        *("--scores-per-block", str(args.scores_per_block)),
        keep_freed_memory_flag(args),
        *(["--shapes"] if args.shapes else []),
    ]
    print(f"config {args.config}, memory {args.memory}, dtype {args.dtype}\n")
    for backend in args.backends:
        lines = list(
            worker_lines(
                "recipes.benchmarks.step_profile",
                backend,
                argv,
                {"KERAS_BACKEND": backend},
            )
        )
        if not lines:
            continue
        timing, *rest = lines
        forward, step = timing["forward"], timing["step"]
        kinds = [line for line in rest if "kind" in line]
        host_tensors = next(
            (line["host_tensors"] for line in rest if "host_tensors" in line), None
        )
        print(f"## {backend}\n")
        print(
            "| forward (ms) | step (ms) | backward + optimizer (ms) | step / forward |"
        )
        print("|---|---|---|---|")
        print(
            f"| {1e3 * forward:.1f} | {1e3 * step:.1f} | "
            f"{1e3 * (step - forward):.1f} | {step / forward:.2f} |\n"
        )
        if host_tensors is not None:
            print(
                f"Tensors made from host data per step: {host_tensors} (on a GPU, "
                "each a copy from the host that waits for the device)\n"
            )
        if kinds:
            print("| operation | ms per step | calls per step |")
            print("|---|---|---|")
            for kind in kinds:
                print(
                    f"| {kind['kind']} | {1e3 * kind['seconds']:.1f} "
                    f"| {kind['count']:g} |"
                )
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tokens per second of a whole training step, with and without memory, per backend.

For one model (`--config peer`, the PyTorch peer's configuration: d_model
256, 6 layers, 4 query heads of 64 sharing one key and value head
(multi-query attention, as the peer's `to_kv` projects), segment 256,
batch 4, byte vocabulary, the memory in the last layer, k = 32, no XL
cache; or any preset), every
backend of `--backends` runs in its own process (this one for its own
backend) and times the model
without memory and with each memory of `--memories` (`none`, `SIZE` for
`memory_kind="auto"`, `SIZE:<kind>` for another kind: `exact`, `scann`,
`scann_exact`), each built, compiled
(the recipe's default compile mode) and timed within ONE `fit` of
`warmup + steps` steps on random tokens: a callback waits for each step's
loss and stamps the time, and the last `steps` intervals are averaged
(separate `fit` calls recompile under JAX, and `train_on_batch` has a
per-call overhead that dwarfs a step). With `--config peer` and the peer
installed (`pip install --no-deps memorizing-transformers-pytorch==0.4.1
einops-exts` plus `faiss-cpu einops filelock joblib cloudpickle`), the peer's own
training step (torch eager, Adam, its faiss memory, which fills as it
trains) is timed the same way in a further process. Prints one markdown
table: seconds per step, training tokens/s, the ratio to the same
backend's step without memory and to the peer's step with the same memory
size. The paper reports +25%
for an 8K memory on TPUv3 (0.2 s -> 0.25 s per step).

    python -m recipes.benchmarks.train_step --config peer
"""

import argparse
import importlib.util
import sys
import tempfile
import time

import keras
import numpy as np

from keras_memtrans.models import PRESETS
from keras_memtrans.models import get_preset
from recipes.benchmarks.workers import free_previous_model
from recipes.benchmarks.workers import print_measurements
from recipes.benchmarks.workers import worker_lines
from recipes.common import build_causal_lm
from recipes.common import jit_compile_flag
from recipes.common import recipe_jit_compile
from recipes.flags import add_keep_freed_memory
from recipes.flags import auto_or_positive_int
from recipes.flags import keep_freed_memory_flag
from recipes.flags import positive_int
from recipes.host_memory import keep_freed_memory

PEER_CONFIG = {
    "vocabulary_size": 256,
    "backbone": {
        "num_layers": 6,
        "num_heads": 4,
        "num_key_value_heads": 1,  # the peer's one shared key and value head
        "hidden_dim": 256,
        "head_dim": 64,
        "intermediate_dim": 1024,
        "batch_size": 4,
        "segment_length": 256,
        "memory_layer_indices": (-1,),
        "memory_options": {"num_neighbors": 32},
        "use_xl_cache": False,
        "smear_keys": False,
    },
}
BACKENDS = ("tensorflow", "jax", "torch")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="peer", choices=["peer", *sorted(PRESETS)])
    parser.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS)
    parser.add_argument(
        "--memories",
        nargs="+",
        default=["none", "8192:exact", "8192:scann_exact", "65536", "262144"],
        help="none, SIZE (memory_kind auto) or SIZE:KIND (exact, scann, scann_exact)",
    )
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--warmup", type=positive_int, default=3, help="at least 1")
    parser.add_argument("--dtype", default="float32", help="e.g. mixed_bfloat16")
    parser.add_argument(
        "--jit-compile",
        default="auto",
        choices=["auto", "true", "false"],
        help="Model.compile's jit_compile (auto: the recipe's default)",
    )
    add_scores_per_block(parser)
    add_keep_freed_memory(parser)
    parser.add_argument("--worker", choices=["keras", "peer"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def add_scores_per_block(parser):
    """The `--scores-per-block` of the exact memories (the layer's
    `scores_per_block`), as `train_step` and `step_profile` take it."""
    parser.add_argument(
        "--scores-per-block",
        default="auto",
        type=auto_or_positive_int,
        help="the exact memory's search blocks (default auto: 2**21 scores "
        "on the CPU, 2**28 on a GPU or TPU)",
    )


def model_config(name):
    if name == "peer":
        return PEER_CONFIG
    preset = get_preset(name)
    return {key: preset[key] for key in ("vocabulary_size", "backbone")}


def parse_memory(memory):
    """`(memory_size, memory_kind)` of a `--memories` entry; `(None, None)`
    for `none`."""
    if memory == "none":
        return None, None
    size, _, kind = memory.partition(":")
    return int(size), kind or "auto"


def with_memory(backbone, memory_size, memory_kind, scores_per_block="auto"):
    """The backbone arguments with a memory of this size, kind and
    `scores_per_block` (none for a `memory_size` of None)."""
    backbone = dict(backbone)
    if memory_size is not None:
        backbone["memory_options"] = dict(
            backbone.get("memory_options") or {},
            memory_size=memory_size,
            memory_kind=memory_kind,
            scores_per_block=scores_per_block,
        )
    return backbone


def compiled_model(config, memory, dtype, jit_compile, scores_per_block="auto"):
    """The causal LM of `config` with the `--memories` entry `memory`
    (searched in blocks of `scores_per_block`), compiled with Adam and
    `jit_compile` (`"auto"`: the recipe's default), its training and
    inference memories filled (see `fill`)."""
    memory_size, memory_kind = parse_memory(memory)
    backbone = with_memory(
        config["backbone"], memory_size, memory_kind, scores_per_block
    )
    causal_lm = build_causal_lm(
        backbone,
        config["vocabulary_size"],
        preprocessor=None,
        use_memory=memory_size is not None,
        seed=0,
        dtype=dtype,
    )
    causal_lm.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        jit_compile=recipe_jit_compile(jit_compile),
    )
    for layer in causal_lm.backbone.memory_layers:
        states = [layer.lane_states(training=mode) for mode in (True, False)]
        fill([state["memory"] for state in states])  # `fit`'s, `test_on_batch`'s
    return causal_lm


def random_batch(config, steps):
    """`(x, y)`: `steps` batches of random tokens for `config`, one segment
    per lane, none starting a document."""
    lanes = config["backbone"]["batch_size"]
    length = config["backbone"]["segment_length"]
    vocabulary = config["vocabulary_size"]
    rng = np.random.default_rng(0)
    rows = steps * lanes
    x = {
        "token_ids": rng.integers(0, vocabulary, (rows, length), "int32"),
        "document_start": np.zeros((rows,), bool),
        "padding_mask": np.ones((rows, length), bool),
    }
    y = rng.integers(0, vocabulary, (rows, length), "int32")
    return x, y


def seconds_per_step(config, memory, args):
    """Mean seconds of one training step of the Keras model inside `fit`."""
    jit_compile = jit_compile_flag(args.jit_compile)
    causal_lm = compiled_model(
        config, memory, args.dtype, jit_compile, args.scores_per_block
    )
    x, y = random_batch(config, args.warmup + args.steps)
    stamps = StepStamps()
    causal_lm.fit(
        x,
        y,
        batch_size=config["backbone"]["batch_size"],
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[stamps],
    )
    return stamps.mean_seconds(args.warmup)


def fill(memories):
    """Fills every slot of each of `memories` (of one shape) with the same
    random keys (a ScaNN memory's search costs depend on how full it is;
    the exact one's do not), as the memory of a long document would be."""
    first = memories[0]
    shape = (first.batch_size, first.memory_size, first.num_heads, first.head_dim)
    keys = np.random.default_rng(1).normal(size=shape).astype("float32")
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
    for memory in memories:
        memory.append(keys, keys)


def peer_runs(dtype):
    """Whether the peer's memory runs under the policy `dtype`: its faiss
    search takes float32 queries only (a bfloat16 one fails in NumPy)."""
    return keras.DTypePolicy(dtype).compute_dtype == "float32"


def peer_seconds_per_step(memory, args):
    """Mean seconds of one training step of the PyTorch peer (torch eager;
    its forward pass under `torch.autocast` in the `--dtype`'s compute
    dtype for a mixed policy)."""
    import torch
    from memorizing_transformers_pytorch import MemorizingTransformer

    memory_size, _ = parse_memory(memory)
    compute_dtype = keras.DTypePolicy(args.dtype).compute_dtype
    autocast = torch.autocast(
        "cpu",
        dtype=getattr(torch, compute_dtype),
        enabled=compute_dtype != "float32",
    )
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        model = MemorizingTransformer(
            num_tokens=256,
            dim=256,
            depth=6,
            heads=4,
            dim_head=64,
            memorizing_layers=(6,) if memory_size else (),
            max_knn_memories=memory_size or 1,
            num_retrieved_memories=32,
            knn_memories_directory=directory,
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        # [steps, batch, segment + 1], without its padding id 0
        data = torch.randint(1, 256, (args.warmup + args.steps, 4, 257))
        stamps = StepStamps()
        with model.knn_memories_context(batch_size=4) as knn_memories:
            for batch in data:
                with autocast:
                    loss = model(batch[:, :-1], knn_memories, labels=batch[:, 1:])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                stamps.on_train_batch_end(None, {"loss": loss.detach()})
    return stamps.mean_seconds(args.warmup)


class StepStamps(keras.callbacks.Callback):
    """Records when each training step has finished (waits for its loss)."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_end(self, batch, logs=None):
        float(logs["loss"])
        self.times.append(time.perf_counter())

    def mean_seconds(self, warmup):
        """Mean interval of the steps after the first `warmup`."""
        timed = self.times[warmup - 1 :]
        return (timed[-1] - timed[0]) / (len(timed) - 1)


def measurements(args):
    """Times every memory of `--memories` in this process (the peer's
    model for `--worker peer`), yielding `{"memory": ..., "seconds": ...}`
    for each."""
    config = model_config(args.config)
    for memory in args.memories:
        if args.worker == "peer" and memory != "none" and not peer_runs(args.dtype):
            continue
        free_previous_model()
        if args.worker == "peer":
            seconds = peer_seconds_per_step(memory, args)
        else:
            seconds = seconds_per_step(config, memory, args)
        yield {"memory": memory, "seconds": seconds}


def print_rows(name, lines, peer, tokens):
    """One table row per memory as each is measured: the step against the
    same worker's step without memory, and the peer's step with the same
    memory size against it. Returns `{memory: seconds}`."""
    times = {}
    for line in lines:
        memory, seconds = line["memory"], line["seconds"]
        times[memory] = seconds
        baseline = times.get("none")
        versus_none = f"{seconds / baseline:.2f}" if baseline else "-"
        versus_peer = f"{peer[memory] / seconds:.2f}x" if memory in peer else "-"
        print(
            f"| {name} | {memory} | {seconds:.4f} | {tokens / seconds:,.0f} "
            f"| {versus_none} | {versus_peer} |",
            flush=True,
        )
    return times


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.worker:
        print_measurements(measurements(args))
        return 0
    argv = [
        *("--config", args.config, "--steps", str(args.steps)),
        *("--warmup", str(args.warmup), "--dtype", args.dtype),
        *("--jit-compile", args.jit_compile),
        *("--scores-per-block", str(args.scores_per_block)),
        keep_freed_memory_flag(args),
        "--memories",
        *args.memories,
    ]
    config = model_config(args.config)
    tokens = config["backbone"]["batch_size"] * config["backbone"]["segment_length"]
    peer_lines = []
    if args.config == "peer":
        if importlib.util.find_spec("memorizing_transformers_pytorch") is None:
            print("peer not installed: no peer column (see --help)\n")
        else:
            peer_lines = list(
                worker_lines(
                    "recipes.benchmarks.train_step",
                    "peer",
                    [*argv, "--worker", "peer"],
                    {"KERAS_BACKEND": "torch"},
                )
            )
    peer = {line["memory"]: line["seconds"] for line in peer_lines}
    if peer_lines and not peer_runs(args.dtype):
        print(
            "the peer's memory takes float32 only: no peer row with memory "
            f"under {args.dtype}\n"
        )
    print(
        f"config {args.config}, dtype {args.dtype}, jit_compile "
        f"{args.jit_compile}, {tokens} tokens per step, "
        f"mean of {args.steps} fit steps after {args.warmup} warm-up steps\n"
    )
    print(
        "| backend | memory | seconds / step | tokens / s | vs no memory "
        "| speed vs peer |"
    )
    print("|---|---|---|---|---|---|", flush=True)
    print_rows("peer (torch eager, faiss)", peer_lines, peer, tokens)
    for backend in args.backends:
        lines = worker_lines(
            "recipes.benchmarks.train_step",
            backend,
            [*argv, "--worker", "keras"],
            {"KERAS_BACKEND": backend},
        )
        print_rows(backend, lines, peer, tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())

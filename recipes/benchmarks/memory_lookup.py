"""Lookup time and recall of ScannMemory against ExactMemory, by memory size.

Keys and queries come from a model layer on real text: the bytes of the
Python standard library's source, embedded and passed through one randomly
initialised `SegmentAttention` block, then projected (and L2-normalised) by
a `KNNAttention`'s query and key projections (4 heads, head_dim 64). Each
of the 4 lanes reads a different part of the library. For every memory
size the memories are filled with a lane's first `memory_size` keys and
searched with the queries of its next 256 tokens (4 lanes x 4 heads x 256
queries, k = 32). Times are medians of `--repeats` searches after one
untimed search; recall@32 is the fraction of ScaNN's 32 neighbours that score at least
the exact 32nd score (tie-aware: text keys repeat). Then the appends of
the next 512-token segments, one per call, to each memory (called
eagerly, as torch's `fit` does, and waited for) are timed the same way.
`--leaves-visited` (a share of the default leaves) and
`--training-sample-size` set ScannMemory's trees.

A second table gives the throughput of `ExactMemory.search` (scores, top-k
and gather) in the backend's compiled predict step, for the search of the
`quick` model (8 lanes x 4 heads x 128 queries, head_dim 32, k = 32) or,
with `--throughput-model peer`, of the PyTorch peer's configuration (4
lanes x 1 key head x 1,024 queries: a segment of 256 tokens of its 4 query
heads, which share the key head; head_dim 64, k = 32), as
GFLOP/s of its score matmul (2 x lanes x heads x queries x slots x
head_dim), next to a dense float32 matmul measured in the same process,
and next to two references for the same scores: the score matmul alone
(reduced by a max, so that only the scores are written: the ceiling of any
search that materialises them), and the exact search of the host memory
(`memory_kind="scann_exact"`: ScaNN's brute-force searchers, SIMD scoring
with a fused top-k, one per (lane, head), the lanes searched side by side,
one thread per core this process may use, and the neighbours gathered on
the host), through the
same compiled predict step.

    KERAS_BACKEND=jax python -m recipes.benchmarks.memory_lookup
"""

import argparse
import pathlib
import statistics
import sys
import sysconfig
import time

import keras
import numpy as np
from keras import ops

from keras_memtrans import ExactMemory
from keras_memtrans import KNNAttention
from keras_memtrans import ScannMemory
from keras_memtrans import SegmentAttention
from keras_memtrans.memory.scann_memory import default_num_leaves
from keras_memtrans.memory.scann_memory import scann_installed
from recipes.benchmarks.timing import call_times
from recipes.benchmarks.workers import free_previous_model
from recipes.flags import add_keep_freed_memory
from recipes.flags import fraction
from recipes.flags import positive_int
from recipes.host_memory import keep_freed_memory

LANES, HEADS, HEAD_DIM, QUERIES, K, SEGMENT = 4, 4, 64, 256, 32, 512
# The searches of the throughput table: (lanes, key heads, queries per key
# head, head_dim).
SEARCH_SHAPES = {"quick": (8, 4, 128, 32), "peer": (4, 1, 1024, 64)}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--memory-sizes",
        type=int,
        nargs="*",
        default=[8192, 32768, 65536, 262144],
        help="memory sizes of the ExactMemory / ScannMemory lookup table",
    )
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument(
        "--throughput-sizes",
        type=int,
        nargs="*",
        default=[8192, 65536],
        help="memory sizes of the exact-search throughput table",
    )
    parser.add_argument(
        "--throughput-model",
        default="quick",
        choices=sorted(SEARCH_SHAPES),
        help="whose search the throughput table times",
    )
    parser.add_argument("--dense-size", type=int, default=2048)
    parser.add_argument(
        "--leaves-visited",
        type=fraction,
        default=None,
        help="the share of its tree leaves ScannMemory visits, e.g. 0.125 "
        "(default: its num_leaves_to_search default, a quarter)",
    )
    parser.add_argument(
        "--training-sample-size",
        type=positive_int,
        default=16384,
        help="keys ScannMemory trains its trees on",
    )
    add_keep_freed_memory(parser)
    return parser.parse_args(argv)


def scann_settings(memory_size, leaves_visited, training_sample_size):
    """`ScannMemory`'s tree arguments for visiting `leaves_visited` of its
    default leaves, rounded down as its own quarter is (`None`: that
    quarter)."""
    settings = {"training_sample_size": training_sample_size}
    if leaves_visited is not None:
        leaves = default_num_leaves(memory_size)
        settings["num_leaves_to_search"] = max(1, int(leaves_visited * leaves))
    return settings


def stdlib_bytes(num_bytes):
    paths = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    chunks, total = [], 0
    for path in paths:
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= num_bytes:
            break
    return np.frombuffer(b"".join(chunks)[:num_bytes], "uint8").astype("int32")


def text_queries_and_keys(tokens_per_lane):
    """Queries and keys `[lanes, tokens, heads, head_dim]` of stdlib text."""
    keras.utils.set_random_seed(0)
    tokens = stdlib_bytes(LANES * tokens_per_lane).reshape(LANES, -1)
    inputs = keras.Input((SEGMENT,), dtype="int32")
    x = keras.layers.Embedding(256, 128)(inputs)
    x = x + SegmentAttention(num_heads=4)(keras.layers.LayerNormalization()(x))
    x = keras.layers.LayerNormalization()(x)
    projection = KNNAttention(
        num_heads=HEADS, head_dim=HEAD_DIM, batch_size=1, memory_kind="exact"
    )
    projection.build((1, *x.shape[1:]))  # only its projections are used
    queries, keys, _ = projection._project(x)
    model = keras.Model(inputs, [queries, keys])
    segments = tokens.reshape(-1, SEGMENT)  # [lanes * segments, segment]
    queries, keys = model.predict(segments, batch_size=128, verbose=0)
    shape = (LANES, tokens_per_lane, HEADS, HEAD_DIM)
    return queries.reshape(shape), keys.reshape(shape)


def timed(function, repeats):
    """Median seconds of `repeats` calls after a warm-up, and a result."""
    times, result = call_times(function, repeats)
    return statistics.median(times), result


def exact_search(memory, queries):
    """ExactMemory.search in query chunks (bounds the score matrix)."""
    parts = [memory.search(queries[:, i : i + 64], K)[0] for i in range(0, QUERIES, 64)]
    return np.concatenate([ops.convert_to_numpy(p) for p in parts], axis=1)


def scores(queries, keys):
    return np.einsum("bqhd,bqhkd->bqhk", queries, keys)  # [batch, query, heads, k]


def measure(memory_size, queries, keys, repeats, scann_options=None):
    """The lookup table's row: both memories hold a lane's first
    `memory_size` keys and are searched by its next `QUERIES` tokens; the
    appends of the segments after those are timed last, once the searches
    are done (they overwrite the oldest entries). `scann_options` are
    `ScannMemory` arguments. The recall is per lane."""
    lane_keys = keys[:, :memory_size]
    lane_queries = queries[:, memory_size : memory_size + QUERIES]
    exact = ExactMemory(LANES, HEADS, HEAD_DIM, memory_size)
    exact.build()
    exact.append(lane_keys, lane_keys)
    scann = ScannMemory(LANES, HEADS, HEAD_DIM, memory_size, **(scann_options or {}))
    start = time.perf_counter()
    scann.append(lane_keys, lane_keys)  # fills the ring, builds the searchers
    build = (time.perf_counter() - start) / (LANES * HEADS)
    exact_time, exact_keys = timed(lambda: exact_search(exact, lane_queries), repeats)
    scann_time, scann_keys = timed(
        lambda: ops.convert_to_numpy(scann.search(lane_queries, K)[0]), repeats
    )
    # Tie-aware: a ScaNN neighbour counts if it scores at least the exact
    # k-th score (text keys repeat, so position sets differ on ties).
    kth = scores(lane_queries, exact_keys).min(axis=-1, keepdims=True)
    found = scores(lane_queries, scann_keys) >= kth - 1e-5  # [lane, q, head, k]
    recall = found.mean(axis=(1, 2, 3))  # [lane]
    # Each timed append writes the next segment of the text, the same ones
    # to both memories.
    starts = range(memory_size + QUERIES, keys.shape[1] - SEGMENT + 1, SEGMENT)
    scann_starts, exact_starts = iter(starts), iter(starts)

    def append(memory, starts):
        start = next(starts)
        segment = keys[:, start : start + SEGMENT]
        memory.append(segment, segment)

    scann_append, _ = timed(lambda: append(scann, scann_starts), repeats)

    def exact_append():  # waited for
        append(exact, exact_starts)
        return ops.convert_to_numpy(exact.next_slot.value)

    exact_append_time, _ = timed(exact_append, repeats)
    return exact_time, scann_time, recall, build, scann_append, exact_append_time


class CompiledCall(keras.layers.Layer):
    """Wraps a function of one tensor (and the state it reads) as a layer,
    so that a model's `predict_on_batch` runs it compiled."""

    def __init__(self, function, state=None, **kwargs):
        super().__init__(**kwargs)
        self.function = function
        self.state = state

    def call(self, inputs):
        return self.function(inputs)


def compiled_seconds(function, inputs, repeats, state=None):
    """Median seconds of `function(inputs)` inside `predict_on_batch`: the
    backend's compiled predict step (XLA on JAX and TensorFlow, eager torch),
    the recipe's default compile mode.

    The inputs are put on the device before the timed calls, and each call
    returns its result summed over all axes but the first: a timed call
    copies no more than a few numbers between the host and a GPU."""

    def summed(x):
        result = function(x)
        return ops.sum(result, axis=tuple(range(1, len(result.shape))))

    inputs = ops.convert_to_tensor(inputs)
    x = keras.Input(inputs.shape[1:], batch_size=inputs.shape[0])
    model = keras.Model(x, CompiledCall(summed, state)(x))
    seconds, _ = timed(lambda: model.predict_on_batch(inputs), repeats)
    return seconds


def search_gflops(memory_size, shape, repeats):
    """GFLOP/s of the score matmul of one compiled exact search of `shape`
    (`SEARCH_SHAPES`), of the score matmul alone, and of the host memory's
    exact search (`memory_kind="scann_exact"`; None for its time and rate
    where ScaNN is not installed)."""
    (lanes, heads, queries, head_dim), k = shape, K
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(lanes, memory_size, heads, head_dim)).astype("float32")
    memory = ExactMemory(lanes, heads, head_dim, memory_size)
    memory.build()
    memory.append(keys, keys)
    query = rng.normal(size=(lanes, queries, heads, head_dim)).astype("float32")
    search = compiled_seconds(
        lambda x: memory.search(x, k)[1], query, repeats, state=memory
    )
    # [batch, heads, query, slots], reduced to [batch, heads, query]
    scores_only = compiled_seconds(
        lambda x: ops.max(ops.einsum("bqhd,bhmd->bhqm", x, memory.keys.value), -1),
        query,
        repeats,
        state=memory,
    )
    host_search = host_exact_search_seconds(keys, query, k, repeats)
    flops = 2 * lanes * heads * queries * memory_size * head_dim
    return [
        (seconds, None if seconds is None else flops / seconds / 1e9)
        for seconds in (search, scores_only, host_search)
    ]


def host_exact_search_seconds(keys, queries, k, repeats):
    """Median seconds of the search of a `ScannMemory` with ScaNN's
    brute-force searchers holding `keys`, as the step runs it (its lanes
    side by side, the neighbours' keys and values gathered on the host);
    None where ScaNN is not installed (an accelerator image)."""
    if not scann_installed():
        return None
    lanes, memory_size, heads, head_dim = keys.shape
    memory = ScannMemory(lanes, heads, head_dim, memory_size, searcher="brute_force")
    memory.build()
    memory.append(keys, keys)
    return compiled_seconds(
        lambda x: memory.search(x, k)[1], queries, repeats, state=memory
    )


def dense_gflops(size, repeats):
    """GFLOP/s of a dense `[size, size] x [size, size]` float32 matmul."""
    rng = np.random.default_rng(0)
    weight = ops.convert_to_tensor(rng.normal(size=(size, size)).astype("float32"))
    x = rng.normal(size=(size, size)).astype("float32")
    seconds = compiled_seconds(lambda x: ops.matmul(x, weight), x, repeats)
    return 2 * size**3 / seconds / 1e9


def print_lookup_table(memory_sizes, repeats, leaves_visited, training_sample_size):
    largest = max(memory_sizes) + QUERIES + SEGMENT * (repeats + 1)
    tokens = -(-largest // SEGMENT) * SEGMENT
    start = time.perf_counter()
    queries, keys = text_queries_and_keys(tokens)
    visited = "a quarter" if leaves_visited is None else f"{leaves_visited:g}"
    print(
        f"backend {keras.backend.backend()}; keys of {LANES} x {tokens} stdlib "
        f"bytes in {time.perf_counter() - start:.0f} s; ScaNN visits {visited} "
        f"of its leaves, trees trained on {training_sample_size} keys"
    )
    print(
        "| memory | exact search (s) | scann search (s) | exact / scann "
        "| recall@32 | build per searcher (s) | scann append 512 (s) "
        f"| exact append 512 (s) | recall of lanes 0-{LANES - 1} |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for memory_size in memory_sizes:
        free_previous_model()
        options = scann_settings(memory_size, leaves_visited, training_sample_size)
        exact_time, scann_time, recall, build, append, exact_append = measure(
            memory_size, queries, keys, repeats, options
        )
        lanes = ", ".join(f"{lane:.3f}" for lane in recall)
        print(
            f"| {memory_size} | {exact_time:.3f} | {scann_time:.3f} "
            f"| {exact_time / scann_time:.1f} | {recall.mean():.3f} | {build:.2f} "
            f"| {append:.3f} | {exact_append:.3f} | {lanes} |",
            flush=True,
        )


def print_throughput_table(memory_sizes, model, dense_size, repeats):
    dense = dense_gflops(dense_size, repeats)
    shape = SEARCH_SHAPES[model]
    lanes, heads, queries, head_dim = shape
    print(
        f"\nExact search throughput, backend {keras.backend.backend()}; the "
        f"{model} model's search: {lanes} lanes x {heads} key heads x {queries} "
        f"queries, head_dim {head_dim}, k {K}; dense {dense_size}^2 matmul: "
        f"{dense:.1f} GFLOP/s\n"
    )
    print(
        "| memory | search (ms) | search GFLOP/s | vs dense matmul "
        "| scores alone (ms) | scores alone vs dense "
        "| host exact search (ms) | host exact search vs dense |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for memory_size in memory_sizes:
        free_previous_model()
        (search, search_gflop), *references = search_gflops(memory_size, shape, repeats)
        cells = [
            f"{1e3 * search:.1f}",
            f"{search_gflop:.1f}",
            f"{search_gflop / dense:.2f}",
        ]
        for seconds, gflops in references:
            cells += (
                [f"{1e3 * seconds:.1f}", f"{gflops / dense:.2f}"]
                if seconds
                else ["-", "-"]
            )
        print(f"| {memory_size} | " + " | ".join(cells) + " |", flush=True)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.memory_sizes:
        print_lookup_table(
            args.memory_sizes,
            args.repeats,
            args.leaves_visited,
            args.training_sample_size,
        )
    if args.throughput_sizes:
        print_throughput_table(
            args.throughput_sizes, args.throughput_model, args.dense_size, args.repeats
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

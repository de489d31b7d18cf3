"""ScaNN layout: a searcher per (lane, head) against one per lane, heads folded in.

Folding appends a one-hot head tag scaled by `c` to every key and query, so
same-head pairs gain `c * c`, far above any `|q . k| <= 1`, and a query only
returns keys of its own head. Both layouts use the `ScannMemory` settings
(about sqrt(n) leaves, a quarter visited, exact scores in the visited
leaves) on one lane of the memory-lookup benchmark's text keys.

    KERAS_BACKEND=jax python -m recipes.benchmarks.scann_layout
"""

import argparse
import sys

import numpy as np
import scann

from keras_memtrans.memory.scann_memory import default_num_leaves
from recipes.benchmarks import memory_lookup as lookup
from recipes.benchmarks.timing import call_times


def build(points, k):
    size = len(points)
    leaves = default_num_leaves(size)
    builder = scann.scann_ops_pybind.builder(points, k, "dot_product")
    builder = builder.tree(
        num_leaves=leaves,
        num_leaves_to_search=max(1, leaves // 4),
        training_sample_size=min(size, 16384),
        random_init=False,  # k-means++ seeding, as ScannMemory builds its trees
    )
    return builder.score_brute_force().build()


def timed(function):
    """Seconds of one call of `function` (a build or a first search: no
    warm-up), and its result."""
    times, result = call_times(function, 1, warm_up=False)
    return times[0], result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-size", type=int, default=65536)
    args = parser.parse_args(argv)
    size, heads, dim, k, count = (
        args.memory_size,
        lookup.HEADS,
        lookup.HEAD_DIM,
        lookup.K,
        lookup.QUERIES,
    )
    queries, keys = lookup.text_queries_and_keys(size + count + lookup.SEGMENT)
    keys, queries = keys[0, :size], queries[0, size : size + count]  # [n, h, d]
    exact = np.einsum("qhd,mhd->qhm", queries, keys)  # [query, heads, memory]
    kth = -np.sort(-exact, axis=-1)[..., k - 1 : k]

    def recall(indices):
        return np.mean(np.take_along_axis(exact, indices, -1) >= kth - 1e-5)

    build_time, searchers = timed(lambda: [build(keys[:, h], k) for h in range(heads)])
    search_time, found = timed(
        lambda: np.stack(
            [searchers[h].search_batched(queries[:, h], k)[0] for h in range(heads)], 1
        )
    )
    rows = [
        ("per (lane, head)", build_time, search_time, recall(found.astype(int)), 0.0)
    ]

    tag = 4.0 * np.eye(heads, dtype="float32")  # [heads, heads]

    def fold(x):  # [n, heads, dim] -> [n * heads, dim + heads]
        tags = np.broadcast_to(tag, (*x.shape[:2], heads))
        return np.concatenate([x, tags], -1).reshape(-1, dim + heads)

    build_time, searcher = timed(lambda: build(fold(keys), k))
    search_time, found = timed(lambda: searcher.search_batched(fold(queries), k)[0])
    found = found.reshape(count, heads, k).astype(int)  # [query, heads, k]
    other_head = found % heads != np.arange(heads)[None, :, None]
    rows.append(
        (
            "per lane, heads folded",
            build_time,
            search_time,
            recall(found // heads),
            float(other_head.mean()),
        )
    )
    print(f"{size} keys x {heads} heads, {count} queries per head, k = {k}\n")
    print("| layout | build (s) | search (s) | recall@32 | other-head hits |")
    print("|---|---|---|---|---|")
    for name, build_seconds, search_seconds, hit_rate, other in rows:
        print(
            f"| {name} | {build_seconds:.2f} | {search_seconds:.3f} | "
            f"{hit_rate:.3f} | {other:.4f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

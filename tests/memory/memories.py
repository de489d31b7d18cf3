"""Shared helpers of the memory tests: every memory, its test sizes, test
keys and segments, random write plans, a FIFO reference and damaged saved
memories."""

import collections
import functools

import numpy as np
import pytest
from hypothesis import strategies as st

from keras_memtrans.memory.factory import make_memory
from tests.arrays import to_numpy

MEMORIES = [
    # Spare slots for segments of up to 12 tokens, as `KNNAttention` builds
    # it: `search_and_append` writes those before it searches.
    pytest.param(
        functools.partial(make_memory, "exact", segment_length=12), id="exact"
    ),
    # No spare slot (a segment length unknown when built): the write after
    # the search.
    pytest.param(functools.partial(make_memory, "exact", top_k="approx"), id="approx"),
    # Every leaf visited: ScaNN scores every key, so its results are exact.
    pytest.param(
        functools.partial(make_memory, "scann", num_leaves=2, num_leaves_to_search=2),
        id="scann",
    ),
    pytest.param(functools.partial(make_memory, "scann_exact"), id="scann_exact"),
]
each_memory = pytest.mark.parametrize("make", MEMORIES)


def clustered_keys(rng, shape, num_clusters=4, noise=0.05):
    """Unit keys of `shape` (`[..., dim]`) around a few random centres."""
    centers = rng.normal(size=(num_clusters, shape[-1]))
    keys = centers[rng.integers(0, num_clusters, size=shape[:-1])]
    keys = keys + noise * rng.normal(size=shape)
    return (keys / np.linalg.norm(keys, axis=-1, keepdims=True)).astype("float32")


def rewrite_npz(path, **changes):
    """Rewrites the `.npz` file `path` with arrays changed (`None`: removed)."""
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    for name, value in changes.items():
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value
    with open(path, "wb") as file:
        np.savez(file, **arrays)


def assert_same_entries(got, want):
    """Two `search` results hold the same positions and, where a position
    is set, the same keys and values (empty slots' contents are arbitrary)."""
    got_order, want_order = (np.argsort(result[2], axis=-1) for result in (got, want))
    positions = np.take_along_axis(got[2], got_order, axis=-1)
    np.testing.assert_array_equal(
        positions, np.take_along_axis(want[2], want_order, axis=-1)
    )
    filled = positions >= 0
    for got_array, want_array in zip(got[:2], want[:2]):
        got_array, want_array = (
            np.take_along_axis(array, order[..., None], axis=-2)[filled]
            for array, order in ((got_array, got_order), (want_array, want_order))
        )
        np.testing.assert_array_equal(got_array, want_array)


class FifoReference:
    """An independent kNN memory: a `collections.deque` per lane.

    Each lane's deque holds its last `memory_size` writes since its last
    reset: `(position, key, value)` for a real token (`[heads, dim]` key and
    value), `None` for a padded one, which takes a place but holds nothing.
    """

    def __init__(self, batch_size, memory_size):
        self.lanes = [collections.deque(maxlen=memory_size) for _ in range(batch_size)]
        self.lengths = [0] * batch_size

    def reset(self, document_start):
        for lane, start in enumerate(document_start):
            if start:
                self.lanes[lane].clear()
                self.lengths[lane] = 0

    def append(self, keys, values, padding_mask=None):
        batch_size, segment_length = keys.shape[:2]
        if padding_mask is None:
            padding_mask = np.ones((batch_size, segment_length), bool)
        for lane in range(batch_size):
            for token in range(segment_length):
                entry = None
                if padding_mask[lane, token]:
                    entry = (self.lengths[lane], keys[lane, token], values[lane, token])
                    self.lengths[lane] += 1
                self.lanes[lane].append(entry)

    def entries(self, lane):
        """`{position: (key, value)}` of the tokens `lane` holds."""
        return {entry[0]: entry[1:] for entry in self.lanes[lane] if entry is not None}

    def top_k_positions(self, queries, num_neighbors):
        """Positions `[batch, query, heads, k]` of each lane's exact top-k by
        inner product, sorted along `k` (`-1`, for missing ones, first)."""
        batch_size, num_queries, num_heads, _ = queries.shape
        found = np.full((batch_size, num_queries, num_heads, num_neighbors), -1)
        for lane in range(batch_size):
            entries = self.entries(lane)
            if not entries:
                continue
            positions = np.array(list(entries))
            keys = np.stack([key for key, _ in entries.values()])  # [n, heads, dim]
            scores = np.einsum("qhd,nhd->qhn", queries[lane], keys)
            best = np.argsort(-scores, axis=-1)[..., :num_neighbors]  # [q, heads, k]
            found[lane, ..., : best.shape[-1]] = positions[best]
        return np.sort(found, axis=-1)


def held_entries(memory):
    """What a search of `memory` sees: the positions `[batch, memory_size]`
    (`-1`, for empty slots, first) and keys `[batch, memory_size, heads,
    dim]` in that order, whatever the memory's ring layout."""
    sizes = (memory.batch_size, 1, memory.num_heads, memory.head_dim)
    keys, _, positions = memory.search(np.ones(sizes, "float32"), memory.memory_size)
    keys, positions = to_numpy(keys)[:, 0], to_numpy(positions)[:, 0]
    order = np.argsort(positions, axis=-1)  # [batch, heads, slots]
    positions = np.take_along_axis(positions, order, axis=-1)
    keys = np.take_along_axis(keys, order[..., None], axis=-2)
    return positions[:, 0], keys.transpose(0, 2, 1, 3)


# ScaNN with 2 leaves needs memory_size // 2 >= 16 entries to build its trees.
BATCH, HEADS, DIM, MEMORY = 2, 2, 8, 32
SIZES = dict(batch_size=BATCH, num_heads=HEADS, head_dim=DIM, memory_size=MEMORY)


def segment(rng, length, batch=BATCH):
    """Keys and distinct values `[batch, length, heads, dim]`."""
    keys = clustered_keys(rng, (batch, length, HEADS, DIM))
    return keys, rng.normal(size=keys.shape).astype("float32")


def search(memory, queries, k=MEMORY):
    return tuple(to_numpy(x) for x in memory.search(queries, k))


def filled_memory(make, rng, segments=3, length=24):
    """A memory fed `segments * length` tokens: ScaNN lanes get indexed,
    then upserted and rebuilt."""
    memory = make(**SIZES)
    for _ in range(segments):
        memory.append(*segment(rng, length))
    return memory


@st.composite
def write_plans(draw):
    """Lanes, memory size and steps `(reset flags, padding mask [batch,
    length])`: segments of mixed lengths, some wrapping around the ring,
    some longer than the memory."""
    # Few distinct shapes: JAX compiles the exact memory's ops for each (one
    # lane, and lanes reset and padded apart).
    batch = draw(st.sampled_from([1, 2]))
    memory_size = 32
    lengths = st.sampled_from([1, 5, 12, memory_size, memory_size + 5])
    steps = []
    for _ in range(draw(st.integers(1, 8))):
        length = draw(lengths)
        resets = draw(st.lists(st.booleans(), min_size=batch, max_size=batch))
        mask = draw(
            st.just([True] * (batch * length))
            | st.lists(st.booleans(), min_size=batch * length, max_size=batch * length)
        )
        steps.append((resets, np.array(mask).reshape(batch, length)))
    return batch, memory_size, steps

import numpy as np
import pytest
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_memtrans import ExactMemory
from keras_memtrans import ScannMemory
from tests.arrays import to_numpy

HEADS, DIM = 2, 8


def exhaustive(batch, memory_size):
    """A ScannMemory that visits every leaf, where it scores every key
    exactly: results must be exact."""
    return ScannMemory(
        batch,
        HEADS,
        DIM,
        memory_size,
        num_leaves=2,
        num_leaves_to_search=2,
    )


def clustered_keys(rng, shape, num_clusters=4, noise=0.05):
    centers = rng.normal(size=(num_clusters, shape[-1]))
    keys = centers[rng.integers(0, num_clusters, size=shape[:-1])]
    keys = keys + noise * rng.normal(size=shape)
    return (keys / np.linalg.norm(keys, axis=-1, keepdims=True)).astype("float32")


def test_clustered_keys_give_the_exact_neighbours():
    # 32 tight clusters of 8 keys: the 8 neighbours of a cluster centre are
    # its members, which the trees and the exact re-ordering must find.
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(2, 32, 1, HEADS, DIM))
    keys = centers + 0.01 * rng.normal(size=(2, 32, 8, HEADS, DIM))
    keys = keys.reshape(2, 256, HEADS, DIM)  # cluster-major tokens
    keys = (keys / np.linalg.norm(keys, axis=-1, keepdims=True)).astype("float32")
    # Every leaf visited: the tree cannot lose a neighbour, so this checks
    # quantised scoring + exact re-ordering (partial-leaf recall is measured
    # by recipes/benchmarks/memory_lookup.py, not asserted).
    scann = ScannMemory(2, HEADS, DIM, 256, num_leaves=4, num_leaves_to_search=4)
    exact = ExactMemory(2, HEADS, DIM, 256)
    exact.build()
    for memory in (scann, exact):
        memory.append(keys, keys)
    assert all(searchers is not None for searchers in scann._searchers)
    queries = centers[:, :, 0].astype("float32")  # [batch, 32 queries, heads, dim]
    _, _, got = scann.search(queries, 8)
    _, _, want = exact.search(queries, 8)
    want = np.sort(to_numpy(want), axis=-1)
    np.testing.assert_array_equal(np.sort(to_numpy(got), axis=-1), want)
    members = np.arange(256).reshape(32, 8)[None, :, None, :]
    np.testing.assert_array_equal(want, np.broadcast_to(members, want.shape))


@st.composite
def write_plans(draw):
    batch = draw(st.integers(1, 3))
    segment = draw(st.integers(1, 12))
    memory_size = draw(st.integers(max(32, segment), 48))
    steps = draw(st.integers(1, 8))
    resets = draw(
        st.lists(
            st.lists(st.booleans(), min_size=batch, max_size=batch),
            min_size=steps,
            max_size=steps,
        )
    )
    pads = draw(st.lists(st.booleans(), min_size=steps, max_size=steps))
    return batch, segment, memory_size, resets, pads


@settings(max_examples=15, deadline=None)
@given(write_plans())
def test_fifo_resets_and_padding_match_the_exact_memory(plan):
    """Over any write/reset/padding pattern (index builds, upserts, deletes,
    rebuilds included) the ScaNN memory holds and returns what the exact one
    does; asking for every slot checks that no evicted entry survives."""
    batch, segment, memory_size, resets, pads = plan
    scann = exhaustive(batch, memory_size)
    exact = ExactMemory(batch, HEADS, DIM, memory_size)
    exact.build()
    rng = np.random.default_rng(0)
    for reset, pad in zip(resets, pads):
        keys = clustered_keys(rng, (batch, segment, HEADS, DIM))
        mask = rng.random((batch, segment)) > 0.3 if pad else None
        for memory in (scann, exact):
            memory.reset(np.array(reset))
            memory.append(keys, keys, mask)
    queries = clustered_keys(rng, (batch, 3, HEADS, DIM))
    for k in (4, memory_size):
        got, want = scann.search(queries, k), exact.search(queries, k)
        np.testing.assert_array_equal(
            np.sort(to_numpy(got[2]), -1), np.sort(to_numpy(want[2]), -1)
        )
    np.testing.assert_array_equal(
        scann._document_length, to_numpy(exact.document_length)
    )


def fifo_top_k(keys, masks, memory_size, queries, k):
    """NumPy reference: positions `[batch, query, heads, k]` (sorted, -1
    first) of the exact top-k among each lane's last `memory_size` writes."""
    keys = np.concatenate(keys, axis=1)[:, -memory_size:]  # [b, slots, h, d]
    positions = np.cumsum(np.concatenate(masks, axis=1), axis=1) - 1
    mask = np.concatenate(masks, axis=1)[:, -memory_size:]
    positions = positions[:, -memory_size:]
    batch, num_queries, heads, _ = queries.shape
    want = np.full((batch, num_queries, heads, k), -1)
    for lane in range(batch):
        filled = np.flatnonzero(mask[lane])
        scores = np.einsum("qhd,nhd->qhn", queries[lane], keys[lane, filled])
        best = np.argsort(-scores, axis=-1)[..., :k]
        want[lane, ..., : best.shape[-1]] = positions[lane, filled][best]
    return np.sort(want, axis=-1)


def test_a_lane_fed_only_padding_empties_and_searches_exactly():
    # Both lanes are indexed at 32 entries; lane 1's document then ends and
    # 80 padded tokens empty it. The rebuild due after 64 writes used to
    # train the trees on no keys ("Cannot compute the mean of an empty
    # dataset").
    rng = np.random.default_rng(4)
    memory = ScannMemory(2, HEADS, DIM, 64, num_leaves=4, num_leaves_to_search=4)
    keys = [rng.normal(size=(2, 32, HEADS, DIM)).astype("float32")]
    masks = [np.ones((2, 32), bool)]
    memory.append(keys[0], keys[0])
    assert all(searchers is not None for searchers in memory._searchers)
    for _ in range(5):
        keys.append(rng.normal(size=(2, 16, HEADS, DIM)).astype("float32"))
        masks.append(np.array([[True] * 16, [False] * 16]))
        memory.append(keys[-1], keys[-1], masks[-1])
    queries = rng.normal(size=(2, 3, HEADS, DIM)).astype("float32")
    for k in (4, 64):
        got = np.sort(to_numpy(memory.search(queries, k)[2]), axis=-1)
        np.testing.assert_array_equal(got[1], -1)
        np.testing.assert_array_equal(got, fifo_top_k(keys, masks, 64, queries, k))
    newest = np.broadcast_to(np.arange(48, 112), got[0].shape)  # 112 tokens
    np.testing.assert_array_equal(got[0], newest)
    assert memory._searchers[1] is None and memory._searchers[0] is not None


def test_a_lane_with_one_token_per_segment_searches_its_few_entries_exactly():
    # After the index build lane 1 gets one real token per 32: 2 entries
    # when its rebuild falls due, which used to fail ("Number of points (2)
    # is less than the number of clusters (4)").
    rng = np.random.default_rng(5)
    memory = ScannMemory(2, HEADS, DIM, 64, num_leaves=4, num_leaves_to_search=4)
    keys = [rng.normal(size=(2, 32, HEADS, DIM)).astype("float32")]
    masks = [np.ones((2, 32), bool)]
    memory.append(keys[0], keys[0])
    for _ in range(4):
        keys.append(rng.normal(size=(2, 32, HEADS, DIM)).astype("float32"))
        masks.append(np.ones((2, 32), bool))
        masks[-1][1] = np.arange(32) == rng.integers(32)
        memory.append(keys[-1], keys[-1], masks[-1])
        queries = rng.normal(size=(2, 5, HEADS, DIM)).astype("float32")
        for k in (1, 3, 64):
            got = np.sort(to_numpy(memory.search(queries, k)[2]), axis=-1)
            want = fifo_top_k(keys, masks, 64, queries, k)
            np.testing.assert_array_equal(got, want)
    assert memory._searchers[1] is None and memory._searchers[0] is not None


FILLS = ("padding", "one", "random", "real")


@st.composite
def lane_fill_plans(draw):
    batch = draw(st.integers(1, 3))
    memory_size = draw(st.sampled_from([32, 48, 64]))
    leaves = draw(st.integers(1, memory_size // 16))
    segment = draw(st.integers(1, 16))
    fills = draw(
        st.lists(
            st.lists(st.sampled_from(FILLS), min_size=batch, max_size=batch),
            min_size=1,
            max_size=16,
        )
    )
    return memory_size, leaves, segment, fills


@settings(max_examples=20, deadline=None)
@given(lane_fill_plans())
@example((32, 2, 8, [["real", "real"]] * 4 + [["real", "padding"]] * 5))
def test_padded_and_real_lanes_match_a_fifo_brute_force(plan):
    """Lanes that fill, idle on padding or trickle single tokens (index
    builds, drops and rebuilds included) return the exact top-k of their
    last memory_size writes: every leaf is visited, so ScaNN is exact."""
    memory_size, leaves, segment, fills = plan
    batch = len(fills[0])
    memory = ScannMemory(
        batch, HEADS, DIM, memory_size, num_leaves=leaves, num_leaves_to_search=leaves
    )
    rng = np.random.default_rng(6)
    keys, masks = [], []
    for step_fills in fills:
        keys.append(rng.normal(size=(batch, segment, HEADS, DIM)).astype("float32"))
        masks.append(
            np.stack(
                [
                    {
                        "padding": np.zeros(segment, bool),
                        "one": np.arange(segment) == rng.integers(segment),
                        "random": rng.random(segment) < 0.5,
                        "real": np.ones(segment, bool),
                    }[fill]
                    for fill in step_fills
                ]
            )
        )
        memory.append(keys[-1], keys[-1], masks[-1])
    queries = rng.normal(size=(batch, 3, HEADS, DIM)).astype("float32")
    for k in (3, memory_size):
        got = np.sort(to_numpy(memory.search(queries, k)[2]), axis=-1)
        np.testing.assert_array_equal(
            got, fifo_top_k(keys, masks, memory_size, queries, k)
        )


def test_evicted_entries_are_never_returned():
    memory = ScannMemory(1, 1, DIM, 64, num_leaves=2)
    rng = np.random.default_rng(1)
    for _ in range(10):  # 160 tokens through 64 slots: builds and rebuilds
        keys = clustered_keys(rng, (1, 16, 1, DIM))
        memory.append(keys, keys)
        _, _, positions = memory.search(keys, 64)
        positions = to_numpy(positions)
        newest = int(memory._document_length[0])
        assert positions.min() >= newest - 64
        assert np.all(positions < newest)


def test_reset_clears_only_flagged_lanes():
    memory = exhaustive(3, 32)
    keys = clustered_keys(np.random.default_rng(2), (3, 20, HEADS, DIM))
    memory.append(keys, keys)
    memory.reset(np.array([False, True, False]))
    _, _, positions = memory.search(keys[:, :2], 32)
    filled = (to_numpy(positions) >= 0).sum(axis=-1)  # [batch, query, heads]
    np.testing.assert_array_equal(filled[:, 0, 0], [20, 0, 20])
    assert memory._searchers[1] is None and memory._searchers[0] is not None


def test_save_and_load_give_the_same_retrievals(tmp_path):
    rng = np.random.default_rng(3)
    memory = ScannMemory(2, HEADS, DIM, 64, num_leaves=4)
    for _ in range(3):  # indexed lanes with upserts
        keys = clustered_keys(rng, (2, 24, HEADS, DIM))
        memory.append(keys, keys)
    memory.save_memory(tmp_path / "memory")
    queries = clustered_keys(rng, (2, 5, HEADS, DIM))
    want = [to_numpy(x) for x in memory.search(queries, 6)]

    loaded = ScannMemory(2, HEADS, DIM, 64, num_leaves=4)
    loaded.load_memory(tmp_path / "memory")
    for got, expected in zip(loaded.search(queries, 6), want):
        np.testing.assert_array_equal(to_numpy(got), expected)
    keys = clustered_keys(rng, (2, 8, HEADS, DIM))
    for m in (memory, loaded):
        m.append(keys, keys)
    np.testing.assert_array_equal(
        to_numpy(loaded.search(queries, 6)[2]), to_numpy(memory.search(queries, 6)[2])
    )


def test_rejects_a_memory_too_small_for_its_trees():
    with pytest.raises(ValueError, match="too small for 8 tree leaves"):
        ScannMemory(1, 1, DIM, 100, num_leaves=8)


def test_rejects_more_neighbours_than_slots():
    memory = ScannMemory(1, 1, DIM, 32)
    with pytest.raises(ValueError, match="num_neighbors"):
        memory.search(np.ones((1, 1, 1, DIM), "float32"), 33)


def test_config_round_trip():
    memory = ScannMemory(2, 1, DIM, 64, num_leaves=2, num_leaves_to_search=1)
    clone = ScannMemory.from_config(memory.get_config())
    assert clone.get_config() == memory.get_config()

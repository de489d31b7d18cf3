"""The `KNNMemory` contract, checked on every memory.

A new memory joins these tests with one line in `MEMORIES`
(tests/memory/memories.py): a factory taking the four sizes, building the
memory like `make_memory` does. Saving and loading are checked in
tests/memory/test_memory_files.py.
"""

import numpy as np
import pytest
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_memtrans.memory.knn_memory import KNNMemory
from tests.arrays import to_numpy
from tests.memory.memories import BATCH
from tests.memory.memories import DIM
from tests.memory.memories import HEADS
from tests.memory.memories import MEMORY
from tests.memory.memories import SIZES
from tests.memory.memories import FifoReference
from tests.memory.memories import assert_same_entries
from tests.memory.memories import clustered_keys
from tests.memory.memories import each_memory
from tests.memory.memories import filled_memory
from tests.memory.memories import search
from tests.memory.memories import segment
from tests.memory.memories import write_plans


def index_lifecycle_plan():
    """A plan that takes ScaNN lanes through an index build, upserts,
    deletes, a reset, a drop to exact search and a rebuild (few random
    examples rarely fill a lane)."""
    whole = np.ones((2, 12), bool)
    half = np.tile(np.arange(12) % 2 == 0, (2, 1))
    lane_1_padded = np.array([[True] * 12, [False] * 12])
    steps = [([True, True], whole), ([False, False], whole), ([False, False], half)]
    steps += [([False, True], whole), ([False, False], whole)]
    steps += [([False, False], lane_1_padded)] * 3
    return 2, 32, steps


@each_memory
@settings(max_examples=15, deadline=None)
@given(write_plans())
@example(plan=index_lifecycle_plan())
def test_fifo_keeps_exactly_the_last_memory_size_tokens_per_lane(make, plan):
    """Over any write/reset/padding plan (ScaNN index builds, upserts,
    deletes and rebuilds included) a lane returns exactly its entries of
    an independent FIFO, and its exact top-k."""
    batch, memory_size, steps = plan
    memory = make(batch, HEADS, DIM, memory_size)
    reference = FifoReference(batch, memory_size)
    rng = np.random.default_rng(0)
    for resets, mask in steps:
        keys, values = segment(rng, mask.shape[1], batch)
        for target in (memory, reference):
            target.reset(np.array(resets))
            target.append(keys, values, None if mask.all() else mask)
        queries = clustered_keys(rng, (batch, 3, HEADS, DIM))
        # Asking for every slot returns each lane's whole memory.
        _, got_values, got_positions = search(memory, queries, memory_size)
        for lane in range(batch):
            want = reference.entries(lane)
            for head in range(HEADS):
                positions = got_positions[lane, 0, head]
                assert sorted(positions[positions >= 0]) == sorted(want)
                for position, value in zip(positions, got_values[lane, 0, head]):
                    if position >= 0:
                        np.testing.assert_array_equal(value, want[position][1][head])
        got = np.sort(search(memory, queries, 3)[2], axis=-1)
        np.testing.assert_array_equal(got, reference.top_k_positions(queries, 3))


@st.composite
def non_finite_plans(draw, length=12):
    """Steps `(padding mask or None, bool [batch, length] of broken tokens)`,
    the non-finite number and whether it goes into keys (else values)."""
    tokens = hnp.arrays(bool, (BATCH, length))
    steps = [
        (draw(st.none() | tokens), draw(tokens)) for _ in range(draw(st.integers(1, 4)))
    ]
    return steps, draw(st.sampled_from([np.nan, np.inf, -np.inf])), draw(st.booleans())


# Four segments of 12 with one broken token per lane: ScaNN lanes build
# their index on them (at 16 entries), upsert and rebuild.
BROKEN_STEPS = [(None, np.eye(BATCH, 12, step, dtype=bool)) for step in range(4)]


@each_memory
@settings(max_examples=10, deadline=None)
@given(non_finite_plans())
@example(plan=(BROKEN_STEPS, np.nan, True))
@example(plan=(BROKEN_STEPS, np.inf, False))
def test_non_finite_tokens_are_stored_as_padding(make, plan):
    """A token whose key or value has a non-finite element is stored as an
    empty slot and does not advance its lane's position, exactly like
    padding: the memory then answers as one fed that token as padding and
    holds the same (finite) arrays, and ScaNN never sees it (its index build
    raised "Element not finite" and left the lane broken)."""
    steps, number, in_keys = plan
    memory, padded = make(**SIZES), make(**SIZES)
    rng = np.random.default_rng(11)
    for mask, broken in steps:
        keys, values = segment(rng, broken.shape[1])
        damaged_keys, damaged_values = keys.copy(), values.copy()
        (damaged_keys if in_keys else damaged_values)[broken, 1, 2] = number
        memory.append(damaged_keys, damaged_values, mask)
        kept = ~broken if mask is None else mask & ~broken
        padded.append(keys, values, kept)
        queries = clustered_keys(rng, (BATCH, 3, HEADS, DIM))
        for k in (3, MEMORY):
            assert_same_entries(search(memory, queries, k), search(padded, queries, k))
    for name in ("keys", "values", "positions", "document_length"):  # all finite
        got, want = (to_numpy(getattr(target, name)) for target in (memory, padded))
        np.testing.assert_array_equal(got, want, err_msg=name)


@each_memory
def test_search_returns_the_exact_top_k_by_inner_product(make):
    memory = make(**SIZES)
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(BATCH, MEMORY, HEADS, DIM)).astype("float32")
    memory.append(keys, -keys)
    queries = rng.normal(size=(BATCH, 5, HEADS, DIM)).astype("float32")
    got_keys, got_values, positions = search(memory, queries, 3)
    scores = np.einsum("bqhd,bmhd->bqhm", queries, keys)
    want = np.sort(np.argsort(-scores, axis=-1)[..., :3], axis=-1)
    np.testing.assert_array_equal(np.sort(positions, axis=-1), want)
    assert positions.dtype == np.int32
    # The keys and values returned are those of the positions returned.
    lanes = np.arange(BATCH)[:, None, None, None]
    heads = np.arange(HEADS)[None, None, :, None]
    np.testing.assert_array_equal(got_keys, keys[lanes, positions, heads])
    np.testing.assert_array_equal(got_values, -keys[lanes, positions, heads])


@each_memory
def test_empty_memory_returns_no_neighbours(make):
    memory = make(**SIZES)
    positions = search(memory, np.ones((BATCH, 3, HEADS, DIM), "float32"), 4)[2]
    assert positions.shape == (BATCH, 3, HEADS, 4)
    assert np.all(positions == -1)


@each_memory
def test_padded_tokens_take_a_slot_but_are_never_returned(make):
    memory = make(**SIZES)
    keys, values = segment(np.random.default_rng(2), MEMORY)
    mask = np.zeros((BATCH, MEMORY), bool)
    mask[:, [0, 5, MEMORY - 1]] = True
    memory.append(keys, values, mask)
    assert sorted(set(search(memory, keys[:, :2])[2].ravel())) == [-1, 0, 1, 2]
    # The ring is full: the next token overwrites the slot of token 0.
    memory.append(keys[:, :1], values[:, :1])
    assert sorted(set(search(memory, keys[:, :2])[2].ravel())) == [-1, 1, 2, 3]


@each_memory
def test_reset_clears_only_flagged_lanes(make):
    memory = make(batch_size=3, num_heads=HEADS, head_dim=DIM, memory_size=MEMORY)
    rng = np.random.default_rng(3)
    memory.append(*segment(rng, 20, batch=3))
    memory.reset(np.array([False, True, False]))
    keys, values = segment(rng, 2, batch=3)
    positions = search(memory, keys)[2]
    np.testing.assert_array_equal((positions >= 0).sum(axis=-1)[:, 0, 0], [20, 0, 20])
    memory.append(keys, values)
    positions = search(memory, keys)[2][:, 0, 0]  # [batch, k]
    assert [sorted(p[p >= 0]) for p in positions] == [
        list(range(22)),
        [0, 1],
        list(range(22)),
    ]


@each_memory
def test_evicted_entries_are_never_returned(make):
    memory = make(batch_size=1, num_heads=1, head_dim=DIM, memory_size=MEMORY)
    rng = np.random.default_rng(4)
    for step in range(1, 11):  # 100 tokens through 32 slots
        keys = clustered_keys(rng, (1, 10, 1, DIM))
        memory.append(keys, keys)
        positions = to_numpy(memory.search(keys, MEMORY)[2])[0, 0, 0]
        newest = 10 * step
        assert sorted(positions[positions >= 0]) == list(
            range(max(0, newest - MEMORY), newest)
        )


@each_memory
def test_reset_state_empties_every_lane_and_rewinds(make):
    rng = np.random.default_rng(5)
    memory = filled_memory(make, rng)
    memory.reset_state()
    keys, values = segment(rng, 2)
    assert np.all(search(memory, keys)[2] == -1)
    memory.append(keys, values)
    positions = search(memory, keys)[2]
    assert sorted(set(positions.ravel())) == [-1, 0, 1]


@each_memory
def test_frozen_makes_reset_and_append_no_ops(make):
    rng = np.random.default_rng(9)
    memory = filled_memory(make, rng, segments=1)
    queries = clustered_keys(rng, (BATCH, 5, HEADS, DIM))
    before = search(memory, queries)
    assert memory.read_only is False
    with memory.frozen():
        assert memory.read_only is True
        memory.reset(np.array([True, True]))
        memory.append(*segment(rng, 8))
        for got, want in zip(search(memory, queries), before):
            np.testing.assert_array_equal(got, want)
    assert memory.read_only is False
    with pytest.raises(RuntimeError), memory.frozen():
        raise RuntimeError
    assert memory.read_only is False
    memory.read_only = True
    with memory.frozen():
        pass
    assert memory.read_only is True
    memory.read_only = False
    memory.append(*segment(rng, 8))
    assert (search(memory, queries)[2] >= 0).sum() > (before[2] >= 0).sum()


@each_memory
def test_rejects_more_neighbours_than_slots(make):
    memory = make(**SIZES)
    with pytest.raises(ValueError, match="num_neighbors"):
        memory.search(np.ones((BATCH, 1, HEADS, DIM), "float32"), MEMORY + 1)


@each_memory
@pytest.mark.parametrize("name", list(SIZES))
def test_rejects_non_positive_sizes(make, name):
    with pytest.raises(ValueError, match=name):
        make(**{**SIZES, name: 0})


@each_memory
def test_config_round_trip(make):
    memory = make(**SIZES)
    assert isinstance(memory, KNNMemory)
    config = memory.get_config()
    assert {name: config[name] for name in SIZES} == SIZES
    assert type(memory).from_config(config).get_config() == config


@each_memory
def test_saved_keras_variables_are_empty(make):
    memory = filled_memory(make, np.random.default_rng(10), segments=1)
    store = {}
    memory.save_own_variables(store)
    assert store == {}

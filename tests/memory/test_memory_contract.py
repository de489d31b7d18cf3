"""The `KNNMemory` contract, checked on every memory.

A new memory joins these tests with one line in `MEMORIES`
(tests/memory/memories.py): a factory taking the four sizes, building the
memory like `make_memory` does.
"""

import os
import re

import numpy as np
import pytest
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_memtrans.memory.knn_memory import KNNMemory
from tests.arrays import to_numpy
from tests.memory.memories import FifoReference
from tests.memory.memories import assert_same_entries
from tests.memory.memories import clustered_keys
from tests.memory.memories import each_memory
from tests.memory.memories import rewrite_npz

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
def test_save_and_load_give_identical_retrievals_and_behaviour(make, tmp_path):
    rng = np.random.default_rng(6)
    memory = filled_memory(make, rng)
    path = tmp_path / "memory.npz"
    memory.save(path)
    loaded = make(**SIZES)
    loaded.append(*segment(rng, 5))  # replaced by the load
    loaded.load(path)
    queries = clustered_keys(rng, (BATCH, 5, HEADS, DIM))
    for got, want in zip(search(loaded, queries, 6), search(memory, queries, 6)):
        np.testing.assert_array_equal(got, want)
    keys, values = segment(rng, 8)
    for target in (memory, loaded):
        target.reset(np.array([True, False]))
        target.append(keys, values)
    for got, want in zip(search(loaded, queries, 6), search(memory, queries, 6)):
        np.testing.assert_array_equal(got, want)


@each_memory
def test_a_loaded_non_finite_entry_is_stored_as_empty(make, tmp_path):
    """A saved key or value with a NaN or inf (an old save, or a damaged
    file; `append` never stores one) loads as an empty slot, as `append`
    stores it: a search returns finite keys and values only (`KNNAttention`
    weights an empty slot's by 0, and 0 x NaN is NaN) and never that slot."""
    rng = np.random.default_rng(12)
    memory = filled_memory(make, rng)
    memory.reset(np.array([False, True]))  # lane 1's slots: stale, not empty
    path, reference = tmp_path / "memory.npz", tmp_path / "reference.npz"
    memory.save(path)
    memory.save(reference)
    with np.load(path) as saved:
        keys, values = saved["keys"].copy(), saved["values"].copy()
        positions = saved["positions"].copy()
    damaged = np.zeros(positions.shape, bool)  # [batch, slots]
    damaged[0, [3, 17]] = True  # two of lane 0's entries
    keys[0, 1, 3, 2], values[0, 0, 17, 5] = np.nan, np.inf
    keys[1], values[1] = np.nan, -np.inf  # every stale slot of lane 1
    rewrite_npz(path, keys=keys, values=values)
    rows = damaged[:, None, :, None]  # [batch, 1, slots, 1]
    rewrite_npz(
        reference,
        keys=np.where(rows | ~np.isfinite(keys), 0, keys),
        values=np.where(rows | ~np.isfinite(values), 0, values),
        positions=np.where(damaged, -1, positions),
    )
    loaded, expected = make(**SIZES), make(**SIZES)
    loaded.load(path)
    expected.load(reference)
    queries = clustered_keys(rng, (BATCH, 5, HEADS, DIM))
    got = search(loaded, queries)
    assert np.isfinite(got[0]).all() and np.isfinite(got[1]).all()
    assert not np.isin(got[2][0], positions[0, damaged[0]]).any()
    assert_same_entries(got, search(expected, queries))


@each_memory
@pytest.mark.parametrize(
    "damage, error, match",
    [
        pytest.param("missing", FileNotFoundError, "memory.npz", id="missing"),
        pytest.param("truncated", ValueError, "memory.npz", id="truncated"),
        pytest.param("not_npz", ValueError, "memory.npz", id="not_npz"),
        pytest.param(
            {"memory_class": np.array("OtherMemory")},
            ValueError,
            "OtherMemory",
            id="other_class",
        ),
        pytest.param({"batch_size": np.array(3)}, ValueError, "batch_size", id="batch"),
        pytest.param(
            {"memory_size": np.array(64)}, ValueError, "memory_size", id="memory_size"
        ),
        pytest.param(
            {"keys": np.zeros((BATCH, HEADS, MEMORY, DIM + 1))},
            ValueError,
            "`keys`",
            id="keys_shape",
        ),
        pytest.param({"positions": None}, ValueError, "positions", id="no_positions"),
        pytest.param(
            {"next_slot": np.array(MEMORY)}, ValueError, "next_slot", id="next_slot"
        ),
    ],
)
def test_a_failed_load_raises_and_leaves_the_memory_unchanged(
    make, tmp_path, damage, error, match
):
    rng = np.random.default_rng(7)
    path = tmp_path / "memory.npz"
    make(**SIZES).save(path)
    if damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "not_npz":
        path.write_text("not a memory")
    elif damage == "missing":
        path.unlink()
    else:
        rewrite_npz(path, **damage)
    memory = filled_memory(make, rng)
    queries = clustered_keys(rng, (BATCH, 5, HEADS, DIM))
    before = search(memory, queries, 6)
    with pytest.raises(error, match=re.escape(match)):
        memory.load(path)
    for got, want in zip(search(memory, queries, 6), before):
        np.testing.assert_array_equal(got, want)


@each_memory
def test_save_replaces_an_existing_file_without_leftovers(make, tmp_path):
    rng = np.random.default_rng(8)
    path = tmp_path / "memory.npz"
    make(**SIZES).save(path)
    memory = filled_memory(make, rng)
    memory.save(str(path))
    assert os.listdir(tmp_path) == ["memory.npz"]
    loaded = make(**SIZES)
    loaded.load(path)
    queries = clustered_keys(rng, (BATCH, 5, HEADS, DIM))
    np.testing.assert_array_equal(
        search(loaded, queries, 6)[2], search(memory, queries, 6)[2]
    )


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

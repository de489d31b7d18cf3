import collections

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from keras_memtrans import ExactMemory
from tests.arrays import to_numpy

HEADS, DIM = 2, 4


@st.composite
def write_plans(draw):
    batch = draw(st.integers(1, 3))
    segment = draw(st.integers(1, 6))
    memory_size = draw(st.integers(segment, 14))
    steps = draw(st.integers(1, 6))
    resets = draw(
        st.lists(
            st.lists(st.booleans(), min_size=batch, max_size=batch),
            min_size=steps,
            max_size=steps,
        )
    )
    return batch, segment, memory_size, resets


@given(write_plans())
def test_fifo_keeps_exactly_the_last_memory_size_tokens_per_lane(plan):
    batch, segment, memory_size, resets = plan
    memory = ExactMemory(batch, HEADS, DIM, memory_size)
    memory.build()
    rng = np.random.default_rng(0)
    expected = [collections.deque(maxlen=memory_size) for _ in range(batch)]
    lengths = [0] * batch
    for reset in resets:
        memory.reset(np.array(reset))
        values = rng.normal(size=(batch, segment, HEADS, DIM)).astype("float32")
        keys = values / np.linalg.norm(values, axis=-1, keepdims=True)
        memory.append(keys, values)
        for lane in range(batch):
            if reset[lane]:
                expected[lane].clear()
                lengths[lane] = 0
            for t in range(segment):
                expected[lane].append((lengths[lane], values[lane, t]))
                lengths[lane] += 1

    # Asking for every slot returns each lane's whole memory.
    queries = rng.normal(size=(batch, 1, HEADS, DIM)).astype("float32")
    _, got_values, got_positions = memory.search(queries, memory_size)
    got_values, got_positions = to_numpy(got_values), to_numpy(got_positions)
    for lane in range(batch):
        want = dict(expected[lane])
        for head in range(HEADS):
            positions = got_positions[lane, 0, head]
            found = positions[positions >= 0]
            assert sorted(found) == sorted(want)
            for position, value in zip(positions, got_values[lane, 0, head]):
                if position >= 0:
                    np.testing.assert_allclose(value, want[position][head], atol=1e-6)


def test_search_returns_the_exact_top_k_by_inner_product():
    memory = ExactMemory(batch_size=2, num_heads=HEADS, head_dim=DIM, memory_size=16)
    memory.build()
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(2, 16, HEADS, DIM)).astype("float32")
    memory.append(keys, keys)
    queries = rng.normal(size=(2, 5, HEADS, DIM)).astype("float32")
    got_keys, _, positions = memory.search(queries, 3)
    scores = np.einsum("bqhd,bmhd->bqhm", queries, keys)
    want = np.sort(np.argsort(-scores, axis=-1)[..., :3], axis=-1)
    np.testing.assert_array_equal(np.sort(to_numpy(positions), axis=-1), want)
    np.testing.assert_allclose(
        np.sort(np.einsum("bqhd,bqhkd->bqhk", queries, to_numpy(got_keys)), -1),
        np.sort(np.take_along_axis(scores, want, -1), -1),
        atol=1e-5,
    )


def test_empty_memory_returns_no_neighbours():
    memory = ExactMemory(batch_size=2, num_heads=HEADS, head_dim=DIM, memory_size=8)
    memory.build()
    _, _, positions = memory.search(np.ones((2, 3, HEADS, DIM), "float32"), 4)
    assert np.all(to_numpy(positions) == -1)


def test_padded_tokens_take_a_slot_but_are_never_returned():
    memory = ExactMemory(batch_size=1, num_heads=1, head_dim=2, memory_size=4)
    memory.build()
    keys = np.ones((1, 3, 1, 2), "float32")
    memory.append(keys, keys, padding_mask=np.array([[True, False, True]]))
    _, _, positions = memory.search(np.ones((1, 1, 1, 2), "float32"), 4)
    assert sorted(to_numpy(positions).ravel()) == [-1, -1, 0, 1]
    assert int(to_numpy(memory.next_slot)) == 3


def test_reset_clears_only_flagged_lanes():
    memory = ExactMemory(batch_size=3, num_heads=1, head_dim=2, memory_size=4)
    memory.build()
    memory.append(np.ones((3, 2, 1, 2), "float32"), np.ones((3, 2, 1, 2), "float32"))
    memory.reset(np.array([False, True, False]))
    filled = (to_numpy(memory.positions) >= 0).sum(axis=0)
    np.testing.assert_array_equal(filled, [2, 0, 2])
    np.testing.assert_array_equal(to_numpy(memory.document_length), [2, 0, 2])


def test_saved_variables_are_empty():
    memory = ExactMemory(batch_size=1, num_heads=1, head_dim=2, memory_size=4)
    memory.build()
    store = {}
    memory.save_own_variables(store)
    assert store == {}


@pytest.mark.parametrize("name", ["batch_size", "num_heads", "head_dim", "memory_size"])
def test_rejects_non_positive_sizes(name):
    sizes = dict(batch_size=1, num_heads=1, head_dim=2, memory_size=4)
    sizes[name] = 0
    with pytest.raises(ValueError, match=name):
        ExactMemory(**sizes)

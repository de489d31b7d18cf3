import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from keras_memtrans.memory.top_k import group_size_for
from keras_memtrans.memory.top_k import top_k_slots
from tests.arrays import to_numpy


@st.composite
def score_rows(draw):
    """Scores `[rows, slots]` without ties (a permutation per row, some
    slots empty at `-inf`), `k` and a group size."""
    # Few distinct shapes: JAX compiles the ops for each.
    slots = draw(st.sampled_from([64, 96, 256]))
    k = draw(st.sampled_from([1, 4, 16]))
    group_size = draw(st.sampled_from([1, 2, 8, 16, 32]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    scores = np.stack([rng.permutation(slots) for _ in range(3)]).astype("float32")
    empty = rng.random(scores.shape) < draw(st.sampled_from([0.0, 0.5, 0.99]))
    return np.where(empty, -np.inf, scores), k, group_size


@given(score_rows())
def test_two_stage_top_k_returns_the_k_best_slots(plan):
    scores, k, group_size = plan
    got = np.sort(to_numpy(top_k_slots(scores, k, group_size)), axis=-1)
    assert got.dtype == np.int32
    # Distinct slots; the finite ones are exactly NumPy's best, and a row
    # with fewer than k finite scores fills up with empty slots.
    assert all(len(set(row)) == k for row in got)
    for row_scores, row in zip(scores, got):
        finite = np.flatnonzero(np.isfinite(row_scores))
        want = finite[np.argsort(-row_scores[finite])[:k]]
        assert set(want) <= set(row)
        assert np.isneginf(row_scores[sorted(set(row) - set(want))]).all()


@pytest.mark.parametrize("memory_size, k", [(8192, 32), (65536, 32), (262144, 32)])
def test_group_size_divides_the_memory_and_leaves_enough_groups(memory_size, k):
    group_size = group_size_for(memory_size, k)
    assert memory_size % group_size == 0
    assert group_size & (group_size - 1) == 0  # a power of two
    assert memory_size // group_size >= 4 * k
    assert group_size > 1


@pytest.mark.parametrize(
    "memory_size, k, group_size",
    [(8192, 32, 16), (65536, 32, 64), (100, 4, 2), (96, 32, 1), (7, 2, 1)],
)
def test_group_size_fits_any_memory(memory_size, k, group_size):
    # At most sqrt(memory_size) / 4 (100: 2 x 50 groups); 96 and 7 leave
    # fewer than 4k groups of any size above 1, so one plain top-k.
    assert group_size_for(memory_size, k) == group_size

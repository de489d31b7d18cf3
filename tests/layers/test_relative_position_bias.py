import numpy as np
import pytest
from hypothesis import assume
from hypothesis import example
from hypothesis import given
from hypothesis import strategies as st

from keras_memtrans import RelativePositionBias
from keras_memtrans.layers.relative_position_bias import bucket_boundaries
from keras_memtrans.layers.relative_position_bias import toeplitz
from tests.arrays import to_numpy
from tests.numpy_reference import t5_bucket

# T5's 32/128 buckets (its float32 formula, as in mesh_tensorflow and HF
# transformers): the smallest causal distance of each of the 16 log buckets,
# and of each of the 8 log buckets of one bidirectional half.
T5_CAUSAL_LOG_STARTS = [16, 19, 21, 24, 27, 31, 35, 40, 46, 52, 59, 67, 77, 87, 99, 113]
T5_BIDIRECTIONAL_LOG_STARTS = [8, 12, 16, 23, 32, 46, 64, 91]


def reference_buckets(relative, num_buckets, max_distance, bidirectional=False):
    return [
        t5_bucket(int(r), num_buckets, max_distance, bidirectional) for r in relative
    ]


@given(
    num_buckets=st.integers(4, 64),
    max_distance=st.integers(2, 400),
    bidirectional=st.booleans(),
)
# Distances on an exact bucket boundary: float32 logs put 18 and 54 one
# bucket low on JAX (12/162), and 45 on torch (55/75).
@example(num_buckets=12, max_distance=162, bidirectional=False)
@example(num_buckets=55, max_distance=75, bidirectional=False)
@example(num_buckets=32, max_distance=128, bidirectional=True)
def test_buckets_match_reference(num_buckets, max_distance, bidirectional):
    exact_buckets = num_buckets // 2 if bidirectional else num_buckets
    assume(max_distance > exact_buckets // 2)
    layer = RelativePositionBias(
        num_heads=1,
        num_buckets=num_buckets,
        max_distance=max_distance,
        bidirectional=bidirectional,
    )
    relative = np.arange(-420, 420)  # one shape: JAX compiles its ops once
    got = to_numpy(layer.bucket(relative))
    want = reference_buckets(relative, num_buckets, max_distance, bidirectional)
    np.testing.assert_array_equal(got, want)


def test_exact_boundaries_fall_in_the_upper_bucket():
    # 12 buckets to 162: 6 exact, then bucket 6 + k starts at the first integer
    # >= 6 * 27 ** (k / 6): exactly 18 = 6 * 3 for bucket 8, 54 = 6 * 9 for 10.
    layer = RelativePositionBias(num_heads=1, num_buckets=12, max_distance=162)
    got = to_numpy(layer.bucket(-np.array([17, 18, 53, 54])))
    np.testing.assert_array_equal(got, [7, 8, 9, 10])
    assert bucket_boundaries(12, 162) == [0, 1, 2, 3, 4, 5, 6, 11, 18, 32, 54, 94]


@given(num_buckets=st.integers(2, 64), max_distance=st.integers(2, 400))
def test_boundaries_are_first_distances_of_reference_buckets(num_buckets, max_distance):
    assume(max_distance > num_buckets // 2)
    starts = bucket_boundaries(num_buckets, max_distance)
    assert len(starts) == num_buckets and starts[0] == 0
    assert starts[-1] <= max_distance
    for bucket, start in enumerate(starts):
        assert t5_bucket(-start, num_buckets, max_distance) >= bucket
        if start > 0:
            assert t5_bucket(1 - start, num_buckets, max_distance) < bucket


def test_default_buckets_are_t5s():
    assert bucket_boundaries(32, 128) == list(range(16)) + T5_CAUSAL_LOG_STARTS
    assert bucket_boundaries(16, 128) == list(range(8)) + T5_BIDIRECTIONAL_LOG_STARTS
    causal = to_numpy(RelativePositionBias(num_heads=1).bucket(-np.arange(1000)))
    starts = list(range(16)) + T5_CAUSAL_LOG_STARTS
    np.testing.assert_array_equal(
        causal, np.searchsorted(starts, np.arange(1000), "right") - 1
    )
    layer = RelativePositionBias(num_heads=1, bidirectional=True)
    got = to_numpy(layer.bucket(np.array([-3, 0, 3, -16, 16, -500, 500])))
    np.testing.assert_array_equal(got, [3, 0, 19, 10, 26, 15, 31])


@given(
    num_buckets=st.integers(2, 64),
    max_distance=st.integers(2, 400),
    bidirectional=st.booleans(),
)
def test_buckets_are_monotone_and_bounded(num_buckets, max_distance, bidirectional):
    exact_buckets = num_buckets // 2 if bidirectional else num_buckets
    assume(exact_buckets >= 2 and max_distance > exact_buckets // 2)
    layer = RelativePositionBias(
        num_heads=1,
        num_buckets=num_buckets,
        max_distance=max_distance,
        bidirectional=bidirectional,
    )
    before = to_numpy(layer.bucket(-np.arange(420)))
    np.testing.assert_array_equal(
        before[: exact_buckets // 2], np.arange(exact_buckets // 2)
    )
    assert np.all(np.diff(before) >= 0)
    assert np.all(before[max_distance:] == exact_buckets - 1)
    if bidirectional:
        after = to_numpy(layer.bucket(np.arange(1, 420)))
        np.testing.assert_array_equal(after, before[1:] + exact_buckets)


def test_bias_gathers_one_value_per_head():
    layer = RelativePositionBias(num_heads=3, num_buckets=8, max_distance=16)
    layer.build()
    table = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    layer.embeddings.assign(table)
    relative = np.arange(6)[None, :] - np.arange(6)[:, None]
    got = to_numpy(layer(relative))
    assert got.shape == (3, 6, 6)
    buckets = np.array(reference_buckets(relative.ravel(), 8, 16)).reshape(6, 6)
    np.testing.assert_allclose(got, table[buckets].transpose(2, 0, 1))


# Few distinct shapes: JAX compiles the ops for each.
@given(
    num_queries=st.sampled_from([1, 2, 5, 8]),
    num_keys=st.sampled_from([1, 3, 8, 13]),
    heads=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
)
def test_toeplitz_puts_each_diagonal_on_its_diagonal(
    num_queries, num_keys, heads, seed
):
    diagonals = np.random.default_rng(seed).normal(
        size=(heads, num_queries + num_keys - 1)
    )
    got = to_numpy(toeplitz(diagonals.astype("float32"), num_queries, num_keys))
    rows = np.arange(num_queries)[:, None]
    columns = np.arange(num_keys)[None, :]
    want = diagonals[:, columns - rows + num_queries - 1]  # [heads, q, k]
    np.testing.assert_array_equal(got, want.astype("float32"))


def test_config_round_trip():
    layer = RelativePositionBias(
        num_heads=2, num_buckets=16, max_distance=64, bidirectional=True
    )
    clone = RelativePositionBias.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    relative = np.arange(-80, 80)
    np.testing.assert_array_equal(
        to_numpy(clone.bucket(relative)), to_numpy(layer.bucket(relative))
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_heads": 0}, "num_heads"),
        ({"num_heads": 1, "max_distance": 16}, "max_distance"),
        ({"num_heads": 1, "num_buckets": 1}, "num_buckets"),
        ({"num_heads": 1, "num_buckets": 3, "bidirectional": True}, "num_buckets"),
        (
            {
                "num_heads": 1,
                "num_buckets": 32,
                "max_distance": 4,
                "bidirectional": True,
            },
            "max_distance",
        ),
        ({"num_heads": 1, "max_distance": 128.5}, "integers"),
        ({"num_heads": 1, "num_buckets": 32.0}, "integers"),
    ],
)
def test_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RelativePositionBias(**kwargs)

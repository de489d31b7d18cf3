import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from keras_memtrans import RelativePositionBias
from tests.arrays import to_numpy
from tests.numpy_reference import t5_bucket


@given(
    num_buckets=st.integers(4, 64),
    max_distance=st.integers(40, 300),
)
def test_causal_buckets_match_reference(num_buckets, max_distance):
    layer = RelativePositionBias(
        num_heads=1, num_buckets=num_buckets, max_distance=max_distance
    )
    relative = np.arange(-400, 5)
    got = to_numpy(layer.bucket(relative))
    want = [t5_bucket(r, num_buckets, max_distance) for r in relative]
    np.testing.assert_array_equal(got, want)


def test_buckets_are_monotone_and_bounded():
    layer = RelativePositionBias(num_heads=1)
    got = to_numpy(layer.bucket(-np.arange(0, 1000)))
    assert got[0] == 0 and got[-1] == 31
    assert np.all(np.diff(got) >= 0)
    np.testing.assert_array_equal(got[:16], np.arange(16))


def test_bidirectional_buckets_split_by_sign():
    layer = RelativePositionBias(num_heads=1, num_buckets=32, bidirectional=True)
    got = to_numpy(layer.bucket(np.array([-3, 0, 3, 500])))
    np.testing.assert_array_equal(got, [3, 0, 19, 31])


def test_bias_gathers_one_value_per_head():
    layer = RelativePositionBias(num_heads=3, num_buckets=8, max_distance=16)
    layer.build()
    table = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    layer.embeddings.assign(table)
    relative = np.arange(6)[None, :] - np.arange(6)[:, None]
    got = to_numpy(layer(relative))
    assert got.shape == (3, 6, 6)
    buckets = np.vectorize(lambda r: t5_bucket(r, 8, 16))(relative)
    np.testing.assert_allclose(got, table[buckets].transpose(2, 0, 1))


def test_config_round_trip():
    layer = RelativePositionBias(num_heads=2, num_buckets=16, max_distance=64)
    clone = RelativePositionBias.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_rejects_degenerate_bucket_settings():
    with pytest.raises(ValueError, match="max_distance"):
        RelativePositionBias(num_heads=1, num_buckets=32, max_distance=8)

import numpy as np
import pytest

from keras_memtrans import SegmentCache
from tests.arrays import to_numpy


def make_cache():
    cache = SegmentCache(batch_size=2, cache_length=3, num_heads=1, head_dim=2)
    cache.build()
    return cache


def test_write_then_read_returns_the_segment():
    cache = make_cache()
    keys = np.arange(12, dtype="float32").reshape(2, 3, 1, 2)
    cache.write(keys, -keys, padding_mask=np.array([[1, 1, 0], [1, 1, 1]], bool))
    got_keys, got_values, mask = cache.read()
    np.testing.assert_array_equal(to_numpy(got_keys), keys)
    np.testing.assert_array_equal(to_numpy(got_values), -keys)
    np.testing.assert_array_equal(to_numpy(mask), [[1, 1, 0], [1, 1, 1]])


def test_reset_clears_only_flagged_lanes():
    cache = make_cache()
    keys = np.ones((2, 3, 1, 2), "float32")
    cache.write(keys, keys)
    cache.reset(np.array([True, False]))
    np.testing.assert_array_equal(to_numpy(cache.read()[2]), [[0, 0, 0], [1, 1, 1]])


def test_rejects_non_positive_cache_length():
    with pytest.raises(ValueError, match="cache_length"):
        SegmentCache(batch_size=2, cache_length=0, num_heads=1, head_dim=2)

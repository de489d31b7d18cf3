import os

import numpy as np
import pytest

from keras_memtrans import SegmentCache
from keras_memtrans.memory.last_key import LastKey
from tests.arrays import to_numpy
from tests.memory.memories import rewrite_npz


def make_cache():
    cache = SegmentCache(batch_size=2, cache_length=3, num_heads=1, head_dim=2)
    cache.build()
    return cache


def test_write_then_read_returns_the_segment():
    cache = make_cache()
    keys = np.arange(12, dtype="float32").reshape(2, 3, 1, 2)
    cache.write(keys, -keys, padding_mask=np.array([[1, 1, 0], [1, 1, 1]], bool))
    got_keys, got_values, mask = cache.read()
    present = np.array([[1, 1, 0], [1, 1, 1]], bool)
    np.testing.assert_array_equal(to_numpy(mask), present)
    # Present tokens as written; an absent one is a zero key and value.
    np.testing.assert_array_equal(to_numpy(got_keys), keys * present[..., None, None])
    np.testing.assert_array_equal(
        to_numpy(got_values), -keys * present[..., None, None]
    )


def test_reset_clears_only_flagged_lanes():
    cache = make_cache()
    keys = np.ones((2, 3, 1, 2), "float32")
    cache.write(keys, keys)
    cache.reset(np.array([True, False]))
    np.testing.assert_array_equal(to_numpy(cache.read()[2]), [[0, 0, 0], [1, 1, 1]])


def test_rejects_non_positive_cache_length():
    with pytest.raises(ValueError, match="cache_length"):
        SegmentCache(batch_size=2, cache_length=0, num_heads=1, head_dim=2)


def written_cache(dtype="float32"):
    """A cache holding a partly padded segment, and its keys and mask."""
    cache = SegmentCache(
        batch_size=2, cache_length=3, num_heads=1, head_dim=2, dtype=dtype
    )
    cache.build()
    keys = np.random.default_rng(0).normal(size=(2, 3, 1, 2)).astype("float32")
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    cache.write(keys, -keys, padding_mask=mask)
    return cache, keys, mask


def read_cache(cache):
    return [to_numpy(x) for x in cache.read()]


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_save_and_load_restore_the_cache(tmp_path, dtype):
    cache, keys, mask = written_cache(dtype)
    path = tmp_path / "sub" / "cache.npz"
    cache.save(path)
    assert os.listdir(tmp_path / "sub") == ["cache.npz"]
    restored = SegmentCache(
        batch_size=2, cache_length=3, num_heads=1, head_dim=2, dtype=dtype
    )
    restored.load(path)  # builds it
    got_keys, got_values, got_mask = read_cache(restored)
    np.testing.assert_array_equal(got_mask, mask)
    tolerance = 0 if dtype == "float32" else 1e-2  # bfloat16 keys
    np.testing.assert_allclose(
        got_keys.astype("float32")[mask], keys[mask], atol=tolerance
    )
    for got, want in zip(read_cache(restored), read_cache(cache)):
        np.testing.assert_array_equal(got, want)
    for target in (cache, restored):
        target.reset(np.array([False, True]))
    np.testing.assert_array_equal(read_cache(restored)[2], [[1, 1, 0], [0, 0, 0]])


def save_then_damage(tmp_path, damage):
    path = tmp_path / "cache.npz"
    source, _, _ = written_cache()
    if damage == "missing":
        return path
    if damage == "other_length":
        source = SegmentCache(batch_size=2, cache_length=4, num_heads=1, head_dim=2)
    elif damage == "last_key":
        source = LastKey(batch_size=2, num_heads=1, head_dim=2)
    source.save(path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "float_mask":
        rewrite_npz(path, mask=np.ones((2, 3), "float32"))
    elif damage == "no_values":
        rewrite_npz(path, values=None)
    return path


@pytest.mark.parametrize(
    "damage, error, match",
    [
        ("missing", FileNotFoundError, "cache.npz"),
        ("truncated", ValueError, "not a readable .npz"),
        ("other_length", ValueError, "`cache_length` 4, this one 3"),
        ("last_key", ValueError, "holds LastKey, not SegmentCache"),
        ("float_mask", ValueError, "`mask`"),
        ("no_values", ValueError, "no `values`"),
    ],
)
def test_a_failed_load_leaves_the_cache_unchanged(tmp_path, damage, error, match):
    path = save_then_damage(tmp_path, damage)
    cache = make_cache()
    keys = np.full((2, 3, 1, 2), 7.0, "float32")
    cache.write(keys, keys, padding_mask=np.array([[0, 1, 1], [1, 1, 1]], bool))
    before = read_cache(cache)
    with pytest.raises(error, match=match):
        cache.load(path)
    for got, want in zip(read_cache(cache), before):
        np.testing.assert_array_equal(got, want)


def test_config_round_trip_and_no_saved_weights():
    cache, _, _ = written_cache()
    config = cache.get_config()
    assert SegmentCache.from_config(config).get_config() == config
    store = {}
    cache.save_own_variables(store)
    assert store == {}


def test_a_non_finite_token_is_never_cached():
    cache = SegmentCache(batch_size=2, cache_length=3, num_heads=1, head_dim=2)
    cache.build()
    keys = np.ones((2, 3, 1, 2), "float32")
    values = np.full((2, 3, 1, 2), 2.0, "float32")
    keys[0, 1, 0, 0] = np.nan
    values[1, 2, 0, 1] = np.inf
    cache.write(keys, values)
    got_keys, got_values, mask = (to_numpy(x) for x in cache.read())
    np.testing.assert_array_equal(mask, [[True, False, True], [True, True, False]])
    assert np.isfinite(got_keys).all() and np.isfinite(got_values).all()
    np.testing.assert_array_equal(got_keys[mask], keys[mask])
    np.testing.assert_array_equal(got_values[mask], values[mask])

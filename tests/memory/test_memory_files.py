"""`KNNMemory.save` and `load`, checked on every memory: a loaded memory
retrieves and behaves as the saved one, a damaged file loads as empty
slots or fails with a clear error and leaves the memory as it was, and a
save replaces the file atomically."""

import os
import re

import numpy as np
import pytest

from tests.memory.memories import BATCH
from tests.memory.memories import DIM
from tests.memory.memories import HEADS
from tests.memory.memories import MEMORY
from tests.memory.memories import SIZES
from tests.memory.memories import assert_same_entries
from tests.memory.memories import clustered_keys
from tests.memory.memories import each_memory
from tests.memory.memories import filled_memory
from tests.memory.memories import rewrite_npz
from tests.memory.memories import search
from tests.memory.memories import segment


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

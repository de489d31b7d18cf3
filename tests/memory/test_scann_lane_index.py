import numpy as np
import pytest
from scann.scann_ops.py import scann_ops_pybind

from keras_memtrans.memory.scann_lane_index import ScannLaneIndex
from keras_memtrans.memory.scann_lane_index import delete_slots
from keras_memtrans.memory.scann_lane_index import exact_top_slots
from keras_memtrans.memory.scann_lane_index import min_index_entries


def test_min_index_entries():
    assert [min_index_entries(n) for n in (1, 2, 3, 8)] == [16, 16, 24, 64]


def test_exact_top_slots_searches_the_filled_slots_only():
    keys = np.eye(4, dtype="float32")[None]  # [heads, slots, dim]
    queries = np.array([[[1, 2, 3, 4]]], "float32")  # [query, heads, dim]
    slots = np.array([0, 1, 2])
    found = exact_top_slots(queries, keys, slots, 2)
    assert sorted(found[0, 0]) == [1, 2]
    assert sorted(exact_top_slots(queries, keys, slots, 4)[0, 0]) == [-1, 0, 1, 2]
    assert np.all(exact_top_slots(queries, keys, slots[:0], 2) == -1)


def test_delete_slots_moves_the_last_id_into_each_deleted_one():
    # ScaNN's delete(id) moves its last document into id.
    index_slots = np.array([5, 2, 7, 0], "int64")
    remaining, slot_index, deleted = delete_slots(index_slots, [2, 3, 0], 8)
    # Slot 2 (id 1) is deleted and slot 0 moves into id 1; slot 3 is not
    # indexed; slot 0 (now id 1) is deleted and slot 7 moves into id 1.
    assert deleted == [1, 1]
    np.testing.assert_array_equal(remaining, [5, 7])
    np.testing.assert_array_equal(index_slots, [5, 2, 7, 0])  # not modified
    indexed = slot_index >= 0
    np.testing.assert_array_equal(np.flatnonzero(indexed), sorted(remaining))
    np.testing.assert_array_equal(
        remaining[slot_index[indexed]], np.flatnonzero(indexed)
    )


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"writes_since_build": np.array(0)}, "slots"),
        ({"slots": np.array([0, 0]), "writes_since_build": np.array(0)}, "slots"),
        ({"slots": np.array([0, 9]), "writes_since_build": np.array(0)}, "slots"),
        ({"slots": np.array([0, 1]), "writes_since_build": np.array(0)}, "head 0"),
    ],
)
def test_restore_rejects_inconsistent_arrays_and_changes_nothing(arrays, match):
    index = ScannLaneIndex(None, 1, 8, 1, 1, 16)
    keys, positions = np.zeros((1, 8, 4), "float32"), np.arange(8)
    with pytest.raises(ValueError, match=match):
        index.restore({"settings": index.settings, **arrays}, keys, positions)
    assert not index.indexed


@pytest.mark.parametrize("seed", range(3))
def test_the_same_entries_build_the_same_searchers(seed):
    # ScaNN's default random seeding takes its k-means centres in the order
    # of a hash set: 4 builds on the same 256 keys differed for 6 to 10
    # seeds in 10 (on one training thread too).
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(1, 512, 16)).astype("float32")  # [heads, slots, dim]
    positions = np.where(np.arange(512) < 256, np.arange(512), -1)  # half full
    builds = []
    for _ in range(4):
        index = ScannLaneIndex(scann_ops_pybind, 1, 512, 8, 2, 256)
        index.update(keys, positions, np.arange(256))
        assert index.indexed
        builds.append(index.state_arrays())  # the serialised trees
    for arrays in builds[1:]:
        assert arrays.keys() == builds[0].keys()
        for name, array in arrays.items():
            np.testing.assert_array_equal(array, builds[0][name], err_msg=name)


@pytest.mark.parametrize("entries, indexed", [(100, False), (300, True)])
def test_a_lane_saved_without_searchers_is_indexed_as_its_entries_ask(entries, indexed):
    # An unindexed lane of a tree memory (fewer entries than half the
    # memory) stays unindexed; one saved by another kind of memory, which
    # saves no searchers, gets them built when it is full enough.
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(1, 512, 16)).astype("float32")  # [heads, slots, dim]
    positions = np.where(np.arange(512) < entries, np.arange(512), -1)
    index = ScannLaneIndex(scann_ops_pybind, 1, 512, 8, 2, 256)
    index.restore({}, keys, positions)
    assert index.indexed == indexed
    if indexed:
        np.testing.assert_array_equal(np.sort(index.index_slots), np.arange(entries))

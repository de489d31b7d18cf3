"""Saving and loading an attention layer's memory and whole lane state:
a restored twin (same weights) continues its documents like the original,
and a failed load changes nothing."""

import functools
import json
import os

import numpy as np
import pytest

from keras_memtrans import KNNAttention
from keras_memtrans.layers.segment_attention import SegmentAttention
from keras_memtrans.memory.lane_state import MANIFEST
from tests.arrays import filled_lanes
from tests.layers.attention_cases import BATCH
from tests.layers.attention_cases import HEADS
from tests.layers.attention_cases import HIDDEN
from tests.layers.attention_cases import MIXED_PADDING
from tests.layers.attention_cases import STARTS
from tests.layers.attention_cases import attend
from tests.layers.attention_cases import make_layer
from tests.layers.attention_cases import segments

# ScaNN visits every leaf, so its results are exact; its lanes are indexed
# from 16 entries (2 segments of 8).
MEMORIES = {
    "exact": dict(memory_kind="exact", memory_size=20, num_neighbors=5),
    "scann": dict(
        memory_kind="scann",
        memory_size=32,
        num_neighbors=5,
        num_leaves=2,
        num_leaves_to_search=2,
    ),
}
each_memory = pytest.mark.parametrize(
    "memory", list(MEMORIES.values()), ids=list(MEMORIES)
)
# Segments 0-2 are read before saving, 3-4 after restoring.
SAVED, CONTINUED = (0, 1, 2), (3, 4)


def read(layer, x, steps, training):
    for step in steps:
        attend(layer, x[step], STARTS[step], MIXED_PADDING, training)


def assert_continues_like(restored, original, x, training):
    """The next segments give the same outputs and neighbours on both;
    returns the original's outputs."""
    outputs = []
    for step in CONTINUED:
        got = attend(restored, x[step], STARTS[step], MIXED_PADDING, training)
        want = attend(original, x[step], STARTS[step], MIXED_PADDING, training)
        np.testing.assert_allclose(got[0], want[0], atol=1e-5)
        if want[1] is not None:
            np.testing.assert_array_equal(
                np.sort(got[1], axis=-1), np.sort(want[1], axis=-1)
            )
        outputs.append(want[0])
    return outputs


@each_memory
@pytest.mark.parametrize("training", [False, True])
def test_a_loaded_memory_continues_like_the_saved_one(tmp_path, memory, training):
    make = functools.partial(make_layer, KNNAttention, **memory)
    layer, x = make(), segments(5)
    read(layer, x, SAVED, training)
    layer.save_memory(tmp_path / "memory.npz", training=training)
    restored = make()
    restored.load_memory(tmp_path / "memory.npz", training=training)
    assert filled_lanes(restored, training)["memory"].all()
    assert not filled_lanes(restored, not training)["memory"].any()
    want = assert_continues_like(restored, layer, x, training)[0]
    empty = make()  # the memory matters: without it the outputs differ
    got = attend(empty, x[3], STARTS[3], MIXED_PADDING, training)[0]
    assert np.abs(got - want).max() > 1e-3


def saved_memory_of(tmp_path, make, path=None):
    """Saves the inference memory of a `make()` layer fed two segments."""
    layer = make()
    read(layer, segments(2, seed=5), (0, 1), False)
    path = path or tmp_path / "memory.npz"
    layer.save_memory(path)
    return path


@each_memory
@pytest.mark.parametrize(
    "damage, error, match",
    [
        ("missing", FileNotFoundError, "memory.npz"),
        ("truncated", ValueError, "not a readable .npz"),
        ("memory_size", ValueError, "`memory_size` 40"),
        ("head_dim", ValueError, "`head_dim` 4"),
        ("other_state", ValueError, "not a saved (Exact|Scann)Memory"),
    ],
)
def test_a_failed_memory_load_leaves_the_memory_as_it_was(
    tmp_path, memory, damage, error, match
):
    path = tmp_path / "memory.npz"
    if damage == "truncated":
        saved_memory_of(tmp_path, lambda: make_layer(KNNAttention, **memory))
        path.write_bytes(path.read_bytes()[:-200])
    elif damage == "memory_size":
        options = {**memory, "memory_size": 40}
        saved_memory_of(tmp_path, lambda: make_layer(KNNAttention, **options))
    elif damage == "head_dim":
        options = {**memory, "head_dim": 4}
        saved_memory_of(tmp_path, lambda: make_layer(KNNAttention, **options))
    elif damage == "other_state":  # the XL cache's file, not a memory's
        other = make_layer(KNNAttention, use_xl_cache=True, **memory)
        other.lane_states(False)["cache"].save(path)
    x = segments(5)
    layer, twin = (make_layer(KNNAttention, **memory) for _ in range(2))
    for target in (layer, twin):
        read(target, x, SAVED, False)
    with pytest.raises(error, match=match):
        layer.load_memory(path)
    assert_continues_like(layer, twin, x, False)


# Each kind with the same sizes, as "auto" picks one by backend and device.
SAME_SIZES = {
    "exact": dict(MEMORIES["exact"], memory_size=32),
    "scann": MEMORIES["scann"],
    "scann_exact": dict(memory_kind="scann_exact", memory_size=32, num_neighbors=5),
}


@pytest.mark.parametrize(
    "saved, loaded",
    [
        ("scann", "exact"),
        ("exact", "scann"),
        ("scann_exact", "exact"),
        ("exact", "scann_exact"),
    ],
)
def test_a_memory_saved_by_another_kind_loads_and_continues_alike(
    tmp_path, saved, loaded
):
    # Every memory saves the same ring buffer (a ScaNN memory its searchers
    # too, which the exact one ignores and which it builds without them).
    x = segments(5)
    layer = make_layer(KNNAttention, **SAME_SIZES[saved])
    read(layer, x, SAVED, False)
    layer.save_memory(tmp_path / "memory.npz")
    restored = make_layer(KNNAttention, **SAME_SIZES[loaded])
    restored.load_memory(tmp_path / "memory.npz")
    memory = restored.lane_states(False)["memory"]
    assert type(memory).__name__ == (
        "ExactMemory" if loaded == "exact" else "ScannMemory"
    )
    assert filled_lanes(restored, False)["memory"].all()
    if loaded != "exact":  # indexed as if it had read the segments itself
        twin = make_layer(KNNAttention, **SAME_SIZES[loaded])
        read(twin, x, SAVED, False)
        twin_memory = twin.lane_states(False)["memory"]
        np.testing.assert_array_equal(memory.indexed_lanes, twin_memory.indexed_lanes)
    assert_continues_like(restored, layer, x, False)


# Every lane state at once: the XL cache, the last keys, the memory.
LANE_STATE_CASES = {
    "segment_xl_smear": functools.partial(
        SegmentAttention, use_xl_cache=True, smear_keys=True
    ),
    **{
        f"knn_{name}_xl_smear": functools.partial(
            KNNAttention, use_xl_cache=True, smear_keys=True, **memory
        )
        for name, memory in MEMORIES.items()
    },
}
each_case = pytest.mark.parametrize(
    "case", list(LANE_STATE_CASES.values()), ids=list(LANE_STATE_CASES)
)


def manifest_of(directory):
    with open(os.path.join(directory, MANIFEST)) as file:
        return json.load(file)


@each_case
@pytest.mark.parametrize("training", [True, False])
def test_loaded_lane_states_continue_like_the_saved_ones(tmp_path, case, training):
    layer, x = make_layer(case), segments(5)
    read(layer, x, SAVED, training)
    layer.save_lane_states(tmp_path / "states", training=training)
    manifest = manifest_of(tmp_path / "states")
    assert manifest["states"] == sorted(layer.lane_states(training))
    save = tmp_path / "states" / manifest["save"]
    assert sorted(os.listdir(save)) == [f"{name}.npz" for name in manifest["states"]]
    restored = make_layer(case)
    restored.load_lane_states(tmp_path / "states", training=training)
    assert all(lanes.all() for lanes in filled_lanes(restored, training).values())
    assert not any(
        lanes.any() for lanes in filled_lanes(restored, not training).values()
    )
    assert_continues_like(restored, layer, x, training)


def shorter_segments():
    """The exact case's layer, built for segments of 4 tokens, not 8."""
    layer = LANE_STATE_CASES["knn_exact_xl_smear"](num_heads=HEADS)
    layer.build((BATCH, 4, HIDDEN))
    return layer


def damage_saved_state(directory, name, make_other, other_name=None):
    """Replaces the saved state `name` of `directory` with the state
    `other_name` (default: the same) of a `make_other()` layer."""
    other = make_other()
    path = os.path.join(directory, manifest_of(directory)["save"], f"{name}.npz")
    other.lane_states(True)[other_name or name].save(path)


@pytest.mark.parametrize(
    "name, make_other, other_name, match",
    [
        # The memory is read last: the cache and last key were fine.
        (
            "memory",
            lambda: make_layer(LANE_STATE_CASES["knn_exact_xl_smear"], memory_size=24),
            None,
            "`memory_size` 24",
        ),
        (
            "memory",
            lambda: make_layer(LANE_STATE_CASES["knn_exact_xl_smear"]),
            "last_key",
            "not a saved ExactMemory",
        ),
        ("cache", lambda: shorter_segments(), None, "`cache_length` 4, this one 8"),
    ],
    ids=["memory_size", "other_state", "cache_length"],
)
def test_a_failed_lane_state_load_changes_no_state(
    tmp_path, name, make_other, other_name, match
):
    case = LANE_STATE_CASES["knn_exact_xl_smear"]
    x = segments(5)
    saved = make_layer(case)
    read(saved, segments(5, seed=9), SAVED, True)
    saved.save_lane_states(tmp_path)
    damage_saved_state(tmp_path, name, make_other, other_name)
    layer, twin = make_layer(case), make_layer(case)
    for target in (layer, twin):
        read(target, x, SAVED, True)
    with pytest.raises(ValueError, match=match):
        layer.load_lane_states(tmp_path)
    assert_continues_like(layer, twin, x, True)


def test_a_layer_without_the_saved_states_does_not_load_them(tmp_path):
    layer = make_layer(LANE_STATE_CASES["knn_exact_xl_smear"])
    read(layer, segments(5), SAVED, True)
    layer.save_lane_states(tmp_path)
    no_smear = make_layer(KNNAttention, use_xl_cache=True, **MEMORIES["exact"])
    with pytest.raises(ValueError, match=r"saved but not here \['last_key'\]"):
        no_smear.load_lane_states(tmp_path)
    assert not any(lanes.any() for lanes in filled_lanes(no_smear, True).values())


def test_an_unbuilt_layer_has_no_lane_state_to_save(tmp_path):
    layer = KNNAttention(num_heads=2, **MEMORIES["exact"])
    for method in (layer.save_lane_states, layer.load_lane_states):
        with pytest.raises(ValueError, match="not built"):
            method(tmp_path)
    with pytest.raises(ValueError, match="not built"):
        layer.save_memory(tmp_path / "memory.npz")
    assert os.listdir(tmp_path) == []

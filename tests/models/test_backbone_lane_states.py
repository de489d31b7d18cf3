"""A backbone's lane states saved mid-document and restored into a fresh
backbone with the same weights: it continues like the original, and a
backbone of another shape refuses the save and keeps its own state."""

from unittest import mock

import numpy as np
import pytest

from keras_memtrans.memory.scann_lane_index import ScannLaneIndex
from tests.arrays import stored_tokens
from tests.arrays import to_numpy
from tests.models.conftest import tiny_backbone

# Smeared keys, the XL cache (the preset's default) and memory in the top
# block. ScaNN visits every leaf (exact results) and indexes its lanes from
# 32 entries, one segment.
EXACT = dict(smear_keys=True, memory_options={"memory_kind": "exact"})
SCANN = dict(
    smear_keys=True,
    memory_options={
        "memory_kind": "scann",
        "memory_size": 64,
        "num_leaves": 2,
        "num_leaves_to_search": 2,
    },
)
# Segments 0-2 are read before saving, 3-4 after restoring.
SAVED, CONTINUED = (0, 1, 2), (3, 4)


def segment(backbone, step, seed=0):
    """Input `step` of a stream: documents start at step 0 and lane 1's
    again at step 2; lane 0's last segment is half padding."""
    batch, length = backbone.batch_size, backbone.segment_length
    rng = np.random.default_rng([seed, step])
    document_start = np.full(batch, step == 0)
    document_start[1] |= step == 2
    padding_mask = np.ones((batch, length), bool)
    if step == 4:
        padding_mask[0, length // 2 :] = False
    return {
        "token_ids": rng.integers(0, backbone.vocabulary_size, (batch, length)),
        "document_start": document_start,
        "padding_mask": padding_mask,
    }


def read(backbone, steps, seed=0):
    """The outputs of `backbone` (training mode) on segments `steps`."""
    return [
        to_numpy(backbone(segment(backbone, step, seed), training=True))
        for step in steps
    ]


@pytest.mark.parametrize("options", [EXACT, SCANN], ids=["exact", "scann"])
def test_a_restored_backbone_continues_like_the_saved_one(tmp_path, options):
    backbone = tiny_backbone(**options)
    read(backbone, SAVED)
    backbone.save_weights(tmp_path / "model.weights.h5")
    backbone.save_lane_states(tmp_path / "lane_states")
    restored, unrestored = tiny_backbone(**options), tiny_backbone(**options)
    for target in (restored, unrestored):
        target.load_weights(tmp_path / "model.weights.h5")  # no lane state
    # A ScaNN memory gets its searchers from the file, not by a rebuild.
    with mock.patch.object(ScannLaneIndex, "_build", side_effect=AssertionError):
        restored.load_lane_states(tmp_path / "lane_states")
    for layer in restored.memory_layers:
        memory = layer.lane_states(training=True)["memory"]
        assert getattr(memory, "indexed_lanes", np.ones(1, bool)).all()
    want = read(backbone, CONTINUED)
    for got, expected in zip(read(restored, CONTINUED), want):
        np.testing.assert_allclose(got, expected, atol=1e-5)
    # Without the lane states the same weights give other outputs.
    assert np.abs(read(unrestored, CONTINUED)[0] - want[0]).max() > 1e-3


def test_a_backbone_with_another_memory_kind_continues_like_the_saved_one(tmp_path):
    # "auto" picks the kind by backend and device: a run saved with the
    # exact memory resumes with ScaNN's (each direction and kind at the
    # layer: tests/layers/test_lane_state_persistence.py).
    saved_options = dict(SCANN, memory_options={**SCANN["memory_options"]})
    saved_options["memory_options"]["memory_kind"] = "exact"
    backbone = tiny_backbone(**saved_options)
    read(backbone, SAVED)
    backbone.save_weights(tmp_path / "model.weights.h5")
    backbone.save_lane_states(tmp_path / "lane_states")
    restored = tiny_backbone(**SCANN)
    restored.load_weights(tmp_path / "model.weights.h5")
    restored.load_lane_states(tmp_path / "lane_states")
    want = read(backbone, CONTINUED)
    for got, expected in zip(read(restored, CONTINUED), want):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def lane_state_contents(backbone):
    """What every block's training lane state holds, as NumPy arrays."""
    contents = {}
    for block in backbone.transformer_layers:
        layer = block.attention
        for name, value in stored_tokens(layer, training=True).items():
            contents[f"{block.name}/{name}"] = value
        last_key = layer.lane_states(training=True).get("last_key")
        if last_key is not None:
            keys, present = last_key.read()
            contents[f"{block.name}/last_key"] = to_numpy(keys)
            contents[f"{block.name}/last_key_present"] = to_numpy(present)
    return contents


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(num_layers=3), r"not saved \['transformer_layer_2/cache', "),
        (dict(smear_keys=False), r"saved but not here \['transformer_layer_0/last_"),
        (
            dict(memory_layer_indices=(0,)),
            r"not saved \['transformer_layer_0/memory'\], saved but not here "
            r"\['transformer_layer_1/memory'\]",
        ),
        (dict(segment_length=16), "`cache_length` 32, this one 16"),
        (dict(memory_options={"memory_size": 128}), "`memory_size` 256, this one 128"),
    ],
    ids=["layers", "smear_keys", "memory_layer", "segment", "memory_size"],
)
def test_a_backbone_of_another_shape_refuses_the_save(tmp_path, overrides, match):
    saved = tiny_backbone(**EXACT)
    read(saved, SAVED, seed=1)
    saved.save_lane_states(tmp_path)
    options = {**EXACT, **overrides}
    options["memory_options"] = {
        **EXACT["memory_options"],
        **overrides.get("memory_options", {}),
    }
    other = tiny_backbone(**options)
    read(other, SAVED)
    before = lane_state_contents(other)
    with pytest.raises(ValueError, match=match):
        other.load_lane_states(tmp_path)
    after = lane_state_contents(other)
    assert sorted(after) == sorted(before)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_a_directory_without_a_save_raises(tmp_path):
    backbone = tiny_backbone(**EXACT)
    with pytest.raises(FileNotFoundError, match="lane_states.json"):
        backbone.load_lane_states(tmp_path)

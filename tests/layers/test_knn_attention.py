"""What only `KNNAttention` does: memory, gate, neighbours, memory options.

The contract it shares with the other attention layers (NumPy reference
with retrieval over a wrapping memory, smeared keys, padding, lane state,
gradients, config) is in `test_attention_contract`, bad inputs in
`test_attention_bad_input`.
"""

import functools

import keras
import numpy as np
import pytest
from keras import ops

from keras_memtrans import KNNAttention
from tests.arrays import to_numpy
from tests.host_data import only_on_torch
from tests.host_data import package_host_tensors
from tests.layers.attention_cases import BATCH
from tests.layers.attention_cases import HEADS
from tests.layers.attention_cases import SEGMENT
from tests.layers.attention_cases import STARTS
from tests.layers.attention_cases import attend
from tests.layers.attention_cases import make_layer
from tests.layers.attention_cases import segments
from tests.memory.memories import rewrite_npz

MEMORY_KINDS = {
    "exact": dict(memory_kind="exact"),
    # Every leaf visited: ScaNN's results are exact, as ExactMemory's.
    "scann": dict(memory_kind="scann", num_leaves=2, num_leaves_to_search=2),
}
each_memory_kind = pytest.mark.parametrize(
    "memory_options", list(MEMORY_KINDS.values()), ids=list(MEMORY_KINDS)
)


def memory_layer(memory_options, num_neighbors=5):
    """A built `KNNAttention` of 32 memory slots with the contract tests'
    weights (the same for every call)."""
    return make_layer(
        functools.partial(
            KNNAttention, memory_size=32, num_neighbors=num_neighbors, **memory_options
        )
    )


def test_gate_starts_at_one_half():
    layer = KNNAttention(num_heads=4, memory_size=16, num_neighbors=2)
    layer.build((2, 4, 8))
    np.testing.assert_allclose(to_numpy(ops.sigmoid(layer.gate_bias)), 0.5)


def test_mixed_bfloat16_runs_and_stays_finite():
    layer = KNNAttention(
        num_heads=HEADS,
        memory_size=20,
        num_neighbors=5,
        use_xl_cache=True,
        dtype="mixed_bfloat16",
    )
    for x, start in zip(segments(3), STARTS):
        out = layer(x, document_start=start)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert layer.attention_scale.dtype == "float32"
    assert layer.inference_memory.keys.dtype == "bfloat16"
    assert np.all(np.isfinite(to_numpy(ops.cast(out, "float32"))))


def test_config_keeps_the_memory_size_and_neighbors():
    layer = KNNAttention(num_heads=4, memory_size=64, num_neighbors=8)
    config = KNNAttention.from_config(layer.get_config()).get_config()
    assert (config["memory_size"], config["num_neighbors"]) == (64, 8)


def test_symbolic_call_gives_neighbor_positions():
    layer = KNNAttention(num_heads=2, memory_size=32, num_neighbors=4)
    hidden = keras.Input((8, 12), batch_size=2)
    outputs, neighbors = layer(hidden, return_neighbors=True)
    assert outputs.shape == (2, 8, 12)
    assert neighbors.shape == (2, 8, 2, 4)
    assert neighbors.dtype == "int32"


@each_memory_kind
def test_a_non_finite_token_is_dropped_like_padding(memory_options):
    """A NaN hidden state (lane 0 of segment 1; lane 2 of segment 3, once
    ScaNN lanes are indexed) spoils its own lane's segment (local attention
    weighs its NaN value by 0) and nothing else: the other lanes and every
    later segment are finite and equal to a run where that token is
    padding. Its NaN key used to reach every later query of its lane
    through the memory."""
    inputs = segments(6, seed=7)
    broken = inputs.copy()
    padding = np.ones((len(inputs), BATCH, SEGMENT), bool)
    spoiled = np.zeros((len(inputs), BATCH, SEGMENT), bool)
    for step, lane, token in ((1, 0, 3), (3, 2, 6)):
        broken[step, lane, token, 0] = np.nan
        padding[step, lane, token] = False
        spoiled[step, lane] = True
    layer, padded_layer = memory_layer(memory_options), memory_layer(memory_options)
    for step in range(len(inputs)):
        start = np.full((BATCH,), step == 0)
        got, got_positions = attend(layer, broken[step], start)
        want, want_positions = attend(padded_layer, inputs[step], start, padding[step])
        clean = ~spoiled[step]
        assert np.isfinite(got[clean]).all(), step
        np.testing.assert_allclose(got[clean], want[clean], atol=1e-5)
        np.testing.assert_array_equal(
            np.sort(got_positions, axis=-1)[clean],
            np.sort(want_positions, axis=-1)[clean],
        )


@each_memory_kind
def test_empty_slots_contribute_nothing_even_when_stale_slots_hold_nan(
    memory_options, tmp_path
):
    """A lane holding fewer than `k` entries retrieves empty slots too; a
    stale NaN in them (a NaN token stored before the lane's reset; here
    written into a saved memory, since NaN tokens are no longer stored)
    used to turn weight 0 times NaN into NaN outputs. The next document
    reads as in a fresh layer."""
    layer = memory_layer(memory_options, num_neighbors=16)
    for step, x in enumerate(segments(3, seed=8)):
        layer(x, document_start=np.full((BATCH,), step == 0))
    memory = layer.lane_states()["memory"]
    path = tmp_path / "memory.npz"
    memory.save(path)
    with np.load(path) as saved:
        nan = np.full(saved["keys"].shape, np.nan, "float32")
    rewrite_npz(path, keys=nan, values=nan)
    memory.load(path)
    fresh = memory_layer(memory_options, num_neighbors=16)
    for step, x in enumerate(segments(3, seed=9)):
        start = np.full((BATCH,), step == 0)
        got, got_positions = attend(layer, x, start)
        want, want_positions = attend(fresh, x, start)
        assert np.isfinite(got).all(), step
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_array_equal(
            np.sort(got_positions, axis=-1), np.sort(want_positions, axis=-1)
        )


@only_on_torch
@pytest.mark.parametrize("segment", [16, 1], ids=["segment", "one-token"])
def test_a_training_call_makes_no_tensor_from_host_data(segment):
    # A segment's search puts the empty slots' mask in the score matmul
    # (more queries than head_dim + 1); one token's caps each score.
    layer = KNNAttention(
        num_heads=4,
        memory_size=32,
        num_neighbors=4,
        use_xl_cache=True,
        smear_keys=True,
    )
    rng = np.random.default_rng(0)
    mask = ops.ones((2, segment), "bool")

    def train(start):
        x = ops.convert_to_tensor(rng.normal(size=(2, segment, 16)), "float32")
        start = ops.convert_to_tensor(np.array(start))
        outputs = layer(x, document_start=start, padding_mask=mask, training=True)
        ops.sum(outputs).backward()

    train([True, True])  # builds the layer and its memory
    with package_host_tensors() as sites:
        train([False, True])  # lane 1 restarts its document
        train([False, False])
    assert sites == [], sorted(set(sites))


class TestBadMemoryOptions:
    def test_segment_longer_than_memory(self):
        layer = KNNAttention(num_heads=2, memory_size=4, num_neighbors=2)
        with pytest.raises(ValueError, match="memory_size"):
            layer(np.zeros((2, 8, 4), "float32"))

    def test_num_neighbors_above_memory_size(self):
        with pytest.raises(ValueError, match="num_neighbors"):
            KNNAttention(num_heads=2, memory_size=8, num_neighbors=9)

    @pytest.mark.parametrize("name, value", [("memory_size", -1), ("num_neighbors", 0)])
    def test_non_positive_sizes(self, name, value):
        options = dict(num_heads=2, memory_size=16, num_neighbors=2)
        options[name] = value
        with pytest.raises(ValueError, match=name):
            KNNAttention(**options)

    @pytest.mark.parametrize("value", [0, 2.5, True])
    def test_bad_scores_per_block(self, value):
        with pytest.raises(ValueError, match="scores_per_block"):
            KNNAttention(num_heads=2, scores_per_block=value)

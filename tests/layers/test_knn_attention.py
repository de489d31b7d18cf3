import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from keras import ops

from keras_memtrans import KNNAttention
from tests.arrays import attention_weights
from tests.arrays import stored_tokens
from tests.arrays import to_numpy
from tests.gradients import segment_gradients
from tests.numpy_reference import NumpyKNNAttention

BATCH, SEGMENT, HIDDEN, HEADS = 3, 8, 16, 2


def randomize(layer, seed=0):
    """Gives every trainable weight a random, non-degenerate value."""
    rng = np.random.default_rng(seed)
    for variable in layer.trainable_variables:
        shape = tuple(variable.shape)
        if variable.path.endswith("attention_scale"):
            value = rng.uniform(1.0, 6.0, shape)
        else:
            value = rng.normal(0.0, 0.5, shape)
        variable.assign(value.astype("float32"))


def make_layer(**kwargs):
    config = dict(num_heads=HEADS, memory_size=20, num_neighbors=5)
    config.update(kwargs)
    layer = KNNAttention(**config)
    layer.build((BATCH, SEGMENT, HIDDEN))
    randomize(layer)
    return layer


def segments(count, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(count, BATCH, SEGMENT, HIDDEN)).astype("float32")


# Segment 0 starts every document, segment 2 restarts lane 1 only.
STARTS = [
    np.array([True, True, True]),
    np.array([False, False, False]),
    np.array([False, True, False]),
    np.array([False, False, False]),
    np.array([False, False, False]),
]


@pytest.mark.parametrize(
    "use_xl_cache, training, smear_keys",
    [
        (False, False, False),
        (False, True, False),
        (True, False, False),
        (True, True, False),
        (True, False, True),
    ],
)
def test_matches_numpy_reference_over_segments(use_xl_cache, training, smear_keys):
    # memory_size 20 with segments of 8: the ring wraps mid-segment, lanes
    # 0 and 2 overflow (40 tokens) while lane 1 restarts.
    layer = make_layer(
        use_xl_cache=use_xl_cache, smear_keys=smear_keys, max_distance=16, num_buckets=8
    )
    reference = NumpyKNNAttention(
        attention_weights(layer),
        batch_size=BATCH,
        memory_size=20,
        num_neighbors=5,
        use_xl_cache=use_xl_cache,
        num_buckets=8,
        max_distance=16,
    )
    padding = np.ones((BATCH, SEGMENT), bool)
    padding[2, 5:] = False  # lane 2 pads the tail of its third segment
    for step, (x, start) in enumerate(zip(segments(5), STARTS)):
        mask = padding if step == 2 else None
        got, got_positions = layer(
            x,
            document_start=start,
            padding_mask=mask,
            return_neighbors=True,
            training=training,
        )
        want, want_positions = reference(x, start, mask)
        valid = np.ones((BATCH, SEGMENT), bool) if mask is None else mask
        np.testing.assert_allclose(to_numpy(got)[valid], want[valid], atol=1e-4)
        got_positions = np.sort(to_numpy(got_positions), axis=-1)
        np.testing.assert_array_equal(
            got_positions[valid], np.sort(want_positions, axis=-1)[valid]
        )


def test_memory_changes_the_output_only_after_the_first_segment():
    layer = make_layer()
    x = segments(1)[0]
    first = to_numpy(layer(x, document_start=STARTS[0]))
    again = to_numpy(layer(x, document_start=STARTS[0]))
    np.testing.assert_allclose(first, again, atol=1e-6)
    with_memory = to_numpy(layer(x))
    assert np.abs(with_memory - first).max() > 1e-3


def test_training_and_inference_memories_are_separate():
    layer = make_layer()
    x = segments(2)
    layer(x[0], document_start=STARTS[0], training=True)
    assert np.all(to_numpy(layer.inference_memory.positions) == -1)
    layer(x[1], document_start=STARTS[0], training=False)
    train_positions = to_numpy(layer.train_memory.positions)
    assert np.sum(train_positions >= 0) == BATCH * SEGMENT
    layer(x[1], document_start=STARTS[0], training=False)
    np.testing.assert_array_equal(
        to_numpy(layer.train_memory.positions), train_positions
    )


def test_reset_state_empties_every_memory():
    layer = make_layer(use_xl_cache=True)
    for training in (True, False):
        layer(segments(1)[0], document_start=STARTS[0], training=training)
    layer.reset_state()
    for memory in (layer.train_memory, layer.inference_memory):
        assert np.all(to_numpy(memory.positions) == -1)
    for cache in (layer.train_cache, layer.inference_cache):
        assert not np.any(to_numpy(cache.mask))


@pytest.mark.parametrize(
    "use_xl_cache, smear_keys", [(False, False), (True, False), (True, True)]
)
def test_gradients_reach_weights_but_not_memory(use_xl_cache, smear_keys):
    layer = make_layer(use_xl_cache=use_xl_cache, smear_keys=smear_keys)
    x = segments(3)
    starts = [STARTS[0], STARTS[1], STARTS[1]]
    weights = np.random.default_rng(2).normal(size=x[0].shape).astype("float32")
    variable_grads, segment_grads = segment_gradients(layer, x, starts, weights)
    for variable, grad in zip(layer.trainable_variables, variable_grads):
        assert np.abs(grad).max() > 0, f"no gradient for {variable.path}"
    # Earlier segments reach the last one only through memory and cache.
    assert np.abs(segment_grads[0]).max() == 0
    assert np.abs(segment_grads[1]).max() == 0
    assert np.abs(segment_grads[2]).max() > 0


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


def test_get_config_round_trip():
    layer = KNNAttention(
        num_heads=4,
        head_dim=6,
        memory_size=64,
        num_neighbors=8,
        batch_size=2,
        use_xl_cache=True,
        num_buckets=16,
        max_distance=64,
        kernel_initializer="he_normal",
    )
    config = layer.get_config()
    clone = KNNAttention.from_config(config)
    assert clone.get_config() == config
    for name in ("num_heads", "head_dim", "memory_size", "num_neighbors"):
        assert config[name] == getattr(layer, name)


def test_compute_output_shape_and_symbolic_neighbors():
    layer = KNNAttention(num_heads=2, memory_size=32, num_neighbors=4)
    assert layer.compute_output_shape((2, 8, 12)) == (2, 8, 12)
    hidden = keras.Input((8, 12), batch_size=2)
    outputs, neighbors = layer(hidden, return_neighbors=True)
    assert outputs.shape == (2, 8, 12)
    assert neighbors.shape == (2, 8, 2, 4)
    assert neighbors.dtype == "int32"


class TestBadInput:
    def test_batch_size_differs_from_memory_lanes(self):
        layer = make_layer()
        with pytest.raises(ValueError, match="batch_size"):
            layer(np.zeros((BATCH + 1, SEGMENT, HIDDEN), "float32"))

    def test_hidden_states_wrong_rank(self):
        layer = make_layer()
        with pytest.raises(ValueError, match="hidden_states"):
            layer(np.zeros((BATCH, HIDDEN), "float32"))

    def test_document_start_wrong_rank(self):
        layer = make_layer()
        with pytest.raises(ValueError, match="document_start"):
            layer(
                np.zeros((BATCH, SEGMENT, HIDDEN), "float32"),
                document_start=np.zeros((BATCH, 1), bool),
            )

    def test_padding_mask_wrong_shape(self):
        layer = make_layer()
        with pytest.raises(ValueError, match="padding_mask"):
            layer(
                np.zeros((BATCH, SEGMENT, HIDDEN), "float32"),
                padding_mask=np.ones((BATCH,), bool),
            )

    def test_segment_longer_than_memory(self):
        layer = KNNAttention(num_heads=2, memory_size=4, num_neighbors=2)
        with pytest.raises(ValueError, match="memory_size"):
            layer(np.zeros((2, 8, 4), "float32"))

    def test_num_neighbors_above_memory_size(self):
        with pytest.raises(ValueError, match="num_neighbors"):
            KNNAttention(num_heads=2, memory_size=8, num_neighbors=9)

    def test_heads_do_not_divide_hidden_size(self):
        layer = KNNAttention(num_heads=3, memory_size=16, num_neighbors=2)
        with pytest.raises(ValueError, match="num_heads"):
            layer(np.zeros((2, 4, 10), "float32"))

    def test_unknown_batch_size(self):
        layer = KNNAttention(num_heads=2, memory_size=16, num_neighbors=2)
        with pytest.raises(ValueError, match="batch_size"):
            layer(keras.Input((4, 8)))

    @pytest.mark.parametrize(
        "name, value", [("num_heads", 0), ("memory_size", -1), ("batch_size", 0)]
    )
    def test_non_positive_sizes(self, name, value):
        config = dict(num_heads=2, memory_size=16, num_neighbors=2)
        config[name] = value
        with pytest.raises(ValueError, match=name):
            KNNAttention(**config)


# Smeared keys and padding (issue 8): a key mixes with the previous *real*
# token's key, carried across the segments of a lane (memory is lane state).

# Lane 0 pads a prefix, lane 1 the middle, lane 2 a suffix.
MIXED_PADDING = np.ones((BATCH, SEGMENT), bool)
MIXED_PADDING[0, :3] = False
MIXED_PADDING[1, [2, 3, 5]] = False
MIXED_PADDING[2, 6:] = False
# Step 2 restarts lane 1 and pads all of lane 2 (which keeps its last key).
SMEAR_PADDING = np.stack(
    [MIXED_PADDING, MIXED_PADDING[::-1], MIXED_PADDING, np.ones((BATCH, SEGMENT))]
).astype(bool)
SMEAR_PADDING[2, 2] = False


def check_smeared_keys_against_reference(use_xl_cache, inputs, starts, masks):
    layer = make_layer(
        use_xl_cache=use_xl_cache, smear_keys=True, max_distance=16, num_buckets=8
    )
    reference = NumpyKNNAttention(
        attention_weights(layer),
        batch_size=BATCH,
        memory_size=20,
        num_neighbors=5,
        use_xl_cache=use_xl_cache,
        num_buckets=8,
        max_distance=16,
    )
    for x, start, mask in zip(inputs, starts, masks):
        got, got_positions = layer(
            x, document_start=start, padding_mask=mask, return_neighbors=True
        )
        want, want_positions = reference(x, start, mask)
        np.testing.assert_allclose(to_numpy(got)[mask], want[mask], atol=1e-4)
        np.testing.assert_array_equal(
            np.sort(to_numpy(got_positions), axis=-1)[mask],
            np.sort(want_positions, axis=-1)[mask],
        )


@pytest.mark.parametrize("use_xl_cache", [False, True])
def test_smeared_keys_ignore_padded_hidden_states(use_xl_cache):
    inputs = segments(3, seed=3)
    noise = np.random.default_rng(4).normal(0.0, 10.0, inputs.shape)
    noisy = np.where(MIXED_PADDING[..., None], inputs, noise).astype("float32")
    runs = []
    for x in (inputs, noisy):
        layer = make_layer(use_xl_cache=use_xl_cache, smear_keys=True)
        outputs = [
            to_numpy(layer(segment, document_start=start, padding_mask=MIXED_PADDING))
            for segment, start in zip(x, STARTS)
        ]
        runs.append(([out[MIXED_PADDING] for out in outputs], stored_tokens(layer)))
    (outputs, stored), (noisy_outputs, noisy_stored) = runs
    for got, want in zip(noisy_outputs, outputs):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert stored.keys() == noisy_stored.keys()
    for name, want in stored.items():
        np.testing.assert_allclose(noisy_stored[name], want, atol=1e-5)


@pytest.mark.parametrize("use_xl_cache", [False, True])
def test_smeared_keys_continue_from_the_previous_segment(use_xl_cache):
    # The first real key of a continuing segment mixes with the lane's last
    # real key so far (memory keeps lane state); after a document start it
    # is not mixed. STARTS restarts lane 1 at step 2.
    check_smeared_keys_against_reference(
        use_xl_cache, segments(4, seed=5), STARTS, SMEAR_PADDING
    )


@given(
    use_xl_cache=st.booleans(),
    starts=hnp.arrays(bool, (3, BATCH)),
    masks=hnp.arrays(bool, (3, BATCH, SEGMENT)),
)
def test_smeared_keys_match_reference_for_any_padding(use_xl_cache, starts, masks):
    check_smeared_keys_against_reference(
        use_xl_cache, segments(3, seed=6), starts, masks
    )


def test_carried_keys_are_per_mode_state_and_not_saved():
    layer = make_layer(smear_keys=True)
    for training in (True, False):
        layer(segments(1)[0], document_start=STARTS[0], training=training)
    states = {"train": layer.train_last_key, "inference": layer.inference_last_key}
    for state in states.values():
        assert np.all(to_numpy(state.present))
    layer.reset_state(training=True)
    assert not np.any(to_numpy(states["train"].present))
    assert np.all(to_numpy(states["inference"].present))
    layer.reset_state()
    assert not np.any(to_numpy(states["inference"].present))
    for state in states.values():
        store = {}
        state.save_own_variables(store)
        assert store == {}

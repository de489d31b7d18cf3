"""The contract every attention layer keeps, run against each of them.

`CASES` (tests/layers/attention_cases.py) lists the layers (and
configurations) under test: a new attention layer is tested by adding one
line. What only one layer does (memory retrieval, gates, neighbours) stays
in that layer's own test file; bad input is checked in
tests/layers/test_attention_bad_input.py.

Each case is checked against the plain-NumPy statement of the layer
(`tests.numpy_reference`) over several segments, with document starts,
padding and, with memory, a ring buffer that wraps; smeared keys, padding,
per-mode lane state, gradients and configs are checked too.
"""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis.extra import numpy as hnp

from tests.arrays import filled_lanes
from tests.arrays import stored_tokens
from tests.gradients import segment_gradients
from tests.layers.attention_cases import BATCH
from tests.layers.attention_cases import MIXED_PADDING
from tests.layers.attention_cases import SEGMENT
from tests.layers.attention_cases import SMEAR_PADDING
from tests.layers.attention_cases import STARTS
from tests.layers.attention_cases import assert_same_tokens
from tests.layers.attention_cases import attend
from tests.layers.attention_cases import cases
from tests.layers.attention_cases import check_against_reference
from tests.layers.attention_cases import keeps_lane_state
from tests.layers.attention_cases import make_layer
from tests.layers.attention_cases import segments


@cases()
@pytest.mark.parametrize(
    "training, smear_keys", [(False, False), (True, False), (False, True)]
)
def test_matches_numpy_reference_over_segments(case, training, smear_keys):
    padding = np.ones((BATCH, SEGMENT), bool)
    padding[2, 5:] = False  # lane 2 pads the tail of its third segment
    masks = [None, None, padding, None, None]
    check_against_reference(
        make_layer(case, smear_keys=smear_keys), segments(5), STARTS, masks, training
    )


@cases()
def test_lane_state_changes_the_output_only_after_a_document_start(case):
    layer = make_layer(case)
    x = segments(1)[0]
    first, _ = attend(layer, x, STARTS[0])
    again, _ = attend(layer, x, STARTS[0])
    np.testing.assert_allclose(first, again, atol=1e-6)
    continued, _ = attend(layer, x)
    if keeps_lane_state(layer):  # the cache or memory now holds `x`
        assert np.abs(continued - first).max() > 1e-3
    else:
        np.testing.assert_allclose(continued, first, atol=1e-6)


@cases()
def test_lane_inputs_may_be_python_bools_and_lists(case):
    # A Python or NumPy bool flags every lane; lists of bools are arrays.
    x = segments(3, seed=10)
    given = [
        (True, MIXED_PADDING.tolist()),
        (np.False_, None),
        ([False, True, False], None),
    ]
    arrays = [(np.ones(BATCH, bool), MIXED_PADDING), (np.zeros(BATCH, bool), None)]
    arrays.append((np.array([False, True, False]), None))
    runs = []
    for steps in (given, arrays):
        layer = make_layer(case)
        runs.append(
            [attend(layer, segment, *step)[0] for segment, step in zip(x, steps)]
        )
    for got, want in zip(*runs):
        np.testing.assert_allclose(got, want, atol=1e-6)


# Smeared keys and padding (issue 8): a key mixes with the previous *real*
# token's key, carried across the segments of a lane when the layer keeps
# lane state (XL cache or memory).


@cases()
@pytest.mark.parametrize("smear_keys", [False, True])
def test_padded_hidden_states_never_reach_outputs_or_lane_state(case, smear_keys):
    inputs = segments(3, seed=3)
    noise = np.random.default_rng(4).normal(0.0, 10.0, inputs.shape)
    noisy = np.where(MIXED_PADDING[..., None], inputs, noise).astype("float32")
    runs = []
    for x in (inputs, noisy):
        layer = make_layer(case, smear_keys=smear_keys)
        outputs = [
            attend(layer, segment, start, MIXED_PADDING)[0][MIXED_PADDING]
            for segment, start in zip(x, STARTS)
        ]
        runs.append((outputs, stored_tokens(layer)))
    (outputs, stored), (noisy_outputs, noisy_stored) = runs
    for got, want in zip(noisy_outputs, outputs):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert_same_tokens(noisy_stored, stored, atol=1e-5)


@cases()
def test_a_query_that_sees_no_real_key_attends_to_nothing(case):
    # Lane 0 pads the first 3 tokens of a new document: those queries have
    # no real key before them (and no cache or memory yet), so their output
    # is exactly zero, whatever the padded tokens hold.
    x = segments(1, seed=7)[0]
    noise = np.random.default_rng(8).normal(0.0, 10.0, x.shape).astype("float32")
    for padded_values in (x, noise):
        inputs = np.where(MIXED_PADDING[..., None], x, padded_values)
        outputs, _ = attend(make_layer(case), inputs, STARTS[0], MIXED_PADDING)
        np.testing.assert_array_equal(outputs[0, :3], 0.0)
        assert np.all(np.abs(outputs[MIXED_PADDING]) > 0)


@cases()
def test_smeared_keys_continue_from_the_previous_segment(case):
    # With lane state the first real key of a continuing segment mixes with
    # the lane's last real key so far; without, or after a document start,
    # it is not mixed. STARTS restarts lane 1 at step 2.
    layer = make_layer(case, smear_keys=True)
    check_against_reference(layer, segments(4, seed=5), STARTS, SMEAR_PADDING)


# Half the profile's examples per case: each layer gets the full budget
# over its two cases (without and with the XL cache), as before.
@cases()
@settings(max_examples=max(1, settings.default.max_examples // 2))
@given(starts=hnp.arrays(bool, (3, BATCH)), masks=hnp.arrays(bool, (3, BATCH, SEGMENT)))
def test_smeared_keys_match_reference_for_any_padding(case, starts, masks):
    layer = make_layer(case, smear_keys=True)
    check_against_reference(layer, segments(3, seed=6), starts, masks)


@cases()
def test_lane_state_is_per_mode_and_not_saved(case):
    layer = make_layer(case, smear_keys=True)
    assert layer.lane_states(True).keys() == layer.lane_states(False).keys()
    x = segments(2)
    layer(x[0], document_start=STARTS[0], training=True)
    trained = stored_tokens(layer, training=True)
    for name in ("cache_keys", "memory_keys"):
        if name in trained:  # one full segment per lane
            assert len(trained[name]) == BATCH * SEGMENT, name
    assert not any(lanes.any() for lanes in filled_lanes(layer, False).values())
    layer(x[1], document_start=STARTS[0], training=False)
    assert_same_tokens(stored_tokens(layer, training=True), trained, atol=0)
    for training in (True, False):
        assert all(lanes.all() for lanes in filled_lanes(layer, training).values())
    layer.reset_state(training=True)
    assert not any(lanes.any() for lanes in filled_lanes(layer, True).values())
    assert all(lanes.all() for lanes in filled_lanes(layer, False).values())
    layer.reset_state()
    assert not any(lanes.any() for lanes in filled_lanes(layer, False).values())
    for training in (True, False):
        for state in layer.lane_states(training).values():
            store = {}
            state.save_own_variables(store)
            assert store == {}


@cases()
@pytest.mark.parametrize("smear_keys", [False, True])
def test_gradients_reach_weights_but_not_lane_state(case, smear_keys):
    layer = make_layer(case, smear_keys=smear_keys)
    x = segments(3)
    weights = np.random.default_rng(2).normal(size=x[0].shape).astype("float32")
    variable_grads, segment_grads = segment_gradients(
        layer, x, STARTS[[0, 1, 1]], weights
    )
    for variable, grad in zip(layer.trainable_variables, variable_grads):
        assert np.abs(grad).max() > 0, f"no gradient for {variable.path}"
    # Earlier segments reach the last one only through lane state.
    assert np.abs(segment_grads[0]).max() == 0
    assert np.abs(segment_grads[1]).max() == 0
    assert np.abs(segment_grads[2]).max() > 0


@cases()
def test_get_config_round_trip(case):
    # The SegmentAttention arguments away from their defaults.
    options = {"num_heads": 4, "head_dim": 6, "batch_size": 2, "num_buckets": 16}
    options.update(max_distance=64, kernel_initializer="he_normal")
    layer = case(smear_keys=True, tie_query_key_init=True, **options)
    config = layer.get_config()
    assert type(layer).from_config(config).get_config() == config
    for name in ("num_heads", "head_dim", "batch_size", "use_xl_cache"):
        assert config[name] == getattr(layer, name)


@cases()
def test_compute_output_shape_and_symbolic_call(case):
    layer = case(num_heads=2)
    assert layer.compute_output_shape((2, 8, 12)) == (2, 8, 12)
    assert layer(keras.Input((8, 12), batch_size=2)).shape == (2, 8, 12)

"""The contract every attention layer keeps, run against each of them.

`CASES` lists the layers (and configurations) under test: a new attention
layer is tested by adding one line. What only one layer does (memory
retrieval, gates, neighbours) stays in that layer's own test file, which
takes its helpers from here.

Each case is checked against the plain-NumPy statement of the layer
(`tests.numpy_reference`) over several segments, with document starts,
padding and, with memory, a ring buffer that wraps; smeared keys, padding,
per-mode lane state, gradients, bad inputs and configs are checked too.
"""

import functools

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis.extra import numpy as hnp

from keras_memtrans import KNNAttention
from keras_memtrans.layers.attention_functions import check_lane_inputs
from keras_memtrans.layers.segment_attention import SegmentAttention
from tests.arrays import attention_weights
from tests.arrays import filled_lanes
from tests.arrays import stored_tokens
from tests.arrays import to_numpy
from tests.gradients import segment_gradients
from tests.numpy_reference import NumpyKNNAttention

BATCH, SEGMENT, HIDDEN, HEADS = 3, 8, 16, 2

# memory_size 20 with segments of 8: over 5 segments the ring wraps
# mid-segment and lanes that do not restart overflow (40 tokens).
EXACT_MEMORY = dict(memory_kind="exact", memory_size=20, num_neighbors=5)


def grouped_query(make):
    """`make` with twice the query heads asked for, in groups of 2 sharing
    a key and value head (grouped-query attention): `num_heads=2` gives 4
    query heads reading 2 key and value heads."""

    def make_grouped(num_heads, **options):
        return make(num_heads=2 * num_heads, num_key_value_heads=num_heads, **options)

    return make_grouped


# One line per layer and configuration: an unbuilt layer's constructor.
CASES = {
    "segment": SegmentAttention,
    "segment_xl": functools.partial(SegmentAttention, use_xl_cache=True),
    "segment_grouped": grouped_query(SegmentAttention),
    "knn": functools.partial(KNNAttention, **EXACT_MEMORY),
    "knn_xl": functools.partial(KNNAttention, use_xl_cache=True, **EXACT_MEMORY),
    "knn_xl_grouped": grouped_query(
        functools.partial(KNNAttention, use_xl_cache=True, **EXACT_MEMORY)
    ),
}


def cases(where=None):
    """Parametrises a test's `case` over the `CASES` whose unbuilt layer
    satisfies `where` (all by default)."""
    chosen = {
        name: make
        for name, make in CASES.items()
        if where is None or where(make(num_heads=HEADS))
    }
    return pytest.mark.parametrize("case", list(chosen.values()), ids=list(chosen))


def keeps_lane_state(layer):
    """Whether `layer` keeps per-lane state (XL cache or memory)."""
    return layer.needs_fixed_batch


def make_layer(case, **options):
    """A `case` layer built for `[BATCH, SEGMENT, HIDDEN]` with random,
    non-degenerate weights (attention scales in [1, 6])."""
    options = dict(num_heads=HEADS, num_buckets=8, max_distance=16, **options)
    layer = case(**options)
    layer.build((BATCH, SEGMENT, HIDDEN))
    rng = np.random.default_rng(0)
    for variable in layer.trainable_variables:
        shape = tuple(variable.shape)
        if variable.path.endswith("attention_scale"):
            value = rng.uniform(1.0, 6.0, shape)
        else:
            value = rng.normal(0.0, 0.5, shape)
        variable.assign(value.astype("float32"))
    return layer


def segments(count, seed=1):
    """`count` random segments `[BATCH, SEGMENT, HIDDEN]`, stacked."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(count, BATCH, SEGMENT, HIDDEN)).astype("float32")


# Segment 0 starts every document, segment 2 restarts lane 1 only.
STARTS = np.array([[1, 1, 1], [0, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0]], bool)

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


def attend(layer, x, start=None, mask=None, training=False):
    """`(outputs, positions)` of one call as NumPy arrays; `positions` are
    the retrieved neighbours of a layer with memory, else `None`."""
    call = functools.partial(
        layer, x, document_start=start, padding_mask=mask, training=training
    )
    if "memory" not in layer.lane_states(training):
        return to_numpy(call()), None
    outputs, positions = call(return_neighbors=True)
    return to_numpy(outputs), to_numpy(positions)


def reference_for(layer):
    """The NumPy reference with `layer`'s weights and settings."""
    memory = layer.lane_states().get("memory")
    return NumpyKNNAttention(
        attention_weights(layer),
        batch_size=BATCH,
        memory_size=SEGMENT if memory is None else memory.memory_size,
        num_neighbors=getattr(layer, "num_neighbors", 1),
        use_xl_cache=layer.use_xl_cache,
        num_buckets=layer.num_buckets,
        max_distance=layer.max_distance,
        use_memory=memory is not None,
    )


def check_against_reference(layer, inputs, starts, masks, training=False):
    """Feeds the segments to `layer` and to the NumPy reference.

    Compares the real tokens' outputs and, with memory, the positions they
    retrieve, after every segment; with an XL cache, the cached keys after
    the last one. A mask `None` pads nothing.
    """
    reference = reference_for(layer)
    for x, start, mask in zip(inputs, starts, masks):
        got, got_positions = attend(layer, x, start, mask, training)
        want, want_positions = reference(x, start, mask)
        valid = np.ones((BATCH, SEGMENT), bool) if mask is None else mask
        np.testing.assert_allclose(got[valid], want[valid], atol=1e-4)
        if got_positions is not None:
            np.testing.assert_array_equal(
                np.sort(got_positions, axis=-1)[valid],
                np.sort(want_positions, axis=-1)[valid],
            )
    if layer.use_xl_cache:  # the cached keys are the smeared ones
        got_keys = stored_tokens(layer, training)["cache_keys"]
        cached = [entry for lane in reference.cache for entry in lane if entry]
        assert len(got_keys) == len(cached)
        for got_key, (want_key, _) in zip(got_keys, cached):
            np.testing.assert_allclose(got_key, want_key, atol=1e-5)


def assert_same_tokens(got, want, atol):
    """Two `stored_tokens` dicts hold the same tokens."""
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, atol=atol, err_msg=name)


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


class TestBadInput:
    @cases()
    def test_hidden_states_wrong_rank(self, case):
        with pytest.raises(ValueError, match="hidden_states"):
            make_layer(case)(np.zeros((BATCH, HIDDEN), "float32"))

    @cases()
    @pytest.mark.parametrize(
        "name, value",
        [
            ("document_start", np.zeros((BATCH, 1), bool)),
            ("padding_mask", np.ones((BATCH,), bool)),
        ],
    )
    def test_lane_input_wrong_shape(self, case, name, value):
        x = np.zeros((BATCH, SEGMENT, HIDDEN), "float32")
        with pytest.raises(ValueError, match=name):
            make_layer(case)(x, **{name: value})

    @cases()
    @pytest.mark.parametrize(
        "name, value, dtype",
        [
            ("document_start", np.full((BATCH,), 0.5, "float32"), "float32"),
            ("document_start", np.ones((BATCH,), "int32"), "int32"),
            ("document_start", [1, 0, 1], "int32"),
            ("document_start", 1, "int"),
            ("document_start", 0.5, "float"),
            ("padding_mask", np.ones((BATCH, SEGMENT), "float32"), "float32"),
            ("padding_mask", np.ones((BATCH, SEGMENT), "uint8"), "uint8"),
        ],
    )
    def test_lane_input_not_bool(self, case, name, value, dtype):
        # A float flag of 0.5 used to reset its lanes; a Python bool or
        # number raised an AttributeError.
        x = np.zeros((BATCH, SEGMENT, HIDDEN), "float32")
        with pytest.raises(ValueError, match=f"`{name}` must be bool.*got {dtype}"):
            make_layer(case)(x, **{name: value})

    def test_one_bool_needs_a_static_shape(self):
        # As in a step traced for any batch size.
        with pytest.raises(ValueError, match="`document_start` is one bool"):
            check_lane_inputs((None, SEGMENT, HIDDEN), True, None)

    @cases()
    def test_heads_do_not_divide_hidden_size(self, case):
        with pytest.raises(ValueError, match="num_heads"):
            case(num_heads=3)(np.zeros((2, 4, 10), "float32"))

    @cases()
    @pytest.mark.parametrize("name", ["num_heads", "head_dim", "batch_size"])
    def test_non_positive_sizes(self, case, name):
        options = {"num_heads": 2, name: 0}
        with pytest.raises(ValueError, match=name):
            case(**options)

    @cases(keeps_lane_state)
    def test_batch_size_differs_from_the_lanes(self, case):
        with pytest.raises(ValueError, match="batch_size"):
            make_layer(case)(np.zeros((BATCH + 1, SEGMENT, HIDDEN), "float32"))

    @cases(keeps_lane_state)
    def test_unknown_batch_size(self, case):
        with pytest.raises(ValueError, match="batch_size"):
            case(num_heads=2)(keras.Input((4, 8)))

    @cases(lambda layer: layer.use_xl_cache)
    def test_xl_cache_rejects_another_segment_length(self, case):
        with pytest.raises(ValueError, match="segment"):
            make_layer(case)(np.ones((BATCH, SEGMENT + 1, HIDDEN), "float32"))

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_memtrans.layers.segment_attention import SegmentAttention
from tests.arrays import attention_weights
from tests.arrays import stored_tokens
from tests.arrays import to_numpy
from tests.numpy_reference import NumpyKNNAttention

BATCH, SEGMENT, HIDDEN = 3, 8, 16


def randomized_layer(**kwargs):
    layer = SegmentAttention(num_heads=2, num_buckets=8, max_distance=16, **kwargs)
    layer.build((BATCH, SEGMENT, HIDDEN))
    rng = np.random.default_rng(0)
    for variable in layer.trainable_variables:
        value = rng.normal(0.0, 0.5, tuple(variable.shape))
        if variable.path.endswith("attention_scale"):
            value = rng.uniform(1.0, 6.0, tuple(variable.shape))
        variable.assign(value.astype("float32"))
    return layer


@pytest.mark.parametrize(
    "use_xl_cache, smear_keys", [(False, False), (True, False), (True, True)]
)
def test_matches_numpy_reference_over_segments(use_xl_cache, smear_keys):
    layer = randomized_layer(use_xl_cache=use_xl_cache, smear_keys=smear_keys)
    reference = NumpyKNNAttention(
        attention_weights(layer),
        batch_size=BATCH,
        memory_size=SEGMENT,
        num_neighbors=1,
        use_xl_cache=use_xl_cache,
        num_buckets=8,
        max_distance=16,
        use_memory=False,
    )
    rng = np.random.default_rng(1)
    starts = [np.ones(BATCH, bool), np.zeros(BATCH, bool), np.array([0, 1, 0], bool)]
    padding = np.ones((BATCH, SEGMENT), bool)
    padding[0, 6:] = False
    for step, start in enumerate(starts):
        x = rng.normal(size=(BATCH, SEGMENT, HIDDEN)).astype("float32")
        mask = padding if step == 1 else None
        got = to_numpy(layer(x, document_start=start, padding_mask=mask))
        want, _ = reference(x, start, mask)
        valid = np.ones((BATCH, SEGMENT), bool) if mask is None else mask
        np.testing.assert_allclose(got[valid], want[valid], atol=1e-4)


def test_without_cache_any_batch_size_works():
    layer = SegmentAttention(num_heads=2)
    assert layer(np.ones((1, 4, 8), "float32")).shape == (1, 4, 8)
    assert layer(np.ones((5, 4, 8), "float32")).shape == (5, 4, 8)


def test_xl_cache_attends_to_the_previous_segment_of_the_lane():
    layer = randomized_layer(use_xl_cache=True)
    rng = np.random.default_rng(2)
    first, second = rng.normal(size=(2, BATCH, SEGMENT, HIDDEN)).astype("float32")
    start = np.ones(BATCH, bool)
    layer(first, document_start=start)
    continued = to_numpy(layer(second))
    restarted = to_numpy(layer(second, document_start=start))
    assert np.abs(continued - restarted).max() > 1e-3


def test_xl_cache_needs_a_fixed_batch_size():
    import keras

    layer = SegmentAttention(num_heads=2, use_xl_cache=True)
    with pytest.raises(ValueError, match="batch_size"):
        layer(keras.Input((4, 8)))


def test_xl_cache_rejects_another_segment_length():
    layer = randomized_layer(use_xl_cache=True)
    with pytest.raises(ValueError, match="segment"):
        layer(np.ones((BATCH, SEGMENT + 1, HIDDEN), "float32"))


def test_get_config_round_trip():
    layer = SegmentAttention(num_heads=4, head_dim=8, batch_size=2, use_xl_cache=True)
    config = layer.get_config()
    assert SegmentAttention.from_config(config).get_config() == config


# Smeared keys and padding (issue 8): a key mixes with the previous *real*
# token's key, carried across the segments of a lane with the XL cache.

# Lane 0 pads a prefix, lane 1 the middle, lane 2 a suffix.
MIXED_PADDING = np.ones((BATCH, SEGMENT), bool)
MIXED_PADDING[0, :3] = False
MIXED_PADDING[1, [2, 3, 5]] = False
MIXED_PADDING[2, 6:] = False
# Step 2 restarts lane 1 and pads all of lane 2 (which keeps its last key).
SMEAR_STARTS = np.array([[1, 1, 1], [0, 0, 0], [0, 1, 0], [0, 0, 0]], bool)
SMEAR_PADDING = np.stack(
    [MIXED_PADDING, MIXED_PADDING[::-1], MIXED_PADDING, np.ones((BATCH, SEGMENT))]
).astype(bool)
SMEAR_PADDING[2, 2] = False


def run_segments(layer, inputs, starts, masks):
    """Real tokens' outputs of each segment and the stored tokens after."""
    outputs = [
        to_numpy(layer(x, document_start=start, padding_mask=mask))[mask]
        for x, start, mask in zip(inputs, starts, masks)
    ]
    return outputs, stored_tokens(layer)


def check_smeared_keys_against_reference(use_xl_cache, inputs, starts, masks):
    layer = randomized_layer(use_xl_cache=use_xl_cache, smear_keys=True)
    reference = NumpyKNNAttention(
        attention_weights(layer),
        batch_size=BATCH,
        memory_size=SEGMENT,
        num_neighbors=1,
        use_xl_cache=use_xl_cache,
        num_buckets=8,
        max_distance=16,
        use_memory=False,
    )
    for x, start, mask in zip(inputs, starts, masks):
        got = to_numpy(layer(x, document_start=start, padding_mask=mask))
        want, _ = reference(x, start, mask)
        np.testing.assert_allclose(got[mask], want[mask], atol=1e-4)
    if use_xl_cache:  # the cached keys are the smeared ones
        got_keys = stored_tokens(layer)["cache_keys"]
        cached = [entry for lane in reference.cache for entry in lane if entry]
        assert len(got_keys) == len(cached)
        for got_key, (want_key, _) in zip(got_keys, cached):
            np.testing.assert_allclose(got_key, want_key, atol=1e-5)


@pytest.mark.parametrize("use_xl_cache", [False, True])
def test_smeared_keys_ignore_padded_hidden_states(use_xl_cache):
    inputs = np.random.default_rng(3).normal(size=(3, BATCH, SEGMENT, HIDDEN))
    noise = np.random.default_rng(4).normal(0.0, 10.0, inputs.shape)
    starts = SMEAR_STARTS[[0, 1, 1]]
    masks = [MIXED_PADDING] * 3
    runs = []
    for x in (inputs, np.where(MIXED_PADDING[..., None], inputs, noise)):
        layer = randomized_layer(use_xl_cache=use_xl_cache, smear_keys=True)
        runs.append(run_segments(layer, x.astype("float32"), starts, masks))
    (outputs, stored), (noisy_outputs, noisy_stored) = runs
    for got, want in zip(noisy_outputs, outputs):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert stored.keys() == noisy_stored.keys()
    for name, want in stored.items():
        np.testing.assert_allclose(noisy_stored[name], want, atol=1e-5)


@pytest.mark.parametrize("use_xl_cache", [False, True])
def test_smeared_keys_continue_from_the_previous_segment(use_xl_cache):
    # With the XL cache the first real key of a continuing segment mixes
    # with the lane's last real key so far; without, or after a document
    # start, it is not mixed.
    inputs = np.random.default_rng(5).normal(size=(4, BATCH, SEGMENT, HIDDEN))
    check_smeared_keys_against_reference(
        use_xl_cache, inputs.astype("float32"), SMEAR_STARTS, SMEAR_PADDING
    )


@given(
    use_xl_cache=st.booleans(),
    starts=hnp.arrays(bool, (3, BATCH)),
    masks=hnp.arrays(bool, (3, BATCH, SEGMENT)),
)
def test_smeared_keys_match_reference_for_any_padding(use_xl_cache, starts, masks):
    inputs = np.random.default_rng(6).normal(size=(3, BATCH, SEGMENT, HIDDEN))
    check_smeared_keys_against_reference(
        use_xl_cache, inputs.astype("float32"), starts, masks
    )

import numpy as np
import pytest

from keras_memtrans.layers.segment_attention import SegmentAttention
from tests.arrays import attention_weights
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

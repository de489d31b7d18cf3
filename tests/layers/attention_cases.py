"""The attention layers under test and the helpers their tests share.

`CASES` lists the layers (and configurations) that
tests/layers/test_attention_contract.py and test_attention_bad_input.py
check: a new attention layer is tested by adding one line. A layer's own
test file (memory retrieval, gates, neighbours) takes its helpers from
here too.
"""

import functools

import numpy as np
import pytest

from keras_memtrans import KNNAttention
from keras_memtrans.layers.segment_attention import SegmentAttention
from tests.arrays import attention_weights
from tests.arrays import stored_tokens
from tests.arrays import to_numpy
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

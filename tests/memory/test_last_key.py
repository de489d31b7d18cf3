import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_memtrans.memory.last_key import LastKey
from keras_memtrans.memory.last_key import previous_real_keys
from keras_memtrans.memory.segment_cache import SegmentCache
from tests.arrays import to_numpy
from tests.memory.memories import rewrite_npz

BATCH, HEADS, DIM = 3, 2, 4


def make_state(**options):
    state = LastKey(batch_size=BATCH, num_heads=HEADS, head_dim=DIM, **options)
    state.build()
    return state


def read_state(state):
    keys, present = state.read()
    return to_numpy(keys), to_numpy(present)


@st.composite
def steps(draw):
    """Writes `("write", keys, found)` and resets `("reset", flags)`."""
    plan = []
    for _ in range(draw(st.integers(1, 8))):
        flags = np.array(draw(st.lists(st.booleans(), min_size=BATCH, max_size=BATCH)))
        if draw(st.booleans()):
            seed = draw(st.integers(0, 2**16))
            keys = np.random.default_rng(seed).normal(size=(BATCH, HEADS, DIM))
            plan.append(("write", keys.astype("float32"), flags))
        else:
            plan.append(("reset", flags))
    return plan


@settings(max_examples=20, deadline=None)
@given(steps())
def test_carries_each_lanes_last_written_key_until_its_reset(plan):
    state = make_state()
    carried = [None] * BATCH  # the reference: a key per lane, or none
    for step in plan:
        if step[0] == "write":
            _, keys, found = step
            state.write(keys, found)
            for lane in np.flatnonzero(found):
                carried[lane] = keys[lane]
        else:
            state.reset(step[1])
            for lane in np.flatnonzero(step[1]):
                carried[lane] = None
    keys, present = read_state(state)
    np.testing.assert_array_equal(present, [key is not None for key in carried])
    for lane, key in enumerate(carried):
        want = np.zeros((HEADS, DIM)) if key is None else key
        np.testing.assert_array_equal(keys[lane], want)


def reference_previous_real_keys(keys, padding_mask, carried):
    """Loops over lanes and tokens: the last real key before each token."""
    previous = np.zeros_like(keys)
    last, found = np.zeros_like(keys[:, 0]), np.zeros(len(keys), bool)
    for lane in range(len(keys)):
        key = carried[lane]
        for token in range(keys.shape[1]):
            previous[lane, token] = key
            if padding_mask[lane, token]:
                key = keys[lane, token]
                last[lane], found[lane] = key, True
    return previous, last, found


@settings(max_examples=20, deadline=None)
@given(
    mask=st.lists(st.booleans(), min_size=BATCH * 5, max_size=BATCH * 5),
    seed=st.integers(0, 2**16),
    length=st.integers(1, 5),  # 1: a generated token on its own
    with_carried=st.booleans(),
)
def test_previous_real_keys_skip_padding_and_start_from_the_carried_key(
    mask, seed, length, with_carried
):
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(BATCH, length, HEADS, DIM)).astype("float32")
    carried = rng.normal(size=(BATCH, HEADS, DIM)).astype("float32")
    if not with_carried:
        carried *= 0  # what `carried=None` stands for
    padding_mask = np.array(mask).reshape(BATCH, 5)[:, :length]
    previous, last, found = (
        to_numpy(x)
        for x in previous_real_keys(
            keys, padding_mask, carried if with_carried else None
        )
    )
    want_previous, want_last, want_found = reference_previous_real_keys(
        keys, padding_mask, carried
    )
    np.testing.assert_array_equal(previous, want_previous)
    np.testing.assert_array_equal(found, want_found)
    # The last key of a lane without a real token is arbitrary, and unused.
    np.testing.assert_array_equal(last[found], want_last[found])


def written_state():
    state = make_state()
    keys = np.random.default_rng(0).normal(size=(BATCH, HEADS, DIM))
    state.write(keys.astype("float32"), np.array([True, False, True]))
    return state


def test_save_and_load_restore_the_carried_keys(tmp_path):
    state = written_state()
    state.save(tmp_path / "last_key.npz")
    restored = LastKey(batch_size=BATCH, num_heads=HEADS, head_dim=DIM)
    restored.load(tmp_path / "last_key.npz")  # builds it
    for got, want in zip(read_state(restored), read_state(state)):
        np.testing.assert_array_equal(got, want)
    assert read_state(restored)[1].tolist() == [True, False, True]


@pytest.mark.parametrize(
    "source, changes, match",
    [
        (dict(num_heads=HEADS + 1), {}, f"`num_heads` {HEADS + 1}, this one {HEADS}"),
        (dict(batch_size=BATCH + 1), {}, "`batch_size`"),
        ("cache", {}, "holds SegmentCache, not LastKey"),
        ({}, {"present": np.ones(BATCH, "int32")}, "`present`"),
        ({}, {"keys": np.zeros((BATCH, HEADS))}, "`keys`"),
        ({}, {"state_class": None}, "not a saved LastKey"),
    ],
    ids=["heads", "batch", "other_state", "int_present", "keys_shape", "no_class"],
)
def test_a_failed_load_leaves_the_state_unchanged(tmp_path, source, changes, match):
    path = tmp_path / "last_key.npz"
    sizes = dict(batch_size=BATCH, num_heads=HEADS, head_dim=DIM)
    if source == "cache":
        SegmentCache(cache_length=2, **sizes).save(path)
    else:
        LastKey(**{**sizes, **source}).save(path)
    rewrite_npz(path, **changes)
    state = written_state()
    before = read_state(state)
    with pytest.raises(ValueError, match=match):
        state.load(path)
    for got, want in zip(read_state(state), before):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["batch_size", "num_heads", "head_dim"])
def test_rejects_non_positive_sizes(name):
    sizes = dict(batch_size=BATCH, num_heads=HEADS, head_dim=DIM)
    with pytest.raises(ValueError, match=name):
        LastKey(**{**sizes, name: 0})


def test_config_round_trip_and_no_saved_weights():
    state = written_state()
    config = state.get_config()
    assert LastKey.from_config(config).get_config() == config
    store = {}
    state.save_own_variables(store)
    assert store == {}


def test_a_non_finite_key_is_never_carried():
    state = LastKey(batch_size=2, num_heads=1, head_dim=2)
    state.build()
    state.write(np.ones((2, 1, 2), "float32"), np.array([True, True]))
    keys = np.full((2, 1, 2), 5.0, "float32")
    keys[0, 0, 1] = np.nan
    state.write(keys, np.array([True, True]))
    carried, present = (to_numpy(x) for x in state.read())
    np.testing.assert_array_equal(carried[:, 0], [[1.0, 1.0], [5.0, 5.0]])
    np.testing.assert_array_equal(present, [True, True])

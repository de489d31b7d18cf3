import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from keras import ops

from keras_memtrans.memory.ring_buffer import RingBuffer
from keras_memtrans.memory.ring_buffer import document_lengths_after
from keras_memtrans.memory.ring_buffer import document_positions
from keras_memtrans.memory.ring_buffer import next_slot_after
from keras_memtrans.memory.ring_buffer import written_slots
from tests.arrays import to_numpy
from tests.memory.memories import FifoReference

HEADS, DIM = 2, 3


@st.composite
def write_plans(draw):
    """Sizes and steps `(reset flags, padding mask or None, segment length)`."""
    batch = draw(st.integers(1, 3))
    memory_size = draw(st.integers(1, 12))
    steps = []
    for _ in range(draw(st.integers(1, 8))):
        segment = draw(st.integers(1, memory_size))
        resets = draw(st.lists(st.booleans(), min_size=batch, max_size=batch))
        mask = draw(
            st.none()
            | st.lists(
                st.booleans(), min_size=batch * segment, max_size=batch * segment
            )
        )
        if mask is not None:
            mask = np.array(mask).reshape(batch, segment)
        steps.append((resets, mask, segment))
    return batch, memory_size, steps


@given(write_plans())
def test_ring_buffer_is_a_fifo_per_lane(plan):
    batch, memory_size, steps = plan
    buffer = RingBuffer(batch, HEADS, DIM, memory_size)
    reference = FifoReference(batch, memory_size)
    rng = np.random.default_rng(0)
    written = 0
    for resets, mask, segment in steps:
        buffer.reset(np.array(resets))
        reference.reset(resets)
        keys = rng.normal(size=(batch, segment, HEADS, DIM)).astype("float32")
        values = rng.normal(size=keys.shape).astype("float32")
        full = np.ones((batch, segment), bool) if mask is None else mask
        slots = buffer.write(keys, values, full)
        reference.append(keys, values, mask)
        np.testing.assert_array_equal(
            slots, (written + np.arange(segment)) % memory_size
        )
        written += segment
        for lane in range(batch):
            want = reference.entries(lane)
            filled = np.flatnonzero(buffer.positions[lane] >= 0)
            assert sorted(buffer.positions[lane, filled]) == sorted(want)
            for slot in filled:
                key, value = want[buffer.positions[lane, slot]]
                np.testing.assert_array_equal(buffer.keys[lane, :, slot], key)
                np.testing.assert_array_equal(buffer.values[lane, :, slot], value)
        np.testing.assert_array_equal(
            buffer.entries(), [len(reference.entries(lane)) for lane in range(batch)]
        )
        np.testing.assert_array_equal(buffer.document_length, reference.lengths)


def test_gather_returns_the_entries_and_minus_one_for_missing_slots():
    buffer = RingBuffer(2, 1, 2, 4)
    keys = np.arange(16, dtype="float32").reshape(2, 4, 1, 2)
    buffer.write(keys, -keys, np.array([[True, False, True, True]] * 2))
    slots = np.array([[3, -1], [1, 0]])[:, None, None, :]  # [batch, 1, 1, k]
    got_keys, got_values, positions = buffer.gather(slots)
    np.testing.assert_array_equal(positions[:, 0, 0], [[2, -1], [-1, 0]])
    np.testing.assert_array_equal(got_keys[0, 0, 0, 0], keys[0, 3, 0])
    np.testing.assert_array_equal(got_values[1, 0, 0, 1], -keys[1, 0, 0])


def test_state_round_trip():
    buffer = RingBuffer(2, HEADS, DIM, 5)
    keys = np.random.default_rng(1).normal(size=(2, 7, HEADS, DIM))
    buffer.write(keys, 2 * keys, np.random.default_rng(2).random((2, 7)) > 0.3)
    buffer.reset(np.array([True, False]))
    restored = RingBuffer.from_state(buffer.state_arrays())
    for name, array in buffer.state_arrays().items():
        np.testing.assert_array_equal(restored.state_arrays()[name], array)
    assert restored.next_slot == buffer.next_slot == 2


def test_arithmetic_helpers_agree_on_numpy_and_keras_ops():
    # ExactMemory runs them on keras.ops, RingBuffer on NumPy.
    mask = np.array([[1, 0, 1, 1], [0, 0, 1, 0]], "int32")
    length = np.array([5, 0], "int32")
    for xp, convert in ((np, np.asarray), (ops, ops.convert_to_tensor)):
        np.testing.assert_array_equal(
            to_numpy(written_slots(convert(np.int32(3)), 4, 5, xp=xp)), [3, 4, 0, 1]
        )
        np.testing.assert_array_equal(
            to_numpy(document_positions(convert(length), convert(mask), xp=xp)),
            [[5, -1, 6, 7], [-1, -1, 0, -1]],
        )
        np.testing.assert_array_equal(
            to_numpy(document_lengths_after(convert(length), convert(mask), xp=xp)),
            [8, 1],
        )
    assert next_slot_after(3, 4, 5) == 2

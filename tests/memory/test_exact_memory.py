import keras
import numpy as np

from keras_memtrans import ExactMemory
from tests.arrays import to_numpy


def test_padded_tokens_advance_the_ring_but_not_the_document():
    memory = ExactMemory(batch_size=1, num_heads=1, head_dim=2, memory_size=4)
    memory.build()
    keys = np.ones((1, 3, 1, 2), "float32")
    memory.append(keys, keys, padding_mask=np.array([[True, False, True]]))
    assert int(to_numpy(memory.next_slot)) == 3
    np.testing.assert_array_equal(to_numpy(memory.document_length), [2])
    np.testing.assert_array_equal(to_numpy(memory.positions)[0], [0, -1, 1, -1])


def test_reset_marks_slots_empty_and_rewinds_the_document_only():
    memory = ExactMemory(batch_size=3, num_heads=1, head_dim=2, memory_size=4)
    memory.build()
    memory.append(np.ones((3, 2, 1, 2), "float32"), np.ones((3, 2, 1, 2), "float32"))
    memory.reset(np.array([False, True, False]))
    filled = (to_numpy(memory.positions) >= 0).sum(axis=1)  # per lane
    np.testing.assert_array_equal(filled, [2, 0, 2])
    np.testing.assert_array_equal(to_numpy(memory.document_length), [2, 0, 2])
    assert int(to_numpy(memory.next_slot)) == 2


def test_a_bfloat16_memory_saves_and_loads_its_keys(tmp_path):
    keras.config.set_dtype_policy("bfloat16")
    memory = ExactMemory(batch_size=1, num_heads=1, head_dim=2, memory_size=4)
    memory.build()
    keys = np.array([0.5, 1.5, -2.0, 3.0], "float32").reshape(1, 2, 1, 2)
    memory.append(keys, -keys)
    memory.save(tmp_path / "memory.npz")
    with np.load(tmp_path / "memory.npz") as data:
        assert data["keys"].dtype == np.float32
        np.testing.assert_array_equal(data["keys"][0, 0, :2], keys[0, :, 0])
    loaded = ExactMemory(batch_size=1, num_heads=1, head_dim=2, memory_size=4)
    loaded.load(tmp_path / "memory.npz")
    assert loaded.keys.dtype == "bfloat16"
    for name in ("keys", "values", "positions", "next_slot", "document_length"):
        np.testing.assert_array_equal(
            to_numpy(getattr(loaded, name)), to_numpy(getattr(memory, name))
        )

"""`make_memory` under a `keras.distribution` over two devices: a host
memory cannot run there, so `"auto"` keeps the in-graph memory and
`"scann"` is refused with the reason."""

import keras
import pytest

from keras_memtrans.memory import ExactMemory
from keras_memtrans.memory import ScannMemory
from keras_memtrans.memory.factory import SCANN_MIN_MEMORY_SIZE
from keras_memtrans.memory.factory import make_memory

SIZES = dict(batch_size=2, num_heads=1, head_dim=4, memory_size=SCANN_MIN_MEMORY_SIZE)


def two_devices():
    mesh = keras.distribution.DeviceMesh((2,), ["batch"], ["cpu:0", "cpu:1"])
    return keras.distribution.ModelParallel(
        layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch"
    )


def test_auto_picks_scann_for_a_large_memory_on_one_device():
    assert isinstance(make_memory("auto", **SIZES), ScannMemory)


def test_auto_picks_the_in_graph_memory_under_a_distribution():
    with two_devices().scope():
        assert isinstance(make_memory("auto", **SIZES), ExactMemory)


def test_a_scann_memory_is_refused_under_a_distribution():
    with two_devices().scope():
        with pytest.raises(ValueError, match="over 2 devices.*memory_kind='exact'"):
            make_memory("scann", **SIZES)
    assert isinstance(make_memory("scann", **SIZES), ScannMemory)  # scope left

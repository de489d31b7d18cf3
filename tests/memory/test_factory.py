"""`make_memory`: each kind's memory and searcher; under a
`keras.distribution` over two devices a host memory cannot run, so
`"auto"` keeps the in-graph memory and the ScaNN kinds are refused with the
reason."""

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


@pytest.mark.parametrize(
    "kind, searcher", [("scann", "tree"), ("scann_exact", "brute_force")]
)
def test_each_scann_kind_has_its_searcher(kind, searcher):
    memory = make_memory(kind, **SIZES)
    assert isinstance(memory, ScannMemory)
    assert memory.searcher == searcher
    assert ScannMemory.from_config(memory.get_config()).searcher == searcher


@pytest.mark.parametrize("kind", ["scann", "scann_exact"])
def test_a_scann_memory_is_refused_under_a_distribution(kind):
    with two_devices().scope():
        with pytest.raises(ValueError, match="over 2 devices.*memory_kind='exact'"):
            make_memory(kind, **SIZES)
    assert isinstance(make_memory(kind, **SIZES), ScannMemory)  # scope left


def test_an_unknown_searcher_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="`searcher` must be one of.*'trees'"):
        ScannMemory(searcher="trees", **SIZES)

"""`make_memory`: each kind's memory and searcher; what `"auto"` picks by
size; under a `keras.distribution` over two devices a
host memory cannot run, so `"auto"` keeps the in-graph memory and the
ScaNN kinds are refused with the reason."""

from unittest import mock

import keras
import pytest

from keras_memtrans.memory import ExactMemory
from keras_memtrans.memory import ScannMemory
from keras_memtrans.memory import scann_memory
from keras_memtrans.memory.factory import SCANN_MIN_MEMORY_SIZE
from keras_memtrans.memory.factory import make_memory

SIZES = dict(batch_size=2, num_heads=1, head_dim=4, memory_size=SCANN_MIN_MEMORY_SIZE)
# The largest memory "auto" keeps in the graph.
BELOW = dict(SIZES, memory_size=SCANN_MIN_MEMORY_SIZE - 1)


def kind_of(memory):
    """The `memory_kind` that builds `memory`."""
    if isinstance(memory, ExactMemory):
        return "exact"
    return {"tree": "scann", "brute_force": "scann_exact"}[memory.searcher]


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


def test_auto_keeps_the_in_graph_memory_below_the_scann_threshold():
    # Not ScaNN's brute force, though its training step is faster in the
    # peer's configuration on the CPU: JAX's generation with it decodes
    # 1.6-2.4x slower at 8K, and TensorFlow's step is slower
    # (docs/performance.md, "The exact search on the host").
    assert kind_of(make_memory("auto", **BELOW)) == "exact"


def test_auto_without_scann_falls_back_to_the_exact_memory_with_a_warning():
    with mock.patch.object(scann_memory, "_import_scann", side_effect=ImportError):
        with pytest.warns(UserWarning, match="`scann` is not installed"):
            assert kind_of(make_memory("auto", **SIZES)) == "exact"
        with pytest.raises(ImportError):
            make_memory("scann", **SIZES)


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

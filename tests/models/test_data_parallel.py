"""Data-parallel training with `MemorizingTransformerBackbone.get_layout_map`:
every lane state sharded by lane, weights replicated, and `fit` on a
2-device mesh (JAX's forced host devices, tests/conftest.py) equal to `fit`
on one device."""

import contextlib

import keras
import numpy as np
import pytest

from keras_memtrans.data import LaneStreamer
from keras_memtrans.models import MemorizingTransformerBackbone
from keras_memtrans.models import MemorizingTransformerCausalLM
from tests.arrays import to_numpy
from tests.models.conftest import tiny_backbone

# Smeared keys, the XL cache and an exact memory: every kind of lane state.
STATES = dict(smear_keys=True, memory_options={"memory_kind": "exact"})


def lane_variables(backbone):
    """Paths of the variables that hold one row per lane: every lane
    state's variables but a memory's shared `next_slot` (a scalar)."""
    return {
        variable.path
        for training in (True, False)
        for state in backbone._lane_states(training).values()
        for variable in state.variables
        if len(variable.shape) and variable.shape[0] == backbone.batch_size
    }


def test_the_layout_map_shards_every_lane_state_and_nothing_else():
    backbone = tiny_backbone(**STATES)
    mesh = keras.distribution.DeviceMesh((2,), ["lanes"], ["cpu:0", "cpu:1"])
    layout_map = MemorizingTransformerBackbone.get_layout_map(
        mesh, data_parallel_dim_name="lanes"
    )
    expected = lane_variables(backbone)
    assert any("last_key/present" in path for path in expected)
    sharded = {v.path for v in backbone.variables if layout_map[v.path] is not None}
    assert sharded == expected
    for path in sharded:
        assert layout_map[path].axes == ("lanes",)
    assert not any(layout_map[v.path] for v in backbone.trainable_variables)


def test_the_layout_map_refuses_an_axis_the_mesh_lacks():
    mesh = keras.distribution.DeviceMesh((1,), ["batch"], ["cpu:0"])
    with pytest.raises(ValueError, match="'model' is not an axis"):
        MemorizingTransformerBackbone.get_layout_map(mesh, "model")


def documents():
    """Documents of 50-150 tokens: lanes start new documents mid-stream and
    pad their last segment."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 150, size=8)
    return [rng.integers(3, 400, size=n).astype("int32") for n in lengths]


class StepLosses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def fit(steps, distribution=None):
    """`fit` of the tiny model for `steps` batches, on one device or under
    `distribution`: the per-step losses and the trained causal LM."""
    keras.utils.set_random_seed(0)
    stream = LaneStreamer(documents(), 2, 32, shuffle=False)
    losses = StepLosses()
    with distribution.scope() if distribution else contextlib.nullcontext():
        causal_lm = MemorizingTransformerCausalLM(tiny_backbone(**STATES))
        causal_lm.compile(optimizer=keras.optimizers.Adam(1e-3))
        causal_lm.fit(
            stream, epochs=1, steps_per_epoch=steps, callbacks=[losses], verbose=0
        )
    return losses.losses, causal_lm


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution trains on JAX only (torch's data parallelism, "
    "torchrun processes, and TensorFlow's refusal are tested in "
    "tests/recipes/test_data_parallel.py)",
)
def test_fit_on_two_devices_equals_fit_on_one():
    mesh = keras.distribution.DeviceMesh((2,), ["batch"], ["cpu:0", "cpu:1"])
    distribution = keras.distribution.ModelParallel(
        layout_map=MemorizingTransformerBackbone.get_layout_map(mesh),
        batch_dim_name="batch",
    )
    one_losses, one = fit(6)
    two_losses, two = fit(6, distribution)
    assert len(two_losses) == 6
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
    lanes = lane_variables(two.backbone)
    for want, got in zip(one.backbone.variables, two.backbone.variables):
        assert got.path == want.path
        # Two devices sum in another order: after 6 steps, weights and
        # memories were up to 2e-5 apart (a memory mixing lanes is O(1) off).
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), atol=1e-4)
        shards = got.value.addressable_shards
        assert {shard.device.id for shard in shards} == {0, 1}
        # Each device holds its own lane of a lane state, all of the rest.
        for shard in shards:
            if got.path in lanes:
                assert shard.data.shape == (1, *got.shape[1:])
                assert shard.index[0] == slice(shard.device.id, shard.device.id + 1)
            else:
                assert shard.data.shape == tuple(got.shape)
    memory = two.backbone.memory_layers[0].train_memory
    assert int(np.max(to_numpy(memory.positions))) > 0  # it was written

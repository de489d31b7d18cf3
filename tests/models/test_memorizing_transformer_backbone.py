import numpy as np
import pytest
from keras import ops

from keras_memtrans import ExactMemory
from keras_memtrans import KNNAttention
from keras_memtrans import ScannMemory
from keras_memtrans import SegmentAttention
from keras_memtrans.models import MemorizingTransformerBackbone
from tests.models.conftest import tiny_backbone


def inputs(batch=2, length=32, start=True, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "token_ids": rng.integers(0, 400, (batch, length)).astype("int32"),
        "document_start": np.full((batch,), start),
        "padding_mask": np.ones((batch, length), bool),
    }


def test_output_shape_and_memory_layer_placement():
    backbone = tiny_backbone(num_layers=4, memory_layer_indices=(-2, 0))
    assert backbone(inputs()).shape == (2, 32, 32)
    kinds = [type(block.attention) for block in backbone.transformer_layers]
    assert kinds == [KNNAttention, SegmentAttention, KNNAttention, SegmentAttention]
    assert backbone.memory_layers == [
        backbone.transformer_layers[0].attention,
        backbone.transformer_layers[2].attention,
    ]


def test_without_memory_layers_there_is_no_memory():
    backbone = tiny_backbone(memory_layer_indices=())
    assert backbone.memory_layers == []
    assert not any(
        isinstance(layer, KNNAttention) for layer in backbone._flatten_layers()
    )


def test_memory_changes_later_segments_only():
    backbone = tiny_backbone()
    first = inputs(seed=1)
    second = inputs(start=False, seed=2)
    backbone(first)
    with_memory = ops.convert_to_numpy(backbone(second))
    backbone.reset_state()
    without = ops.convert_to_numpy(backbone(second))
    assert np.abs(with_memory - without).max() > 1e-4
    backbone.reset_state()
    fresh = ops.convert_to_numpy(backbone(first))
    backbone.reset_state()
    np.testing.assert_allclose(ops.convert_to_numpy(backbone(first)), fresh, atol=1e-5)


@pytest.mark.parametrize(
    "memory_kind, kind", [("exact", ExactMemory), ("scann", ScannMemory)]
)
def test_memory_kind_reaches_the_memory_layers(memory_kind, kind):
    backbone = tiny_backbone(memory_options={"memory_kind": memory_kind})
    (layer,) = backbone.memory_layers
    assert isinstance(layer.train_memory, kind)
    assert isinstance(layer.inference_memory, kind)


def test_scann_leaf_settings_reach_the_searchers():
    backbone = tiny_backbone(
        memory_options=dict(memory_kind="scann", num_leaves=4, num_leaves_to_search=2)
    )
    (layer,) = backbone.memory_layers
    for memory in (layer.train_memory, layer.inference_memory):
        assert (memory.num_leaves, memory.num_leaves_to_search) == (4, 2)
    options = backbone.get_config()["memory_options"]
    assert (options["num_leaves"], options["num_leaves_to_search"]) == (4, 2)


def test_config_round_trip():
    backbone = tiny_backbone(
        memory_layer_indices=(-1,),
        dropout=0.1,
        memory_options={"memory_kind": "exact"},
        smear_keys=True,
        num_key_value_heads=1,
    )
    config = backbone.get_config()
    clone = MemorizingTransformerBackbone.from_config(config)
    assert clone.get_config() == config
    assert clone.count_params() == backbone.count_params()


def test_key_value_heads_reach_every_projection_cache_and_memory():
    # tiny: 2 query heads of 16 over 2 layers; one key and value head.
    backbone = tiny_backbone(memory_layer_indices=(-1,), num_key_value_heads=1)
    for block in backbone.transformer_layers:
        attention = block.attention
        assert tuple(attention.query_projection.kernel.shape)[1:] == (2, 16)
        for projection in (attention.key_projection, attention.value_projection):
            assert tuple(projection.kernel.shape)[1:] == (1, 16)
        for state in attention.lane_states(training=True).values():
            assert state.num_heads == 1
    memory = backbone.memory_layers[0].lane_states(training=True)["memory"]
    assert tuple(memory.keys.shape)[:2] == (2, 1)  # [lanes, heads, slots, dim]
    hidden = backbone(inputs())
    assert tuple(hidden.shape) == (2, 32, backbone.hidden_dim)


def test_rejects_key_value_heads_that_do_not_divide_the_heads():
    with pytest.raises(ValueError, match="num_key_value_heads.*must divide"):
        tiny_backbone(num_heads=4, num_key_value_heads=3)


@pytest.mark.parametrize(
    "indices, message",
    [((2,), "outside"), ((-3,), "outside"), ((0, -2), "twice"), (("1",), "ints")],
)
def test_rejects_bad_memory_layer_indices(indices, message):
    with pytest.raises(ValueError, match=f"memory_layer_indices.*{message}"):
        tiny_backbone(num_layers=2, memory_layer_indices=indices)


def test_default_memory_layer_is_the_9th_of_12():
    backbone = MemorizingTransformerBackbone(
        vocabulary_size=50,
        num_layers=12,
        num_heads=1,
        hidden_dim=8,
        intermediate_dim=8,
        batch_size=1,
        segment_length=4,
        memory_options=dict(memory_size=16, num_neighbors=2),
    )
    memory_blocks = [
        i for i, b in enumerate(backbone.transformer_layers) if b.use_memory
    ]
    assert memory_blocks == [8]


@pytest.mark.parametrize(
    "name", ["num_layers", "num_heads", "hidden_dim", "batch_size", "segment_length"]
)
@pytest.mark.parametrize("value", [0, 8.0])
def test_rejects_a_size_that_is_not_a_positive_int_by_its_name(name, value):
    with pytest.raises(ValueError, match=f"`{name}` must be a positive int"):
        tiny_backbone(**{name: value})


def test_a_segment_longer_than_the_memory_fails_when_the_model_is_built():
    with pytest.raises(ValueError, match="exceeds `memory_size`"):
        tiny_backbone(segment_length=100, memory_options={"memory_size": 64})


def test_rejects_a_batch_other_than_its_lanes():
    backbone = tiny_backbone()
    with pytest.raises(ValueError, match="batch"):
        backbone(inputs(batch=3))


def test_every_memory_option_of_the_layer_reaches_it_through_the_backbone():
    backbone = tiny_backbone(
        head_dim=8,
        memory_options=dict(memory_kind="exact", top_k="approx", recall_target=0.9),
    )
    (layer,) = backbone.memory_layers
    assert (layer.head_dim, layer.top_k, layer.recall_target) == (8, "approx", 0.9)
    assert (layer.train_memory.top_k, layer.train_memory.recall_target) == (
        "approx",
        0.9,
    )
    assert all(block.attention.head_dim == 8 for block in backbone.transformer_layers)
    config = backbone.get_config()
    options = config["memory_options"]
    assert (config["head_dim"], options["top_k"], options["recall_target"]) == (
        8,
        "approx",
        0.9,
    )
    clone = MemorizingTransformerBackbone.from_config(config)
    assert clone.memory_layers[0].get_config() == layer.get_config()


def test_rejects_an_unknown_memory_option():
    with pytest.raises(ValueError, match=r"Unknown memory option\(s\) \['memory'\]"):
        tiny_backbone(memory_options={"memory": "exact"})

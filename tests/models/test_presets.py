import numpy as np
import pytest

from keras_memtrans.models import PRESETS
from keras_memtrans.models import MemorizingTransformerBackbone
from keras_memtrans.models import get_preset
from tests.weights import assert_independent
from tests.weights import first_rows


@pytest.mark.parametrize("name", ["tiny", "quick", "small"])
def test_cpu_presets_build_and_hold_a_memory(name):
    preset = get_preset(name)
    backbone = MemorizingTransformerBackbone(
        vocabulary_size=preset["vocabulary_size"], **preset["backbone"]
    )
    assert backbone.get_config()["num_layers"] == preset["backbone"]["num_layers"]
    assert len(backbone.memory_layers) == 1


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_is_an_architecture_only(name):
    # Training defaults are the recipes' (recipes/common.py).
    assert set(get_preset(name)) == {"vocabulary_size", "backbone"}


def test_paper_preset_is_the_papers_model():
    config = get_preset("paper")["backbone"]
    assert (config["num_layers"], config["hidden_dim"], config["num_heads"]) == (
        12,
        1024,
        8,
    )
    assert config["intermediate_dim"] == 4096
    assert config["memory_layer_indices"] == (8,)  # the 9th of 12
    assert config["segment_length"] == 512
    assert config["memory_options"] == {"memory_size": 8192, "num_neighbors": 32}
    assert get_preset("paper")["vocabulary_size"] == 32000


def test_unknown_preset_lists_the_names():
    with pytest.raises(ValueError, match="quick"):
        get_preset("huge")
    assert "huge" not in PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_no_two_initial_weights_are_copies(name):
    preset = get_preset(name)
    # The memory's size plays no part in the initial weights: a small one
    # keeps the `paper` model cheap to build.
    config = dict(preset["backbone"])
    config["memory_options"] = dict(
        config["memory_options"], memory_size=config["segment_length"]
    )
    backbone = MemorizingTransformerBackbone(
        vocabulary_size=preset["vocabulary_size"], **config
    )
    tied = config.get("tie_query_key_init", False)
    rows = first_rows(backbone.trainable_variables)
    assert len(rows) == 6 * config["num_layers"] + 1  # kernels + token embedding
    for block in backbone.transformer_layers:
        query = rows[block.attention.query_projection.kernel.path]
        key = rows[block.attention.key_projection.kernel.path]
        assert np.array_equal(query, key) == tied
        if tied:  # K starts as a copy of Q on purpose, and nothing else does
            del rows[block.attention.key_projection.kernel.path]
    assert_independent(rows)

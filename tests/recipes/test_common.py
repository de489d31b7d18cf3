import pytest

from keras_memtrans.models import PRESETS
from keras_memtrans.models import MemorizingTransformerCausalLM
from recipes import common
from tests.models.conftest import tiny_backbone


def test_every_preset_has_training_defaults():
    assert set(common.TRAINING) == set(PRESETS)
    for training in common.TRAINING.values():
        assert set(training) == {
            "steps",
            "learning_rate",
            "warmup_steps",
            "max_documents",
        }


class HalfSave:
    """Writes part of a preset, then fails, as a full disk would."""

    def save_to_preset(self, directory):
        directory.mkdir()
        (directory / "config.json").write_text("{}")
        raise OSError("disk full")


def test_a_saved_preset_is_complete_or_absent(tmp_path):
    causal_lm = MemorizingTransformerCausalLM(tiny_backbone(memory_layer_indices=()))
    common.save_preset(causal_lm, tmp_path / "model")
    assert MemorizingTransformerCausalLM.from_preset(tmp_path / "model").built
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    # A save that fails half-way leaves nothing, not even its partial copy.
    with pytest.raises(OSError, match="disk full"):
        common.save_preset(HalfSave(), tmp_path / "other")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    # A preset is never written into a directory that holds files.
    with pytest.raises(OSError):
        common.save_preset(causal_lm, tmp_path / "model")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]

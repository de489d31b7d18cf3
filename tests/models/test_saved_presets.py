import json

import keras_hub
import numpy as np
import pytest
from keras_hub.src.utils import preset_utils

from keras_memtrans.models import MemorizingTransformerBackbone
from keras_memtrans.models import MemorizingTransformerCausalLM
from keras_memtrans.models import MemorizingTransformerPreprocessor
from keras_memtrans.models import MemorizingTransformerTokenizer
from tests.arrays import to_numpy
from tests.models.conftest import tiny_backbone

KERAS_HUB_FILES = {
    "config.json",
    "metadata.json",
    "model.weights.h5",
    "task.json",
    "preprocessor.json",
    "tokenizer.json",
    "assets/tokenizer/vocabulary.spm",
}


def segments(count, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "token_ids": rng.integers(1, 400, (2, 32)).astype("int32"),
            "document_start": np.full((2,), step == 0),
            "padding_mask": np.ones((2, 32), bool),
        }
        for step in range(count)
    ]


def files(directory):
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_a_preset_restores_the_model_with_empty_memories(
    tmp_path, preprocessor, tie_word_embeddings
):
    causal_lm = MemorizingTransformerCausalLM(
        tiny_backbone(tie_word_embeddings=tie_word_embeddings), preprocessor
    )
    rng = np.random.default_rng(0)
    for variable in causal_lm.trainable_variables:  # far from the initial ones
        variable.assign(rng.normal(0, 0.1, variable.shape).astype(variable.dtype))
    batches = segments(3)
    for batch in batches:  # memories that are not saved
        causal_lm.predict_on_batch(batch)
    causal_lm.save_to_preset(tmp_path / "preset")
    loaded = MemorizingTransformerCausalLM.from_preset(tmp_path / "preset")
    assert isinstance(loaded, MemorizingTransformerCausalLM)
    for layer in loaded.backbone.memory_layers:
        for memory in (layer.train_memory, layer.inference_memory):
            assert (to_numpy(memory.positions) == -1).all()
    saved = {v.path: to_numpy(v) for v in causal_lm.trainable_variables}
    assert {v.path for v in loaded.trainable_variables} == set(saved)
    for variable in loaded.trainable_variables:
        np.testing.assert_array_equal(to_numpy(variable), saved[variable.path])
    causal_lm.reset_state()
    for batch in batches:  # later segments read the memory
        np.testing.assert_array_equal(
            loaded.predict_on_batch(batch), causal_lm.predict_on_batch(batch)
        )
    text = "def f(x):\n    return x  # ünïcode\n"
    np.testing.assert_array_equal(loaded.preprocessor(text), preprocessor(text))


def test_the_directory_holds_what_keras_hub_writes(tmp_path, preprocessor):
    causal_lm = MemorizingTransformerCausalLM(tiny_backbone(), preprocessor)
    causal_lm.save_to_preset(tmp_path)
    assert files(tmp_path) == KERAS_HUB_FILES
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["registered_name"] == "keras_memtrans>MemorizingTransformerBackbone"
    assert config["config"] == json.loads(json.dumps(causal_lm.backbone.get_config()))
    task = json.loads((tmp_path / "task.json").read_text())
    assert task["registered_name"] == "keras_memtrans>MemorizingTransformerCausalLM"
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    assert metadata["keras_hub_version"] == keras_hub.__version__
    # keras-hub's own loaders find this package's classes in it.
    backbone = keras_hub.models.Backbone.from_preset(str(tmp_path))
    assert isinstance(backbone, MemorizingTransformerBackbone)
    assert backbone.get_config() == causal_lm.backbone.get_config()
    np.testing.assert_array_equal(
        to_numpy(backbone.token_embedding.embeddings),
        to_numpy(causal_lm.backbone.token_embedding.embeddings),
    )


def test_the_tokenizer_and_preprocessor_round_trip(tmp_path, preprocessor, documents):
    MemorizingTransformerCausalLM(tiny_backbone(), preprocessor).save_to_preset(
        tmp_path
    )
    tokenizer = MemorizingTransformerTokenizer.from_preset(str(tmp_path))
    assert tokenizer.get_vocabulary() == preprocessor.tokenizer.get_vocabulary()
    assert isinstance(
        keras_hub.tokenizers.Tokenizer.from_preset(str(tmp_path)),
        MemorizingTransformerTokenizer,
    )
    loaded = MemorizingTransformerPreprocessor.from_preset(str(tmp_path))
    text = documents[1][:1000] + "\t→ 数学\n"
    np.testing.assert_array_equal(loaded(text), preprocessor(text))
    assert loaded.detokenize(loaded(text)) == text


def test_a_backbone_and_tokenizer_preset_makes_a_causal_lm(tmp_path, preprocessor):
    backbone = tiny_backbone()
    backbone.save_to_preset(tmp_path)
    preprocessor.tokenizer.save_to_preset(tmp_path)
    causal_lm = MemorizingTransformerCausalLM.from_preset(tmp_path)
    assert causal_lm.preprocessor.tokenizer.vocabulary_size() == 400
    batch = segments(1)[0]
    reference = MemorizingTransformerCausalLM(backbone).predict_on_batch(batch)
    np.testing.assert_array_equal(causal_lm.predict_on_batch(batch), reference)


def test_unknown_presets_raise_keras_hubs_error():
    with pytest.raises(ValueError, match="Unknown preset identifier"):
        MemorizingTransformerCausalLM.from_preset("no-such-preset")


def test_a_preset_of_another_architecture_is_refused(tmp_path):
    keras_hub.models.GPT2Backbone(
        vocabulary_size=10,
        num_layers=1,
        num_heads=1,
        hidden_dim=4,
        intermediate_dim=8,
        max_sequence_length=8,
    ).save_to_preset(tmp_path)
    with pytest.raises(ValueError, match="GPT2Backbone, not a Memorizing"):
        MemorizingTransformerCausalLM.from_preset(tmp_path)


def test_a_preset_saved_over_another_replaces_it_whole_or_not_at_all(
    tmp_path, preprocessor, monkeypatch
):
    first = MemorizingTransformerCausalLM(tiny_backbone(), preprocessor)
    first.save_to_preset(tmp_path / "preset")
    second = MemorizingTransformerCausalLM(tiny_backbone(), preprocessor)
    for variable in second.trainable_variables:
        variable.assign(variable + 1.0)

    class HalfSave:  # a disk filling up in the middle of a save
        def __init__(self, directory):
            self.directory = directory

        def save_task(self, task, max_shard_size):
            with open(f"{self.directory}/config.json", "w") as file:
                file.write("{")
            raise OSError("disk full")

    saver = preset_utils.get_preset_saver
    monkeypatch.setattr(preset_utils, "get_preset_saver", HalfSave)
    with pytest.raises(OSError, match="disk full"):
        second.save_to_preset(tmp_path / "preset")
    assert [p.name for p in tmp_path.iterdir()] == ["preset"]
    loaded = MemorizingTransformerCausalLM.from_preset(tmp_path / "preset")
    for got, want in zip(loaded.trainable_variables, first.trainable_variables):
        np.testing.assert_array_equal(to_numpy(got), to_numpy(want))

    monkeypatch.setattr(preset_utils, "get_preset_saver", saver)
    second.save_to_preset(tmp_path / "preset")
    assert [p.name for p in tmp_path.iterdir()] == ["preset"]
    assert files(tmp_path / "preset") == KERAS_HUB_FILES
    loaded = MemorizingTransformerCausalLM.from_preset(tmp_path / "preset")
    for got, want in zip(loaded.trainable_variables, second.trainable_variables):
        np.testing.assert_array_equal(to_numpy(got), to_numpy(want))


def test_a_preset_is_never_saved_over_a_directory_of_other_files(
    tmp_path, preprocessor
):
    (tmp_path / "train.py").write_text("print('mine')")
    causal_lm = MemorizingTransformerCausalLM(tiny_backbone(), preprocessor)
    with pytest.raises(FileExistsError, match="not a preset's"):
        causal_lm.save_to_preset(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["train.py"]
    assert (tmp_path / "train.py").read_text() == "print('mine')"

import keras
import numpy as np
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


def test_a_preset_is_saved_only_where_there_was_none(tmp_path):
    causal_lm = MemorizingTransformerCausalLM(tiny_backbone(memory_layer_indices=()))
    common.save_preset(causal_lm, tmp_path / "model")
    assert MemorizingTransformerCausalLM.from_preset(tmp_path / "model").built
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "model").iterdir()}
    with pytest.raises(FileExistsError, match="model"):
        common.save_preset(causal_lm, tmp_path / "model")
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "model").iterdir()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# XLA wherever the backend compiles with it on this CPU: TensorFlow too,
# where Keras' own "auto" leaves it off without an accelerator.
XLA_BY_DEFAULT = {"tensorflow": True, "jax": True, "torch": False}


@pytest.mark.parametrize(
    "memory_kind, xla", [("exact", None), ("scann", False), ("scann_exact", False)]
)
def test_the_recipe_compiles_with_xla_wherever_the_memory_allows(memory_kind, xla):
    backend = keras.backend.backend()
    causal_lm = MemorizingTransformerCausalLM(
        tiny_backbone(memory_options={"memory_kind": memory_kind})
    )
    training = common.TRAINING["tiny"]
    common.compile_for_training(causal_lm, training)
    # A host memory keeps XLA off, except on JAX (whose io_callback compiles).
    if xla is None or backend == "jax":
        xla = XLA_BY_DEFAULT[backend]
    assert causal_lm.jit_compile == xla
    # An explicit choice is kept (where the memory allows it).
    common.compile_for_training(causal_lm, training, jit_compile=False)
    assert causal_lm.jit_compile is False


class CountedSteps(MemorizingTransformerCausalLM):
    """Counts the calls of `train_step`: once per trace in a compiled
    step, once per step when eager."""

    steps = 0

    def train_step(self, *args, **kwargs):
        self.steps += 1
        return super().train_step(*args, **kwargs)


def test_the_compiled_training_step_is_traced_once():
    # Optimizer variables made inside the first step made TensorFlow trace
    # the step twice: once to create them, once to run it.
    causal_lm = CountedSteps(tiny_backbone())
    common.compile_for_training(causal_lm, common.TRAINING["tiny"])
    lanes, length = causal_lm.backbone.batch_size, causal_lm.backbone.segment_length
    x = {
        "token_ids": np.ones((3 * lanes, length), "int32"),
        "document_start": np.zeros((3 * lanes,), bool),
        "padding_mask": np.ones((3 * lanes, length), bool),
    }
    causal_lm.fit(x, x["token_ids"], batch_size=lanes, shuffle=False, verbose=0)
    eager = keras.backend.backend() == "torch" and not causal_lm.jit_compile
    assert causal_lm.steps == (3 if eager else 1)


def test_the_jit_compile_flag_reads_as_model_compiles_argument():
    flag = {
        value: common.jit_compile_flag(value) for value in ("auto", "true", "false")
    }
    assert flag == {"auto": "auto", "true": True, "false": False}

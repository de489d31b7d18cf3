"""The models check `document_start` and `padding_mask` before Keras' functional
input conversion would cast them to bool (0.5 -> True) without a word."""

import numpy as np
import pytest
from keras import ops

from keras_memtrans.models import MemorizingTransformerCausalLM
from tests.models.conftest import tiny_backbone


def inputs(document_start=None, padding_mask=None):
    """Two lanes' segment of 32 tokens; a lane input left `None` is all
    `True`."""
    rng = np.random.default_rng(0)
    if document_start is None:
        document_start = np.full((2,), True)
    if padding_mask is None:
        padding_mask = np.ones((2, 32), bool)
    return {
        "token_ids": rng.integers(0, 400, (2, 32)).astype("int32"),
        "document_start": document_start,
        "padding_mask": padding_mask,
    }


@pytest.fixture(params=["backbone", "causal_lm"])
def model(request):
    backbone = tiny_backbone()
    if request.param == "backbone":
        return backbone
    return MemorizingTransformerCausalLM(backbone)


@pytest.mark.parametrize(
    "name, value",
    [
        ("document_start", np.full((2,), 0.5)),
        ("document_start", np.array([1, 0])),
        ("document_start", np.full((2, 1), True)),
        ("padding_mask", np.full((2, 32), 0.5, "float32")),
        ("padding_mask", np.ones((2, 31), bool)),
    ],
)
def test_a_lane_input_that_is_not_a_bool_of_its_shape_is_refused_by_name(
    model, name, value
):
    with pytest.raises(ValueError, match=name):
        model(inputs(**{name: value}))
    model.reset_state()
    with pytest.raises(ValueError, match=name):
        model.predict_on_batch(inputs(**{name: value}))


def outputs_after_a_first_segment(model, document_start):
    model.reset_state()
    model(inputs())  # the lanes' memories and caches now hold a segment
    return ops.convert_to_numpy(model(inputs(document_start=document_start)))


@pytest.mark.parametrize("flag", [True, False])
def test_a_python_bool_or_list_stands_for_every_lane(model, flag):
    want = outputs_after_a_first_segment(model, np.full((2,), flag))
    for document_start in (flag, [flag, flag]):
        got = outputs_after_a_first_segment(model, document_start)
        np.testing.assert_allclose(got, want, atol=1e-6)

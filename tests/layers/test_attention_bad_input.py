"""Bad input and bad configurations, checked on every attention layer in
`CASES` (tests/layers/attention_cases.py): each gets a `ValueError` that
names its cause."""

import keras
import numpy as np
import pytest

from keras_memtrans.layers.attention_functions import check_lane_inputs
from tests.layers.attention_cases import BATCH
from tests.layers.attention_cases import HIDDEN
from tests.layers.attention_cases import SEGMENT
from tests.layers.attention_cases import cases
from tests.layers.attention_cases import keeps_lane_state
from tests.layers.attention_cases import make_layer


class TestBadInput:
    @cases()
    def test_hidden_states_wrong_rank(self, case):
        with pytest.raises(ValueError, match="hidden_states"):
            make_layer(case)(np.zeros((BATCH, HIDDEN), "float32"))

    @cases()
    @pytest.mark.parametrize(
        "name, value",
        [
            ("document_start", np.zeros((BATCH, 1), bool)),
            ("padding_mask", np.ones((BATCH,), bool)),
        ],
    )
    def test_lane_input_wrong_shape(self, case, name, value):
        x = np.zeros((BATCH, SEGMENT, HIDDEN), "float32")
        with pytest.raises(ValueError, match=name):
            make_layer(case)(x, **{name: value})

    @cases()
    @pytest.mark.parametrize(
        "name, value, dtype",
        [
            ("document_start", np.full((BATCH,), 0.5, "float32"), "float32"),
            ("document_start", np.ones((BATCH,), "int32"), "int32"),
            ("document_start", [1, 0, 1], "int32"),
            ("document_start", 1, "int"),
            ("document_start", 0.5, "float"),
            ("padding_mask", np.ones((BATCH, SEGMENT), "float32"), "float32"),
            ("padding_mask", np.ones((BATCH, SEGMENT), "uint8"), "uint8"),
        ],
    )
    def test_lane_input_not_bool(self, case, name, value, dtype):
        # A float flag of 0.5 used to reset its lanes; a Python bool or
        # number raised an AttributeError.
        x = np.zeros((BATCH, SEGMENT, HIDDEN), "float32")
        with pytest.raises(ValueError, match=f"`{name}` must be bool.*got {dtype}"):
            make_layer(case)(x, **{name: value})

    def test_one_bool_needs_a_static_shape(self):
        # As in a step traced for any batch size.
        with pytest.raises(ValueError, match="`document_start` is one bool"):
            check_lane_inputs((None, SEGMENT, HIDDEN), True, None)

    @cases()
    def test_heads_do_not_divide_hidden_size(self, case):
        with pytest.raises(ValueError, match="num_heads"):
            case(num_heads=3)(np.zeros((2, 4, 10), "float32"))

    @cases()
    @pytest.mark.parametrize("name", ["num_heads", "head_dim", "batch_size"])
    def test_non_positive_sizes(self, case, name):
        options = {"num_heads": 2, name: 0}
        with pytest.raises(ValueError, match=name):
            case(**options)

    @cases(keeps_lane_state)
    def test_batch_size_differs_from_the_lanes(self, case):
        with pytest.raises(ValueError, match="batch_size"):
            make_layer(case)(np.zeros((BATCH + 1, SEGMENT, HIDDEN), "float32"))

    @cases(keeps_lane_state)
    def test_unknown_batch_size(self, case):
        with pytest.raises(ValueError, match="batch_size"):
            case(num_heads=2)(keras.Input((4, 8)))

    @cases(lambda layer: layer.use_xl_cache)
    def test_xl_cache_rejects_another_segment_length(self, case):
        with pytest.raises(ValueError, match="segment"):
            make_layer(case)(np.ones((BATCH, SEGMENT + 1, HIDDEN), "float32"))

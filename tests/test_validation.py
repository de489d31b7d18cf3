import pytest
from hypothesis import given
from hypothesis import strategies as st

from keras_memtrans.validation import check_positive_ints


@given(st.integers(min_value=1))
def test_accepts_positive_ints(value):
    check_positive_ints(size=value)


@pytest.mark.parametrize("value", [0, -3, 2.0, "4", True, None])
def test_rejects_anything_else_by_name(value):
    with pytest.raises(ValueError, match=r"`size` must be a positive int"):
        check_positive_ints(num_heads=2, size=value)


def test_optional_arguments_may_be_none_but_not_invalid():
    check_positive_ints(size=None, optional=("size",))
    with pytest.raises(ValueError, match="`size`"):
        check_positive_ints(size=0, optional=("size",))

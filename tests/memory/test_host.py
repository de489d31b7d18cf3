import keras
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from keras import ops

from keras_memtrans.memory.host import approx_top_k
from keras_memtrans.memory.host import full_like
from keras_memtrans.memory.host import host_call
from keras_memtrans.memory.host import slice_update_variable
from tests.host_data import only_on_torch
from tests.host_data import package_host_tensors


def test_approx_top_k_equals_exact_top_k_on_cpu():
    # approx_max_k is approximate on TPU only; on CPU it is exact (and torch
    # uses ops.top_k), so the selected entries equal the exact top-k.
    scores = np.random.default_rng(0).normal(size=(3, 5, 200)).astype("float32")
    values, indices = approx_top_k(scores, 16, recall_target=0.9)
    want = np.sort(np.argsort(-scores, axis=-1)[..., :16], axis=-1)
    np.testing.assert_array_equal(np.sort(ops.convert_to_numpy(indices), -1), want)
    np.testing.assert_allclose(
        np.sort(ops.convert_to_numpy(values), -1),
        np.sort(np.take_along_axis(scores, want, -1), -1),
    )


def test_host_call_returns_shaped_results_and_runs_side_effects():
    seen = []

    def function(x):
        seen.append(x.copy())
        return (x * 2, np.int32(len(seen)))

    doubled, count = host_call(
        function,
        np.arange(4, dtype="float32"),
        result_specs=(((4,), "float32"), ((), "int32")),
    )
    np.testing.assert_array_equal(ops.convert_to_numpy(doubled), [0, 2, 4, 6])
    assert int(ops.convert_to_numpy(count)) == 1
    assert host_call(lambda x: (), np.zeros(2), result_specs=()) == ()
    assert len(seen) == 1


# The numbers each dtype holds exactly.
FILL_VALUES = {
    "float32": [-1, 0, 7.5, -1e9, float("inf"), float("-inf")],
    "int32": [-1, 0, 7],
    "bool": [False, True],
}


@given(
    st.lists(st.integers(0, 4), max_size=3),
    st.sampled_from(list(FILL_VALUES)),
    st.sampled_from([*FILL_VALUES, None]),
    st.data(),
)
def test_full_like_equals_numpy(shape, x_dtype, dtype, data):
    x = np.zeros(shape, x_dtype)
    value = data.draw(st.sampled_from(FILL_VALUES[dtype or x_dtype]))
    filled = full_like(ops.convert_to_tensor(x), value, dtype)
    want = np.full_like(x, value, dtype)
    assert keras.backend.standardize_dtype(filled.dtype) == str(want.dtype)
    np.testing.assert_array_equal(ops.convert_to_numpy(filled), want)


@only_on_torch
def test_full_like_and_a_slice_write_at_a_python_start_make_no_host_tensor():
    variable = keras.Variable(np.zeros((2, 4), "float32"), trainable=False)
    updates = ops.ones((2, 1))
    with package_host_tensors() as sites:
        filled = full_like(updates, -1e9)
        slice_update_variable(variable, 3, 1, updates)
    assert sites == []
    np.testing.assert_array_equal(ops.convert_to_numpy(filled), [[-1e9], [-1e9]])
    np.testing.assert_array_equal(
        ops.convert_to_numpy(variable.value), [[0, 0, 0, 1], [0, 0, 0, 1]]
    )


@only_on_torch
def test_host_call_makes_a_tensor_of_each_result_only():
    # Not of the placeholder result every call gets (see `host_call`).
    array = ops.arange(4, dtype="float32")
    with package_host_tensors() as sites:
        doubled = host_call(
            lambda x: (x * 2,), array, result_specs=(((4,), "float32"),)
        )
        host_call(lambda x: (), array, result_specs=())
    assert len(sites) == 1
    np.testing.assert_array_equal(ops.convert_to_numpy(doubled[0]), [0, 2, 4, 6])


@st.composite
def slice_writes(draw):
    """A variable's shape and dtype, an axis, a start and the updates'
    length along it."""
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    axis = draw(st.integers(0, len(shape) - 1))
    length = draw(st.integers(1, shape[axis]))
    start = draw(st.integers(0, shape[axis] - length))
    return shape, axis, start, length, draw(st.sampled_from(["float32", "bool"]))


def random_array(rng, shape, dtype):
    values = rng.normal(size=shape)
    return values > 0 if dtype == "bool" else values.astype(dtype)


def numpy_slice_update(array, start, axis, updates):
    written = array.copy()
    index = (slice(None),) * axis + (slice(start, start + updates.shape[axis]),)
    written[index] = updates
    return written


@given(slice_writes(), st.booleans())
def test_slice_update_variable_writes_the_slice_and_nothing_else(write, tensor_start):
    shape, axis, start, length, dtype = write
    rng = np.random.default_rng(len(shape) * 7 + axis)
    initial, updates = (
        random_array(rng, size, dtype)
        for size in (shape, shape[:axis] + [length] + shape[axis + 1 :])
    )
    variable = keras.Variable(initial, dtype=dtype, trainable=False)
    position = ops.convert_to_tensor(start, "int32") if tensor_start else start
    slice_update_variable(variable, position, axis, updates)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(variable.value),
        numpy_slice_update(initial, start, axis, updates),
    )


def test_slice_update_variable_inside_a_stateless_scope_records_the_update():
    # There (JAX's compiled steps, `stateless_call`) the variable itself is
    # not written: the scope holds its new value.
    initial = np.zeros((2, 4), "float32")
    variable = keras.Variable(initial, trainable=False)
    updates = np.ones((2, 1), "float32")
    with keras.StatelessScope() as scope:
        slice_update_variable(variable, ops.convert_to_tensor(2), 1, updates)
        written = ops.convert_to_numpy(variable.value)
    np.testing.assert_array_equal(ops.convert_to_numpy(variable.value), initial)
    expected = numpy_slice_update(initial, 2, 1, updates)
    np.testing.assert_array_equal(written, expected)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(scope.get_current_value(variable)), expected
    )


class SliceWriter(keras.Model):
    """Writes a column of its variable, then reads the variable."""

    def __init__(self):
        super().__init__()
        self.table = self.add_weight(
            shape=(3, 6), initializer="zeros", trainable=False, name="table"
        )

    def call(self, inputs):
        start = ops.cast(inputs["start"], "int32")[0]
        slice_update_variable(self.table, start, 1, inputs["column"])
        return self.table.value + 0.0


def test_slice_update_variable_in_a_compiled_predict_step_is_read_after_it():
    writer = SliceWriter()
    expected = np.zeros((3, 6), "float32")
    for start in (4, 1, 4):
        column = np.full((3, 1), start + 1.0, "float32")
        read = writer.predict_on_batch(
            {"start": np.full((3,), start, "int32"), "column": column}
        )
        expected[:, start : start + 1] = column
        np.testing.assert_array_equal(read, expected)
        np.testing.assert_array_equal(ops.convert_to_numpy(writer.table), expected)

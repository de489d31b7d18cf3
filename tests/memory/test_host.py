import numpy as np
from keras import ops

from keras_memtrans.memory.host import approx_top_k
from keras_memtrans.memory.host import host_call


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

"""KNNAttention with the ScaNN memories: memory choice, compiled fit, the
exact ScaNN search against the in-graph one, top_k."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_memtrans import ExactMemory
from keras_memtrans import KNNAttention
from keras_memtrans import ScannMemory
from keras_memtrans.memory.factory import SCANN_MIN_MEMORY_SIZE
from tests.arrays import to_numpy
from tests.memory.memories import held_entries

BATCH, SEGMENT, HIDDEN, STEPS, MEMORY = 2, 8, 16, 6, 32


def build_model(padded=False, **options):
    inputs = {
        "hidden": keras.Input((SEGMENT, HIDDEN), batch_size=BATCH, name="hidden"),
        "document_start": keras.Input(
            (), batch_size=BATCH, dtype="bool", name="document_start"
        ),
    }
    if padded:
        inputs["padding_mask"] = keras.Input(
            (SEGMENT,), batch_size=BATCH, dtype="bool", name="padding_mask"
        )
    x = KNNAttention(
        num_heads=2,
        memory_size=MEMORY,
        num_neighbors=4,
        name="knn_attention",
        **options,
    )(
        inputs["hidden"],
        document_start=inputs["document_start"],
        padding_mask=inputs.get("padding_mask"),
    )
    return keras.Model(inputs, x)


def stream():
    """STEPS segments of 2 lanes (step-major rows); lane 1 restarts at step 3."""
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(STEPS * BATCH, SEGMENT, HIDDEN)).astype("float32")
    starts = np.zeros((STEPS, BATCH), bool)
    starts[0] = True
    starts[3, 1] = True
    return {"hidden": hidden, "document_start": starts.reshape(-1)}, hidden


def test_memory_choice():
    def memory_of(**options):
        layer = KNNAttention(num_heads=2, batch_size=1, **options)
        layer.build((1, 8, 8))
        return type(layer.train_memory), type(layer.inference_memory)

    assert memory_of(memory_size=MEMORY) == (ExactMemory, ExactMemory)
    assert memory_of(memory_size=MEMORY, memory_kind="scann") == (
        ScannMemory,
        ScannMemory,
    )
    assert memory_of(memory_size=SCANN_MIN_MEMORY_SIZE) == (ScannMemory, ScannMemory)
    assert (
        memory_of(memory_size=SCANN_MIN_MEMORY_SIZE, memory_kind="exact")[0]
        is ExactMemory
    )


def host_and_exact_models(memory_kind, **options):
    """A model with a host memory of `memory_kind` and one with the in-graph
    exact memory, with the same weights (and the same other `options`)."""
    host = build_model(memory_kind=memory_kind, **options)
    exact = build_model(memory_kind="exact", **options)
    for target, source in zip(exact.trainable_weights, host.trainable_weights):
        target.assign(ops.convert_to_numpy(source))
    return host, exact


def test_compiled_fit_fills_the_scann_memory_like_the_exact_one():
    x, y = stream()
    scann, exact = host_and_exact_models("scann")
    # Learning rate 0: both models compute the same keys, whatever they
    # retrieve, so their memories must hold the same entries.
    # torch.compile of a stateful layer is not what users run on CPU (as in
    # test_knn_attention_fit); TF and JAX ask for XLA.
    jit = keras.backend.backend() != "torch"
    for model in (scann, exact):
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", jit_compile=jit)
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    # XLA cannot compile a host memory: only JAX keeps the step jitted
    # (with io_callback); TensorFlow and torch turn jit_compile off.
    assert scann.jit_compile == (keras.backend.backend() == "jax")

    host = scann.get_layer("knn_attention").train_memory
    state = exact.get_layer("knn_attention").train_memory
    # The host ring in position order (-1 first), as `held_entries` gives
    # the exact one (a ScaNN search does not return every entry).
    order = np.argsort(host.positions, axis=-1)  # [batch, slots]
    host_positions = np.take_along_axis(host.positions, order, axis=-1)
    host_keys = host.keys.transpose(0, 2, 1, 3)[np.arange(BATCH)[:, None], order]
    positions, keys = held_entries(state)  # [batch, slots], [..., heads, dim]
    np.testing.assert_array_equal(host_positions, positions)
    # 48 tokens through 32 slots: lane 0 holds 16..47, lane 1 (restarted at
    # step 3) holds 0..23.
    assert list(host_positions[0]) == list(range(16, 48))
    lane_1 = host_positions[1]
    assert list(lane_1[lane_1 >= 0]) == list(range(24))
    filled = positions >= 0  # [batch, slots, heads, dim] at filled slots
    np.testing.assert_allclose(host_keys[filled], keys[filled], atol=1e-5)
    assert host.indexed_lanes[0]  # lane 0 is searched with ScaNN
    inference = scann.get_layer("knn_attention").inference_memory
    assert np.all(inference.positions == -1)


@pytest.mark.parametrize("num_key_value_heads", [None, 1])
def test_a_scann_exact_memory_trains_as_the_in_graph_exact_memory(
    num_key_value_heads,
):
    # Both search exactly, so the same weights take the same steps: the
    # losses of a fit that learns (and so retrieves differently each step)
    # agree, and so do the trained weights. With one key and value head,
    # both query heads search the host memory's one head side by side.
    x, y = stream()
    host, exact = host_and_exact_models(
        "scann_exact", num_key_value_heads=num_key_value_heads
    )
    losses = []
    for model in (host, exact):
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        history = model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
        losses.append(history.history["loss"])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert losses[0][-1] < losses[0][0]  # it learnt
    for got, want in zip(host.trainable_weights, exact.trainable_weights):
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), atol=1e-5)
    assert host.get_layer("knn_attention").train_memory.indexed_lanes.all()


def test_a_lane_padded_after_its_document_ends_keeps_the_step_running():
    # Lane 1's document ends after 4 of 10 segments and is padded from then
    # on: its ScaNN index empties, and the rebuild (or the search of an
    # index whose entries were all deleted) used to kill the compiled step.
    steps = 10
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(steps * BATCH, SEGMENT, HIDDEN)).astype("float32")
    starts = np.zeros((steps, BATCH), bool)
    starts[0] = True
    mask = np.ones((steps, BATCH, SEGMENT), bool)
    mask[4:, 1] = False
    x = {
        "hidden": hidden,
        "document_start": starts.reshape(-1),
        "padding_mask": mask.reshape(-1, SEGMENT),
    }
    # Every leaf visited: the ScaNN model retrieves what the exact one does.
    scann = build_model(
        padded=True, memory_kind="scann", num_leaves=2, num_leaves_to_search=2
    )
    exact = build_model(padded=True, memory_kind="exact")
    for target, source in zip(exact.trainable_weights, scann.trainable_weights):
        target.assign(ops.convert_to_numpy(source))
    jit = keras.backend.backend() != "torch"
    losses, outputs = [], []
    for model in (scann, exact):
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", jit_compile=jit)
        history = model.fit(x, hidden, batch_size=BATCH, shuffle=False, verbose=0)
        losses.append(history.history["loss"])
        outputs.append(model.predict(x, batch_size=BATCH, verbose=0))
    assert scann.jit_compile == (keras.backend.backend() == "jax")
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)
    host = scann.get_layer("knn_attention").train_memory
    positions, _ = held_entries(exact.get_layer("knn_attention").train_memory)
    np.testing.assert_array_equal(np.sort(host.positions, axis=-1), positions)
    assert np.all(host.positions[1] == -1) and not host.indexed_lanes[1]


def test_approx_top_k_matches_exact_top_k_on_cpu():
    x, _ = stream()
    exact = build_model(memory_kind="exact")
    approx = build_model(memory_kind="exact", top_k="approx", recall_target=0.9)
    approx.set_weights(exact.get_weights())
    for step in range(STEPS):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        batch = {name: value[rows] for name, value in x.items()}
        np.testing.assert_allclose(
            to_numpy(approx(batch)), to_numpy(exact(batch)), atol=1e-5
        )


def test_config_keeps_the_memory_options():
    layer = KNNAttention(
        num_heads=2, memory_kind="scann", top_k="approx", recall_target=0.8
    )
    config = KNNAttention.from_config(layer.get_config()).get_config()
    assert (config["memory_kind"], config["top_k"], config["recall_target"]) == (
        "scann",
        "approx",
        0.8,
    )


def test_scann_search_settings_reach_the_searchers():
    layer = KNNAttention(
        num_heads=2,
        memory_kind="scann",
        memory_size=1024,
        num_neighbors=4,
        num_leaves=16,
        num_leaves_to_search=4,
    )
    layer.build((2, 8, 16))
    for memory in (layer.train_memory, layer.inference_memory):
        assert (memory.num_leaves, memory.num_leaves_to_search) == (16, 4)
    config = KNNAttention.from_config(layer.get_config()).get_config()
    assert (config["num_leaves"], config["num_leaves_to_search"]) == (16, 4)
    with pytest.raises(ValueError, match="too small for 64 tree leaves"):
        KNNAttention(
            num_heads=2, memory_kind="scann", memory_size=256, num_leaves=64
        ).build((2, 8, 16))


@pytest.mark.parametrize(
    "options,match",
    [
        ({"memory_kind": "faiss"}, "memory_kind"),
        ({"top_k": "fast"}, "top_k"),
        ({"recall_target": 1.5}, "recall_target"),
    ],
)
def test_rejects_bad_memory_options(options, match):
    with pytest.raises(ValueError, match=match):
        KNNAttention(num_heads=2, **options)

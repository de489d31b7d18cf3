"""KNNAttention inside models: compiled fit, validation, saving."""

import zipfile

import h5py
import keras
import numpy as np
import pytest

from keras_memtrans import KNNAttention
from tests.arrays import to_numpy
from tests.memory.memories import held_entries

BATCH, SEGMENT, HIDDEN, STEPS = 2, 8, 16, 4


def build_model(use_xl_cache=True, dtype=None, **memory_options):
    hidden = keras.Input((SEGMENT, HIDDEN), batch_size=BATCH, name="hidden")
    start = keras.Input((), batch_size=BATCH, dtype="bool", name="document_start")
    x = KNNAttention(
        num_heads=2,
        memory_size=12,
        num_neighbors=4,
        use_xl_cache=use_xl_cache,
        dtype=dtype,
        name="knn_attention",
        **memory_options,
    )(hidden, document_start=start)
    outputs = keras.layers.Dense(HIDDEN, dtype="float32", name="head")(x)
    return keras.Model({"hidden": hidden, "document_start": start}, outputs)


def stream(seed=0):
    """STEPS consecutive segments of 2 lanes; lane 1 starts a new document
    at step 2. Rows are step-major, so batch i is segment i."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(STEPS * BATCH, SEGMENT, HIDDEN)).astype("float32")
    starts = np.zeros((STEPS, BATCH), bool)
    starts[0] = True
    starts[2, 1] = True
    targets = rng.normal(size=hidden.shape).astype("float32")
    return {"hidden": hidden, "document_start": starts.reshape(-1)}, targets


def memory_state(model, memory="train_memory"):
    layer = model.get_layer("knn_attention")
    state = getattr(layer, memory)
    return {v.name: to_numpy(v) for v in state.variables}


def searched_positions(model, memory="train_memory"):
    """The positions `[batch, memory_size]` a search of `memory` sees."""
    return held_entries(getattr(model.get_layer("knn_attention"), memory))[0]


def compiled_kwargs():
    # torch.compile of a stateful layer is not what users run on CPU; the
    # TF and JAX runs compile with XLA.
    if keras.backend.backend() == "torch":
        return {}
    return {"jit_compile": True}


def fit(model, x, y, **kwargs):
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, **kwargs)


@pytest.mark.parametrize("use_xl_cache", [False, True])
def test_compiled_fit_matches_eager_fit(use_xl_cache):
    x, y = stream()
    compiled = build_model(use_xl_cache)
    eager = build_model(use_xl_cache)
    eager.set_weights(compiled.get_weights())
    compiled.compile(
        optimizer=keras.optimizers.SGD(0.1), loss="mse", **compiled_kwargs()
    )
    eager.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", run_eagerly=True)
    fit(compiled, x, y)
    fit(eager, x, y)
    got, want = memory_state(compiled), memory_state(eager)
    # 32 tokens through 12 slots: lane 0 holds positions 20..31, lane 1
    # (restarted at step 2) holds 4..15.
    positions = searched_positions(eager)
    assert sorted(positions[0]) == list(range(20, 32))
    assert sorted(positions[1]) == list(range(4, 16))
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-4, err_msg=name)
    for a, b in zip(compiled.get_weights(), eager.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_a_search_in_blocks_trains_as_one_search():
    # 8 queries x 12 slots a (lane, head): scores_per_block=1 searches the
    # 2 lanes x 2 heads in 4 blocks (an `ops.map` in the compiled step),
    # None in one.
    x, y = stream()
    models = [build_model(scores_per_block=block) for block in (1, None)]
    models[1].set_weights(models[0].get_weights())
    losses = []
    for model in models:
        model.compile(
            optimizer=keras.optimizers.SGD(0.1), loss="mse", **compiled_kwargs()
        )
        losses.append(
            model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0).history["loss"]
        )
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    got, want = (memory_state(model) for model in models)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=name)
    for a, b in zip(models[0].get_weights(), models[1].get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_validation_during_fit_leaves_training_memory_alone():
    x, y = stream()
    x_val, y_val = stream(seed=1)
    plain = build_model()
    validated = build_model()
    validated.set_weights(plain.get_weights())
    for model in (plain, validated):
        model.compile(
            optimizer=keras.optimizers.SGD(0.1), loss="mse", **compiled_kwargs()
        )
    fit(plain, x, y)
    fit(validated, x, y, validation_data=(x_val, y_val), validation_batch_size=BATCH)
    got, want = memory_state(validated), memory_state(plain)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)
    inference = searched_positions(validated, "inference_memory")
    assert np.sum(inference >= 0) == 2 * 12


def test_mixed_bfloat16_fit_trains_with_finite_loss():
    x, y = stream()
    model = build_model(dtype="mixed_bfloat16")
    model.compile(optimizer="adam", loss="mse", **compiled_kwargs())
    history = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert memory_state(model)["keys"].dtype == "bfloat16"


def test_predict_streams_segments_into_the_inference_memory():
    x, _ = stream()
    model = build_model()
    model.predict(x, batch_size=BATCH, verbose=0)
    positions = searched_positions(model, "inference_memory")
    assert sorted(positions[0]) == list(range(20, 32))
    assert np.all(memory_state(model)["positions"] == -1)


def run_segments(model, x):
    outputs = []
    for step in range(STEPS):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        batch = {name: value[rows] for name, value in x.items()}
        outputs.append(to_numpy(model(batch, training=False)))
    return np.stack(outputs)


def test_saved_model_reloads_with_empty_memory_and_same_outputs(tmp_path):
    x, y = stream()
    model = build_model()
    model.compile(optimizer="adam", loss="mse")
    fit(model, x, y)
    run_segments(model, x)  # fills the inference memory too
    path = tmp_path / "model.keras"
    model.save(path)

    loaded = keras.saving.load_model(path)
    layer = loaded.get_layer("knn_attention")
    assert isinstance(layer, KNNAttention)
    for name in ("train_memory", "inference_memory"):
        assert np.all(memory_state(loaded, name)["positions"] == -1)
    with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as f:
        datasets = []
        h5py.File(f, "r").visititems(
            lambda name, item: (
                datasets.append(name) if isinstance(item, h5py.Dataset) else None
            )
        )
    assert any("knn_attention" in name for name in datasets)
    assert not [n for n in datasets if "memory" in n or "cache" in n]

    model.get_layer("knn_attention").reset_state()
    np.testing.assert_allclose(
        run_segments(loaded, x), run_segments(model, x), atol=1e-5
    )

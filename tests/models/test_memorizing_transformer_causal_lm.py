import keras
import numpy as np
import pytest

from keras_memtrans import KNNAttention
from keras_memtrans.data import LaneStreamer
from keras_memtrans.models import MemorizingTransformerCausalLM
from keras_memtrans.models import MemorizingTransformerTokenizer
from tests.arrays import to_numpy
from tests.memory.memories import held_entries
from tests.models.conftest import tiny_backbone


def stream(preprocessor, documents):
    return LaneStreamer(
        preprocessor(documents), batch_size=2, segment_length=32, shuffle=False
    )


def test_fit_on_a_repeated_batch_lowers_the_loss(preprocessor, documents):
    causal_lm = MemorizingTransformerCausalLM(tiny_backbone(), preprocessor)
    causal_lm.compile(optimizer=keras.optimizers.Adam(3e-3))
    x, y, w = stream(preprocessor, documents)[0]
    repeats = 6
    batches = {k: np.concatenate([v] * repeats) for k, v in x.items()}
    history = causal_lm.fit(
        batches,
        np.concatenate([y] * repeats),
        sample_weight=np.concatenate([w] * repeats),
        batch_size=2,
        epochs=4,
        shuffle=False,
        verbose=0,
    )
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]


def test_fit_streams_documents_into_the_training_memory(preprocessor, documents):
    causal_lm = MemorizingTransformerCausalLM(tiny_backbone(), preprocessor)
    causal_lm.compile()
    causal_lm.fit(
        stream(preprocessor, documents), steps_per_epoch=3, shuffle=False, verbose=0
    )
    memory = causal_lm.backbone.memory_layers[0].train_memory
    positions = to_numpy(memory.positions)
    # 3 segments of 32 tokens in each lane: positions 0..95.
    for lane in range(2):
        assert sorted(positions[lane][positions[lane] >= 0]) == list(range(96))


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_save_and_load_keep_weights_and_tokenizer(
    tmp_path, preprocessor, documents, tie_word_embeddings
):
    backbone = tiny_backbone(tie_word_embeddings=tie_word_embeddings)
    causal_lm = MemorizingTransformerCausalLM(backbone, preprocessor)
    x, _, _ = stream(preprocessor, documents)[0]
    causal_lm(x)
    path = tmp_path / "causal_lm.keras"
    causal_lm.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, MemorizingTransformerCausalLM)
    text = documents[0][:300]
    np.testing.assert_array_equal(loaded.preprocessor(text), preprocessor(text))
    causal_lm.reset_state()
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(causal_lm(x)), atol=1e-5)


def test_a_loaded_memory_layer_works_in_another_model(tmp_path, preprocessor):
    causal_lm = MemorizingTransformerCausalLM(tiny_backbone(), preprocessor)
    path = tmp_path / "causal_lm.keras"
    causal_lm.save(path)
    layer = keras.saving.load_model(path).backbone.memory_layers[0]
    assert isinstance(layer, KNNAttention)
    original = causal_lm.backbone.memory_layers[0]
    for loaded, saved in zip(layer.trainable_weights, original.trainable_weights):
        np.testing.assert_array_equal(to_numpy(loaded), to_numpy(saved))
    hidden = keras.Input((32, 32), batch_size=2)
    model = keras.Model(hidden, keras.layers.Dense(3)(layer(hidden)))
    assert model(np.ones((2, 32, 32), "float32")).shape == (2, 32, 3)


def test_a_tokenizer_of_another_vocabulary_is_rejected(preprocessor):
    with pytest.raises(ValueError, match="vocabulary_size is 512"):
        MemorizingTransformerCausalLM(tiny_backbone(vocabulary_size=512), preprocessor)


def test_a_loaded_model_checks_its_tokenizer_on_use(tmp_path, preprocessor):
    causal_lm = MemorizingTransformerCausalLM(tiny_backbone(), preprocessor)
    path = tmp_path / "causal_lm.keras"
    causal_lm.save(path)
    loaded = keras.saving.load_model(path)
    # The loaded tokenizer's vocabulary is swapped for a smaller one: the
    # first use names the mismatch instead of indexing out of range.
    loaded.preprocessor.tokenizer.set_proto(
        MemorizingTransformerTokenizer.from_documents(
            ["def f(x):\n    return x\n"] * 40, vocabulary_size=300
        ).proto
    )
    with pytest.raises(ValueError, match="not trained together"):
        loaded.generate("def f(")


def test_generate_reads_a_long_prompt_into_memory(preprocessor, documents):
    causal_lm = MemorizingTransformerCausalLM(tiny_backbone(), preprocessor)
    prompt = documents[0][:2000]
    prompt_tokens = len(preprocessor(prompt))
    assert prompt_tokens > 3 * 32
    text = causal_lm.generate(prompt, max_new_tokens=40)
    assert isinstance(text, str)
    memory = causal_lm.backbone.memory_layers[0].inference_memory
    # Every complete segment of prompt and continuation was committed.
    stored = int(np.sum(held_entries(memory)[0][0] >= 0))
    assert stored == min(256, (prompt_tokens + 40 - 1) // 32 * 32)


def test_generate_without_preprocessor_returns_tokens():
    causal_lm = MemorizingTransformerCausalLM(tiny_backbone())
    out = causal_lm.generate([np.arange(5), np.arange(40)], max_new_tokens=7)
    assert out.shape == (2, 7)
    assert out.dtype == np.int32
    with pytest.raises(ValueError, match="lanes"):
        causal_lm.generate([np.arange(5)] * 3, max_new_tokens=1)


def test_generate_rejects_bad_requests():
    causal_lm = MemorizingTransformerCausalLM(tiny_backbone())
    with pytest.raises(ValueError, match="empty"):
        causal_lm.generate([])
    with pytest.raises(ValueError, match="max_new_tokens"):
        causal_lm.generate([np.arange(5)], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        causal_lm.generate([np.arange(5)], temperature=-1.0)


def test_sampling_is_reproducible_with_a_seed():
    causal_lm = MemorizingTransformerCausalLM(tiny_backbone())
    prompts = [np.arange(5), np.arange(3, 40)]

    def sample(seed):
        return causal_lm.generate(
            prompts, max_new_tokens=12, temperature=1.0, seed=seed
        )

    first = sample(seed=3)
    np.testing.assert_array_equal(sample(seed=3), first)
    # Untrained logits are near uniform over 512 tokens: another seed
    # draws other tokens.
    assert np.any(sample(seed=4) != first)


class GenerateMidway(keras.callbacks.Callback):
    """Samples text after the first training batch, as users' callbacks do."""

    def __init__(self, snapshot):
        super().__init__()
        self.snapshot, self.before, self.after, self.text = snapshot, None, None, None

    def on_train_batch_end(self, batch, logs=None):
        if batch == 0:
            model = self.model  # on JAX, reading `model` syncs its state
            self.before = self.snapshot(model)
            self.text = model.generate("def ", max_new_tokens=3)
            self.after = self.snapshot(model)


@pytest.mark.parametrize("memory_kind", ["exact", "scann"])
def test_generating_during_fit_leaves_the_training_state_alone(
    preprocessor, documents, memory_kind
):
    causal_lm = MemorizingTransformerCausalLM(
        tiny_backbone(memory_options={"memory_kind": memory_kind}), preprocessor
    )
    causal_lm.compile(optimizer=keras.optimizers.Adam(1e-3))
    (layer,) = causal_lm.backbone.memory_layers

    def training_state(model):
        state = {
            v.path: to_numpy(v)
            for v in model.non_trainable_variables
            if "/train_" in v.path
        }
        state["memory positions"] = to_numpy(layer.train_memory.positions)
        return state

    callback = GenerateMidway(training_state)
    causal_lm.fit(
        stream(preprocessor, documents),
        steps_per_epoch=2,
        shuffle=False,
        verbose=0,
        callbacks=[callback],
    )
    assert isinstance(callback.text, str)
    assert (callback.before["memory positions"] >= 0).sum() == 2 * 32
    assert set(callback.after) == set(callback.before)
    for path, value in callback.before.items():
        np.testing.assert_array_equal(callback.after[path], value, err_msg=path)


def test_the_loss_is_the_mean_over_real_target_tokens(preprocessor, documents):
    causal_lm = MemorizingTransformerCausalLM(tiny_backbone(), preprocessor)
    causal_lm.compile()
    x, y, _ = stream(preprocessor, documents)[0]
    rng = np.random.default_rng(0)
    weight = (rng.random(y.shape) < 0.3).astype("float32")
    logits = to_numpy(causal_lm(x)).astype("float64")
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, y[..., None], axis=-1)[..., 0]
    expected = (nll * weight).sum() / weight.sum()
    loss = causal_lm.compute_loss(x, y, causal_lm(x), sample_weight=weight)
    np.testing.assert_allclose(float(to_numpy(loss)), expected, rtol=1e-4)
    empty = causal_lm.compute_loss(x, y, causal_lm(x), sample_weight=0 * weight)
    assert float(to_numpy(empty)) == 0.0


def decayed_by_one_step(causal_lm):
    """The paths of the trainable variables that one optimizer step with
    zero gradients changes (AdamW: only its decay,
    `value * (1 - lr * weight_decay)`, lr 0.1 and weight decay 0.5)."""
    variables = causal_lm.trainable_variables
    before = [to_numpy(v) for v in variables]
    causal_lm.optimizer.apply_gradients(
        [(keras.ops.zeros(v.shape, v.dtype), v) for v in variables]
    )
    decayed = set()
    for variable, value in zip(variables, before):
        after = to_numpy(variable)
        if np.array_equal(after, value):
            continue
        # Zero gradients: only the decay, value * (1 - lr * weight_decay).
        np.testing.assert_allclose(after, value * (1 - 0.1 * 0.5), rtol=1e-5)
        decayed.add(variable.path)
    return decayed


def test_weight_decay_applies_to_kernels_and_embeddings_only(preprocessor):
    causal_lm = MemorizingTransformerCausalLM(
        tiny_backbone(smear_keys=True, tie_word_embeddings=False), preprocessor
    )
    causal_lm.compile(optimizer=keras.optimizers.AdamW(0.1, weight_decay=0.5))
    decayed = decayed_by_one_step(causal_lm)
    variables = causal_lm.trainable_variables
    kernels = {v.path for v in variables if v.path.endswith("kernel")}
    embeddings = {
        "token_embedding/embeddings",
        "token_embedding/reverse_embeddings",
    }
    assert decayed == kernels | embeddings
    kept = {v.path.rsplit("/", 1)[-1] for v in variables} - {"kernel"}
    assert {"attention_scale", "gate_bias", "key_smear_logit", "gamma", "beta"} < kept


def test_compile_keeps_the_weight_decay_exclusions_already_set(preprocessor):
    causal_lm = MemorizingTransformerCausalLM(
        tiny_backbone(tie_word_embeddings=False), preprocessor
    )
    optimizer = keras.optimizers.AdamW(0.1, weight_decay=0.5)
    feedforward = causal_lm.backbone.transformer_layers[0].feedforward_output
    optimizer.exclude_from_weight_decay(
        var_list=[feedforward.kernel], var_names=["reverse_embeddings"]
    )
    causal_lm.compile(optimizer=optimizer)
    paths = {v.path for v in causal_lm.trainable_variables}
    kernels = {path for path in paths if path.endswith("kernel")}
    kept = kernels - {feedforward.kernel.path} | {"token_embedding/embeddings"}
    assert decayed_by_one_step(causal_lm) == kept


def test_a_continuation_does_not_depend_on_the_other_prompts(preprocessor):
    backbone = tiny_backbone(smear_keys=True, memory_options={"memory_kind": "exact"})
    causal_lm = MemorizingTransformerCausalLM(backbone)
    rng = np.random.default_rng(0)
    for variable in backbone.trainable_variables:  # a model far from its init
        value = rng.normal(0, 0.3, tuple(variable.shape))
        variable.assign(value.astype(variable.dtype))
    prompt = rng.integers(1, 400, 45)
    continuations = [
        causal_lm.generate([prompt, rng.integers(1, 400, other)], max_new_tokens=40)[0]
        for other in (3, 50, 60, 83)
    ]
    for continuation in continuations[1:]:
        np.testing.assert_array_equal(continuation, continuations[0])


def test_tied_query_key_init_trains_the_two_apart(preprocessor, documents):
    causal_lm = MemorizingTransformerCausalLM(
        tiny_backbone(tie_query_key_init=True), preprocessor
    )
    causal_lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    attention = causal_lm.backbone.memory_layers[0]
    query, key = attention.query_projection.kernel, attention.key_projection.kernel
    np.testing.assert_array_equal(to_numpy(key), to_numpy(query))
    causal_lm.fit(
        stream(preprocessor, documents), steps_per_epoch=2, shuffle=False, verbose=0
    )
    assert not np.allclose(to_numpy(key), to_numpy(query))


def segments(count, seed=0, vocabulary=400):
    """`count` consecutive segment batches of the tiny model (2 lanes of 32
    tokens): lane 1 starts a new document at the third, and its last
    segment is half padding."""
    rng = np.random.default_rng(seed)
    batches = []
    for step in range(count):
        padding_mask = np.ones((2, 32), bool)
        if step == count - 1:
            padding_mask[1, 16:] = False
        batches.append(
            {
                "token_ids": rng.integers(1, vocabulary, (2, 32)).astype("int32"),
                "document_start": np.array([step == 0, step in (0, 2)]),
                "padding_mask": padding_mask,
            }
        )
    return batches


def test_score_gives_the_models_own_logits_and_losses_segment_after_segment():
    causal_lm = MemorizingTransformerCausalLM(tiny_backbone())
    batches = segments(4)
    targets = [np.roll(batch["token_ids"], -1, axis=1) for batch in batches]
    expected = [causal_lm.predict_on_batch(batch) for batch in batches]
    causal_lm.reset_state()
    for batch, logits in zip(batches, expected):
        scored = causal_lm.score(**batch)
        assert scored.shape == (2, 32, 400) and scored.dtype == np.float32
        np.testing.assert_allclose(scored, logits, rtol=1e-5, atol=1e-5)
    causal_lm.reset_state()
    for batch, target, logits in zip(batches, targets, expected):
        losses = causal_lm.score(**batch, scoring_mode="loss", target_ids=target)
        # Float64 cross-entropy of the predicted logits, every position.
        logits = logits.astype("float64")
        shifted = logits - logits.max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        nll = -np.take_along_axis(log_probs, target[..., None], axis=-1)[..., 0]
        np.testing.assert_allclose(losses, nll, rtol=1e-4, atol=1e-4)


def test_score_returns_what_each_memory_layer_retrieved():
    causal_lm = MemorizingTransformerCausalLM(
        tiny_backbone(memory_layer_indices=(0, 1))
    )
    for step, batch in enumerate(segments(3)):
        logits, neighbors = causal_lm.score(**batch, return_neighbors=True)
        assert logits.shape == (2, 32, 400) and len(neighbors) == 2
        for positions in neighbors:
            assert positions.shape == (2, 32, 2, 8)
            # Memory holds this lane's earlier segments of its document only.
            for lane, first in enumerate((32 * step, 32 * (step % 2))):
                found = positions[lane][positions[lane] >= 0]
                assert found.size == (positions[lane].size if first else 0)
                assert found.size == 0 or found.max() < first
    no_memory = MemorizingTransformerCausalLM(tiny_backbone(memory_layer_indices=()))
    assert no_memory.score(**segments(1)[0], return_neighbors=True)[1] == []


def test_score_reads_the_inference_state_only(tmp_path):
    causal_lm = MemorizingTransformerCausalLM(tiny_backbone())
    (layer,) = causal_lm.backbone.memory_layers
    training_state = [to_numpy(v) for v in layer.train_memory.weights]
    causal_lm.score(**segments(1)[0])
    for variable, value in zip(layer.train_memory.weights, training_state):
        np.testing.assert_array_equal(to_numpy(variable), value)
    # Lane 0's 32 tokens and lane 1's 16 real ones.
    assert (to_numpy(layer.inference_memory.positions) >= 0).sum() == 32 + 16
    # The compiled scoring step is not part of the model: saving is unchanged.
    causal_lm.save(tmp_path / "causal_lm.keras")
    loaded = keras.saving.load_model(tmp_path / "causal_lm.keras")
    assert [v.path for v in loaded.weights] == [v.path for v in causal_lm.weights]


def test_the_first_score_runs_the_step_once(monkeypatch):
    # An unbuilt step model's first `predict_on_batch` ran the step once more,
    # eagerly, to build it: on JAX each of its operations compiled on its own
    # (8 s of a tiny model's first 10 s of scoring).
    causal_lm = MemorizingTransformerCausalLM(tiny_backbone())
    calls = []

    def counted(inputs):
        calls.append(inputs)
        return type(causal_lm)._score_step(causal_lm, inputs)

    monkeypatch.setattr(causal_lm, "_score_step", counted)
    assert causal_lm.score(**segments(1)[0]).shape == (2, 32, 400)
    assert len(calls) == 1


def test_score_rejects_bad_requests():
    causal_lm = MemorizingTransformerCausalLM(tiny_backbone())
    token_ids = segments(1)[0]["token_ids"]
    with pytest.raises(ValueError, match="scoring_mode"):
        causal_lm.score(token_ids, scoring_mode="perplexity")
    with pytest.raises(ValueError, match="target_ids"):
        causal_lm.score(token_ids, scoring_mode="loss")

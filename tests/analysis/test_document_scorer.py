import numpy as np
import pytest

from keras_memtrans.analysis import DocumentScorer
from keras_memtrans.models import MemorizingTransformerCausalLM
from tests.models.conftest import tiny_backbone

SEGMENT = 8


def causal_lm(memory=True, **overrides):
    config = dict(
        segment_length=SEGMENT, memory_options=dict(memory_size=64, num_neighbors=16)
    )
    config.update(overrides)
    if not memory:
        config["memory_layer_indices"] = ()
    return MemorizingTransformerCausalLM(tiny_backbone(vocabulary_size=50, **config))


def reference_losses(model, document):
    """Float64 NLL of one document read alone in lane 0, segment by segment,
    from the model's own logits."""
    batch = model.backbone.batch_size
    losses = []
    for begin in range(0, document.size - 1, SEGMENT):
        width = min(SEGMENT, document.size - 1 - begin)
        token_ids = np.zeros((batch, SEGMENT), "int32")
        token_ids[0, :width] = document[begin : begin + width]
        padding_mask = np.zeros((batch, SEGMENT), bool)
        padding_mask[0, :width] = True
        document_start = np.zeros((batch,), bool)
        document_start[0] = begin == 0
        logits = model.predict_on_batch(
            {
                "token_ids": token_ids,
                "document_start": document_start,
                "padding_mask": padding_mask,
            }
        )[0, :width].astype("float64")
        logits -= logits.max(axis=-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        targets = document[begin + 1 : begin + width + 1]
        losses.append(-log_probs[np.arange(width), targets])
    return np.concatenate(losses)


def documents(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 50, size=n).astype("int32") for n in lengths]


@pytest.mark.parametrize("memory", [True, False])
def test_losses_match_the_model_read_one_document_at_a_time(memory):
    model = causal_lm(memory=memory)
    docs = documents([30, 9, 2, 41])  # more documents than lanes
    scores = DocumentScorer(model)(docs)
    assert len(scores) == len(docs)
    for document, score in zip(docs, scores):
        np.testing.assert_array_equal(score["token_ids"], document)
        assert score["losses"].shape == (document.size - 1,)
        np.testing.assert_allclose(
            score["losses"], reference_losses(model, document), rtol=1e-4, atol=1e-4
        )
        assert len(score["neighbors"]) == (1 if memory else 0)


def test_neighbors_are_earlier_segments_of_the_same_document():
    model = causal_lm()  # memory 64 tokens, k = 16, segments of 8
    scores = DocumentScorer(model)(documents([40, 23]))
    for score in scores:
        (positions,) = score["neighbors"]
        heads = model.backbone.num_heads
        assert positions.shape == (score["losses"].size, heads, 16)
        for query in range(score["losses"].size):
            first = query - query % SEGMENT  # first position of its segment
            for head in range(heads):
                found = set(positions[query, head]) - {-1}
                if first <= 16:  # at most k tokens stored: all are retrieved
                    assert found == set(range(first))
                else:
                    assert len(found) == 16 and found <= set(range(first))


def test_leaves_the_training_memory_untouched():
    model = causal_lm()
    memory = model.backbone.memory_layers[0].train_memory
    before = [np.array(v) for v in memory.weights]
    DocumentScorer(model)(documents([30]))
    for variable, value in zip(memory.weights, before):
        np.testing.assert_array_equal(np.array(variable), value)


def test_scores_strings_through_the_preprocessor(preprocessor, documents):
    model = MemorizingTransformerCausalLM(
        tiny_backbone(memory_options=dict(memory_size=64, num_neighbors=4)),
        preprocessor,
    )
    (score,) = DocumentScorer(model)([documents[0][:500]])
    np.testing.assert_array_equal(score["token_ids"], preprocessor(documents[0][:500]))
    assert np.isfinite(score["losses"]).all()


@pytest.mark.parametrize(
    "docs, match",
    [
        ([np.array([3])], "at least 2 tokens"),
        ([np.ones((2, 4), "int32")], "1-D"),
        (["some text"], "preprocessor"),
    ],
)
def test_bad_documents_raise(docs, match):
    with pytest.raises(ValueError, match=match):
        DocumentScorer(causal_lm())(docs)

"""generate() copies through memory: a constructed two-layer induction model.

Vocabulary V = 16, one-hot token embeddings in the first V of 2V dimensions.
Layer 0 attends only to the previous token (relative bias) and writes that
token into the other V dimensions. Layer 1, the memory layer, queries with
the current token and keys on the previous one, and reads out the token that
followed: after "A" it retrieves the position just after an earlier "A" and
predicts what came there. No gradient descent: the weights are set by hand,
so the test isolates the memory path of `generate()`.
"""

import keras
import numpy as np
import pytest

from keras_memtrans.models import MemorizingTransformerBackbone
from keras_memtrans.models import MemorizingTransformerCausalLM

VOCAB, SEGMENT = 16, 8


def induction_model(memory_gate_bias, memory_kind="exact"):
    backbone = MemorizingTransformerBackbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_heads=1,
        hidden_dim=2 * VOCAB,
        intermediate_dim=4,
        batch_size=1,
        segment_length=SEGMENT,
        memory_layer_indices=(1,),
        memory_options=dict(
            memory_size=64,
            num_neighbors=4,
            memory_kind=memory_kind,
            # A ScaNN search that visits every leaf scores every key exactly:
            # the test is about generate()'s memory path, not ScaNN's recall.
            num_leaves=4,
            num_leaves_to_search=4,
        ),
        use_xl_cache=True,
    )
    centre = np.eye(VOCAB) - 1.0 / VOCAB  # removes layer-norm offsets
    first, second = slice(0, VOCAB), slice(VOCAB, 2 * VOCAB)

    def reads(part):  # [hidden, heads=1, head_dim]
        kernel = np.zeros((2 * VOCAB, 1, 2 * VOCAB))
        kernel[part, 0, :VOCAB] = centre
        return kernel

    def writes(part, gain):  # [heads=1, head_dim, hidden]
        kernel = np.zeros((1, 2 * VOCAB, 2 * VOCAB))
        kernel[0, :VOCAB, part] = gain * np.eye(VOCAB)
        return kernel

    embeddings = np.zeros((VOCAB, 2 * VOCAB))
    embeddings[:, first] = np.eye(VOCAB)
    backbone.token_embedding.embeddings.assign(embeddings)
    previous_token, memory = (b.attention for b in backbone.transformer_layers)
    bias = np.full((32, 1), -50.0)
    bias[1] = 50.0  # bucket 1: the key one position back
    previous_token.relative_position_bias.embeddings.assign(bias)
    previous_token.attention_scale.assign(np.zeros(1))
    previous_token.value_projection.kernel.assign(reads(first))
    previous_token.output_projection.kernel.assign(writes(second, 1.0))
    memory.query_projection.kernel.assign(reads(first))
    memory.key_projection.kernel.assign(reads(second))
    memory.value_projection.kernel.assign(reads(first))
    memory.output_projection.kernel.assign(writes(first, 10.0))
    memory.attention_scale.assign(np.full(1, 50.0))
    memory.gate_bias.assign(np.full(1, memory_gate_bias))
    memory.relative_position_bias.embeddings.assign(np.zeros((32, 1)))
    for block in backbone.transformer_layers:
        for dense in (block.feedforward_intermediate, block.feedforward_output):
            dense.kernel.assign(np.zeros(dense.kernel.shape))
    return MemorizingTransformerCausalLM(backbone)


def prompt(seed=0):
    """A rare run 12 13 14 15 early on, 45 filler tokens, then 12 again."""
    filler = np.random.default_rng(seed).integers(4, 12, size=60)
    return np.concatenate([filler[:3], [12, 13, 14, 15], filler[3:48], [12]])


@pytest.mark.parametrize(
    "seed, memory_kind", [(0, "exact"), (1, "exact"), (0, "scann")]
)
def test_generate_copies_a_sequence_seen_beyond_the_local_context(seed, memory_kind):
    tokens = prompt(seed)
    # The run ends 45 tokens before the query: beyond the segment (8) and
    # the XL cache (8 more), so only the memory can bring it back.
    assert len(tokens) - 1 - 6 > 2 * SEGMENT
    model = induction_model(memory_gate_bias=20.0, memory_kind=memory_kind)
    continuation = model.generate(tokens, 3)
    np.testing.assert_array_equal(continuation, [13, 14, 15])
    # Only complete segments were written: the prompt's 53 tokens, left-
    # padded to 7 whole segments; the 3 new tokens do not complete the 8th.
    (layer,) = model.backbone.memory_layers
    if memory_kind == "scann":
        assert layer.inference_memory.num_leaves_to_search == 4
    memory_positions = np.asarray(
        keras.ops.convert_to_numpy(layer.inference_memory.positions)
    )
    assert sorted(set(memory_positions[0]) - {-1}) == list(range(len(tokens)))


def test_without_memory_the_sequence_is_not_copied():
    continuation = induction_model(memory_gate_bias=-20.0).generate(prompt(), 3)
    assert list(continuation) != [13, 14, 15]
    assert continuation[0] != 13


def test_a_prompts_complete_segments_are_read_by_the_backbones_predict_step():
    # Called as a layer, a segment ran op by op on JAX and without its
    # graph on TensorFlow: reading the `quick` model's prompt took 3.5-4x
    # as long (docs/performance.md, "Generation").
    model = induction_model(memory_gate_bias=20.0)
    assert model.backbone.predict_function is None
    model.generate(prompt(), 1)
    assert model.backbone.predict_function is not None

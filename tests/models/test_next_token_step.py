import contextlib

import keras
import numpy as np
import pytest
from keras import ops

from keras_memtrans.layers import decoder_block
from keras_memtrans.layers import segment_decoding_mixin
from keras_memtrans.models import MemorizingTransformerCausalLM
from keras_memtrans.models import memorizing_transformer_backbone
from keras_memtrans.models import next_token_step
from keras_memtrans.models.next_token_step import NextTokenStep
from keras_memtrans.models.next_token_steps import NextTokenSteps
from tests.arrays import to_numpy
from tests.host_data import only_on_torch
from tests.host_data import package_host_tensors
from tests.models.conftest import tiny_backbone

# The modules whose generation step calls layers through `direct_call`.
DIRECT_CALLERS = (
    decoder_block,
    segment_decoding_mixin,
    memorizing_transformer_backbone,
    next_token_step,
)


def whole_segment_logits(causal_lm, token_ids, padding_mask, position):
    """The reference: the whole model, uncompiled, on the segment up to
    `position` (later tokens padding), its state updates dropped (and any
    host memory frozen); the logits `[batch, vocab]` at `position`."""
    token_ids, padding_mask = token_ids.copy(), padding_mask.copy()
    token_ids[:, position + 1 :] = 0
    padding_mask[:, position + 1 :] = False
    with contextlib.ExitStack() as stack:
        for layer in causal_lm.backbone.memory_layers:
            stack.enter_context(layer.inference_memory.frozen())
        logits, _ = causal_lm.stateless_call(
            [v.value for v in causal_lm.trainable_variables],
            [v.value for v in causal_lm.non_trainable_variables],
            {
                "token_ids": token_ids,
                "padding_mask": padding_mask,
                "document_start": np.zeros((2,), bool),
            },
            training=False,
        )
    return to_numpy(logits)[:, position]


@pytest.mark.parametrize(
    "memory_kind, num_key_value_heads", [("exact", None), ("scann", None), ("exact", 1)]
)
def test_each_token_gets_the_whole_segments_logits_and_nothing_is_written(
    memory_kind, num_key_value_heads
):
    causal_lm = MemorizingTransformerCausalLM(
        tiny_backbone(
            memory_options={"memory_kind": memory_kind},
            use_xl_cache=True,
            smear_keys=True,
            num_key_value_heads=num_key_value_heads,
        )
    )
    rng = np.random.default_rng(0)
    causal_lm.reset_state(training=False)
    causal_lm(  # one segment in memory, XL cache and carried key
        {
            "token_ids": rng.integers(1, 400, (2, 32)).astype("int32"),
            "document_start": np.array([True, True]),
            "padding_mask": np.ones((2, 32), bool),
        },
        training=False,
    )
    state = [to_numpy(v) for v in causal_lm.weights]
    # As generate() does: one step for a prompt's tokens, one for a single
    # token, sharing the decode cache (each compiled for its token count).
    prompt_step = NextTokenStep(causal_lm, starts_segment=True)
    token_step = NextTokenStep(causal_lm, decode_caches=prompt_step.decode_caches)
    # Two segments decoded in turn, the second shorter: what the first left
    # in the cache beyond the second's positions is never read. Each starts
    # with a prompt of 6 tokens in one call, then one token per call.
    prompt = 6
    for length in (20, 9):
        padding_mask = np.ones((2, length), bool)
        padding_mask[1, :3] = False  # a left-padded prompt in lane 1
        token_ids = rng.integers(1, 400, (2, length)).astype("int32") * padding_mask
        segment = np.zeros((2, 32), "int32"), np.zeros((2, 32), bool)
        segment[0][:, :length], segment[1][:, :length] = token_ids, padding_mask
        for start, end in [(0, prompt), *((p, p + 1) for p in range(prompt, length))]:
            step = prompt_step if start == 0 else token_step
            logits = step.predict_on_batch(
                {
                    "token_ids": token_ids[:, start:end],
                    "cache_update_index": np.full((2,), start, "int32"),
                    "token_mask": padding_mask[:, start:end],
                }
            )
            assert logits.shape == (2, 400) and logits.dtype == np.float32
            if end - 1 not in (prompt - 1, prompt + 2, length - 1):
                continue  # the reference is slow: a few positions suffice
            np.testing.assert_allclose(
                logits,
                whole_segment_logits(causal_lm, *segment, end - 1),
                rtol=1e-4,
                atol=1e-4,
            )
    for variable, value in zip(causal_lm.weights, state):
        np.testing.assert_array_equal(to_numpy(variable), value, variable.path)


def test_the_first_decode_runs_the_step_once(monkeypatch):
    # An unbuilt step model's first `predict_on_batch` ran the step once more,
    # eagerly, to build it: on JAX each of its operations compiled on its own
    # (most of a tiny model's first `generate`).
    causal_lm = MemorizingTransformerCausalLM(tiny_backbone())
    backbone = causal_lm.backbone
    calls = []

    def counted(*args):
        calls.append(args)
        return type(backbone).call_with_cache(backbone, *args)

    monkeypatch.setattr(backbone, "call_with_cache", counted)
    step = NextTokenStep(causal_lm, starts_segment=True)
    logits = step.predict_on_batch(
        {
            "token_ids": np.array([[5, 17], [8, 9]], "int32"),
            "cache_update_index": np.zeros((2,), "int32"),
            "token_mask": np.ones((2, 2), bool),
        }
    )
    assert logits.shape == (2, 400)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "model_dtype, global_policy",
    [
        ("float32", "float32"),
        ("mixed_bfloat16", "float32"),
        ("float32", "mixed_bfloat16"),
    ],
)
def test_sublayers_called_directly_give_the_logits_of_normal_calls(
    monkeypatch, model_dtype, global_policy
):
    # `direct_call` runs a sublayer's `call` alone only where its normal
    # call would change nothing: the same logits, bit for bit, in a mixed
    # precision model and in a float32 one under a mixed global policy
    # (whose autocast scope the step must not open around them).
    causal_lm = MemorizingTransformerCausalLM(
        tiny_backbone(use_xl_cache=True, smear_keys=True, dtype=model_dtype)
    )
    keras.config.set_dtype_policy(global_policy)
    inputs = [
        {
            "token_ids": np.array([[5, 17, 3], [0, 8, 9]], "int32"),
            "cache_update_index": np.zeros((2,), "int32"),
            "token_mask": np.array([[True, True, True], [False, True, True]]),
        },
        {
            "token_ids": np.array([[42], [7]], "int32"),
            "cache_update_index": np.full((2,), 3, "int32"),
            "token_mask": np.ones((2, 1), bool),
        },
    ]

    def step_logits():
        prompt_step = NextTokenStep(causal_lm, starts_segment=True)
        token_step = NextTokenStep(causal_lm, decode_caches=prompt_step.decode_caches)
        return [
            prompt_step.predict_on_batch(inputs[0]),
            token_step.predict_on_batch(inputs[1]),
        ]

    direct = step_logits()

    def normal_call(layer, inputs, **kwargs):
        return layer(inputs, **kwargs)

    for module in DIRECT_CALLERS:
        monkeypatch.setattr(module, "direct_call", normal_call)
    for got, expected in zip(direct, step_logits()):
        np.testing.assert_array_equal(got, expected)


def test_a_segment_started_by_one_token_reads_the_xl_cache_committed_before_it():
    # generate() starts each segment after the prompt's with one token at
    # position 0: that step writes the XL cache committed since the last
    # segment, and the position bias, into the decode cache; a step that did
    # not would attend to what the previous segment left there.
    causal_lm = MemorizingTransformerCausalLM(
        tiny_backbone(use_xl_cache=True, smear_keys=True)
    )
    rng = np.random.default_rng(1)
    steps = NextTokenSteps(causal_lm)

    def segment():
        return (
            rng.integers(1, 400, (2, 32)).astype("int32"),
            np.ones((2, 32), bool),
        )

    def commit(token_ids, padding_mask, document_start):
        causal_lm(
            {
                "token_ids": token_ids,
                "padding_mask": padding_mask,
                "document_start": np.full((2,), document_start),
            },
            training=False,
        )

    def decode(token_ids, padding_mask, start, end):
        return steps(
            {
                "token_ids": token_ids[:, start:end],
                "cache_update_index": np.full((2,), start, "int32"),
                "token_mask": padding_mask[:, start:end],
            }
        )

    causal_lm.reset_state(training=False)
    commit(*segment(), document_start=True)
    first = segment()
    decode(*first, 0, 4)  # a prompt, then two tokens
    decode(*first, 4, 5)
    decode(*first, 5, 6)
    commit(*first, document_start=False)  # a new XL cache and memory
    second = segment()
    for position in range(3):  # from position 0, one token per step
        np.testing.assert_allclose(
            decode(*second, position, position + 1),
            whole_segment_logits(causal_lm, *second, position),
            rtol=1e-4,
            atol=1e-4,
        )


@only_on_torch
def test_a_decode_step_makes_no_tensor_from_host_data():
    causal_lm = MemorizingTransformerCausalLM(
        tiny_backbone(use_xl_cache=True, smear_keys=True)
    )
    causal_lm.reset_state(training=False)
    prompt_step = NextTokenStep(causal_lm, starts_segment=True)
    token_step = NextTokenStep(causal_lm, decode_caches=prompt_step.decode_caches)
    rng = np.random.default_rng(2)

    def decode(step, start, end):
        return step.predict_on_batch(
            {
                "token_ids": ops.convert_to_tensor(
                    rng.integers(1, 400, (2, end - start)), "int32"
                ),
                "cache_update_index": ops.full((2,), start, "int32"),
                "token_mask": ops.ones((2, end - start), "bool"),
            }
        )

    decode(prompt_step, 0, 4)  # builds both steps
    decode(token_step, 4, 5)
    with package_host_tensors() as sites:
        decode(prompt_step, 0, 4)
        decode(token_step, 4, 5)
        decode(token_step, 5, 6)
    assert sites == [], sorted(set(sites))

import keras
import pytest
from keras import ops

from keras_memtrans.memory import block_search
from keras_memtrans.memory.block_search import CPU_SCORES_PER_BLOCK
from keras_memtrans.memory.block_search import queries_per_block
from keras_memtrans.memory.block_search import resolved_scores_per_block
from keras_memtrans.memory.host import on_accelerator


@pytest.mark.parametrize(
    "num_queries, num_slots, budget, want",
    [
        (256, 8448, 2**21, 256),  # 1.03 budgets: whole
        (1024, 8448, 2**21, 256),  # 4.1 budgets: 4 chunks
        (9, 8, 40, 3),  # 24 scores are nearer to 40 than 72 or 8
        (5, 8, 1, 1),  # one query at least
        (4, 10, 30, 4),  # 20 and 40 scores as near to 30: the larger chunk
        (7, 8, None, 7),  # no budget: whole
    ],
)
def test_a_row_is_scored_in_chunks_of_queries_of_about_the_budget(
    num_queries, num_slots, budget, want
):
    assert queries_per_block(num_queries, num_slots, budget) == want


@pytest.mark.parametrize(
    "accelerator, want", [(False, CPU_SCORES_PER_BLOCK), (True, 2**28)]
)
def test_auto_blocks_fit_a_cpu_cache_and_are_larger_on_an_accelerator(
    monkeypatch, accelerator, want
):
    monkeypatch.setattr(block_search, "on_accelerator", lambda: accelerator)
    assert resolved_scores_per_block("auto") == want
    assert resolved_scores_per_block(64) == 64
    assert resolved_scores_per_block(None) is None


def test_on_accelerator_is_where_a_new_tensor_lives():
    tensor = ops.zeros(())
    backend = keras.backend.backend()
    if backend == "jax":
        (device,) = tensor.devices()
        platform = device.platform
    elif backend == "tensorflow":
        platform = tensor.device.rsplit("/device:", 1)[-1].split(":")[0]
    else:
        platform = tensor.device.type
    assert on_accelerator() == (platform.lower() != "cpu"), platform

import pytest

from keras_memtrans.memory.block_search import queries_per_block


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

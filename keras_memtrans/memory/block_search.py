"""The exact memory's search: every slot of each (lane, head) scored, in
blocks of (lane, head)s whose scores are reduced to their top-k while they
are still in the CPU's caches, instead of being written whole to memory and
read back (docs/performance.md, "Blocks of (lane, head)s").

On a GPU or TPU there is no such cache to keep the scores in, and each
block is one more round of small kernels (on an H200, torch's step with
an 8K memory launched twice the kernels of one without it): there the
blocks are as large as a bounded score matrix allows.
"""

import ml_dtypes
from keras import ops
from keras.backend import standardize_dtype

from keras_memtrans.memory.host import approx_top_k
from keras_memtrans.memory.host import full_like
from keras_memtrans.memory.host import on_accelerator
from keras_memtrans.memory.top_k import group_size_for
from keras_memtrans.memory.top_k import top_k_slots

# `scores_per_block="auto"`: 8 MB of float32 scores, within a CPU's caches
# (1.15-2x faster than scoring whole lanes at 8K on a 2-core CPU, see
# docs/performance.md); 1 GB on an accelerator, a bound on the memory a
# block's scores take, with few blocks up to a 65K memory.
CPU_SCORES_PER_BLOCK = 2**21
ACCELERATOR_SCORES_PER_BLOCK = 2**28


def resolved_scores_per_block(scores_per_block):
    """The block budget `scores_per_block` stands for: its own value, or
    for `"auto"` `CPU_SCORES_PER_BLOCK` on the CPU and
    `ACCELERATOR_SCORES_PER_BLOCK` on a GPU or TPU."""
    if scores_per_block != "auto":
        return scores_per_block
    if on_accelerator():
        return ACCELERATOR_SCORES_PER_BLOCK
    return CPU_SCORES_PER_BLOCK


def top_slots_in_blocks(
    queries,
    keys,
    filled,
    num_neighbors,
    scores_per_block,
    top_k="exact",
    recall_target=0.95,
):
    """The slots of each query's top-k by inner product among the filled ones.

    Args:
        queries: `[batch, query, heads, head_dim]`.
        keys: `[batch, heads, slots, head_dim]`, each (lane, head)'s slots.
        filled: bool `[batch, slots]`: the slots searched; the others rank
            below every one of them.
        num_neighbors: int, `k`.
        scores_per_block: int, `None` or `"auto"`, see `rows_per_block`,
            `queries_per_block` and `resolved_scores_per_block`.
        top_k: `"exact"` (`top_k.top_k_slots`) or `"approx"`
            (`host.approx_top_k`).
        recall_target: float, the recall target of `"approx"`.

    Returns:
        int32 `[batch, heads, query, k]` slots, in no particular order.
    """
    batch_size, num_heads, num_slots, head_dim = keys.shape
    num_queries = queries.shape[1]
    scores_per_block = resolved_scores_per_block(scores_per_block)
    rows = batch_size * num_heads
    block_rows = rows_per_block(rows, num_queries, num_slots, scores_per_block)
    blocks = rows // block_rows
    queries = ops.transpose(queries, (0, 2, 1, 3))  # [batch, heads, query, dim]
    # [blocks, rows per block, query, dim]: (lane, head) rows, lane-major
    queries = ops.reshape(queries, (blocks, block_rows, -1, head_dim))
    # [blocks, rows per block, slots, dim]
    keys = ops.reshape(keys, (blocks, block_rows, num_slots, head_dim))
    filled = ops.repeat(filled, num_heads, axis=0)  # [rows, slots]
    # An empty slot must rank below every filled one, at the cost of one
    # pass over the smaller of a block's keys and its scores. With more
    # queries than `dim + 1`, one more dimension of the score matmul does
    # it: each query gets a 1 there, each key 0 (filled) or half the
    # dtype's lowest value (empty; finite, so that no kernel meets an
    # infinity). Otherwise (one token while generating) each score is
    # capped by +inf (filled) or -inf (empty). Keys are finite and
    # `KNNAttention`'s queries unit vectors, so no score reaches either
    # bound.
    mask_in_matmul = num_queries is not None and num_queries > head_dim + 1
    if mask_in_matmul:
        dtype = standardize_dtype(queries.dtype)
        lowest = -0.5 * float(ml_dtypes.finfo(dtype).max)
        empty = ops.cast(ops.logical_not(filled), dtype) * lowest  # [rows, slots]
        # [blocks, rows per block, slots, 1]
        empty = ops.reshape(empty, (blocks, block_rows, num_slots, 1))
        # [blocks, rows per block, query, dim + 1]
        queries = ops.concatenate([queries, ops.ones_like(queries[..., :1])], -1)
    else:
        cap = full_like(filled, float("inf"), queries.dtype)
        empty = ops.where(filled, cap, -cap)  # [rows, slots]
        # [blocks, rows per block, 1, slots]
        empty = ops.reshape(empty, (blocks, block_rows, 1, num_slots))

    # A block of one (lane, head) whose scores still exceed the budget
    # (many queries: a segment of a group of query heads sharing the key
    # head) is scored in chunks of its queries, each about the budget.
    chunks = 1
    if block_rows == 1 and num_queries is not None:
        chunks = num_queries // queries_per_block(
            num_queries, num_slots, scores_per_block
        )

    group_size = group_size_for(num_slots, num_neighbors)

    def block_slots(block):
        queries, keys, empty = block
        if mask_in_matmul:
            keys = ops.concatenate([keys, empty], -1)  # [rows, slots, dim + 1]

        def chunk_slots(queries):
            scores = ops.einsum("rqd,rmd->rqm", queries, keys)  # [rows, q, slots]
            if not mask_in_matmul:
                scores = ops.minimum(scores, empty)
            if top_k == "approx":
                _, slots = approx_top_k(scores, num_neighbors, recall_target)
                return ops.cast(slots, "int32")
            return top_k_slots(scores, num_neighbors, group_size)  # [rows, q, k]

        if chunks == 1:
            return chunk_slots(queries)
        # [chunks, rows, queries per chunk, dim]
        queries = ops.reshape(queries, (block_rows, chunks, -1, queries.shape[-1]))
        slots = ops.map(chunk_slots, ops.transpose(queries, (1, 0, 2, 3)))
        # [rows, query, k]
        slots = ops.transpose(slots, (1, 0, 2, 3))
        return ops.reshape(slots, (block_rows, -1, num_neighbors))

    if blocks == 1:
        slots = block_slots((queries[0], keys[0], empty[0]))
    else:  # [blocks, rows per block, query, k]
        slots = ops.map(block_slots, (queries, keys, empty))
    # [batch, heads, query, k]
    return ops.reshape(slots, (batch_size, num_heads, -1, num_neighbors))


def rows_per_block(rows, num_queries, num_slots, scores_per_block):
    """The most (lane, head) rows, a divisor of all `rows`, whose scores
    (`num_queries` x `num_slots` each) fit in `scores_per_block` (one at
    least; all of them when it is `None`; one when the query count is
    unknown)."""
    if scores_per_block is None:
        return rows
    if num_queries is None:
        return 1
    most = max(1, scores_per_block // (num_queries * num_slots))
    return max(d for d in range(1, min(rows, most) + 1) if rows % d == 0)


def queries_per_block(num_queries, num_slots, scores_per_block):
    """The divisor of `num_queries` whose scores against one (lane,
    head)'s `num_slots` come nearest to `scores_per_block` (the larger of
    two as near; all of them when it is `None` or the query count is
    unknown). Nearest, not at most: a row just above the budget is scored
    whole, as a row below it is (measured, docs/performance.md)."""
    if scores_per_block is None or num_queries is None:
        return num_queries
    divisors = [d for d in range(1, num_queries + 1) if num_queries % d == 0]
    return min(divisors, key=lambda d: (abs(d * num_slots - scores_per_block), -d))

"""Exact top-k over a memory's scores, in two stages.

A top-k over every slot of a large memory is slow on CPUs (each row of
scores is sorted or scanned at length `memory_size`). Splitting the slots
into groups of `group_size` slots, the `k` groups with the largest
maxima hold every one of the `k` best slots: a group holding one of them
has a maximum at least the k-th best score, and at most `k` groups can
(each such maximum is itself among the `k` best), ties aside. So one
max-reduction over the scores, a top-k over `memory_size / group_size`
group maxima and a top-k over the `k * group_size` slots of the chosen
groups give the exact answer.
"""

from keras import ops


def group_size_for(memory_size, k):
    """The group size of `top_k_slots` for a memory: the largest power of
    two that divides `memory_size`, is at most `sqrt(memory_size) / 4` and
    leaves at least `4k` groups; 1 (a plain top-k) where none above 1 does.

    Measured on a 2-core CPU (`docs/performance.md`): at 8K and 65K slots
    the two stages beat one top-k by up to 1.5x under XLA (JAX, TensorFlow),
    whose top-k (XLA's `TopK` custom call) reads every slot of a row,
    and larger groups lose again to the gather of their candidates.
    """
    group_size = 1
    while (
        memory_size % (2 * group_size) == 0
        and 16 * (2 * group_size) ** 2 <= memory_size
        and memory_size // (2 * group_size) >= 4 * k
    ):
        group_size *= 2
    return group_size


def top_k_slots(scores, k, group_size):
    """Indices `[..., k]` (int32, unsorted) of the `k` largest scores of the
    last axis, exact up to ties.

    Args:
        scores: float `[..., slots]`; empty slots score below every filled one.
        k: int. How many slots to return.
        group_size: int. Slots per group (`group_size_for`); 1, or one that
            does not divide the slots into at least `k` groups, gives one
            plain top-k.
    """
    *lead, slots = ops.shape(scores)  # a dimension unknown when traced is a tensor
    if group_size <= 1 or slots % group_size or slots // group_size < k:
        return ops.cast(ops.top_k(scores, k, sorted=False)[1], "int32")
    groups = slots // group_size
    # [..., size, groups]: group g holds the slots g, g + groups, g + 2 groups...
    grouped = ops.reshape(scores, (*lead, group_size, groups))
    # The maxima of `size` contiguous rows of scores: an element-wise max
    # along the slots, not a reduction within each short group.
    _, best = ops.top_k(ops.max(grouped, axis=-2), k, sorted=False)  # [..., k]
    # [..., k, size]: the slots of the chosen groups, flattened to [..., k*size]
    offsets = ops.arange(group_size, dtype="int32") * groups
    candidates = ops.cast(best, "int32")[..., None] + offsets
    candidates = ops.reshape(candidates, (*lead, k * group_size))
    candidate_scores = ops.take_along_axis(scores, candidates, axis=-1)
    _, chosen = ops.top_k(candidate_scores, k, sorted=False)  # [..., k]
    return ops.take_along_axis(candidates, ops.cast(chosen, "int32"), axis=-1)

"""Pure-NumPy bookkeeping of `ScannMemory`: exact search and index slots.

A lane of `ScannMemory` is either searched exactly, by `exact_top_slots`,
or through one ScaNN searcher per head whose document ids map to ring-buffer
slots (`index_slots[id] == slot`); `delete_slots` keeps that map in step
with ScaNN's deletions.
"""

import numpy as np


def min_index_entries(num_leaves):
    """Fewest entries a lane's searchers are built on (and kept for).

    The trees are trained by k-means with `num_leaves` centres: below a few
    points per leaf they fail to build (an empty lane, or fewer points than
    leaves) or partition noise, so smaller lanes are searched exactly.
    """
    return max(16, 8 * num_leaves)


def exact_top_slots(queries, keys, slots, num_neighbors):
    """Brute-force top-k among the filled `slots` of one lane.

    Args:
        queries: `[query, heads, dim]`.
        keys: the lane's keys `[heads, memory_size, dim]`.
        slots: int array of the filled slots.
        num_neighbors: int, `k`.

    Returns:
        int64 slots `[query, heads, k]`, unordered, `-1` past the filled ones.
    """
    num_queries, num_heads = queries.shape[:2]
    found = np.full((num_queries, num_heads, num_neighbors), -1, "int64")
    k = min(num_neighbors, len(slots))
    if k == 0:
        return found
    scores = np.einsum("qhd,hnd->qhn", queries, keys[:, slots])
    best = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
    found[..., :k] = slots[best]
    return found


def delete_slots(index_slots, slots, memory_size):
    """Mirrors ScaNN's `delete` of the indexed `slots` of one lane.

    ScaNN moves its last document into a deleted id, so ids are not stable.

    Args:
        index_slots: int64 `[indexed]`, the slot of each document id.
        slots: the slots to delete; those not indexed are skipped.
        memory_size: int, the number of ring-buffer slots.

    Returns:
        `(index_slots, slot_index, deleted)`: the remaining id -> slot map,
        its inverse `[memory_size]` (`-1`: not indexed) and the ids to pass
        to `delete`, in order.
    """
    index_slots = index_slots.copy()
    slot_index = np.full((memory_size,), -1, "int64")
    slot_index[index_slots] = np.arange(len(index_slots))
    deleted = []
    for slot in slots:
        index = int(slot_index[slot])
        if index < 0:
            continue
        last = len(index_slots) - 1
        slot_index[index_slots[last]] = index
        index_slots[index] = index_slots[last]
        index_slots = index_slots[:last]
        slot_index[slot] = -1
        deleted.append(index)
    return index_slots, slot_index, deleted

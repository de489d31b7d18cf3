"""`KNNMemory.search_and_append`, checked on every memory against an
independent FIFO: the search sees the memory before the segment, whatever
order a memory does the two in."""

import numpy as np
from hypothesis import given
from hypothesis import settings

from tests.arrays import to_numpy
from tests.memory.memories import DIM
from tests.memory.memories import HEADS
from tests.memory.memories import FifoReference
from tests.memory.memories import each_memory
from tests.memory.memories import search
from tests.memory.memories import segment
from tests.memory.memories import write_plans


def reference_entries(reference, lane, positions, head):
    """The reference's key and value `[k, dim]` at `positions` (`-1`: none)."""
    entries = reference.entries(lane)
    found = [entries[position] for position in positions if position >= 0]
    return [np.stack([entry[i][head] for entry in found]) for i in (0, 1)]


@each_memory
@settings(max_examples=10, deadline=None)
@given(write_plans())
def test_search_and_append_searches_the_memory_before_the_segment(make, plan):
    """Over any write/reset/padding plan (segments of 1 to 37 tokens, up to
    the exact memory's 12 spare slots and past them), `search_and_append`
    returns each lane's exact top-k of the entries the FIFO held before the
    segment, with their keys and values, and then holds what the FIFO holds
    after it: the segment's own tokens are never returned with it."""
    batch, memory_size, steps = plan
    memory = make(batch, HEADS, DIM, memory_size)
    reference = FifoReference(batch, memory_size)
    rng = np.random.default_rng(3)
    for step, (resets, mask) in enumerate(steps):
        # Queries equal to the segment's own keys: found first if not skipped.
        keys, values = segment(rng, mask.shape[1], batch)
        queries = keys[:, :3]
        padding_mask = None if mask.all() else mask
        k = (3, memory_size)[step % 2]
        for target in (memory, reference):
            target.reset(np.array(resets))
        got_keys, got_values, got_positions = (
            to_numpy(x)
            for x in memory.search_and_append(queries, k, keys, values, padding_mask)
        )
        want = reference.top_k_positions(queries, k)
        np.testing.assert_array_equal(np.sort(got_positions, axis=-1), want)
        for lane in range(batch):
            for head in range(HEADS):
                positions = got_positions[lane, 0, head]
                if not np.any(positions >= 0):
                    continue
                want_keys, want_values = reference_entries(
                    reference, lane, positions, head
                )
                found = positions >= 0
                np.testing.assert_array_equal(got_keys[lane, 0, head][found], want_keys)
                np.testing.assert_array_equal(
                    got_values[lane, 0, head][found], want_values
                )
        reference.append(keys, values, padding_mask)
        after = np.sort(search(memory, queries, memory_size)[2], axis=-1)
        np.testing.assert_array_equal(
            after, reference.top_k_positions(queries, memory_size)
        )

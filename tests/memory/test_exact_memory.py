import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_memtrans import ExactMemory
from tests.arrays import to_numpy
from tests.memory.memories import assert_same_entries


def test_padded_tokens_advance_the_ring_but_not_the_document():
    memory = ExactMemory(batch_size=1, num_heads=1, head_dim=2, memory_size=4)
    memory.build()
    keys = np.ones((1, 3, 1, 2), "float32")
    memory.append(keys, keys, padding_mask=np.array([[True, False, True]]))
    assert int(to_numpy(memory.next_slot)) == 3
    np.testing.assert_array_equal(to_numpy(memory.document_length), [2])
    np.testing.assert_array_equal(to_numpy(memory.positions)[0], [0, -1, 1, -1])


def test_reset_marks_slots_empty_and_rewinds_the_document_only():
    memory = ExactMemory(batch_size=3, num_heads=1, head_dim=2, memory_size=4)
    memory.build()
    memory.append(np.ones((3, 2, 1, 2), "float32"), np.ones((3, 2, 1, 2), "float32"))
    memory.reset(np.array([False, True, False]))
    filled = (to_numpy(memory.positions) >= 0).sum(axis=1)  # per lane
    np.testing.assert_array_equal(filled, [2, 0, 2])
    np.testing.assert_array_equal(to_numpy(memory.document_length), [2, 0, 2])
    assert int(to_numpy(memory.next_slot)) == 2


def test_a_bfloat16_memory_saves_and_loads_its_keys(tmp_path):
    keras.config.set_dtype_policy("bfloat16")
    memory = ExactMemory(batch_size=1, num_heads=1, head_dim=2, memory_size=4)
    memory.build()
    keys = np.array([0.5, 1.5, -2.0, 3.0], "float32").reshape(1, 2, 1, 2)
    memory.append(keys, -keys)
    memory.save(tmp_path / "memory.npz")
    with np.load(tmp_path / "memory.npz") as data:
        assert data["keys"].dtype == np.float32
        np.testing.assert_array_equal(data["keys"][0, 0, :2], keys[0, :, 0])
    loaded = ExactMemory(batch_size=1, num_heads=1, head_dim=2, memory_size=4)
    loaded.load(tmp_path / "memory.npz")
    assert loaded.keys.dtype == "bfloat16"
    for name in ("keys", "values", "positions", "next_slot", "document_length"):
        np.testing.assert_array_equal(
            to_numpy(getattr(loaded, name)), to_numpy(getattr(memory, name))
        )


@settings(max_examples=10, deadline=None)
@given(
    st.sampled_from([(1, 1), (2, 3), (4, 2)]),
    st.sampled_from([None, 1, 40, 80, 200, "auto"]),
    st.sampled_from([1, 5, 9]),
    st.integers(0, 2**16),
)
def test_a_search_in_blocks_returns_each_lanes_numpy_top_k(
    shape, budget, num_queries, seed
):
    """Blocks of 1, 2, 4 or every (lane, head) row (5 queries x 8 slots =
    40 scores a row) find the positions NumPy's top-k finds in each lane,
    and none in a lane that was emptied: 2 slots never written and the
    emptied lanes' stale keys rank below every real score, negative ones
    included, whichever way the search ranks them last (a cap on the
    scores up to `head_dim + 1` queries, one more score dimension above)."""
    batch, heads = shape
    memory = ExactMemory(
        batch_size=batch,
        num_heads=heads,
        head_dim=4,
        memory_size=8,
        scores_per_block=budget,
    )
    memory.build()
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(batch, 6, heads, 4)).astype("float32")
    memory.append(keys, -keys)
    emptied = rng.random(batch) < 0.5
    memory.reset(emptied)
    queries = rng.normal(size=(batch, num_queries, heads, 4)).astype("float32")
    got_keys, _, positions = (to_numpy(x) for x in memory.search(queries, 3))
    scores = np.einsum("bqhd,bmhd->bqhm", queries, keys)  # [batch, q, heads, 6]
    want = np.sort(np.argsort(-scores, axis=-1)[..., :3], axis=-1)
    want[emptied] = -1
    np.testing.assert_array_equal(np.sort(positions, axis=-1), want)
    lanes = np.arange(batch)[:, None, None, None]
    head_ids = np.arange(heads)[None, None, :, None]
    kept = ~emptied
    np.testing.assert_array_equal(
        got_keys[kept], keys[lanes, positions, head_ids][kept]
    )


def test_the_default_scores_per_block_is_auto_in_the_config():
    memory = ExactMemory(batch_size=1, num_heads=1, head_dim=2, memory_size=4)
    assert memory.get_config()["scores_per_block"] == "auto"
    restored = ExactMemory.from_config(memory.get_config())
    assert restored.scores_per_block == "auto"


def test_a_numpy_integer_scores_per_block_is_kept_as_an_int():
    memory = ExactMemory(
        batch_size=1,
        num_heads=1,
        head_dim=2,
        memory_size=4,
        scores_per_block=np.int64(64),
    )
    assert memory.get_config()["scores_per_block"] == 64
    assert type(memory.get_config()["scores_per_block"]) is int


@pytest.mark.parametrize(
    "budget", [0, -3, 1.5, True, "8", "Auto", "whole", np.float32(8)]
)
def test_rejects_a_bad_scores_per_block(budget):
    with pytest.raises(ValueError, match="scores_per_block"):
        ExactMemory(
            batch_size=1,
            num_heads=1,
            head_dim=2,
            memory_size=4,
            scores_per_block=budget,
        )


@pytest.mark.parametrize(
    "option, match",
    [
        ({"top_k": "aprox"}, "top_k"),
        ({"top_k": None}, "top_k"),
        ({"recall_target": -3}, "recall_target"),
        ({"recall_target": 0.0}, "recall_target"),
        ({"recall_target": 1.5}, "recall_target"),
    ],
)
def test_rejects_a_bad_top_k_or_recall_target(option, match):
    with pytest.raises(ValueError, match=match):
        ExactMemory(batch_size=1, num_heads=1, head_dim=2, memory_size=4, **option)


def test_a_memory_saved_with_spare_slots_loads_into_one_without_and_back(tmp_path):
    """The file holds the `memory_size` slots a search sees, whatever the
    spare slots: memories with and without them, fed the same segments
    (wrapping around both rings), load each other's files and then answer
    alike, before and after one more segment."""
    sizes = dict(batch_size=2, num_heads=2, head_dim=4, memory_size=8)
    spare, plain = ExactMemory(**sizes, segment_length=3), ExactMemory(**sizes)
    spare.build()
    plain.build()
    rng = np.random.default_rng(5)
    for _ in range(5):
        keys = rng.normal(size=(2, 3, 2, 4)).astype("float32")
        for memory in (spare, plain):
            memory.search_and_append(keys[:, :1], 2, keys, -keys)
    spare.save(tmp_path / "spare.npz")
    plain.save(tmp_path / "plain.npz")
    from_spare, from_plain = (
        ExactMemory(**sizes),
        ExactMemory(**sizes, segment_length=3),
    )
    from_spare.load(tmp_path / "spare.npz")
    from_plain.load(tmp_path / "plain.npz")
    memories = (spare, plain, from_spare, from_plain)
    queries = rng.normal(size=(2, 4, 2, 4)).astype("float32")
    for step in range(2):
        if step:
            keys = rng.normal(size=(2, 3, 2, 4)).astype("float32")
            for memory in memories:
                memory.append(keys, -keys)
        results = [
            tuple(to_numpy(x) for x in memory.search(queries, 8)) for memory in memories
        ]
        assert np.sum(results[0][2] >= 0) == 2 * 4 * 2 * 8  # every slot filled
        for result in results[1:]:
            assert_same_entries(result, results[0])

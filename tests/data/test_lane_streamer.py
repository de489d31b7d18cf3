import math
import pickle
import threading

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from keras_memtrans.data import LaneStreamer
from tests.data.lane_documents import VOCABULARY
from tests.data.lane_documents import assert_documents_in_order
from tests.data.lane_documents import check_item
from tests.data.lane_documents import expected_orders
from tests.data.lane_documents import make_documents
from tests.data.lane_documents import reconstruct
from tests.data.lane_documents import reference_deal

document_lists = st.lists(
    st.lists(st.integers(1, VOCABULARY - 1), max_size=20),
    min_size=1,
    max_size=7,
).filter(lambda documents: any(len(document) >= 2 for document in documents))
lane_settings = dict(
    batch_size=st.integers(1, 4),
    segment_length=st.integers(1, 8),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**16),
)


@given(
    documents=document_lists,
    repeat=st.booleans(),
    pad_id=st.integers(0, 3),
    **lane_settings,
)
def test_stream_matches_a_step_by_step_deal(
    documents, batch_size, segment_length, shuffle, seed, repeat, pad_id
):
    documents = [np.array(document, dtype="int64") for document in documents]
    streamer = LaneStreamer(
        documents, batch_size, segment_length, shuffle, repeat, seed, pad_id
    )
    usable = [i for i, document in enumerate(documents) if len(document) > 1]
    assert streamer.skipped_documents == len(documents) - len(usable)
    assert streamer.num_documents == len(usable)
    segments = sum(math.ceil((len(documents[i]) - 1) / segment_length) for i in usable)
    assert streamer.steps_per_pass == math.ceil(segments / batch_size)
    num_steps = 3 * streamer.steps_per_pass + 1 if repeat else len(streamer)
    # Enough passes for every lane of every step to start a document.
    passes = (num_steps + 1) * batch_size // len(usable) + 1 if repeat else 1
    orders = expected_orders(documents, shuffle, seed, passes)
    assert [streamer.pass_order(p) for p in range(passes)] == orders
    table = reference_deal(documents, batch_size, segment_length, orders, num_steps + 1)
    if repeat:
        assert streamer.num_batches is None
    else:  # One pass, until its last document ends.
        assert streamer.num_batches == len(streamer)
        assert (table[-2, :, 0] >= 0).any() and (table[-1, :, 0] < 0).all()
    batches = [check_item(streamer, streamer[i]) for i in range(num_steps)]
    masks = np.array([inputs["padding_mask"] for inputs, _, _ in batches])
    for index, (inputs, targets, _) in enumerate(batches):
        token_ids = inputs["token_ids"]
        lane_documents, lane_segments = streamer.batch_contents(index)
        np.testing.assert_array_equal(lane_documents, table[index, :, 0])
        np.testing.assert_array_equal(lane_segments, table[index, :, 1])
        for lane, (document, segment) in enumerate(table[index]):
            width = int(masks[index, lane].sum())
            assert width == 0 if document < 0 else width > 0  # repeat: no idling
            begin = segment * segment_length
            tokens = documents[document][begin : begin + width + 1]
            np.testing.assert_array_equal(token_ids[lane, :width], tokens[:-1])
            np.testing.assert_array_equal(targets[lane, :width], tokens[1:])
            assert inputs["document_start"][lane] == (document >= 0 and segment == 0)
    if repeat:
        assert masks.any(axis=2).all(), "a lane idles"
    rebuilt = reconstruct([inputs for inputs, _, _ in batches], segment_length)
    assert_documents_in_order(rebuilt, documents, orders)
    padded = 1 - np.cumsum(masks.mean(axis=(1, 2))) / np.arange(1, num_steps + 1)
    for steps in range(1, num_steps + 1):
        assert streamer.padding_fraction(steps) == pytest.approx(padded[steps - 1])


@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
    repeat=st.booleans(),
)
def test_batches_depend_only_on_the_index_and_arguments(lengths, seed, repeat):
    documents = make_documents([length + 2 for length in lengths])
    first = LaneStreamer(documents, 3, 4, repeat=repeat, seed=seed)
    second = LaneStreamer(documents, 3, 4, repeat=repeat, seed=seed)
    num_steps = 2 * first.steps_per_pass if repeat else len(first)
    first.on_epoch_end()  # Changes nothing.
    # Random access: the second streamer deals backwards from the last batch.
    for index in reversed(range(num_steps)):
        for got, want in zip(
            keras.tree.flatten(second[np.int64(index)]),
            keras.tree.flatten(first[index]),
        ):
            np.testing.assert_array_equal(got, want)


def test_shuffle_draws_a_new_order_every_pass():
    documents = make_documents(range(2, 14))
    streamer = LaneStreamer(documents, 3, 2, seed=5)
    orders = [tuple(streamer.pass_order(p)) for p in range(4)]
    assert len(set(orders)) == 4
    assert all(sorted(order) == list(range(len(documents))) for order in orders)
    assert LaneStreamer(documents, 3, 2, seed=6).pass_order(0) != list(orders[0])
    in_order = LaneStreamer(documents, 3, 2, shuffle=False)
    assert in_order.pass_order(3) == list(range(len(documents)))


def test_padding_stays_under_two_percent_on_long_documents():
    # Token counts like the default corpus (source files of the standard
    # library: median ~4K tokens, heavy tail) with the `small` preset's lanes.
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(8.3, 1.0, size=300).astype(int), 100_000) + 2
    streamer = LaneStreamer(make_documents(lengths), 8, 128, repeat=True)
    inputs = lengths - 1
    segments = -(-inputs // 128)
    per_pass = (segments * 128 - inputs).sum() / (segments.sum() * 128)
    for passes in (1, 3):
        steps = passes * streamer.steps_per_pass
        fraction = streamer.padding_fraction(steps)
        # Batches hold whole passes but for the <= 8 documents cut at the end.
        assert fraction == pytest.approx(per_pass, abs=8 / steps)
        assert fraction < 0.02
    single_pass = LaneStreamer(make_documents(lengths), 8, 128)
    assert single_pass.padding_fraction(len(single_pass)) > 2 * per_pass


def test_short_document_is_one_padded_segment():
    streamer = LaneStreamer([np.array([4, 5, 6])], batch_size=2, segment_length=5)
    assert len(streamer) == 1
    inputs, targets, sample_weight = streamer[0]
    np.testing.assert_array_equal(inputs["token_ids"], [[4, 5, 0, 0, 0], [0] * 5])
    np.testing.assert_array_equal(targets, [[5, 6, 0, 0, 0], [0] * 5])
    np.testing.assert_array_equal(inputs["document_start"], [True, False])
    np.testing.assert_array_equal(sample_weight, [[1, 1, 0, 0, 0], [0] * 5])


@pytest.mark.parametrize("repeat, index", [(False, -1), (False, 3), (True, -1)])
def test_index_out_of_range_raises(repeat, index):
    streamer = LaneStreamer([np.arange(1, 8)], 1, 2, repeat=repeat)
    with pytest.raises(IndexError, match="out of range"):
        streamer[index]
    with pytest.raises(IndexError, match="out of range"):
        streamer.batch_contents(index)


def test_an_endless_stream_has_no_length():
    streamer = LaneStreamer([np.arange(1, 8)], 1, 2, repeat=True)
    with pytest.raises(TypeError, match="endless"):
        len(streamer)


@pytest.mark.parametrize(
    "arguments, name",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"segment_length": 0}, "segment_length"),
        ({"seed": -1}, "seed"),
        ({"pad_id": -1}, "pad_id"),
        ({"shuffle": "yes"}, "shuffle"),
        ({"repeat": 1}, "repeat"),
        ({"documents": [np.ones((2, 3), "int32")]}, "1-D"),
        ({"documents": [np.array([1.0, 2.0])]}, "integer"),
        ({"documents": [np.array([3, -1, 2])]}, "outside"),
        ({"documents": [np.array([1]), []]}, "at least 2 tokens"),
        ({"documents": []}, "No usable document"),
    ],
)
def test_rejects_bad_arguments(arguments, name):
    arguments = {
        "documents": [np.arange(1, 5)],
        "batch_size": 2,
        "segment_length": 3,
        **arguments,
    }
    with pytest.raises(ValueError, match=name):
        LaneStreamer(**arguments)


@pytest.mark.parametrize(
    "method, value, name",
    [
        ("padding_fraction", 0, "num_steps"),
        ("padding_fraction", 3, "num_steps"),  # Beyond a single pass.
        ("padding_fraction", 1.0, "num_steps"),
        ("pass_order", -1, "pass_index"),
    ],
)
def test_methods_reject_bad_arguments(method, value, name):
    streamer = LaneStreamer([np.arange(1, 6)], 2, 2)
    assert len(streamer) == 2
    with pytest.raises(ValueError, match=name):
        getattr(streamer, method)(value)


def test_threads_read_the_same_batches():
    documents = make_documents(np.arange(2, 60, 3))
    indices = np.random.default_rng(0).permutation(200)
    reference = LaneStreamer(documents, 4, 3, repeat=True, seed=2)
    expected = {i: reference.batch_contents(i) for i in range(200)}
    streamer = LaneStreamer(documents, 4, 3, repeat=True, seed=2)
    got = {}

    def read(part):
        for index in part:
            got[index] = streamer.batch_contents(index)

    threads = [threading.Thread(target=read, args=(p,)) for p in indices.reshape(8, -1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == len(expected)  # No thread failed.
    for index, (documents_, segments) in expected.items():
        np.testing.assert_array_equal(got[index][0], documents_)
        np.testing.assert_array_equal(got[index][1], segments)


def test_a_pickled_copy_streams_the_same_batches():
    # As worker processes may get it (`use_multiprocessing=True`).
    streamer = LaneStreamer(make_documents([9, 30, 4, 17]), 2, 3, repeat=True)
    streamer[20]
    copy = pickle.loads(pickle.dumps(streamer))
    for index in (50, 0, 20, 80):
        for got, want in zip(
            keras.tree.flatten(copy[index]), keras.tree.flatten(streamer[index])
        ):
            np.testing.assert_array_equal(got, want)

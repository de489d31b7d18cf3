import math

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from keras import ops

from keras_memtrans.data import LaneStreamer

VOCABULARY = 16


def read_epoch(streamer):
    """All batches of the current epoch; checks shapes, dtypes and padding."""
    shape = (streamer.batch_size, streamer.segment_length)
    batches = []
    for index in range(len(streamer)):
        inputs, targets, sample_weight = streamer[index]
        assert set(inputs) == {"token_ids", "document_start", "padding_mask"}
        token_ids = inputs["token_ids"]
        mask = inputs["padding_mask"]
        assert token_ids.shape == targets.shape == mask.shape == shape
        assert sample_weight.shape == shape
        assert inputs["document_start"].shape == (streamer.batch_size,)
        assert token_ids.dtype == targets.dtype == np.int32
        assert mask.dtype == inputs["document_start"].dtype == bool
        assert sample_weight.dtype == np.float32
        np.testing.assert_array_equal(sample_weight, mask.astype("float32"))
        widths = mask.sum(axis=1)
        positions = np.arange(streamer.segment_length)
        np.testing.assert_array_equal(mask, positions < widths[:, None])
        assert (token_ids[~mask] == streamer.pad_id).all()
        assert (targets[~mask] == streamer.pad_id).all()
        batches.append((inputs, targets))
    return batches


def reconstruct(streamer):
    """Rebuilds documents per lane, split at `document_start` flags.

    Checks that a lane is busy from the first batch until it runs out of
    documents, that only a document's last segment is partial, that targets
    are the inputs shifted by one, and that no lane idles while a document
    is still to start. Returns the documents in the order they start.
    """
    starts, records = [], []
    current = {}
    idle_from = {}
    for step, (inputs, targets) in enumerate(read_epoch(streamer)):
        for lane in range(streamer.batch_size):
            width = int(inputs["padding_mask"][lane].sum())
            if width == 0:
                assert not inputs["document_start"][lane]
                idle_from.setdefault(lane, step)
                continue
            assert lane not in idle_from, "a lane resumed after idling"
            if inputs["document_start"][lane]:
                current[lane] = {"inputs": [], "targets": [], "widths": []}
                records.append(current[lane])
                starts.append((step, lane))
            assert lane in current, "a segment continues no document"
            current[lane]["inputs"] += inputs["token_ids"][lane, :width].tolist()
            current[lane]["targets"] += targets[lane, :width].tolist()
            current[lane]["widths"].append(width)
    for lane, idle_step in idle_from.items():
        assert all(start < (idle_step, lane) for start in starts)
    documents = []
    for record in records:
        widths = record["widths"]
        assert all(width == streamer.segment_length for width in widths[:-1])
        assert record["targets"][:-1] == record["inputs"][1:]
        documents.append(record["inputs"] + record["targets"][-1:])
    return documents


def expected_documents(documents, streamer):
    return [list(documents[index]) for index in streamer.document_order]


def make_documents(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCABULARY, size=length) for length in lengths]


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


@given(documents=document_lists, pad_id=st.integers(0, 3), **lane_settings)
def test_every_document_streams_whole_in_one_lane(
    documents, batch_size, segment_length, shuffle, seed, pad_id
):
    documents = [np.array(document, dtype="int64") for document in documents]
    streamer = LaneStreamer(
        documents,
        batch_size=batch_size,
        segment_length=segment_length,
        shuffle=shuffle,
        seed=seed,
        pad_id=pad_id,
    )
    usable = [index for index, document in enumerate(documents) if len(document) > 1]
    assert streamer.skipped_documents == len(documents) - len(usable)
    assert streamer.num_documents == len(usable)
    segments = [
        math.ceil((len(documents[index]) - 1) / segment_length) for index in usable
    ]
    num_batches = len(streamer)
    for epoch in range(3):
        assert streamer.epoch == epoch
        assert len(streamer) == num_batches
        assert sorted(streamer.document_order) == usable
        if not shuffle:
            assert streamer.document_order == usable
        assert reconstruct(streamer) == expected_documents(documents, streamer)
        streamer.on_epoch_end()
    if shuffle:
        longest, total = max(segments), sum(segments)
        assert num_batches == (total - longest) // batch_size + longest
    else:
        last_inputs, _, _ = streamer[num_batches - 1]
        assert last_inputs["padding_mask"].any(), "no fully padded tail"


@given(documents=document_lists, **lane_settings)
def test_batch_contents_locate_every_lane_in_its_document(
    documents, batch_size, segment_length, shuffle, seed
):
    documents = [np.array(document, dtype="int64") for document in documents]
    streamer = LaneStreamer(
        documents, batch_size, segment_length, shuffle=shuffle, seed=seed
    )
    for index in range(len(streamer)):
        inputs, targets, _ = streamer[index]
        lane_documents, lane_segments = streamer.batch_contents(index)
        assert lane_documents.shape == lane_segments.shape == (batch_size,)
        for lane in range(batch_size):
            width = int(inputs["padding_mask"][lane].sum())
            if lane_documents[lane] < 0:
                assert width == 0
                continue
            document = documents[lane_documents[lane]]
            begin = lane_segments[lane] * segment_length
            np.testing.assert_array_equal(
                inputs["token_ids"][lane, :width], document[begin : begin + width]
            )
            np.testing.assert_array_equal(
                targets[lane, :width], document[begin + 1 : begin + width + 1]
            )
            assert inputs["document_start"][lane] == (lane_segments[lane] == 0)
    with pytest.raises(IndexError, match="out of range"):
        streamer.batch_contents(len(streamer))


@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
    epoch=st.integers(0, 3),
)
def test_same_seed_and_epoch_give_identical_batches(lengths, seed, epoch):
    documents = make_documents([length + 2 for length in lengths])
    first = LaneStreamer(documents, batch_size=3, segment_length=4, seed=seed)
    second = LaneStreamer(documents, batch_size=3, segment_length=4, seed=seed)
    for _ in range(epoch):
        first.on_epoch_end()
        second.on_epoch_end()
    assert first.document_order == second.document_order
    for index in range(len(first)):
        for got, expected in zip(
            keras.tree.flatten(first[index]), keras.tree.flatten(second[index])
        ):
            np.testing.assert_array_equal(got, expected)


def test_shuffle_changes_the_document_order_every_epoch():
    documents = make_documents(range(2, 14))
    streamer = LaneStreamer(documents, batch_size=3, segment_length=2, seed=5)
    orders = []
    for _ in range(4):
        orders.append(streamer.document_order)
        assert sorted(reconstruct(streamer)) == sorted(map(list, documents))
        streamer.on_epoch_end()
    assert len({tuple(order) for order in orders}) == 4
    other_seed = LaneStreamer(documents, batch_size=3, segment_length=2, seed=6)
    assert other_seed.document_order != orders[0]


def test_without_shuffle_every_epoch_is_the_same_stream():
    documents = make_documents([9, 3, 17, 2, 5])
    streamer = LaneStreamer(documents, batch_size=2, segment_length=3, shuffle=False)
    first_epoch = [keras.tree.flatten(streamer[i]) for i in range(len(streamer))]
    streamer.on_epoch_end()
    assert streamer.document_order == list(range(len(documents)))
    for index, expected in enumerate(first_epoch):
        for got, want in zip(keras.tree.flatten(streamer[index]), expected):
            np.testing.assert_array_equal(got, want)


def test_batches_are_random_access():
    documents = make_documents([11, 4, 23, 8, 2, 15])
    streamer = LaneStreamer(documents, batch_size=2, segment_length=4, seed=1)
    in_order = [keras.tree.flatten(streamer[i]) for i in range(len(streamer))]
    for index in reversed(range(len(streamer))):
        for got, expected in zip(keras.tree.flatten(streamer[index]), in_order[index]):
            np.testing.assert_array_equal(got, expected)
    np_index = np.int64(len(streamer) - 1)
    np.testing.assert_array_equal(streamer[np_index][1], streamer[len(streamer) - 1][1])


def test_short_document_is_one_padded_segment():
    streamer = LaneStreamer([np.array([4, 5, 6])], batch_size=2, segment_length=5)
    assert len(streamer) == 1
    inputs, targets, sample_weight = streamer[0]
    np.testing.assert_array_equal(inputs["token_ids"], [[4, 5, 0, 0, 0], [0] * 5])
    np.testing.assert_array_equal(targets, [[5, 6, 0, 0, 0], [0] * 5])
    np.testing.assert_array_equal(inputs["document_start"], [True, False])
    np.testing.assert_array_equal(sample_weight, [[1, 1, 0, 0, 0], [0] * 5])


@pytest.mark.parametrize("index", [-1, 3, 100])
def test_index_out_of_range_raises(index):
    streamer = LaneStreamer([np.arange(1, 8)], batch_size=1, segment_length=2)
    assert len(streamer) == 3
    with pytest.raises(IndexError, match="out of range"):
        streamer[index]


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


class NextTokenModel(keras.Model):
    """Embedding and softmax over the vocabulary; optionally records inputs."""

    def __init__(self, record_training_inputs=False, **kwargs):
        super().__init__(**kwargs)
        self.embedding = keras.layers.Embedding(VOCABULARY, 8)
        self.next_token = keras.layers.Dense(VOCABULARY, activation="softmax")
        self.record_training_inputs = record_training_inputs
        self.training_token_ids = []

    def call(self, inputs, training=False):
        if training and self.record_training_inputs:
            self.training_token_ids.append(ops.convert_to_numpy(inputs["token_ids"]))
        return self.next_token(self.embedding(inputs["token_ids"]))


def fit_streamer():
    documents = make_documents([40, 7, 25, 1, 13, 30])
    return LaneStreamer(documents, batch_size=2, segment_length=8, seed=3)


def test_fit_trains_on_the_streamer():
    streamer = fit_streamer()
    model = NextTokenModel()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    history = model.fit(streamer, epochs=2, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert len(losses) == 2 and np.isfinite(losses).all()


def test_fit_reads_each_epoch_in_order():
    streamer = fit_streamer()
    model = NextTokenModel(record_training_inputs=True)
    # Built before `fit`, which would otherwise build it with a training call.
    model(streamer[0][0])
    model.compile(
        optimizer="adam", loss="sparse_categorical_crossentropy", run_eagerly=True
    )
    model.fit(streamer, epochs=2, shuffle=False, verbose=0)
    # `fit` calls `on_epoch_end` after each epoch (and may call it before the
    # first), so the two trained epochs are the two before the last call.
    reference = fit_streamer()
    for _ in range(streamer.epoch - 2):
        reference.on_epoch_end()
    expected, orders = [], []
    for _ in range(2):
        orders.append(reference.document_order)
        expected += [reference[i][0]["token_ids"] for i in range(len(reference))]
        reference.on_epoch_end()
    assert orders[0] != orders[1]
    assert reference.epoch == streamer.epoch
    assert len(model.training_token_ids) == len(expected)
    for got, want in zip(model.training_token_ids, expected):
        np.testing.assert_array_equal(got, want)

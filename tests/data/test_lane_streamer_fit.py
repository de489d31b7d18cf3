import math

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

from keras_memtrans.data import LaneStreamer
from tests.data.lane_documents import VOCABULARY
from tests.data.lane_documents import assert_documents_in_order
from tests.data.lane_documents import expected_orders
from tests.data.lane_documents import make_documents
from tests.data.lane_documents import reconstruct


class RecordingModel(keras.Model):
    """Embedding and logits over the vocabulary; records the inputs it
    trains on when run eagerly."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embedding = keras.layers.Embedding(VOCABULARY, 4)
        self.next_token = keras.layers.Dense(VOCABULARY)
        self.training_inputs = []

    def call(self, inputs, training=False):
        if training and self.run_eagerly:
            self.training_inputs.append(
                {name: ops.convert_to_numpy(x) for name, x in inputs.items()}
            )
        return self.next_token(self.embedding(inputs["token_ids"]))


def fit(streamer, **kwargs):
    """Trains a `RecordingModel` eagerly; returns the inputs it trained on."""
    model = RecordingModel()
    model(streamer[0][0])  # Built here: `fit` would build it with a training call.
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=True,
    )
    model.fit(streamer, shuffle=False, verbose=0, **kwargs)
    return model.training_inputs


@st.composite
def small_streams(draw):
    """Lanes, segment length and at most `2 * batch_size` documents of at
    most 3 segments: passes of at most 6 steps, as eager fits are slow."""
    batch_size = draw(st.integers(1, 3))
    segment_length = draw(st.integers(2, 5))
    document = st.lists(
        st.integers(1, VOCABULARY - 1), min_size=2, max_size=3 * segment_length + 1
    )
    documents = draw(st.lists(document, min_size=1, max_size=2 * batch_size))
    return [np.array(d) for d in documents], batch_size, segment_length


# `fit` restarts a single pass after its last batch, with this warning.
@pytest.mark.filterwarnings("ignore:Your input ran out of data")
@pytest.mark.parametrize(
    "repeat, epoch", [(True, "shorter"), (True, "longer"), (False, "shorter")]
)
@settings(max_examples=5)
@given(
    stream=small_streams(),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_fit_trains_on_whole_documents_in_order_across_epochs(
    repeat, epoch, stream, shuffle, seed, data
):
    documents, batch_size, segment_length = stream
    streamer = LaneStreamer(
        documents, batch_size, segment_length, shuffle, repeat, seed
    )
    # Epochs at most or more than a pass long; over two passes in all.
    per_pass = streamer.steps_per_pass if repeat else len(streamer)
    steps = (1, per_pass) if epoch == "shorter" else (per_pass + 1, 2 * per_pass)
    steps_per_epoch = data.draw(st.integers(*steps), label="steps_per_epoch")
    epochs = max(2, math.ceil((2 * per_pass + 1) / steps_per_epoch))
    seen = fit(streamer, epochs=epochs, steps_per_epoch=steps_per_epoch)
    # A single pass restarts after its last batch; an endless one goes on.
    passes = len(seen) * batch_size // len(documents) + 1
    orders = expected_orders(documents, shuffle, seed, passes)
    if not repeat:
        orders = orders[:1] * passes
    assert_documents_in_order(reconstruct(seen, segment_length), documents, orders)
    if repeat:
        assert len(seen) == epochs * steps_per_epoch
        for index, inputs in enumerate(seen):
            for name, value in streamer[index][0].items():
                np.testing.assert_array_equal(inputs[name], value)
            assert inputs["padding_mask"].any(axis=1).all(), "a lane idles"


def test_fit_trains_and_evaluates_on_the_streamer():
    documents = make_documents([40, 9, 28])
    model = RecordingModel()
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(
        LaneStreamer(documents, 2, 8, repeat=True, seed=3),
        epochs=2,
        steps_per_epoch=5,
        shuffle=False,
        verbose=0,
    )
    assert len(history.history["loss"]) == 2
    assert np.isfinite(history.history["loss"]).all()
    loss = model.evaluate(LaneStreamer(documents, 2, 8, shuffle=False), verbose=0)
    assert np.isfinite(loss)

"""Documents for the `LaneStreamer` tests, and the independent statement
of how it deals them: the pass orders, a step-by-step deal, and the
documents rebuilt from its batches."""

import itertools

import numpy as np

VOCABULARY = 16


def make_documents(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCABULARY, size=length) for length in lengths]


def expected_orders(documents, shuffle, seed, passes):
    """Pass orders by the documented rule, as indices into `documents`."""
    usable = np.array([i for i, doc in enumerate(documents) if len(doc) > 1])
    return [
        usable[np.random.default_rng((seed, p)).permutation(len(usable))].tolist()
        if shuffle
        else usable.tolist()
        for p in range(passes)
    ]


def reference_deal(documents, batch_size, segment_length, orders, num_steps):
    """`(document, segment)` per step and lane (`(-1, 0)`: idle), dealt step
    by step: each free lane, in lane order, takes the next document."""
    queue = itertools.chain.from_iterable(orders)
    lanes = [None] * batch_size
    table = []
    for _ in range(num_steps):
        for lane, current in enumerate(lanes):
            if current is not None:
                document, segment = current
                if (segment + 1) * segment_length < len(documents[document]) - 1:
                    lanes[lane] = (document, segment + 1)
                    continue
            document = next(queue, None)
            lanes[lane] = None if document is None else (document, 0)
        table.append([lane or (-1, 0) for lane in lanes])
    return np.array(table).reshape(num_steps, batch_size, 2)


def check_item(streamer, item):
    """Checks an item's structure, dtypes and padding; returns it."""
    inputs, targets, sample_weight = item
    shape = (streamer.batch_size, streamer.segment_length)
    assert set(inputs) == {"token_ids", "document_start", "padding_mask"}
    token_ids, mask = inputs["token_ids"], inputs["padding_mask"]
    assert token_ids.shape == targets.shape == mask.shape == sample_weight.shape
    assert token_ids.shape == shape
    assert inputs["document_start"].shape == (streamer.batch_size,)
    assert token_ids.dtype == targets.dtype == np.int32
    assert mask.dtype == inputs["document_start"].dtype == bool
    assert sample_weight.dtype == np.float32
    np.testing.assert_array_equal(sample_weight, mask.astype("float32"))
    positions = np.arange(streamer.segment_length)
    np.testing.assert_array_equal(mask, positions < mask.sum(axis=1)[:, None])
    assert (token_ids[~mask] == streamer.pad_id).all()
    assert (targets[~mask] == streamer.pad_id).all()
    return item


def reconstruct(inputs_list, segment_length):
    """Rebuilds each lane's documents from its segments' inputs, split at
    `document_start`; an idle (fully padded) segment ends a document.

    Checks that a lane's segment continues the document it carries and that
    only a document's last segment is partial. Returns `(inputs, finished)`
    per document in the order they start; `finished` is False when the
    batches end first.
    """
    records, current = [], {}
    for inputs in inputs_list:
        for lane, width in enumerate(inputs["padding_mask"].sum(axis=1)):
            start = inputs["document_start"][lane]
            if (start or width == 0) and lane in current:
                current.pop(lane)[1] = True
            if start:
                current[lane] = [[], False]
                records.append(current[lane])
            if width == 0:
                assert not start
                continue
            assert lane in current, "a segment continues no document"
            tokens = current[lane][0]
            assert len(tokens) % segment_length == 0, "a partial segment continues"
            tokens += inputs["token_ids"][lane, :width].tolist()
    return [tuple(record) for record in records]


def assert_documents_in_order(rebuilt, documents, orders):
    """Documents rebuilt from lanes are `orders`' documents in turn, whole
    (the ones the batches cut short: a prefix)."""
    expected = [list(documents[i][:-1]) for i in itertools.chain.from_iterable(orders)]
    assert len(rebuilt) <= len(expected)
    for (tokens, finished), want in zip(rebuilt, expected):
        assert tokens == (want if finished else want[: len(tokens)])

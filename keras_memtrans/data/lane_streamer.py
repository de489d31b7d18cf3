import heapq
import numbers
import operator

import keras
import numpy as np

_INT32_MAX = np.iinfo(np.int32).max


class LaneStreamer(keras.utils.PyDataset):
    """Streams long tokenized documents in lanes, Transformer-XL style.

    Batch row `b` is a lane that carries consecutive segments of one
    document, which is what a memory model (`KNNAttention`) needs: its
    memory for row `b` then holds the earlier tokens of the same document.
    The documents of an epoch are dealt in order: each goes, whole, to the
    lane that becomes free first (the lowest lane on ties), so every token
    appears exactly once, in order, in one lane. Segments are never
    shuffled; with `shuffle=True` the order of the documents is, afresh each
    epoch, by a generator seeded with `(seed, epoch)`.

    Targets are the next tokens: a document `d` of `n` tokens gives the
    inputs `d[0:n-1]` and the targets `d[1:n]`, and its segment `i` covers
    input positions `[i * L, (i + 1) * L)`, so the target of a segment's
    last input is the first input of the next segment. Only the last
    segment of a document is partial; a document shorter than one segment is
    one padded segment. Documents with fewer than 2 tokens have no target:
    they are skipped and counted in `skipped_documents`.

    Each item is `(inputs, targets, sample_weight)`:

    - `inputs["token_ids"]`: int32 `[batch_size, segment_length]`, `pad_id`
      where padded.
    - `inputs["document_start"]`: bool `[batch_size]`, `True` exactly on the
      first segment of a document: the model empties that lane's memory
      before reading it.
    - `inputs["padding_mask"]`: bool `[batch_size, segment_length]`, `True`
      on real input tokens (a prefix of each row).
    - `targets`: int32 `[batch_size, segment_length]`, `pad_id` where padded.
    - `sample_weight`: float32 `[batch_size, segment_length]`, `1.0` where a
      real target exists, which is exactly where `padding_mask` is `True`.

    Once a lane has no document left it is fully padded (`padding_mask`
    and `document_start` all `False`, `sample_weight` 0) until the epoch
    ends. The batch shape never changes, as the lanes of a memory model are
    fixed.

    The number of batches is the same every epoch, as `fit` reads it once:
    with `shuffle=False`, the length of the schedule of the given order;
    with `shuffle=True`, the longest schedule any order can give,
    `(S - P) // batch_size + P` for `S` segments in all and `P` in the
    longest document. An epoch whose schedule is shorter ends with fully
    padded batches.

    Use with memory models:

    - Pass `shuffle=False` to `Model.fit`: by default `fit` shuffles the
      batch order of a `PyDataset` of known length, which breaks the lanes.
    - Use `shuffle=False` here for evaluation, so each evaluation sees the
      same stream.
    - `__getitem__(index)` is random access and depends only on `index`,
      `seed` and `epoch`, so threads (`workers > 1`) are safe.
    - `epoch` counts `on_epoch_end` calls. Keras calls it once when `fit`
      or `evaluate` starts and after every epoch, so `fit(epochs=2)` on a
      new streamer streams the orders of epochs 1 and 2.

    Args:
        documents: list of 1-D integer arrays of non-negative token ids.
        batch_size: int. Number of lanes.
        segment_length: int. Tokens per segment, `L`.
        shuffle: bool. Whether to shuffle the document order every epoch.
        seed: non-negative int seeding the document order.
        pad_id: non-negative int filling padded inputs and targets.
        **kwargs: `keras.utils.PyDataset` arguments (`workers`,
            `use_multiprocessing`, `max_queue_size`).

    Example:
    >>> import numpy as np
    >>> documents = [np.arange(1, 11), np.arange(20, 25), np.arange(30, 33)]
    >>> streamer = LaneStreamer(
    ...     documents, batch_size=2, segment_length=4, shuffle=False
    ... )
    >>> len(streamer)
    3
    >>> inputs, targets, sample_weight = streamer[1]
    >>> inputs["token_ids"]
    array([[ 5,  6,  7,  8],
           [30, 31,  0,  0]], dtype=int32)
    >>> targets
    array([[ 6,  7,  8,  9],
           [31, 32,  0,  0]], dtype=int32)
    >>> inputs["document_start"]
    array([False,  True])

    Reference:
        Dai et al., "Transformer-XL: Attentive Language Models Beyond a
        Fixed-Length Context", ACL 2019 (https://arxiv.org/abs/1901.02860);
        Wu et al., "Memorizing Transformers", ICLR 2022
        (https://arxiv.org/abs/2203.08913).
    """

    def __init__(
        self,
        documents,
        batch_size,
        segment_length,
        shuffle=True,
        seed=0,
        pad_id=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value, minimum in (
            ("batch_size", batch_size, 1),
            ("segment_length", segment_length, 1),
            ("seed", seed, 0),
            ("pad_id", pad_id, 0),
        ):
            if not _is_int(value) or not minimum <= value <= _INT32_MAX:
                raise ValueError(
                    f"`{name}` must be an int in [{minimum}, {_INT32_MAX}], "
                    f"got {value!r}."
                )
        if not isinstance(shuffle, bool):
            raise ValueError(f"`shuffle` must be a bool, got {shuffle!r}.")
        self.batch_size = int(batch_size)
        self.segment_length = int(segment_length)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.pad_id = int(pad_id)

        self._documents = []
        self._document_indices = []
        self.skipped_documents = 0
        for index, document in enumerate(documents):
            tokens = _token_array(index, document)
            if tokens.size < 2:
                self.skipped_documents += 1
            else:
                self._documents.append(tokens)
                self._document_indices.append(index)
        if not self._documents:
            raise ValueError(
                f"No usable document among the {self.skipped_documents} given: "
                "a document needs at least 2 tokens to have a next-token target."
            )
        self._segment_counts = [
            -(-(tokens.size - 1) // self.segment_length) for tokens in self._documents
        ]
        if self.shuffle:
            longest = max(self._segment_counts)
            total = sum(self._segment_counts)
            self._num_batches = (total - longest) // self.batch_size + longest
        else:
            _, self._num_batches = self._place(range(len(self._documents)))
        self._epoch = 0
        self._schedule = self._build_schedule()

    @property
    def epoch(self):
        """Number of `on_epoch_end` calls; selects the document order."""
        return self._epoch

    @property
    def num_documents(self):
        """Number of usable documents (at least 2 tokens)."""
        return len(self._documents)

    @property
    def document_order(self):
        """Indices into `documents` of this epoch's documents, in order."""
        order, _, _ = self._schedule
        return [self._document_indices[document] for document in order]

    def __len__(self):
        return self._num_batches

    def __getitem__(self, index):
        index = operator.index(index)
        if not 0 <= index < self._num_batches:
            raise IndexError(
                f"Batch index {index} out of range for {self._num_batches} batches."
            )
        _, lane_documents, lane_segments = self._schedule
        shape = (self.batch_size, self.segment_length)
        token_ids = np.full(shape, self.pad_id, dtype="int32")
        targets = np.full(shape, self.pad_id, dtype="int32")
        padding_mask = np.zeros(shape, dtype=bool)
        document_start = np.zeros((self.batch_size,), dtype=bool)
        for lane in range(self.batch_size):
            document = lane_documents[index, lane]
            if document < 0:
                continue
            tokens = self._documents[document]
            segment = lane_segments[index, lane]
            begin = segment * self.segment_length
            end = min(begin + self.segment_length, tokens.size - 1)
            token_ids[lane, : end - begin] = tokens[begin:end]
            targets[lane, : end - begin] = tokens[begin + 1 : end + 1]
            padding_mask[lane, : end - begin] = True
            document_start[lane] = segment == 0
        inputs = {
            "token_ids": token_ids,
            "document_start": document_start,
            "padding_mask": padding_mask,
        }
        return inputs, targets, padding_mask.astype("float32")

    def batch_contents(self, index):
        """Which document segment each lane of batch `index` carries.

        Returns:
            `(documents, segments)`, int arrays `[batch_size]`: the index
            into the `documents` given (`-1` for a padded lane) and the
            segment within that document; segment `i` holds the inputs at
            document positions `[i * segment_length, (i + 1) *
            segment_length)` and their next-token targets.
        """
        index = operator.index(index)
        if not 0 <= index < self._num_batches:
            raise IndexError(
                f"Batch index {index} out of range for {self._num_batches} batches."
            )
        _, lane_documents, lane_segments = self._schedule
        usable = lane_documents[index]
        indices = np.asarray(self._document_indices)[np.maximum(usable, 0)]
        documents = np.where(usable >= 0, indices, -1)
        segments = np.where(usable >= 0, lane_segments[index], 0)
        return documents, segments

    def on_epoch_end(self):
        self._epoch += 1
        if self.shuffle:
            self._schedule = self._build_schedule()

    def _place(self, order):
        """Deals documents to the first free lane.

        Returns `(placements, steps)`: `(document, lane, first_step)` per
        document, and the number of steps until every lane is done.
        """
        free_lanes = [(0, lane) for lane in range(self.batch_size)]
        placements = []
        for document in order:
            step, lane = heapq.heappop(free_lanes)
            placements.append((document, lane, step))
            heapq.heappush(free_lanes, (step + self._segment_counts[document], lane))
        return placements, max(step for step, _ in free_lanes)

    def _build_schedule(self):
        """This epoch's `(order, lane_documents, lane_segments)`.

        `lane_documents[step, lane]` indexes the usable documents (`-1`:
        padding); `lane_segments[step, lane]` is the segment within it.
        """
        order = np.arange(len(self._documents))
        if self.shuffle:
            order = np.random.default_rng((self.seed, self._epoch)).permutation(order)
        placements, _ = self._place(order)
        shape = (self._num_batches, self.batch_size)
        lane_documents = np.full(shape, -1, dtype="int64")
        lane_segments = np.zeros(shape, dtype="int64")
        for document, lane, step in placements:
            count = self._segment_counts[document]
            lane_documents[step : step + count, lane] = document
            lane_segments[step : step + count, lane] = np.arange(count)
        return order, lane_documents, lane_segments


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _token_array(index, document):
    """`document` as an int32 array; ValueError unless 1-D token ids."""
    tokens = np.asarray(document)
    if tokens.ndim != 1:
        raise ValueError(
            f"Document {index} must be a 1-D array of token ids, got shape "
            f"{tokens.shape}."
        )
    if tokens.size == 0:
        return tokens.astype("int32")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"Document {index} must hold integer token ids, got dtype {tokens.dtype}."
        )
    if tokens.min() < 0 or tokens.max() > _INT32_MAX:
        raise ValueError(
            f"Document {index} has token ids outside [0, {_INT32_MAX}]: "
            f"{tokens.min()} to {tokens.max()}."
        )
    return tokens.astype("int32")

import bisect
import heapq
import operator
import threading

import keras
import numpy as np

from keras_memtrans.validation import is_int

_INT32_MAX = np.iinfo(np.int32).max


class LaneStreamer(keras.utils.PyDataset):
    """Streams long tokenized documents in lanes, Transformer-XL style.

    Batch row `b` is a lane that carries consecutive segments of one
    document, which is what a memory model (`KNNAttention`) needs: its
    memory for row `b` then holds the earlier tokens of the same document.
    Documents are dealt in passes, each pass every usable document once, in
    `pass_order(p)`: the given order, or with `shuffle=True` an order drawn
    by a generator seeded with `(seed, p)`. Each document goes, whole, to the
    lane that becomes free first (the lowest lane on ties), so every token
    of a pass appears exactly once, in order, in one lane. Segments are
    never shuffled.

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

    With `repeat=False` (evaluation) the stream is one pass, pass 0, and
    `len()` batches long: once a lane has no document left it is fully
    padded (`padding_mask` and `document_start` all `False`,
    `sample_weight` 0) until the longest-running document ends. With
    `repeat=True` (training) the stream is endless (`num_batches` is
    `None`): a lane that becomes free takes the next document of passes 0,
    1, 2, ... in turn, so no lane ever idles and the last documents of a
    pass run alongside the first of the next. Batch `index` is then the
    global training step; `steps_per_pass` batches hold about one pass.
    The batch shape never changes, as the lanes of a memory model are fixed.

    Use with memory models:

    - Train on `repeat=True` with `fit(..., steps_per_epoch=N)`: `fit`
      reads batches 0, 1, 2, ... across all its epochs, whatever `N` (a new
      `fit` call starts again at batch 0).
    - Evaluate on `repeat=False`, `shuffle=False`, so each evaluation sees
      the same stream.
    - Give `fit` a `repeat=False` stream only with `shuffle=False`: by
      default `fit` shuffles the batch order of a `PyDataset` of known
      length, which breaks the lanes. Past the last batch, `fit` restarts
      the stream at batch 0, where every lane starts a document.
    - `__getitem__(index)` is random access and depends only on `index` and
      the constructor arguments (`on_epoch_end` changes nothing), so
      threads (`workers > 1`) and read-ahead are safe. The deal is computed
      lazily, as far as the batches asked for. One caution: with
      `workers > 1`, Keras 3.15's JAX and torch trainers were seen to spend
      batch 0 of a first `fit` on building the model and to train from
      batch 1 on, whose documents then start mid-way; the default
      `workers=1` trains from batch 0.

    Args:
        documents: list of 1-D integer arrays of non-negative token ids.
        batch_size: int. Number of lanes.
        segment_length: int. Tokens per segment, `L`.
        shuffle: bool. Whether each pass deals the documents in a seeded
            random order rather than the given one.
        repeat: bool. Whether to stream passes endlessly (training) rather
            than one pass (evaluation).
        seed: non-negative int seeding the pass orders.
        pad_id: non-negative int filling padded inputs and targets.
        **kwargs: `keras.utils.PyDataset` arguments (`workers`,
            `use_multiprocessing`, `max_queue_size`).

    Call arguments (`streamer[index]`):
        index: int. The batch, from 0 (below `len(streamer)` unless
            `repeat=True`).

    Returns:
        `(inputs, targets, sample_weight)` as above.

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
    >>> streamer[2][0]["padding_mask"].any(axis=1)  # lane 1 idles
    array([ True, False])
    >>> endless = LaneStreamer(
    ...     documents, batch_size=2, segment_length=4, shuffle=False, repeat=True
    ... )
    >>> endless.num_batches is None, endless.steps_per_pass
    (True, 3)
    >>> endless[2][0]["token_ids"]  # lane 1 starts pass 1
    array([[9, 0, 0, 0],
           [1, 2, 3, 4]], dtype=int32)
    >>> endless.batch_contents(2)
    (array([0, 0]), array([2, 0]))

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
        repeat=False,
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
            if not is_int(value) or not minimum <= value <= _INT32_MAX:
                raise ValueError(
                    f"`{name}` must be an int in [{minimum}, {_INT32_MAX}], "
                    f"got {value!r}."
                )
        for name, value in (("shuffle", shuffle), ("repeat", repeat)):
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be a bool, got {value!r}.")
        self.batch_size = int(batch_size)
        self.segment_length = int(segment_length)
        self.shuffle = shuffle
        self.repeat = repeat
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
        inputs = np.array([tokens.size - 1 for tokens in self._documents])
        self._segment_counts = -(-inputs // self.segment_length)
        # Padded slots of each document's last segment.
        self._last_padding = self._segment_counts * self.segment_length - inputs
        total = int(self._segment_counts.sum())
        self._steps_per_pass = -(-total // self.batch_size)

        # The deal so far: per lane, the steps where its documents start and
        # which (usable) documents they are; a heap of `(free step, lane)`.
        self._lock = threading.Lock()
        self._lane_starts = [[] for _ in range(self.batch_size)]
        self._lane_documents = [[] for _ in range(self.batch_size)]
        self._free_lanes = [(0, lane) for lane in range(self.batch_size)]
        self._dealt = 0
        self._order_pass, self._order = None, None
        if not self.repeat:
            self._deal_until(total)
            self._num_batches = max(step for step, _ in self._free_lanes)

    @property
    def num_documents(self):
        """Number of usable documents (at least 2 tokens)."""
        return len(self._documents)

    @property
    def steps_per_pass(self):
        """Batches that hold one pass's segments: `ceil(segments / lanes)`."""
        return self._steps_per_pass

    @property
    def num_batches(self):
        """`len(self)`, or `None` for an endless (`repeat=True`) stream."""
        return None if self.repeat else self._num_batches

    def __len__(self):
        if self.repeat:
            raise TypeError(
                "A `repeat=True` LaneStreamer is endless: it has no length "
                "(see `steps_per_pass`)."
            )
        return self._num_batches

    def pass_order(self, pass_index):
        """Indices into `documents` of the documents of pass `pass_index`."""
        if not is_int(pass_index) or pass_index < 0:
            raise ValueError(
                f"`pass_index` must be a non-negative int, got {pass_index!r}."
            )
        return [self._document_indices[d] for d in self._usable_order(pass_index)]

    def __getitem__(self, index):
        lane_documents, lane_segments = self._contents(index)
        shape = (self.batch_size, self.segment_length)
        token_ids = np.full(shape, self.pad_id, dtype="int32")
        targets = np.full(shape, self.pad_id, dtype="int32")
        padding_mask = np.zeros(shape, dtype=bool)
        document_start = np.zeros((self.batch_size,), dtype=bool)
        for lane, (document, segment) in enumerate(zip(lane_documents, lane_segments)):
            if document < 0:
                continue
            tokens = self._documents[document]
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
        usable, segments = self._contents(index)
        indices = np.asarray(self._document_indices)[np.maximum(usable, 0)]
        return np.where(usable >= 0, indices, -1), segments

    def padding_fraction(self, num_steps):
        """Fraction of padded input slots in batches `0` to `num_steps - 1`.

        With `repeat=True` only documents' partial last segments are
        padded; without, also the lanes idling at the end of the pass.
        """
        limit = _INT32_MAX if self.repeat else self._num_batches
        if not is_int(num_steps) or not 1 <= num_steps <= limit:
            raise ValueError(
                f"`num_steps` must be an int in [1, {limit}], got {num_steps!r}."
            )
        real = 0
        with self._lock:
            self._deal_until(num_steps - 1)
            for starts, documents in zip(self._lane_starts, self._lane_documents):
                # A lane's documents that start within the batches asked for.
                starts = np.asarray(starts, dtype="int64")
                within = starts < num_steps
                starts = starts[within]
                documents = np.asarray(documents, dtype="int64")[within]
                counts = self._segment_counts[documents]
                covered = np.minimum(counts, num_steps - starts)
                padding = np.where(covered == counts, self._last_padding[documents], 0)
                real += int(covered.sum()) * self.segment_length - int(padding.sum())
        return 1 - real / (num_steps * self.batch_size * self.segment_length)

    def _contents(self, index):
        """`(usable documents, segments)` of batch `index`; `-1`: padding."""
        index = operator.index(index)
        if index < 0 or (not self.repeat and index >= self._num_batches):
            raise IndexError(
                f"Batch index {index} out of range for "
                f"{self.num_batches or 'endless'} batches."
            )
        documents = np.full((self.batch_size,), -1, dtype="int64")
        segments = np.zeros((self.batch_size,), dtype="int64")
        with self._lock:
            self._deal_until(index)
            for lane, starts in enumerate(self._lane_starts):
                position = bisect.bisect_right(starts, index) - 1
                if position < 0:
                    continue  # A lane with no document at all.
                document = self._lane_documents[lane][position]
                segment = index - starts[position]
                if segment < self._segment_counts[document]:
                    documents[lane], segments[lane] = document, segment
        return documents, segments

    def _deal_until(self, step):
        """Deals documents until each lane's documents cover batch `step`.

        Without `repeat`, dealing stops after pass 0. The caller holds the
        lock.
        """
        while self._free_lanes[0][0] <= step and (
            self.repeat or self._dealt < len(self._documents)
        ):
            pass_index, position = divmod(self._dealt, len(self._documents))
            if pass_index != self._order_pass:
                self._order_pass = pass_index
                self._order = self._usable_order(pass_index)
            document = int(self._order[position])
            start, lane = heapq.heappop(self._free_lanes)
            self._lane_starts[lane].append(start)
            self._lane_documents[lane].append(document)
            count = int(self._segment_counts[document])
            heapq.heappush(self._free_lanes, (start + count, lane))
            self._dealt += 1

    def __getstate__(self):
        # Worker processes (`use_multiprocessing=True`) may get a pickled copy.
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _usable_order(self, pass_index):
        """Pass `pass_index`'s order of the usable documents."""
        if not self.shuffle:
            return np.arange(len(self._documents))
        rng = np.random.default_rng((self.seed, pass_index))
        return rng.permutation(len(self._documents))


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

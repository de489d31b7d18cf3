"""`make_memory`: the one place that turns a memory kind into a memory.

A new memory is a `KNNMemory` subclass in its own module, one entry in
`MEMORY_CLASSES` and one line in the contract tests
(`tests/memory/test_memory_contract.py`).
"""

import warnings

from keras_memtrans.memory.exact_memory import ExactMemory
from keras_memtrans.memory.host import distributed_devices
from keras_memtrans.memory.scann_memory import ScannMemory

# Smallest `memory_size` at which `memory_kind="auto"` picks ScaNN: the
# measured crossover of docs/memory_lookup.md.
SCANN_MIN_MEMORY_SIZE = 32768

# Each kind's class and its arguments beyond the sizes.
MEMORY_CLASSES = {
    "exact": (ExactMemory, {}),
    "scann": (ScannMemory, {"searcher": "tree"}),
    "scann_exact": (ScannMemory, {"searcher": "brute_force"}),
}
MEMORY_KINDS = ("auto", *MEMORY_CLASSES)
# The kinds whose memory lives on the host (called back from the step).
HOST_MEMORY_KINDS = tuple(
    kind
    for kind, (memory_class, _) in MEMORY_CLASSES.items()
    if memory_class is ScannMemory
)


def check_memory_kind(memory_kind):
    """Raises a ValueError unless `memory_kind` is one of `MEMORY_KINDS`."""
    if memory_kind not in MEMORY_KINDS:
        kinds = ", ".join(repr(kind) for kind in MEMORY_KINDS)
        raise ValueError(f"`memory_kind` must be one of {kinds}, got {memory_kind!r}.")


def resolve_memory_kind(memory_kind, memory_size):
    """The kind of memory `make_memory` builds for `memory_kind`: `"auto"`
    resolved to `"scann"` from `memory_size >= SCANN_MIN_MEMORY_SIZE` when
    no `keras.distribution` spreads the step over several devices, else to
    `"exact"` (`make_memory` falls back to `"exact"` when `scann` is not
    installed); any other kind unchanged."""
    check_memory_kind(memory_kind)
    if memory_kind != "auto":
        return memory_kind
    large = memory_size >= SCANN_MIN_MEMORY_SIZE
    return "scann" if large and distributed_devices() == 1 else "exact"


def make_memory(
    memory_kind,
    batch_size,
    num_heads,
    head_dim,
    memory_size,
    top_k="exact",
    recall_target=0.95,
    scores_per_block="auto",
    num_leaves=None,
    num_leaves_to_search=None,
    segment_length=None,
    **kwargs,
):
    """A `KNNMemory` of the given kind.

    Args:
        memory_kind: `"exact"` (`ExactMemory`: in-graph ring buffer, exact
            top-k, compiles with XLA), `"scann"` (`ScannMemory`: host memory
            searched with ScaNN's trees), `"scann_exact"` (`ScannMemory`
            with ScaNN's brute-force searchers: the exact top-k on the
            host) or `"auto"`: `"scann"` from
            `memory_size >= SCANN_MIN_MEMORY_SIZE` (32768, the crossover
            measured in docs/memory_lookup.md) when `scann` is installed
            and no `keras.distribution` spreads the step over several
            devices (a host memory cannot run there), else `"exact"`.
        batch_size, num_heads, head_dim, memory_size: the memory's sizes
            (see `KNNMemory`).
        top_k, recall_target, scores_per_block: the in-graph memory's
            top-k and search blocks (see `ExactMemory`); ignored by ScaNN.
        num_leaves, num_leaves_to_search: the ScaNN trees (see
            `ScannMemory`); ignored by the exact memory.
        segment_length: the longest segment the attention layer writes (the
            exact memory's spare slots, see `ExactMemory`); ignored by
            ScaNN.
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`).

    Returns:
        An `ExactMemory` or a `ScannMemory`, built.

    Example:
    >>> memory = make_memory("auto", batch_size=2, num_heads=1, head_dim=4,
    ...                      memory_size=64)
    >>> type(memory).__name__
    'ExactMemory'
    """
    sizes = dict(
        batch_size=batch_size,
        num_heads=num_heads,
        head_dim=head_dim,
        memory_size=memory_size,
        **kwargs,
    )
    kind = resolve_memory_kind(memory_kind, memory_size)
    memory_class, options = MEMORY_CLASSES[kind]
    if memory_class is ScannMemory:
        options = dict(
            options, num_leaves=num_leaves, num_leaves_to_search=num_leaves_to_search
        )
    else:
        options = dict(
            options,
            top_k=top_k,
            recall_target=recall_target,
            scores_per_block=scores_per_block,
            segment_length=segment_length,
        )
    try:
        memory = memory_class(**options, **sizes)
    except ImportError:
        if memory_kind != "auto":
            raise
        warnings.warn(
            f"`memory_size={memory_size}` selects ScannMemory, but `scann` "
            "is not installed (`pip install keras-memtrans[scann]`): using "
            "ExactMemory.",
            stacklevel=2,
        )
        memory = ExactMemory(
            top_k=top_k,
            recall_target=recall_target,
            scores_per_block=scores_per_block,
            segment_length=segment_length,
            **sizes,
        )
    memory.build()
    return memory

"""Stream two long standard-library files through a KNNAttention layer and
show what its memory retrieves.

The layer is untrained; its query and key projections are tied and its input
at each byte encodes the last few bytes, so a query retrieves earlier places
in the same document where the same text occurred. Each of the two batch
lanes reads its own document, segment by segment, into its own memory.

    KERAS_BACKEND=jax python -m recipes.demo
"""

import argparse
import inspect
import sys

import keras
import numpy as np
from keras import ops

from keras_memtrans import KNNAttention

DEFAULT_MODULES = ("argparse", "typing")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs=2, default=DEFAULT_MODULES)
    parser.add_argument("--segment-length", type=int, default=256)
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--memory-size", type=int, default=4096)
    parser.add_argument("--num-neighbors", type=int, default=4)
    parser.add_argument("--context-bytes", type=int, default=6)
    parser.add_argument("--queries", type=int, default=3)
    return parser.parse_args(argv)


def read_module(name):
    module = __import__(name)
    return inspect.getsource(module).encode("utf-8")


def build_model(args, batch_size):
    """Bytes -> sum of per-offset byte embeddings -> KNNAttention."""
    token_ids = keras.Input(
        (args.segment_length,), batch_size=batch_size, dtype="int32"
    )
    document_start = keras.Input((), batch_size=batch_size, dtype="bool")
    hidden = 0
    for offset in range(args.context_bytes):
        # The byte `offset` places back (0 before the segment starts).
        shifted = keras.layers.ZeroPadding1D((offset, 0))(token_ids[:, :, None])
        shifted = shifted[:, : args.segment_length, 0]
        hidden = hidden + keras.layers.Embedding(256, 64)(shifted)
    attention = KNNAttention(
        num_heads=1,
        memory_size=args.memory_size,
        num_neighbors=args.num_neighbors,
        name="knn_attention",
    )
    _, neighbors = attention(
        hidden, document_start=document_start, return_neighbors=True
    )
    attention.key_projection.kernel.assign(attention.query_projection.kernel)
    return keras.Model([token_ids, document_start], neighbors)


def show(text, position, width=24):
    snippet = text[max(position - width, 0) : position + 1]
    return repr(snippet.decode("utf-8", "replace"))[-width - 2 :]


def main(argv=None):
    args = parse_args(argv)
    documents = [read_module(name) for name in args.modules]
    length = args.segment_length
    segments = min(args.segments, min(len(d) for d in documents) // length)
    print(
        f"backend={keras.backend.backend()} lanes={len(documents)} "
        f"segment={length} memory_size={args.memory_size} "
        f"k={args.num_neighbors} segments={segments}"
    )
    model = build_model(args, batch_size=len(documents))
    tokens = np.stack(
        [np.frombuffer(d[: segments * length], np.uint8) for d in documents]
    ).astype("int32")
    for step in range(segments):
        start = np.full((len(documents),), step == 0)
        batch = tokens[:, step * length : (step + 1) * length]
        neighbors = np.asarray(ops.convert_to_numpy(model([batch, start])))
    print("Last segment: each query and the text its nearest memories end with")
    rng = np.random.default_rng(0)
    offset = (segments - 1) * length
    for lane, name in enumerate(args.modules):
        print(f"\nlane {lane}: {name}.py")
        for query in rng.choice(length, args.queries, replace=False):
            print(
                f"  query @{offset + query:6d} {show(documents[lane], offset + query)}"
            )
            for position in sorted(neighbors[lane, query, 0]):
                if position >= 0:
                    print(
                        f"    memory @{position:6d} {show(documents[lane], position)}"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

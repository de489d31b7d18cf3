import keras
import numpy as np
import pytest

from keras_memtrans import DecoderBlock
from keras_memtrans import KNNAttention
from keras_memtrans import SegmentAttention
from keras_memtrans.layers.initializers import clone_initializer
from tests.arrays import to_numpy
from tests.weights import assert_independent
from tests.weights import first_rows


def built_memory_block(**options):
    block = DecoderBlock(
        num_heads=2,
        intermediate_dim=16,
        memory_options=dict(memory_size=32, num_neighbors=4),
        batch_size=2,
        **options,
    )
    block.build((2, 8, 16))
    return block


def kernels(layer):
    return [v for v in layer.trainable_variables if v.path.endswith("kernel")]


def test_knn_attention_starts_with_distinct_query_key_and_value():
    layer = KNNAttention(
        num_heads=2, head_dim=8, memory_size=64, num_neighbors=4, batch_size=2
    )
    layer.build((2, 16, 16))
    rows = first_rows(kernels(layer))
    assert len(rows) == 4  # query, key, value, output
    assert_independent(rows)


@pytest.mark.parametrize(
    "initializer",
    [
        lambda: "glorot_uniform",
        lambda: keras.initializers.GlorotUniform(seed=3),
        lambda: keras.initializers.GlorotUniform(seed=keras.random.SeedGenerator(3)),
    ],
    ids=["named", "seeded", "seed_generator"],
)
def test_every_kernel_of_a_block_is_drawn_on_its_own(initializer):
    block = built_memory_block(kernel_initializer=initializer())
    rows = first_rows(kernels(block))
    assert len(rows) == 6
    assert_independent(rows)


@pytest.mark.parametrize(
    "seed", [lambda: 7, lambda: keras.random.SeedGenerator(7)], ids=["int", "generator"]
)
def test_a_seeded_initializer_stays_reproducible(seed):
    def build():
        initializer = keras.initializers.GlorotUniform(seed=seed())
        layer = SegmentAttention(num_heads=2, kernel_initializer=initializer)
        layer.build((2, 8, 16))
        return [to_numpy(kernel) for kernel in kernels(layer)]

    for first, second in zip(build(), build(), strict=True):
        np.testing.assert_array_equal(first, second)


def test_clone_initializer_keeps_the_distribution():
    clone = clone_initializer(keras.initializers.RandomNormal(stddev=0.5), "x")
    assert isinstance(clone, keras.initializers.RandomNormal)
    assert clone.get_config()["stddev"] == 0.5
    values = to_numpy(clone((200, 200)))
    assert abs(values.std() - 0.5) < 0.01


def test_tied_query_key_init_copies_the_query_kernel_only():
    block = built_memory_block(tie_query_key_init=True)
    attention = block.attention
    np.testing.assert_array_equal(
        to_numpy(attention.key_projection.kernel),
        to_numpy(attention.query_projection.kernel),
    )
    rows = first_rows([v for v in kernels(block) if "key_projection" not in v.path])
    assert len(rows) == 5
    assert_independent(rows)
    clone = DecoderBlock.from_config(block.get_config())
    assert clone.attention.tie_query_key_init is True


def test_tied_init_starts_each_key_head_as_its_groups_first_query_head():
    # 4 query heads in 2 groups: key head n starts as query head 2 n.
    layer = SegmentAttention(
        num_heads=4, num_key_value_heads=2, tie_query_key_init=True
    )
    layer.build((2, 8, 16))
    query = to_numpy(layer.query_projection.kernel)  # [hidden, 4, head_dim]
    key = to_numpy(layer.key_projection.kernel)  # [hidden, 2, head_dim]
    np.testing.assert_array_equal(key, query[:, [0, 2]])
    assert np.abs(query[:, 1] - query[:, 0]).max() > 0

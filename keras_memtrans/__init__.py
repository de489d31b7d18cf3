"""Memorizing Transformers (Wu et al., ICLR 2022) for Keras 3."""

from keras_memtrans.layers.knn_attention import KNNAttention
from keras_memtrans.layers.relative_position_bias import RelativePositionBias
from keras_memtrans.layers.segment_attention import SegmentAttention
from keras_memtrans.memory.exact_memory import ExactMemory
from keras_memtrans.memory.segment_cache import SegmentCache

__version__ = "0.1.0"

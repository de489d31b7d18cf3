"""Memorizing Transformers (Wu et al., ICLR 2022) for Keras 3."""

from keras_memtrans import data
from keras_memtrans.data import LaneStreamer
from keras_memtrans.data import TextCorpus
from keras_memtrans.layers.decoder_block import DecoderBlock
from keras_memtrans.layers.knn_attention import KNNAttention
from keras_memtrans.layers.relative_position_bias import RelativePositionBias
from keras_memtrans.layers.segment_attention import SegmentAttention
from keras_memtrans.memory.exact_memory import ExactMemory
from keras_memtrans.memory.scann_memory import ScannMemory
from keras_memtrans.memory.segment_cache import SegmentCache

try:
    import keras_hub  # noqa: F401
except ImportError:  # Without the `hub` extra: layers, memories and data only.
    analysis = models = None
else:
    from keras_memtrans import analysis
    from keras_memtrans import models
    from keras_memtrans.models import MemorizingTransformerBackbone
    from keras_memtrans.models import MemorizingTransformerCausalLM
    from keras_memtrans.models import MemorizingTransformerPreprocessor
    from keras_memtrans.models import MemorizingTransformerTokenizer

__version__ = "0.1.0"

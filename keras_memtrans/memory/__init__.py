from keras_memtrans.memory.exact_memory import ExactMemory
from keras_memtrans.memory.factory import make_memory
from keras_memtrans.memory.knn_memory import KNNMemory
from keras_memtrans.memory.ring_buffer import RingBuffer
from keras_memtrans.memory.scann_memory import ScannMemory
from keras_memtrans.memory.segment_cache import SegmentCache

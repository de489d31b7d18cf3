from keras_memtrans.data.lane_streamer import LaneStreamer
from keras_memtrans.data.text_corpus import TextCorpus

from keras_memtrans.models.memorizing_transformer_backbone import (
    MemorizingTransformerBackbone,
)
from keras_memtrans.models.memorizing_transformer_causal_lm import (
    MemorizingTransformerCausalLM,
)
from keras_memtrans.models.memorizing_transformer_preprocessor import (
    MemorizingTransformerPreprocessor,
)
from keras_memtrans.models.memorizing_transformer_tokenizer import (
    MemorizingTransformerTokenizer,
)
from keras_memtrans.models.presets import PRESETS
from keras_memtrans.models.presets import get_preset

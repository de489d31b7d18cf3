import keras
import keras_hub
import numpy as np

from keras_memtrans.models.memorizing_transformer_backbone import (
    MemorizingTransformerBackbone,
)
from keras_memtrans.models.memorizing_transformer_tokenizer import (
    MemorizingTransformerTokenizer,
)


@keras.saving.register_keras_serializable(package="keras_memtrans")
class MemorizingTransformerPreprocessor(keras_hub.models.Preprocessor):
    """Turns whole documents into token arrays for the lane streamer.

    A memory model reads documents whole, segment after segment, so this
    preprocessor does not pack fixed-length samples as keras-hub's
    `CausalLMPreprocessor` does: it tokenizes each document (newlines are
    encoded, so a document's tokens are its exact text) and leaves the
    segmenting to `keras_memtrans.data.LaneStreamer`.

    Args:
        tokenizer: a `MemorizingTransformerTokenizer`.
        **kwargs: `keras_hub.models.Preprocessor` arguments.

    Call arguments:
        documents: a string or a list of strings.

    Returns:
        An int32 NumPy array of token ids, or a list of them.

    Example:
    >>> tokenizer = MemorizingTransformerTokenizer.from_documents(
    ...     ["x = 1\\ny = 2\\n"] * 50, vocabulary_size=300)
    >>> preprocessor = MemorizingTransformerPreprocessor(tokenizer)
    >>> preprocessor.detokenize(preprocessor("x = 1\\n"))
    'x = 1\\n'
    """

    backbone_cls = MemorizingTransformerBackbone
    tokenizer_cls = MemorizingTransformerTokenizer

    def __init__(self, tokenizer, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer = tokenizer

    def build(self, input_shape=None):
        self.built = True

    def call(self, documents):
        if isinstance(documents, str):
            return self.call([documents])[0]
        tokens = self.tokenizer.tokenize(list(documents))
        return [np.asarray(t, dtype="int32") for t in tokens]

    def detokenize(self, token_ids):
        """Text of a 1-D sequence of token ids."""
        token_ids = [int(t) for t in np.asarray(token_ids).reshape(-1)]
        return self.tokenizer.detokenize([token_ids])[0]

    def check_vocabulary(self, vocabulary_size):
        """Raises if the tokenizer does not match a model's vocabulary."""
        if self.tokenizer.vocabulary_size() != vocabulary_size:
            raise ValueError(
                f"The tokenizer has {self.tokenizer.vocabulary_size()} tokens "
                f"but the model's vocabulary_size is {vocabulary_size}: they "
                "were not trained together."
            )

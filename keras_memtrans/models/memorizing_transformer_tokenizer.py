import io

import keras
import keras_hub
import numpy as np
import sentencepiece

from keras_memtrans.models.memorizing_transformer_backbone import (
    MemorizingTransformerBackbone,
)


@keras.saving.register_keras_serializable(package="keras_memtrans")
class MemorizingTransformerTokenizer(keras_hub.tokenizers.SentencePieceTokenizer):
    """SentencePiece tokenizer of the Memorizing Transformer.

    A keras-hub `SentencePieceTokenizer` with the special tokens `<pad>` (id
    0), `<unk>` (1), `<s>` (2) and `</s>` (3). `from_documents()` learns a vocabulary
    from raw documents with the `sentencepiece` package, keeping whitespace
    as it is (source code depends on it) and falling back to bytes for
    characters outside the vocabulary, so any UTF-8 text round-trips. The
    model proto is saved as an asset of the `.keras` file, or of a keras-hub
    preset (`assets/tokenizer/vocabulary.spm`, beside `tokenizer.json`;
    `from_preset(directory)` reads it back).

    Args:
        proto: a SentencePiece model: serialized bytes or a file path.
        **kwargs: `keras_hub.tokenizers.SentencePieceTokenizer` arguments.

    Call arguments:
        inputs: a string or a list of strings (as `tokenize`).

    Returns:
        Token ids: an int tensor for a string, a ragged one for a list.

    Example:
    >>> tokenizer = MemorizingTransformerTokenizer.from_documents(
    ...     ["def add(a, b):\\n    return a + b\\n"] * 50, vocabulary_size=300)
    >>> tokenizer.detokenize(tokenizer.tokenize("def add(a, b):"))
    'def add(a, b):'

    Reference:
        Kudo and Richardson, "SentencePiece", EMNLP 2018
        (https://arxiv.org/abs/1808.06226).
    """

    backbone_cls = MemorizingTransformerBackbone

    def __init__(self, proto=None, **kwargs):
        self._add_special_token("<pad>", "pad_token")
        self._add_special_token("<s>", "start_token")
        self._add_special_token("</s>", "end_token")
        super().__init__(proto=proto, **kwargs)

    @classmethod
    def from_documents(cls, documents, vocabulary_size, max_sentences=200_000, seed=0):
        """Learns a unigram vocabulary of at most `vocabulary_size` pieces.

        SentencePiece stops short of `vocabulary_size` when a small corpus
        has fewer useful pieces; `vocabulary_size()` is the real size, the
        one a model must be built with.

        Args:
            documents: iterable of strings.
            vocabulary_size: int, including the 4 special tokens and 256
                byte-fallback pieces.
            max_sentences: int. Lines sampled for training.
            seed: int. Sampling seed.
        """
        if vocabulary_size < 4 + 256 + 1:
            raise ValueError(
                f"`vocabulary_size` must exceed 260 (4 special tokens and 256 "
                f"byte-fallback pieces), got {vocabulary_size}."
            )
        lines = [line for text in documents for line in text.split("\n") if line]
        if not lines:
            raise ValueError(
                "No text to train a tokenizer on: all documents are empty."
            )
        if len(lines) > max_sentences:
            rng = np.random.default_rng(seed)
            lines = [
                lines[i] for i in rng.choice(len(lines), max_sentences, replace=False)
            ]
        model = io.BytesIO()
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_writer=model,
                vocab_size=vocabulary_size,
                model_type="unigram",
                pad_id=0,
                unk_id=1,
                bos_id=2,
                eos_id=3,
                byte_fallback=True,
                character_coverage=0.995,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                split_digits=True,
                allow_whitespace_only_pieces=True,
                shuffle_input_sentence=False,
                hard_vocab_limit=False,
                num_threads=2,
                minloglevel=2,
            )
        except RuntimeError as error:
            if "smaller than required_chars" not in str(error):
                raise
            raise ValueError(
                f"`vocabulary_size` ({vocabulary_size}) leaves no room for the "
                "characters of these documents beside the 260 special and byte "
                f"pieces; SentencePiece says: {error}"
            ) from None
        return cls(proto=model.getvalue())

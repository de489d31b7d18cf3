import numpy as np
import pytest

from keras_memtrans.models import MemorizingTransformerPreprocessor
from keras_memtrans.models import MemorizingTransformerTokenizer


def test_special_tokens_have_fixed_ids(tokenizer):
    assert tokenizer.pad_token_id == 0
    assert tokenizer.start_token_id == 2
    assert tokenizer.end_token_id == 3
    assert tokenizer.vocabulary_size() == 400


def test_documents_round_trip_exactly_whitespace_and_unicode_included(
    preprocessor, documents
):
    text = documents[0][:3000] + "\n\n\t  café ünïcödé → 数学\n"
    tokens = preprocessor(text)
    assert tokens.dtype == np.int32
    assert len(tokens) < len(text)
    assert preprocessor.detokenize(tokens) == text


def test_preprocessor_tokenizes_a_batch_of_documents(preprocessor, documents):
    batch = preprocessor(documents)
    assert len(batch) == 2
    for text, tokens in zip(documents, batch):
        np.testing.assert_array_equal(tokens, preprocessor(text))


def test_training_is_deterministic(documents):
    a = MemorizingTransformerTokenizer.from_documents(documents, 400, seed=1)
    b = MemorizingTransformerTokenizer.from_documents(documents, 400, seed=1)
    assert a.get_vocabulary() == b.get_vocabulary()


def test_config_round_trip_through_the_preprocessor(preprocessor, tmp_path):
    config = preprocessor.get_config()
    assert config["tokenizer"]["class_name"] == "MemorizingTransformerTokenizer"
    # The vocabulary travels as an asset, as in a `.keras` file.
    clone = MemorizingTransformerPreprocessor.from_config(config)
    preprocessor.tokenizer.save_assets(str(tmp_path))
    clone.tokenizer.load_assets(str(tmp_path))
    text = "for key, value in items:\n\tpass  # ünïcode\n"
    np.testing.assert_array_equal(clone(text), preprocessor(text))


@pytest.mark.parametrize("size", [0, 260, 280])
def test_rejects_a_vocabulary_without_room_for_pieces(documents, size):
    with pytest.raises(ValueError, match="vocabulary_size"):
        MemorizingTransformerTokenizer.from_documents(documents, size)


def test_rejects_empty_documents():
    with pytest.raises(ValueError, match="empty"):
        MemorizingTransformerTokenizer.from_documents(["", "\n\n"], 400)


def test_vocabulary_mismatch_names_both_sizes(preprocessor):
    with pytest.raises(ValueError, match="400 tokens.*512"):
        preprocessor.check_vocabulary(512)

import inspect
import json

import pytest

from keras_memtrans.models import MemorizingTransformerBackbone
from keras_memtrans.models import MemorizingTransformerPreprocessor
from keras_memtrans.models import MemorizingTransformerTokenizer
from keras_memtrans.models import get_preset


@pytest.fixture(scope="session")
def documents():
    return [inspect.getsource(module) for module in (json.decoder, json.encoder)]


@pytest.fixture(scope="session")
def tokenizer(documents):
    return MemorizingTransformerTokenizer.from_documents(documents, vocabulary_size=400)


@pytest.fixture
def preprocessor(tokenizer):
    return MemorizingTransformerPreprocessor(tokenizer)


def tiny_backbone(vocabulary_size=400, memory_options=None, **overrides):
    """The `tiny` preset's backbone; `memory_options` update the preset's."""
    config = dict(get_preset("tiny")["backbone"])
    config["memory_options"] = {**config["memory_options"], **(memory_options or {})}
    config.update(overrides)
    return MemorizingTransformerBackbone(vocabulary_size=vocabulary_size, **config)

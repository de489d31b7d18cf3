# The models' text fixtures: a tokenizer trained on two standard-library files.
from tests.models.conftest import documents  # noqa: F401
from tests.models.conftest import preprocessor  # noqa: F401
from tests.models.conftest import tokenizer  # noqa: F401

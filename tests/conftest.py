import os

import keras
import numpy as np
import pytest
from hypothesis import settings

from recipes import host_memory

# Eager backends are slow per example; keep property tests to a CI budget.
# Local runs explore 25 new examples each time; CI (HYPOTHESIS_PROFILE=ci,
# set by .ci/run) draws the same 15 every run (three backends in 20
# minutes) and prints how to reproduce one.
settings.register_profile("keras", max_examples=25, deadline=None)
settings.register_profile(
    "ci",
    settings.get_profile("keras"),
    max_examples=15,
    derandomize=True,
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "keras"))


def pytest_collection_modifyitems(items):
    # The recipe tests train whole runs, some in groups that one worker
    # runs (tests/recipes/runs.py): they go first, so that the workers share
    # them out from the start, not one worker finishing a group at the end.
    items.sort(key=lambda item: not item.nodeid.startswith("tests/recipes/"))


def pytest_report_header():
    return f"keras {keras.__version__}, backend: {keras.backend.backend()}"


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(0)
    np.random.seed(0)
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture(scope="session", autouse=True)
def _malloc_left_alone():
    """A recipe's `main` run in a test's process sets nothing in its
    `malloc` (`recipes.host_memory`): the setting is the process's, for
    good, and would reach every later test. tests/recipes/test_host_memory.py
    sets it in processes of its own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(host_memory, "mallopt", lambda parameter, value: True)
        yield

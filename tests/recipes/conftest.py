import pytest

from tests.recipes.runs import run


@pytest.fixture(scope="session")
def compared_run(tmp_path_factory):
    """The directory of one `--compare` run (the tiny preset for 3 steps,
    evaluated every 2), for the tests that only read a finished run: its
    output is `compared_run / "out"`."""
    tmp_path = tmp_path_factory.mktemp("compared")
    run(tmp_path, "--compare", "--eval-every", "2")
    return tmp_path


# A run of 8 steps, checkpointed and evaluated every 4: the schedule of the
# tests that stop a run at step 4 and resume it.
RESUMED_SCHEDULE = ("--steps", "8", "--checkpoint-every", "4", "--eval-every", "4")


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory):
    """`uninterrupted_run(memory_kind)`: the output directory of the run of
    `RESUMED_SCHEDULE` with that memory, never stopped (made once)."""
    outputs = {}

    def output(memory_kind):
        if memory_kind not in outputs:
            tmp_path = tmp_path_factory.mktemp(f"uninterrupted-{memory_kind}")
            run(tmp_path, *RESUMED_SCHEDULE, "--memory-kind", memory_kind)
            outputs[memory_kind] = tmp_path / "out"
        return outputs[memory_kind]

    return output

import re
import subprocess
import sys

# Six tests of one group and six others, each printing nothing: pytest-xdist
# spreads the others over both workers and must keep the group on one.
GROUPED_TESTS = """
import pytest

@pytest.mark.xdist_group("shared_run")
@pytest.mark.parametrize("case", range(6))
def test_grouped(case):
    pass

@pytest.mark.parametrize("case", range(6))
def test_free(case):
    pass
"""


def test_the_tests_of_a_shared_run_are_sent_to_one_worker(tmp_path):
    # tox's `--dist loadgroup` sends a group (COMPARED_RUN, UNINTERRUPTED_RUN
    # in tests/recipes/runs.py) to one worker by the group it adds to each
    # test's node id, which pytest 9.2 no longer reads (constraints.txt):
    # each worker then made its own shared run.
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_grouped.py").write_text(GROUPED_TESTS)
    command = [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup"]
    output = subprocess.run(
        [*command, "-v", "-p", "no:cacheprovider", "test_grouped.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    workers = re.findall(r"^\[(gw\d)\] .* PASSED test_grouped\.py::(\w+)", output, re.M)
    grouped = {worker for worker, test in workers if test == "test_grouped"}
    assert len(workers) == 12 and len(grouped) == 1, output

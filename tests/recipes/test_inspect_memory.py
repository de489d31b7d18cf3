import json
import os
import re

import matplotlib.figure
import numpy as np
import pytest

from recipes import inspect_memory
from tests.recipes.runs import run

# One pytest-xdist worker runs this module (`--dist loadgroup`, see
# tests/recipes/runs.py): it makes the `compare_run` once.
pytestmark = pytest.mark.xdist_group("inspect_memory")


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("inspect")
    corpus = tmp_path / "corpus"  # short documents keep the scoring quick
    corpus.mkdir()
    source = open(inspect_memory.__file__).read() * 2
    for i in range(4):
        (corpus / f"doc{i}.py").write_text(source[i * 2500 : (i + 1) * 2500])
    run(tmp_path, "--compare")
    return tmp_path / "out"


def test_inspection_agrees_with_the_run_and_writes_its_files(
    compare_run, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # it runs from any directory
    assert inspect_memory.main([str(compare_run), "--top", "5"]) == 0
    output = compare_run / "inspection"
    for name in ("summary.md", "gain_by_position.png", "document.html"):
        assert (output / name).stat().st_size > 0
    summary = (output / "summary.md").read_text()
    results = {
        r["run"]: r["validation_nll"]
        for r in json.loads((compare_run / "results.json").read_text())["results"]
    }
    # Token by token, the scorer reads the held-out documents exactly as the
    # run's evaluation did: the mean losses are the reported ones.
    without, with_memory = map(
        float,
        re.search(r"([\d.]+) nats without memory, ([\d.]+) with", summary).groups(),
    )
    assert without == pytest.approx(results["no_memory"], abs=2e-4)
    assert with_memory == pytest.approx(results["memory"], abs=2e-4)
    # The position table covers every token once.
    rows = re.findall(r"^\| (\d+)-(\d+) \| (\d+) \|", summary, re.MULTILINE)
    total = int(re.search(r"\((\d+) tokens;", summary).group(1))
    assert sum(int(tokens) for *_, tokens in rows) == total
    assert int(rows[0][0]) == 0
    assert len(re.findall(r"^\| doc\d", summary, re.MULTILINE)) == 5
    assert "<span" in (output / "document.html").read_text()


def test_needs_a_compare_run(tmp_path):
    results = {"results": [{"run": "no_memory"}]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="--compare"):
        inspect_memory.main([str(tmp_path)])


def test_needs_the_python_whose_standard_library_it_was_trained_on(tmp_path):
    results = {
        "results": [{"run": "memory"}, {"run": "no_memory"}],
        "corpus": {"source": None, "python": "2.7.18"},
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="Python 2.7.18"):
        inspect_memory.main([str(tmp_path)])


def test_needs_a_recipe_output(tmp_path):
    with pytest.raises(SystemExit, match="results.json"):
        inspect_memory.main([str(tmp_path)])


def test_unknown_document_is_named(compare_run):
    with pytest.raises(SystemExit, match="no_such_file"):
        inspect_memory.main([str(compare_run), "--document", "no_such_file"])


def test_top_tokens_lists_the_largest_gains_in_order():
    rng = np.random.default_rng(0)
    lengths = (7, 12, 5)
    memory, baseline = [], []
    for length in lengths:
        neighbors = rng.integers(-1, length, size=(1, length, 2, 3))  # [layer, q, h, k]
        losses = rng.normal(size=length)
        memory.append(
            {
                "token_ids": np.arange(length + 1),
                "losses": losses,
                "neighbors": neighbors,
            }
        )
        baseline.append({"losses": losses + rng.normal(size=length)})
    lines = inspect_memory.top_tokens(
        ["a", "b", "c"], memory, baseline, lambda ids: " ".join(map(str, ids)), 4
    )
    gains = [
        (b["losses"][i] - m["losses"][i], d, i)
        for d, (m, b) in enumerate(zip(memory, baseline))
        for i in range(len(m["losses"]))
    ]
    expected = sorted(gains, reverse=True)[:4]
    rows = [line.split(" | ") for line in lines[2:]]
    assert [row[0] for row in rows] == ["| " + "abc"[d] for _, d, _ in expected]
    for row, (_, d, i) in zip(rows, expected):
        assert row[2] == f"`{i + 1}`"  # the next token's id
        assert float(row[3]) == pytest.approx(baseline[d]["losses"][i], abs=0.005)
        assert float(row[4]) == pytest.approx(memory[d]["losses"][i], abs=0.005)


def test_a_plot_that_fails_half_way_leaves_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "gain_by_position.png"
    path.write_bytes(b"the previous plot")

    def half_a_png(figure, target, **kwargs):  # a disk filling up
        if isinstance(target, (str, os.PathLike)):
            target = open(target, "wb")
        target.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_a_png)
    with pytest.raises(OSError, match="disk full"):
        inspect_memory.plot([(0, 64, 10, 2.0, 1.5)], path)
    assert path.read_bytes() == b"the previous plot"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]

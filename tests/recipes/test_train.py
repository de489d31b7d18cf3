import json
import math

import keras

from recipes import train


def run(tmp_path, *flags):
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        corpus.mkdir()
        source = keras.__file__.rsplit("/", 1)[0] + "/src/ops/numpy.py"
        text = open(source).read()
        for i in range(4):
            (corpus / f"doc{i}.py").write_text(text[i * 20000 : (i + 1) * 20000])
    args = [
        "--preset",
        "tiny",
        "--corpus",
        str(corpus),
        "--steps",
        "3",
        "--output-dir",
        str(tmp_path / "out"),
        "--verbose",
        "0",
        "--validation-fraction",
        "0.25",
        *flags,
    ]
    assert train.main(args) == 0


def test_compare_trains_both_models_and_reports_perplexity(tmp_path):
    run(tmp_path, "--compare")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["backend"] == keras.backend.backend()
    memory, no_memory = results["results"]
    assert memory["memory_layers"] == [-1] and no_memory["memory_layers"] == []
    for r in results["results"]:
        assert (
            math.isfinite(r["validation_perplexity"]) and r["validation_perplexity"] > 1
        )
        assert r["steps"] == 3
        model = keras.saving.load_model(r["checkpoint"])
        assert len(model.backbone.memory_layers) == len(r["memory_layers"])
        assert int(model.optimizer.iterations) == 3  # resumable checkpoint
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| memory |" in table and "| no_memory |" in table


def test_existing_results_are_never_overwritten(tmp_path):
    run(tmp_path, "--no-memory")
    first = (tmp_path / "out" / "results.json").read_text()
    run(tmp_path, "--no-memory")
    assert (tmp_path / "out" / "results.json").read_text() == first
    assert (tmp_path / "out-2" / "results.json").exists()

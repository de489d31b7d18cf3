import json
import math
import os
import platform

import keras
import numpy as np
import pytest

from keras_memtrans import KNNAttention
from keras_memtrans.data import LaneStreamer
from keras_memtrans.models import MemorizingTransformerCausalLM
from keras_memtrans.models import get_preset
from recipes import common
from recipes import flags
from recipes import train
from recipes.reporting import held_out_scores
from tests.arrays import to_numpy
from tests.recipes.runs import COMPARED_RUN
from tests.recipes.runs import run


@COMPARED_RUN
def test_compare_trains_both_models_and_reports_perplexity(compared_run):
    tmp_path = compared_run
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["backend"] == keras.backend.backend()
    memory, no_memory = results["results"]
    assert memory["memory_layers"] == [-1] and no_memory["memory_layers"] == []
    # The held-out curve: every 2 steps and at the end, which is the result.
    for r in results["results"]:
        assert [row["step"] for row in r["curve"]] == [2, 3]
        assert r["curve"][-1]["validation_nll"] == r["validation_nll"]
    assert len(memory["gates"]) == 1 and len(memory["gates"][0]) == 2  # 2 heads
    assert 0 < min(memory["gates"][0]) <= max(memory["gates"][0]) < 1
    assert no_memory["gates"] == []
    for r in results["results"]:
        assert (
            math.isfinite(r["validation_perplexity"]) and r["validation_perplexity"] > 1
        )
        assert r["steps"] == 3
        model = keras.saving.load_model(r["checkpoint"])
        assert len(model.backbone.memory_layers) == len(r["memory_layers"])
        assert int(model.optimizer.iterations) == 3  # resumable checkpoint
        log_dir = tmp_path / "out" / "training" / r["run"]
        assert len((log_dir / "log.csv").read_text().splitlines()) == 3  # 2 epochs
        assert any((log_dir / "tensorboard").rglob("events.out.tfevents.*"))
        assert r["preset_dir"] == str((tmp_path / "out" / r["run"]).resolve())
        assert (tmp_path / "out" / r["run"] / "config.json").exists()
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| memory |" in table and "| no_memory |" in table
    assert "| step | perplexity, memory | perplexity, no_memory | ratio |" in table


@COMPARED_RUN
def test_results_record_the_machine_and_the_package_versions(compared_run):
    results = json.loads((compared_run / "out" / "results.json").read_text())
    environment = results["environment"]
    assert environment["packages"]["keras"] == keras.__version__
    assert environment["cpu_count"] == os.cpu_count()
    assert environment["python"] == platform.python_version()
    assert environment["processor"]
    table = (compared_run / "out" / "results.md").read_text()
    assert f"Machine: {environment['processor']}, {os.cpu_count()} CPUs" in table
    assert f"keras {keras.__version__}" in table


@COMPARED_RUN
def test_the_trained_model_loads_from_its_preset(compared_run):
    tmp_path = compared_run
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    result = results["results"][0]
    assert result["run"] == "memory"
    loaded = MemorizingTransformerCausalLM.from_preset(tmp_path / "out" / "memory")
    # The same held-out score as the trained model's, on the run's own split.
    _, _, validation = common.split_corpus(results["corpus"])
    backbone = loaded.backbone
    stream = LaneStreamer(
        loaded.preprocessor(validation.texts),
        backbone.batch_size,
        backbone.segment_length,
        shuffle=False,
    )
    # Compiled as the run's model was (XLA or not: the last bits differ).
    common.compile_for_training(
        loaded, results["training"], jit_compile=result["jit_compile"]
    )
    scores = held_out_scores(loaded, stream)
    assert scores["validation_nll"] == pytest.approx(result["validation_nll"], rel=1e-5)
    assert scores["gates"] == result["gates"]
    # The same logits as the final checkpoint's (the model as trained).
    checkpoint = keras.saving.load_model(result["checkpoint"])
    inputs, _, _ = stream[0]
    np.testing.assert_array_equal(
        loaded.predict_on_batch(inputs), checkpoint.predict_on_batch(inputs)
    )
    # Only the finished presets: no partial directory beside them.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "memory",
        "no_memory",
        "results.json",
        "results.md",
        "run.json",
        "training",
    ]


@COMPARED_RUN
def test_existing_results_are_never_overwritten(compared_run):
    tmp_path = compared_run
    first = (tmp_path / "out" / "results.json").read_text()
    run(tmp_path, "--no-memory", "--steps", "1")
    assert (tmp_path / "out" / "results.json").read_text() == first
    assert (tmp_path / "out-2" / "results.json").exists()


def test_trains_exactly_the_steps_asked_for_across_epochs(tmp_path, capsys):
    corpus = tmp_path / "corpus"  # 4 short documents: epochs of a few steps
    corpus.mkdir()
    text = open(train.__file__).read()
    for i in range(4):
        (corpus / f"doc{i}.py").write_text(text[i * 1000 : (i + 1) * 1000])
    # XLA on the backends that have it (torch.compile is not the CPU path).
    jit = "false" if keras.backend.backend() == "torch" else "true"
    run(
        tmp_path,
        "--min-chars",
        "500",
        "--segment-length",
        "128",
        "--steps",
        "13",
        "--checkpoint-every",
        "5",
        "--jit-compile",
        jit,
    )
    (result,) = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert result["steps"] == 13
    assert result["jit_compile"] == (jit == "true")
    assert int(keras.saving.load_model(result["checkpoint"]).optimizer.iterations) == 13
    log = tmp_path / "out" / "training" / "memory" / "log.csv"
    epochs = len(log.read_text().splitlines())
    assert epochs - 1 > 1  # the 13 steps span more than one epoch
    # Lanes never idle: the padding is the documents' partial last segments.
    assert "% of training token slots" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, models",
    [
        ([], ("memory",)),
        (["--compare"], ("memory", "no_memory")),
        (["--no-memory"], ("no_memory",)),
        (["--compare", "--no-memory"], ("no_memory",)),  # tox -e train -- --no-memory
        (["--no-memory", "--compare"], ("memory", "no_memory")),
    ],
)
def test_the_last_of_compare_and_no_memory_picks_the_models(argv, models):
    assert flags.parse_args(argv).models == models


def test_flags_take_precedence_over_the_preset():
    args = flags.parse_args(
        ["--preset", "tiny", "--memory-kind", "scann", "--steps", "7"]
    )
    backbone, training, vocabulary_size = flags.resolve_config(args)
    assert backbone["memory_options"]["memory_kind"] == "scann"
    assert training["steps"] == 7
    assert vocabulary_size == 512


def test_memory_placement_smeared_keys_and_tied_init_are_flags():
    args = flags.parse_args(
        ["--preset", "quick", "--memory-layers", "2", "-1", "--smear-keys", "false"]
        + ["--tie-query-key-init", "true"]
    )
    backbone, _, _ = flags.resolve_config(args)
    assert backbone["memory_layer_indices"] == (2, -1)
    assert backbone["smear_keys"] is False
    assert backbone["tie_query_key_init"] is True
    backbone, _, _ = flags.resolve_config(flags.parse_args(["--preset", "quick"]))
    assert (
        backbone["memory_layer_indices"]
        == get_preset("quick")["backbone"]["memory_layer_indices"]
    )


def test_key_value_heads_are_a_flag_checked_before_any_data_is_read():
    argv = ["--preset", "quick", "--num-key-value-heads"]  # quick: 4 heads
    backbone, _, _ = flags.resolve_config(flags.parse_args([*argv, "2"]))
    assert backbone["num_key_value_heads"] == 2
    with pytest.raises(ValueError, match=r"`num_key_value_heads` \(3\) must divide"):
        flags.resolve_config(flags.parse_args([*argv, "3"]))


def test_every_memory_option_of_the_layer_is_a_flag():
    options = {
        "--memory-size": ("memory_size", "128", 128),
        "--num-neighbors": ("num_neighbors", "4", 4),
        "--memory-kind": ("memory_kind", "exact", "exact"),
        "--top-k": ("top_k", "approx", "approx"),
        "--recall-target": ("recall_target", "0.9", 0.9),
        "--scores-per-block": ("scores_per_block", "4096", 4096),
        "--num-leaves": ("num_leaves", "4", 4),
        "--num-leaves-to-search": ("num_leaves_to_search", "2", 2),
    }
    argv = ["--preset", "tiny", "--head-dim", "8"]
    for flag, (_, text, _) in options.items():
        argv += [flag, text]
    backbone, _, _ = flags.resolve_config(flags.parse_args(argv))
    for name, _, value in options.values():
        assert backbone["memory_options"][name] == value
    assert set(KNNAttention.memory_options()) == {
        name for name, _, _ in options.values()
    }
    model = common.build_causal_lm(backbone, 300, None, True, 0)
    (layer,) = model.backbone.memory_layers
    assert layer.head_dim == 8
    for name, _, value in options.values():
        assert getattr(layer, name) == value


@pytest.mark.parametrize(
    "argv", [["--steps", "0"], ["--memory-size", "-4"], ["--vocabulary-size", "0"]]
)
def test_non_positive_sizes_are_rejected(argv, capsys):
    with pytest.raises(SystemExit):
        flags.parse_args(argv)
    assert "must be at least 1" in capsys.readouterr().err


def test_scores_per_block_is_auto_or_a_positive_int(capsys):
    argv = ["--preset", "tiny", "--scores-per-block"]
    backbone, _, _ = flags.resolve_config(flags.parse_args([*argv, "auto"]))
    assert backbone["memory_options"]["scores_per_block"] == "auto"
    for text in ("0", "Auto"):
        with pytest.raises(SystemExit):
            flags.parse_args([*argv, text])
    assert "must be at least 1" in capsys.readouterr().err


def test_the_model_without_memory_starts_from_the_same_weights():
    config = dict(get_preset("tiny")["backbone"])
    with_memory, without = (
        {w.path: w for w in common.build_causal_lm(config, 300, None, m, 0).weights}
        for m in (True, False)
    )
    assert set(without) < set(with_memory)
    for path, weight in without.items():
        np.testing.assert_array_equal(to_numpy(with_memory[path]), to_numpy(weight))
    # Beyond them, the memory model has only its gates and memory state.
    extra = {path.split("/")[-1] for path in set(with_memory) - set(without)}
    assert {"gate_bias", "keys", "values", "positions"} <= extra
    trainable = {
        w.path
        for w in common.build_causal_lm(config, 300, None, True, 0).trainable_weights
    }
    assert {p for p in set(with_memory) - set(without) if p in trainable} == {
        "transformer_layer_1/attention/gate_bias"
    }


class Stopped(Exception):
    """Stops `train.main` once it would read its settings."""


@pytest.mark.parametrize(
    "flag, resumed_argv, kept",
    [
        ([], None, [True]),
        (["--no-keep-freed-memory"], None, []),
        # A setting of the process: a resumed run takes the command line's.
        (["--no-keep-freed-memory"], [], []),
        ([], ["--no-keep-freed-memory"], [True]),
    ],
)
def test_the_recipe_keeps_freed_memory_unless_told_not_to(
    tmp_path, monkeypatch, flag, resumed_argv, kept
):
    calls = []
    monkeypatch.setattr(train, "keep_freed_memory", lambda: calls.append(True))

    def stop(args):
        raise Stopped

    monkeypatch.setattr(train, "resolve_config", stop)
    argv = ["--preset", "tiny", *flag]
    if resumed_argv is not None:
        run = {"argv": resumed_argv, "backend": keras.backend.backend()}
        (tmp_path / "run.json").write_text(json.dumps(run))
        argv = ["--resume", str(tmp_path), *flag]
    with pytest.raises(Stopped):
        train.main(argv)
    assert calls == kept

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest

from keras_memtrans.models import MemorizingTransformerCausalLM
from recipes import checkpointing
from recipes import common
from recipes import flags
from recipes import reporting
from recipes import train
from tests.arrays import to_numpy
from tests.models.conftest import tiny_backbone
from tests.recipes.conftest import RESUMED_SCHEDULE
from tests.recipes.runs import COMPARED_RUN
from tests.recipes.runs import UNINTERRUPTED_RUN
from tests.recipes.runs import Interrupted
from tests.recipes.runs import epoch_losses
from tests.recipes.runs import recipe_args
from tests.recipes.runs import results
from tests.recipes.runs import run
from tests.recipes.runs import run_until_checkpoint

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]


@UNINTERRUPTED_RUN
@pytest.mark.parametrize("memory_kind", ["exact", "scann"])
def test_a_resumed_run_continues_exactly_as_the_uninterrupted_one(
    tmp_path, monkeypatch, uninterrupted_run, memory_kind
):
    # The ScaNN memory's searchers come back from the checkpoint: the resumed
    # losses agreed to 3e-5 (TensorFlow) and 5e-5 (torch) relative, and to
    # 1e-5 on JAX, against 1e-5 everywhere with the exact memory.
    tolerance = {"exact": 1e-5, "scann": 1e-4}[memory_kind]
    schedule = (*RESUMED_SCHEDULE, "--memory-kind", memory_kind)
    run_until_checkpoint(tmp_path, monkeypatch, 4, *schedule, output="parts")
    assert not (tmp_path / "parts" / "results.json").exists()
    assert train.main(["--resume", str(tmp_path / "parts")]) == 0

    whole, parts = (uninterrupted_run(memory_kind), tmp_path / "parts")
    # Steps 5-8 (epoch 1, counted from 0) from the checkpoint of step 4: the
    # same losses.
    np.testing.assert_allclose(
        epoch_losses(parts)[1], epoch_losses(whole)[1], rtol=tolerance
    )
    (want,), (got,) = results(whole), results(parts)
    assert got["steps"] == want["steps"] == 8
    for key in ("validation_nll", "train_loss"):
        np.testing.assert_allclose(got[key], want[key], rtol=tolerance)
    assert [row["step"] for row in got["curve"]] == [4, 8]
    for row, want_row in zip(got["curve"], want["curve"]):
        np.testing.assert_allclose(
            row["validation_nll"], want_row["validation_nll"], rtol=tolerance
        )


@UNINTERRUPTED_RUN
def test_a_run_killed_mid_training_resumes_to_the_same_result(
    tmp_path, uninterrupted_run
):
    schedule = (*RESUMED_SCHEDULE, "--memory-kind", "exact")
    log = tmp_path / "child.log"
    with open(log, "wb") as output:
        child = subprocess.Popen(
            [sys.executable, "-m", "recipes.train", *recipe_args(tmp_path, *schedule)],
            cwd=REPOSITORY,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    latest = tmp_path / "out" / "training" / "memory" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    try:
        while not (latest.exists() and int(latest.read_text()[5:]) >= 4):
            assert child.poll() is None, (
                "the run ended before it was killed:\n" + log.read_text()[-3000:]
            )
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not (tmp_path / "out" / "results.json").exists()
    assert train.main(["--resume", str(tmp_path / "out")]) == 0
    (got,), (want,) = results(tmp_path / "out"), results(uninterrupted_run("exact"))
    assert got["steps"] == 8
    np.testing.assert_allclose(got["validation_nll"], want["validation_nll"], 1e-5)


KILLED_SAVER = """
import sys
from keras_memtrans.models import MemorizingTransformerCausalLM
from recipes import checkpointing
from tests.models.conftest import tiny_backbone
from keras_memtrans.models import MemorizingTransformerCausalLM

causal_lm = MemorizingTransformerCausalLM(tiny_backbone())
causal_lm.compile()
step = 0
while True:
    step += 1
    checkpointing.save_checkpoint(causal_lm, sys.argv[1], step, {})
    print(step, flush=True)
"""


def test_a_resumed_run_logs_each_epoch_once(tmp_path, monkeypatch):
    # Epochs of 2 steps, a checkpoint every 4: a kill after the log's row of
    # step 6 resumes from step 4, and epoch 2 (steps 5-6) is trained again.
    schedule = ("--steps", "8", "--checkpoint-every", "4", "--eval-every", "2")
    log_epoch = keras.callbacks.CSVLogger.on_epoch_end

    def killed_after_epoch_2(self, epoch, logs=None):
        log_epoch(self, epoch, logs)
        if epoch == 2:
            raise Interrupted

    monkeypatch.setattr(keras.callbacks.CSVLogger, "on_epoch_end", killed_after_epoch_2)
    with pytest.raises(Interrupted):
        train.main(recipe_args(tmp_path, *schedule))
    assert sorted(epoch_losses(tmp_path / "out")) == [0, 1, 2]
    monkeypatch.setattr(keras.callbacks.CSVLogger, "on_epoch_end", log_epoch)
    assert train.main(["--resume", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "training" / "memory" / "log.csv") as file:
        epochs = [int(row["epoch"]) for row in csv.DictReader(file)]
    assert epochs == [0, 1, 2, 3]


def test_a_run_resumed_after_its_last_checkpoint_keeps_every_row(tmp_path, monkeypatch):
    # Epochs of 2 steps; the last (step 5) is short. Killed after its
    # checkpoint, as during the held-out scoring, the run has nothing left
    # to train when it resumes: its log must keep the short epoch's row.
    schedule = ("--steps", "5", "--checkpoint-every", "2")
    run_until_checkpoint(tmp_path, monkeypatch, 5, *schedule, output="out")
    assert train.main(["--resume", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "training" / "memory" / "log.csv") as file:
        epochs = [int(row["epoch"]) for row in csv.DictReader(file)]
    assert epochs == [0, 1, 2]


def test_a_kill_during_a_checkpoint_save_leaves_a_complete_checkpoint(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVER, str(tmp_path)],
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "1"  # one complete save
        time.sleep(0.05)  # then a kill somewhere in the next saves
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    checkpoint = checkpointing.latest_checkpoint(tmp_path)
    causal_lm, state = checkpointing.load_checkpoint(checkpoint)
    assert checkpoint.name == f"step-{state['step']}" and state["step"] >= 1
    assert len(causal_lm.backbone.memory_layers) == 1


def test_a_run_resumes_only_on_the_backend_it_started_on(tmp_path):
    run_json = {"argv": ["--preset", "tiny"], "backend": "another-backend"}
    (tmp_path / "run.json").write_text(json.dumps(run_json))
    with pytest.raises(ValueError, match="KERAS_BACKEND=another-backend"):
        train.main(["--resume", str(tmp_path)])
    assert [path.name for path in tmp_path.iterdir()] == ["run.json"]


def test_resume_names_a_directory_that_holds_no_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run.json"):
        train.main(["--resume", str(tmp_path)])


def test_two_runs_never_claim_the_same_directory(tmp_path):
    claimed, start = [], threading.Barrier(8)

    def claim():
        start.wait()
        claimed.append(checkpointing.claim_directory(tmp_path / "runs" / "quick"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(claimed)) == 8
    assert {path.name for path in claimed} == {"quick"} | {
        f"quick-{n}" for n in range(2, 9)
    }


def test_compare_writes_each_model_as_soon_as_it_is_evaluated(tmp_path, monkeypatch):
    build = common.build_causal_lm

    def no_second_model(config, vocabulary_size, preprocessor, use_memory, seed):
        if not use_memory:
            raise Interrupted
        return build(config, vocabulary_size, preprocessor, use_memory, seed)

    monkeypatch.setattr(train, "build_causal_lm", no_second_model)
    with pytest.raises(Interrupted):
        train.main(recipe_args(tmp_path, "--compare"))
    (memory,) = results(tmp_path / "out")
    assert memory["run"] == "memory"
    assert "| memory |" in (tmp_path / "out" / "results.md").read_text()
    monkeypatch.setattr(train, "build_causal_lm", build)
    assert train.main(["--resume", str(tmp_path / "out")]) == 0
    assert [r["run"] for r in results(tmp_path / "out")] == ["memory", "no_memory"]
    assert results(tmp_path / "out")[0] == memory


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--learning-rate", "nan", "finite"),
        ("--learning-rate", "inf", "finite"),
        ("--recall-target", "nan", "finite"),
        ("--validation-fraction", "1e400", "finite"),
        ("--seed", "-1", "at least 0"),
    ],
)
def test_non_finite_and_negative_flags_are_refused(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        flags.parse_args([flag, value])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "settings, message",
    [
        (["--memory-size", str(10**9)], "GiB"),
        (["--memory-size", "64", "--segment-length", "128"], "exceeds"),
        (["--memory-size", "256", "--num-neighbors", "300"], "num_neighbors"),
    ],
)
def test_impossible_model_settings_fail_before_the_corpus_is_read(
    tmp_path, settings, message
):
    argv = ["--preset", "tiny", "--corpus", str(tmp_path / "missing"), *settings]
    with pytest.raises(ValueError, match=message):
        train.main([*argv, "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, error",
    [
        (("--corpus", "missing"), FileNotFoundError),
        (("--validation-fraction", "1.5"), ValueError),
        (("--init-from", "missing/no_memory"), FileNotFoundError),
    ],
    ids=["corpus", "validation_fraction", "init_from"],
)
def test_bad_data_flags_fail_before_the_run_claims_its_directory(
    tmp_path, flags, error
):
    argv = recipe_args(tmp_path)
    flags = [str(tmp_path / f) if f.startswith("missing") else f for f in flags]
    with pytest.raises(error):
        train.main([*argv, *flags])
    assert not (tmp_path / "out").exists()


def test_a_learning_rate_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        flags.parse_args(["--learning-rate", "0"])
    assert "positive" in capsys.readouterr().err


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, capsys):
    argv = recipe_args(tmp_path, "--steps", "8", "--checkpoint-every", "1")
    assert train.main([*argv, "--learning-rate", "1e30"]) == 1
    assert "training diverged" in capsys.readouterr().out
    assert not (tmp_path / "out" / "results.json").exists()
    checkpoint = checkpointing.latest_checkpoint(
        tmp_path / "out" / "training" / "memory"
    )
    causal_lm, state = checkpointing.load_checkpoint(checkpoint)
    assert 1 <= state["step"] < 8
    for weight in causal_lm.weights:
        assert np.all(np.isfinite(to_numpy(weight))), weight.path


def test_weights_gone_non_finite_under_a_finite_loss_never_replace_a_checkpoint(
    tmp_path,
):
    # The epoch's loss is computed before each step's update: a last update
    # that makes the weights NaN still logs a finite loss.
    causal_lm = MemorizingTransformerCausalLM(tiny_backbone())
    causal_lm.compile()
    callback = checkpointing.StepCheckpoint(tmp_path, 1, 8, 0, lambda logs: {})
    callback.set_model(causal_lm)
    for epoch, poisoned in enumerate([False, True]):
        if poisoned:
            weight = causal_lm.trainable_weights[0]
            weight.assign(np.full(weight.shape, np.nan, weight.dtype))
        callback.on_train_batch_end(0)
        callback.on_epoch_end(epoch, {"loss": 1.0})
    checkpoint = checkpointing.latest_checkpoint(tmp_path)
    assert checkpoint.name == "step-1"
    restored, _ = checkpointing.load_checkpoint(checkpoint)
    for weight in restored.trainable_weights:
        assert np.all(np.isfinite(to_numpy(weight))), weight.path


def test_an_infinite_perplexity_is_reported_as_null():
    assert reporting.perplexity(2.0) == pytest.approx(np.exp(2.0))
    assert reporting.perplexity(800.0) is None
    assert reporting.perplexity(float("nan")) is None
    report = reporting.json_safe({"a": [1.0, float("inf")], "b": float("nan")})
    assert json.loads(json.dumps(report, allow_nan=False)) == {
        "a": [1.0, None],
        "b": None,
    }


@COMPARED_RUN
def test_init_from_copies_every_trained_weight_and_leaves_the_memory_at_init(
    tmp_path, compared_run
):
    source_dir = compared_run / "out" / "no_memory"
    source = train.load_trained_model(source_dir)
    args = flags.parse_args(recipe_args(tmp_path))
    backbone_config, _, _ = flags.resolve_config(args)
    vocabulary_size = source.backbone.vocabulary_size
    fresh = common.build_causal_lm(backbone_config, vocabulary_size, None, True, 7)
    started = train.initialised_from(
        common.build_causal_lm(backbone_config, vocabulary_size, None, True, 7),
        source,
    )
    trained = {w.path: to_numpy(w) for w in source.weights}
    for weight, initial in zip(started.weights, fresh.weights):
        want = trained.get(weight.path, to_numpy(initial))
        np.testing.assert_array_equal(to_numpy(weight), want, err_msg=weight.path)
    assert set(trained) < {w.path for w in started.weights}
    # The recipe fine-tunes the memory model from it, with its tokenizer, and
    # the model without memory the same way, as a control (on JAX, where
    # `fit` donates each variable's buffer, the first run must not delete
    # the trained weights the second starts from).
    run(tmp_path, "--compare", "--init-from", str(source_dir), output="tuned")
    report = json.loads((tmp_path / "tuned" / "results.json").read_text())
    assert report["init_from"] == str(source_dir.resolve())
    assert report["vocabulary_size"] == vocabulary_size
    assert [result["run"] for result in report["results"]] == ["memory", "no_memory"]
    assert os.path.isdir(tmp_path / "tuned" / "memory")


def test_truncate_log_drops_rows_cut_short_and_names_a_file_that_is_no_log(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("epoch,loss\n0,2.5\n1,2.0\n2,1.5\n3")  # killed mid-row
    checkpointing.truncate_log(log, 4)
    assert log.read_text().splitlines() == ["epoch,loss", "0,2.5", "1,2.0", "2,1.5"]
    checkpointing.truncate_log(log, 2)
    assert log.read_text().splitlines() == ["epoch,loss", "0,2.5", "1,2.0"]
    log.write_text("")  # opened, no row written yet
    checkpointing.truncate_log(log, 3)
    assert log.read_text() == ""
    log.write_text("step,loss\n0,2.5\n")
    with pytest.raises(ValueError, match="no `epoch` column"):
        checkpointing.truncate_log(log, 3)

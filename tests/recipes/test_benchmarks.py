"""Each benchmark runs at a tiny size and prints its table (benchmarks are
scripts: their timings are never asserted)."""

import re
import sys
import weakref

import keras
import numpy as np
import pytest

from keras_memtrans.memory import ExactMemory
from keras_memtrans.memory.scann_memory import default_num_leaves
from recipes.benchmarks import accelerator
from recipes.benchmarks import generate
from recipes.benchmarks import memory_lookup
from recipes.benchmarks import scann_layout
from recipes.benchmarks import step_profile
from recipes.benchmarks import train_step
from tests.arrays import to_numpy


def table_rows(text):
    return [line for line in text.splitlines() if re.match(r"\| \d", line)]


def test_memory_lookup_prints_lookup_and_throughput_tables(capsys):
    memory_lookup.main(
        [
            "--memory-sizes",
            "512",
            "--repeats",
            "1",
            "--throughput-sizes",
            "256",
            "--dense-size",
            "64",
        ]
    )
    output = capsys.readouterr().out
    lookup, throughput = table_rows(output)
    assert lookup.startswith("| 512 |")
    # Times, their ratio, recall, build, and ScaNN's and the exact memory's
    # appends: every one a number, none negative (a tiny one prints as 0).
    *cells, lanes = lookup.strip("| ").split(" | ")[1:]
    lookup_cells = [float(cell) for cell in cells]
    assert len(lookup_cells) == 7 and min(lookup_cells) >= 0
    # Each lane's recall, whose mean is the table's recall@32.
    lane_recalls = [float(recall) for recall in lanes.split(", ")]
    assert len(lane_recalls) == memory_lookup.LANES
    assert 0 <= min(lane_recalls) <= max(lane_recalls) <= 1
    assert abs(np.mean(lane_recalls) - lookup_cells[3]) <= 1e-3
    assert throughput.startswith("| 256 |")
    assert "GFLOP/s" in output
    # The search, the scores alone and the host memory's exact search: a
    # time and a ratio to the dense matmul each, every one a positive number.
    cells = [float(cell) for cell in throughput.strip("| ").split(" | ")]
    assert len(cells) == 8 and min(cells) > 0


def test_memory_lookup_builds_scann_with_the_settings_given(capsys, monkeypatch):
    built = []

    class RecordedScannMemory(memory_lookup.ScannMemory):
        def __init__(self, *args, **kwargs):
            built.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(memory_lookup, "ScannMemory", RecordedScannMemory)
    argv = ["--memory-sizes", "2048", "--repeats", "1", "--throughput-sizes"]
    settings = ["--leaves-visited", "0.125", "--training-sample-size", "700"]
    memory_lookup.main([*argv, *settings])
    # An eighth of 45 leaves, 5.6, rounded down as ScannMemory's own
    # quarter is: with 0.25 the default's 11.
    assert default_num_leaves(2048) == 45
    assert built == [{"num_leaves_to_search": 5, "training_sample_size": 700}]
    output = capsys.readouterr().out
    assert "visits 0.125 of its leaves, trees trained on 700 keys" in output
    memory_lookup.main(argv)  # the memory's own default: a quarter
    assert built[1] == {"training_sample_size": 16384}


@pytest.mark.parametrize("value", ["0", "1.5", "-0.25"])
def test_memory_lookup_refuses_a_share_of_leaves_outside_zero_to_one(value, capsys):
    with pytest.raises(SystemExit):
        memory_lookup.parse_args(["--leaves-visited", value])
    assert "must be in (0, 1]" in capsys.readouterr().err


def test_memory_lookup_times_the_peers_search(capsys):
    memory_lookup.main(
        [
            *("--memory-sizes", "--throughput-sizes", "256"),
            *("--throughput-model", "peer", "--dense-size", "64", "--repeats", "1"),
        ]
    )
    output = capsys.readouterr().out
    assert "4 lanes x 1 key heads x 1024 queries, head_dim 64" in output
    (throughput,) = table_rows(output)
    cells = [float(cell) for cell in throughput.strip("| ").split(" | ")]
    assert cells[0] == 256 and len(cells) == 8 and min(cells) > 0


def test_memory_lookup_throughput_runs_without_scann(capsys, monkeypatch):
    # An accelerator image has no TensorFlow, so no ScaNN: its columns
    # print as "-" and the exact search is still timed.
    monkeypatch.setitem(sys.modules, "scann", None)  # `import scann` fails
    memory_lookup.main(
        [
            *("--memory-sizes", "--throughput-sizes", "256"),
            *("--dense-size", "64", "--repeats", "1"),
        ]
    )
    (throughput,) = table_rows(capsys.readouterr().out)
    cells = throughput.strip("| ").split(" | ")
    assert cells[-2:] == ["-", "-"]
    assert len(cells) == 8 and min(float(cell) for cell in cells[:-2]) > 0


def test_scann_layout_compares_both_layouts(capsys):
    scann_layout.main(["--memory-size", "512"])
    rows = [
        line.strip("| ").split(" | ")
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| per ")
    ]
    assert [row[0] for row in rows] == ["per (lane, head)", "per lane, heads folded"]
    for _, build, search, recall, other_head in rows:
        assert float(build) >= 0 and float(search) >= 0
        assert 0 < float(recall) <= 1
        assert float(other_head) == 0  # the head tags keep heads apart


def test_accelerator_runs_every_benchmark_at_test_size(capfd):
    backend = keras.backend.backend()  # each backend's own run tests its workers
    accelerator.main(["--tiny", "--backends", backend, "--dtype", "float32"])
    output = capfd.readouterr().out
    cells = [
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in output.splitlines()
        if line.startswith(f"| {backend} |")
    ]
    # The training step without memory and with an exact memory ...
    assert [row[1] for row in cells if len(row) == 6] == ["none", "64:exact"]
    # ... the search throughput (from a worker of this backend) ...
    assert re.search(r"^\| 256 \|", output, re.MULTILINE)
    # ... and generation, whose greedy tokens have a digest.
    (generation,) = [row for row in cells if len(row) == 5]
    assert generation[1] == "tiny" and re.fullmatch(r"[0-9a-f]{12}", generation[4])
    # Both timed lengths are warmed up: decoding is not credited with the
    # compilation of the shorter call (which made the rate negative), and a
    # difference within the timer's noise is printed as such.
    assert float(generation[2]) > 0
    assert generation[3] == "-" or float(generation[3].replace(",", "")) > 0


def test_step_profile_times_the_step_and_names_where_it_goes(capfd, monkeypatch):
    def no_logits(*args, **kwargs):
        raise AssertionError("the forward step copied its logits to the host")

    # The forward step is timed with its loss: logits copied to the host
    # took longer than the paper preset's whole training step on a GPU.
    monkeypatch.setattr(keras.Model, "predict_on_batch", no_logits)
    backend = keras.backend.backend()
    step_profile.main(
        [
            *("--config", "tiny", "--backends", backend),
            *("--repeats", "1", "--top", "3", "--shapes"),
        ]
    )
    output = capfd.readouterr().out
    rows = re.findall(
        r"^\| ([\d.]+) \| ([\d.]+) \| (-?[\d.]+) \| ([\d.]+) \|$", output, re.M
    )
    ((forward, step, rest, ratio),) = rows
    assert float(forward) > 0 and float(step) > 0
    assert abs(float(step) - float(forward) - float(rest)) < 0.2  # rounding
    operations = re.findall(
        r"^\| ([A-Za-z_][^|]*) \| ([\d.]+) \| ([\d.]+) \|$", output, re.M
    )
    # The profilers this script reads: XLA's operations on JAX, torch's
    # operators; TensorFlow gets the timings only.
    assert len(operations) == {"jax": 3, "torch": 3}.get(backend, 0)
    assert all(float(ms) >= 0 for _, ms, _ in operations)
    if backend == "torch":  # --shapes: each operator with its input shapes
        assert all("[" in name for name, _, _ in operations)
    # torch counts the tensors a step makes from host data: at least the
    # batch's four arrays.
    counts = re.findall(r"^Tensors made from host data per step: (\d+)", output, re.M)
    assert [int(count) >= 4 for count in counts] == [True] * (backend == "torch")


def test_the_lookup_searches_a_memory_of_the_keys_before_the_queries(monkeypatch):
    searched = []
    search = memory_lookup.exact_search

    def recorded_search(memory, queries):
        searched.append(to_numpy(memory.positions))
        return search(memory, queries)

    monkeypatch.setattr(memory_lookup, "exact_search", recorded_search)
    memory_lookup.measure(*[512, *memory_lookup.text_queries_and_keys(2560)], 2)
    for positions in searched:  # tokens 0-511: none queried, each once
        filled = np.sort(positions[positions >= 0].reshape(memory_lookup.LANES, -1))
        np.testing.assert_array_equal(filled, np.tile(np.arange(512), (4, 1)))


def test_a_timed_search_copies_little_between_host_and_device(monkeypatch):
    calls = []
    predict = keras.Model.predict_on_batch

    def recorded_predict(model, x):
        outputs = predict(model, x)
        calls.append((type(x), np.size(outputs)))
        return outputs

    monkeypatch.setattr(keras.Model, "predict_on_batch", recorded_predict)
    memory_lookup.dense_gflops(64, 1)
    memory_lookup.search_gflops(256, memory_lookup.SEARCH_SHAPES["quick"], 1)
    assert len(calls) >= 4
    for input_type, output_size in calls:
        assert input_type is not np.ndarray  # already on the device
        assert output_size <= 64  # one number per row of the batch


class Built(Exception):
    """Stops a benchmark once its model would be built."""


@pytest.mark.parametrize("module", [train_step, step_profile])
@pytest.mark.parametrize(
    "argv, want", [([], "auto"), (["--scores-per-block", "64"], 64)]
)
def test_the_step_benchmarks_pass_scores_per_block_to_the_memory(
    monkeypatch, module, argv, want
):
    built = []

    def compiled_model(config, memory, dtype, jit_compile, scores_per_block):
        built.append(scores_per_block)
        raise Built

    monkeypatch.setattr(module, "compiled_model", compiled_model)
    memory = "--memories" if module is train_step else "--memory"
    with pytest.raises(Built):
        module.main(
            [
                *("--config", "tiny", "--backends", keras.backend.backend()),
                *(memory, "64:exact", *argv),
            ]
        )
    assert built == [want]


@pytest.mark.parametrize("memory", ["64:exact", "64:scann"])
def test_the_step_benchmarks_fill_both_memories(memory):
    # `fit` reads the training memory, `test_on_batch` (step_profile's
    # forward step) the inference one.
    config = train_step.model_config("tiny")
    causal_lm = train_step.compiled_model(config, memory, "float32", "auto")
    (layer,) = causal_lm.backbone.memory_layers
    for training in (True, False):
        positions = to_numpy(layer.lane_states(training=training)["memory"].positions)
        filled = (positions >= 0).sum(axis=-1)  # an exact memory has spare slots
        assert (filled == layer.memory_size).all(), training


@pytest.mark.parametrize(
    "module, flag",
    [
        (train_step, "--steps"),
        (train_step, "--warmup"),
        (step_profile, "--repeats"),
        (memory_lookup, "--repeats"),
        (generate, "--repeats"),
    ],
)
def test_a_count_of_steps_or_calls_is_at_least_one(module, flag, capsys):
    with pytest.raises(SystemExit):
        module.parse_args([flag, "0"])
    assert "at least 1" in capsys.readouterr().err


def recorded_workers(monkeypatch, module):
    """`(kept, workers)`: the calls of `module`'s `keep_freed_memory` and
    the argv of each worker it would start (none is started)."""
    kept, workers = [], []
    monkeypatch.setattr(module, "keep_freed_memory", lambda: kept.append(True))

    def worker_lines(module_name, name, argv, environment):
        workers.append(argv)
        return iter(())

    monkeypatch.setattr(module, "worker_lines", worker_lines)
    return kept, workers


@pytest.mark.parametrize(
    "module, argv",
    [
        (train_step, ["--config", "tiny", "--memories", "none"]),
        (step_profile, ["--config", "tiny", "--memory", "none"]),
        (generate, ["--presets", "tiny"]),
    ],
)
@pytest.mark.parametrize("flag", [[], ["--no-keep-freed-memory"]])
def test_the_benchmarks_keep_freed_memory_unless_told_not_to(
    monkeypatch, module, argv, flag
):
    kept, workers = recorded_workers(monkeypatch, module)
    module.main([*argv, "--backends", "jax", *flag])
    assert kept == ([] if flag else [True])
    # Each worker process is told the same.
    want = flag[0] if flag else "--keep-freed-memory"
    assert workers and all(want in argv for argv in workers)


@pytest.mark.parametrize("flag", [[], ["--no-keep-freed-memory"]])
def test_the_lookup_keeps_freed_memory_unless_told_not_to(monkeypatch, flag):
    kept = []
    monkeypatch.setattr(memory_lookup, "keep_freed_memory", lambda: kept.append(True))
    memory_lookup.main(["--memory-sizes", "--throughput-sizes", *flag])
    assert kept == ([] if flag else [True])


@pytest.mark.parametrize(
    "module, builder, argv",
    [
        (
            train_step,
            "compiled_model",
            ["--config", "tiny", "--memories", "none", "64:exact", "none"]
            + ["--steps", "1", "--warmup", "1"],
        ),
        (
            generate,
            "build_causal_lm",
            [
                "--presets",
                "tiny",
                "tiny",
                "tiny",
                "--new-tokens",
                "1",
                "--repeats",
                "1",
            ],
        ),
    ],
    ids=["train_step", "generate"],
)
def test_each_measured_model_is_freed_before_the_next_is_built(
    monkeypatch, module, builder, argv
):
    # Reference cycles kept a measured model alive until the garbage
    # collector ran, so two `paper` models were held at once.
    models, alive = [], []
    build = getattr(module, builder)

    def spy(*args, **kwargs):
        alive.append([model() is not None for model in models])
        model = build(*args, **kwargs)
        models.append(weakref.ref(model))
        return model

    monkeypatch.setattr(module, builder, spy)
    list(module.measurements(module.parse_args(argv)))
    assert alive == [[], [False], [False, False]]


@pytest.mark.parametrize(
    "table, args",
    [
        ("print_lookup_table", ([512, 1024], 1, None, 1000)),
        ("print_throughput_table", ([256, 512, 256], "quick", 64, 1)),
    ],
)
def test_each_memory_size_is_freed_before_the_next_is_built(
    monkeypatch, capsys, table, args
):
    memories, alive = [], []

    def spy(*args, **kwargs):
        alive.append([memory() is not None for memory in memories])
        memory = ExactMemory(*args, **kwargs)
        memories.append(weakref.ref(memory))
        return memory

    monkeypatch.setattr(memory_lookup, "ExactMemory", spy)
    getattr(memory_lookup, table)(*args)
    assert alive == [[False] * count for count in range(len(alive))]
    assert len(alive) == len(args[0])

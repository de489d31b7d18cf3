import json
from unittest import mock

import keras
import numpy as np
import pytest

from keras_memtrans import KNNAttention
from keras_memtrans.memory import host
from keras_memtrans.models import MemorizingTransformerBackbone
from keras_memtrans.models import get_preset
from recipes import flags


def held_memory_bytes(backbone):
    """Bytes of the lane arrays (keys, values, positions) of every memory
    a built backbone holds, counted from its variables."""
    total = 0
    for layer in backbone.memory_layers:
        for training in (True, False):
            memory = layer.lane_states(training)["memory"]
            for variable in (memory.keys, memory.values, memory.positions):
                itemsize = np.dtype(keras.backend.standardize_dtype(variable.dtype))
                total += int(np.prod(variable.shape)) * itemsize.itemsize
    return total


@pytest.mark.parametrize(
    "memory_kind, num_key_value_heads", [("exact", None), ("auto", None), ("exact", 1)]
)
def test_memory_bytes_are_the_bytes_the_built_memories_hold(
    memory_kind, num_key_value_heads
):
    config = dict(get_preset("tiny")["backbone"], memory_layer_indices=(0, 1))
    config["num_key_value_heads"] = num_key_value_heads  # tiny: 2 query heads
    config["memory_options"] = dict(config["memory_options"], memory_kind=memory_kind)
    backbone = MemorizingTransformerBackbone(vocabulary_size=512, **config)
    options = {**KNNAttention.memory_options(), **config["memory_options"]}
    assert flags.memory_bytes(config, options) == held_memory_bytes(backbone)


def test_a_scann_memory_holds_no_spare_slots():
    config = get_preset("tiny")["backbone"]  # 2 lanes, 2 heads of 16
    options = {**KNNAttention.memory_options(), "memory_kind": "scann"}
    options["memory_size"] = 256
    slot = 2 * (2 * 2 * 16 * 4 + 4)  # training and inference memories
    assert flags.memory_bytes(config, options) == 2 * 256 * slot


def test_memory_slots_of_auto_ask_no_device_and_bound_the_exact_memory():
    # A multi-process JAX run checks its memory budget before it starts
    # JAX's distributed runtime, which refuses to start after the backends.
    config = get_preset("paper")["backbone"]
    options = {**KNNAttention.memory_options(), **config["memory_options"]}
    assert options["memory_kind"] == "auto" and options["memory_size"] == 8192
    with mock.patch.object(host, "on_accelerator", side_effect=AssertionError):
        slots = flags.memory_slots(config, options)
    assert slots == 8192 + config["segment_length"]


def test_a_resumed_run_reads_its_relative_paths_from_where_it_started(
    tmp_path, monkeypatch
):
    argv = ["--corpus", "texts/*.py", "--init-from", "runs/base/no_memory"]
    started_in = tmp_path / "project"
    run_json = {
        "argv": [*argv, "--preset", "tiny"],
        "backend": keras.backend.backend(),
        "directory": str(started_in),
    }
    (tmp_path / "run.json").write_text(json.dumps(run_json))
    monkeypatch.chdir(tmp_path)  # another directory than the run's
    saved_argv, args = flags.resumed_args(tmp_path)
    assert saved_argv == run_json["argv"]
    assert args.corpus == str(started_in / "texts" / "*.py")
    assert args.init_from == started_in / "runs" / "base" / "no_memory"
    assert args.preset == "tiny"

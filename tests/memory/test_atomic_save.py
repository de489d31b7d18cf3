"""Atomic files: `atomic_write`, a killed memory save, and the saves of
many lane states (`save_states` / `load_states`)."""

import json
import os
import random
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_memtrans import ScannMemory
from keras_memtrans.memory import atomic_files
from keras_memtrans.memory import lane_state
from keras_memtrans.memory.atomic_files import atomic_write
from keras_memtrans.memory.lane_state import MANIFEST
from keras_memtrans.memory.lane_state import load_states
from keras_memtrans.memory.lane_state import save_states
from keras_memtrans.memory.last_key import LastKey
from keras_memtrans.memory.ring_buffer import RingBuffer
from tests.arrays import to_numpy
from tests.memory.memories import rewrite_npz


def read(path):
    with open(path, "rb") as file:
        return file.read()


def test_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "data.bin"
    atomic_write(path, lambda file: file.write(b"old"))
    atomic_write(str(path), lambda file: file.write(b"new contents"))
    assert read(path) == b"new contents"
    assert os.listdir(tmp_path) == ["data.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # not 0600


def test_a_failed_write_keeps_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "data.bin"
    atomic_write(path, lambda file: file.write(b"old"))

    def write_half_then_fail(file):
        file.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, write_half_then_fail)
    assert read(path) == b"old"
    assert os.listdir(tmp_path) == ["data.bin"]


def test_missing_directories_are_created(tmp_path):
    path = tmp_path / "a" / "b" / "data.bin"
    atomic_write(path, lambda file: file.write(b"x"))
    assert read(path) == b"x"
    with pytest.raises(FileExistsError):  # a file where a directory must go
        atomic_write(path / "below.bin", lambda file: file.write(b"x"))


# A ScaNN memory whose every (append, save) step is dominated by the save:
# 2 lanes x 4 heads x 8192 slots x 64 dims, keys and values (32 MB), and
# 64-token appends. The child runs on Keras' NumPy backend: the memory
# lives on the host whatever the backend, and it imports fastest.
KILLED_SAVE = dict(batch=2, heads=4, dim=64, memory_size=8192, segment=64)
SAVING_CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from keras_memtrans import ScannMemory

    path, batch, heads, dim, memory_size, segment = sys.argv[1:]
    batch, heads, dim, memory_size, segment = map(
        int, (batch, heads, dim, memory_size, segment))
    memory = ScannMemory(batch, heads, dim, memory_size, num_leaves=8,
                         num_leaves_to_search=8)
    rng = np.random.default_rng(0)
    step = 0
    while True:
        # The first step fills half the memory, so every save has searchers.
        for _ in range(memory_size // 2 // segment if step == 0 else 1):
            keys = rng.normal(size=(batch, segment, heads, dim)).astype("float32")
            memory.append(keys, -keys)
        start = time.perf_counter()
        memory.save(path)
        print(step, time.perf_counter() - start, flush=True)
        step += 1
    """
)


def saved_buffer(tokens):
    """The ring buffer the child has after writing `tokens` tokens per lane,
    rebuilt independently from the same random keys."""
    sizes = KILLED_SAVE
    shape = (sizes["batch"], sizes["segment"], sizes["heads"], sizes["dim"])
    buffer = RingBuffer(
        sizes["batch"], sizes["heads"], sizes["dim"], sizes["memory_size"]
    )
    rng = np.random.default_rng(0)
    for _ in range(tokens // sizes["segment"]):
        keys = rng.normal(size=shape).astype("float32")
        buffer.write(keys, -keys, np.ones(shape[:2], bool))
    return buffer


def test_a_killed_scann_memory_save_leaves_a_complete_saved_memory(tmp_path):
    path = tmp_path / "memory.npz"
    sizes = KILLED_SAVE
    child = subprocess.Popen(
        [sys.executable, "-c", SAVING_CHILD, str(path), *map(str, sizes.values())],
        env={**os.environ, "KERAS_BACKEND": "numpy"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        save_seconds = float(child.stdout.readline().split()[1])  # first save
        # A moment in the next step: a 64-token append (a few ms), then a
        # save a little shorter than the first, mostly spent writing the
        # file (after a quarter or so serialising the searchers).
        time.sleep(random.Random(3).uniform(0.35, 0.8) * save_seconds)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    # A leftover is the hidden temporary file, which is never `*.npz`.
    leftovers = sorted(set(os.listdir(tmp_path)) - {"memory.npz"})
    assert all(n.startswith(".memory.npz.") and n.endswith(".tmp") for n in leftovers)
    memory = ScannMemory(
        sizes["batch"],
        sizes["heads"],
        sizes["dim"],
        sizes["memory_size"],
        num_leaves=8,
        num_leaves_to_search=8,
    )
    memory.load(path)  # complete: one of the saved states
    tokens = int(memory.document_length[0])
    want = saved_buffer(tokens)
    assert tokens >= sizes["memory_size"] // 2
    np.testing.assert_array_equal(memory.document_length, want.document_length)
    np.testing.assert_array_equal(memory.positions, want.positions)
    np.testing.assert_array_equal(memory.keys, want.keys)
    np.testing.assert_array_equal(memory.values, -memory.keys)
    # The saved searchers index this buffer (not a stale one): visiting
    # every leaf, they return its exact top-k.
    assert memory.indexed_lanes.all()
    shape = (sizes["batch"], 4, sizes["heads"], sizes["dim"])  # 4 queries
    queries = np.random.default_rng(1).normal(size=shape).astype("float32")
    _, _, got = memory.search(queries, 8)
    scores = np.einsum("bqhd,bhmd->bqhm", queries, want.keys)
    best = np.argsort(-scores, axis=-1)[..., :8]  # slots [batch, query, heads, k]
    lanes = np.arange(sizes["batch"])[:, None, None, None]
    want_positions = np.sort(want.positions[lanes, best], axis=-1)
    np.testing.assert_array_equal(np.sort(to_numpy(got), axis=-1), want_positions)


def last_key(value, batch_size=2):
    """A LastKey whose every lane carries a key filled with `value`."""
    state = LastKey(batch_size=batch_size, num_heads=1, head_dim=3)
    state.build()
    state.write(
        np.full((batch_size, 1, 3), value, "float32"), np.ones(batch_size, bool)
    )
    return state


def carried(state):
    keys, present = state.read()
    return to_numpy(keys), to_numpy(present)


def assert_carries(state, value):
    keys, present = carried(state)
    assert present.all()
    np.testing.assert_array_equal(keys, np.full(keys.shape, value, "float32"))


NAMES = ("block_0/last_key", "block_1/last_key", "top")


def test_states_save_to_one_file_each_named_by_a_manifest(tmp_path):
    states = {name: last_key(i + 1.0) for i, name in enumerate(NAMES)}
    save_states(states, tmp_path / "new")
    with open(tmp_path / "new" / MANIFEST) as file:
        manifest = json.load(file)
    assert manifest["states"] == sorted(NAMES)
    assert sorted(os.listdir(tmp_path / "new")) == [MANIFEST, manifest["save"]]
    save = tmp_path / "new" / manifest["save"]
    assert sorted(os.listdir(save)) == ["block_0", "block_1", "top.npz"]
    assert os.listdir(save / "block_0") == ["last_key.npz"]
    restored = {name: last_key(0.0) for name in NAMES}
    load_states(restored, tmp_path / "new")
    for i, name in enumerate(NAMES):
        assert_carries(restored[name], i + 1.0)
    # A second save replaces the first, whose directory goes.
    save_states({name: last_key(7.0) for name in NAMES}, tmp_path / "new")
    assert len(os.listdir(tmp_path / "new")) == 2
    load_states(restored, tmp_path / "new")
    for name in NAMES:
        assert_carries(restored[name], 7.0)


@settings(max_examples=8, deadline=None)
@given(failing_write=st.integers(0, len(NAMES)))
def test_an_interrupted_save_leaves_the_previous_save_in_force(failing_write):
    """The save stops at its `failing_write`-th file (the manifest last):
    the previous save still loads, then a complete save takes over."""
    with tempfile.TemporaryDirectory() as directory:
        save_states({name: last_key(1.0) for name in NAMES}, directory)
        writes = []
        real_write = atomic_files.atomic_write

        def write_until_failure(path, write):
            if len(writes) == failing_write:
                raise OSError("killed")
            writes.append(path)
            real_write(path, write)

        new = {name: last_key(2.0) for name in NAMES}
        with (
            mock.patch.object(atomic_files, "atomic_write", write_until_failure),
            mock.patch.object(lane_state, "atomic_write", write_until_failure),
            pytest.raises(OSError, match="killed"),
        ):
            save_states(new, directory)
        restored = {name: last_key(0.0) for name in NAMES}
        load_states(restored, directory)
        for state in restored.values():
            assert_carries(state, 1.0)
        save_states(new, directory)
        assert len(os.listdir(directory)) == 2  # the manifest and one save
        load_states(restored, directory)
        for state in restored.values():
            assert_carries(state, 2.0)


def damage_manifest(directory, text):
    with open(os.path.join(directory, MANIFEST), "w") as file:
        file.write(text)


def saved_file(directory, name):
    with open(os.path.join(directory, MANIFEST)) as file:
        save = json.load(file)["save"]
    return os.path.join(directory, save, *name.split("/")) + ".npz"


@pytest.mark.parametrize(
    "damage, error, match",
    [
        pytest.param(
            lambda d: os.remove(os.path.join(d, MANIFEST)),
            FileNotFoundError,
            MANIFEST,
            id="no_manifest",
        ),
        pytest.param(
            lambda d: damage_manifest(d, "{"),
            ValueError,
            "not a lane-state manifest",
            id="manifest_not_json",
        ),
        pytest.param(
            lambda d: damage_manifest(d, '{"save": "../x", "states": []}'),
            ValueError,
            "not a lane-state manifest",
            id="manifest_save_outside",
        ),
        pytest.param(
            lambda d: os.remove(saved_file(d, "top")),
            FileNotFoundError,
            "top.npz",
            id="missing_file",
        ),
        pytest.param(
            lambda d: rewrite_npz(saved_file(d, "top"), head_dim=np.array(4)),
            ValueError,
            "`head_dim` 4",
            id="other_size",
        ),
        pytest.param(
            lambda d: rewrite_npz(saved_file(d, "top"), present=None),
            ValueError,
            "present",
            id="no_present",
        ),
    ],
)
def test_a_failed_load_changes_no_state(tmp_path, damage, error, match):
    save_states({name: last_key(1.0) for name in NAMES}, tmp_path)
    damage(str(tmp_path))
    states = {name: last_key(5.0) for name in NAMES}
    with pytest.raises(error, match=match):
        load_states(states, tmp_path)
    for state in states.values():  # "top" is read last: the others are fine
        assert_carries(state, 5.0)


def test_a_save_of_other_states_does_not_load_and_names_them(tmp_path):
    save_states({name: last_key(1.0) for name in NAMES[:2]}, tmp_path)
    states = {name: last_key(5.0) for name in NAMES[1:]}
    with pytest.raises(ValueError, match=r"not saved \['top'\].*\['block_0/last"):
        load_states(states, tmp_path)
    for state in states.values():
        assert_carries(state, 5.0)


def test_a_restore_that_fails_late_puts_the_earlier_states_back(tmp_path):
    """A ScaNN index can fail in its own restore, after the file checks:
    the states restored before it get their contents back."""
    rng = np.random.default_rng(0)
    memory = ScannMemory(2, 1, 3, 32, num_leaves=2, num_leaves_to_search=2)
    keys = rng.normal(size=(2, 20, 1, 3)).astype("float32")
    memory.append(keys, keys)  # 20 of 32 entries: the lanes are indexed
    assert memory.indexed_lanes.all()
    save_states({"a": last_key(1.0), "memory": memory}, tmp_path)
    rewrite_npz(saved_file(tmp_path, "memory"), **{"index/1/slots": np.zeros(2)})
    fresh = ScannMemory(2, 1, 3, 32, num_leaves=2, num_leaves_to_search=2)
    states = {"a": last_key(5.0), "memory": fresh}
    with pytest.raises(ValueError, match="invalid slots"):
        load_states(states, tmp_path)
    assert_carries(states["a"], 5.0)
    assert not (states["memory"].positions >= 0).any()


def test_a_directory_write_interrupted_between_its_renames_puts_the_old_one_back(
    tmp_path, monkeypatch
):
    target = tmp_path / "preset"
    target.mkdir()
    (target / "config.json").write_text("old")
    rename = os.rename

    def interrupted_second_rename(source, destination):
        if source.endswith(".partial"):  # the new directory moving into place
            raise KeyboardInterrupt
        rename(source, destination)

    monkeypatch.setattr(os, "rename", interrupted_second_rename)

    def write(directory):
        with open(os.path.join(directory, "config.json"), "w") as file:
            file.write("new")

    with pytest.raises(KeyboardInterrupt):
        atomic_files.atomic_directory(target, write)
    assert [p.name for p in tmp_path.iterdir()] == ["preset"]
    assert (target / "config.json").read_text() == "old"

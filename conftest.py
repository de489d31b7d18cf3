"""Loaded by pytest before any test module imports a backend."""

import atexit
import os
import shutil
import tempfile

BACKEND = os.environ.get("KERAS_BACKEND")
# Under pytest-xdist (`tox` runs one worker per core), each worker gets an
# equal share of the cores: a framework that spins up one thread per core in
# every worker slows them all down (torch by 3x on 2 cores).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    threads = max(1, os.cpu_count() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", str(threads))
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false"
        f" intra_op_parallelism_threads={threads}"
    )

# Two host devices on JAX, for the data-parallel tests (keras.distribution
# over a 2-device mesh, as on a 2-chip accelerator); every other test runs
# on the first device, as without the flag.
if BACKEND == "jax":
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    )

# A test builds its model afresh, so XLA compiles the same programs again
# in test after test, and in the recipes' subprocesses. The backend's
# persistent compilation cache, in one directory per test run (made here
# before pytest-xdist starts its workers, which inherit it), compiles each
# such program once; a cached executable is the one XLA would compile
# again (TensorFlow writes each entry atomically and checks its program
# against its own).
# - JAX: locked for concurrent processes (it locks when its size is
#   bounded); programs that compile in under half a second (JAX's op-by-op
#   eager calls among them) are not cached: writing each cost more than it
#   saved.
# - TensorFlow: its XLA-compiled steps (the recipe's default on CPU).
if BACKEND in ("jax", "tensorflow") and ("KERAS_MEMTRANS_TEST_CACHE" not in os.environ):
    cache = tempfile.mkdtemp(prefix=f"keras-memtrans-{BACKEND}-cache-")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    os.environ["KERAS_MEMTRANS_TEST_CACHE"] = cache
    if BACKEND == "jax":
        os.environ.update(
            JAX_COMPILATION_CACHE_DIR=cache,
            JAX_COMPILATION_CACHE_MAX_SIZE=str(2**30),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        )
    else:
        os.environ["TF_XLA_FLAGS"] = (
            f"{os.environ.get('TF_XLA_FLAGS', '')}"
            f" --tf_xla_persistent_cache_directory={cache}"
        )

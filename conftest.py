"""Loaded by pytest before any test module imports a backend."""

import os

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
if os.environ.get("KERAS_BACKEND") == "jax":
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    )

"""The tensors the package's own code makes from host data, on torch.

Keras' torch backend turns a Python number or NumPy array into a tensor
with `torch.as_tensor` on the current device. On a GPU that is a copy from
the host which waits for the device: a step that makes one stalls until
the device has caught up. Compiled steps (TensorFlow, JAX) hold such
numbers as constants of the program, so only torch is counted.

Tests may import backends; the library may not.
"""

import contextlib
import pathlib
import traceback
from unittest import mock

import keras
import pytest

import keras_memtrans

PACKAGE = pathlib.Path(keras_memtrans.__file__).parent

only_on_torch = pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="only torch's eager backend copies a Python number to the device "
    "for each operation; TensorFlow and JAX compile it into the step",
)


@contextlib.contextmanager
def package_host_tensors():
    """Yields a list that gets the `file:line` of the package's innermost
    frame for each tensor made from host data while the context is open,
    under a frame of `keras_memtrans` (Keras' own, as an optimizer's step
    count, are not the package's)."""
    import torch

    sites = []

    def counted(make):
        def make_counted(data, *args, **kwargs):
            if not isinstance(data, torch.Tensor):
                ours = [
                    frame
                    for frame in traceback.extract_stack()
                    if pathlib.Path(frame.filename).is_relative_to(PACKAGE)
                ]
                if ours:
                    path = pathlib.Path(ours[-1].filename).relative_to(PACKAGE)
                    sites.append(f"{path}:{ours[-1].lineno}")
            return make(data, *args, **kwargs)

        return make_counted

    with (
        mock.patch.object(torch, "as_tensor", counted(torch.as_tensor)),
        mock.patch.object(torch, "tensor", counted(torch.tensor)),
    ):
        yield sites

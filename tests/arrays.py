"""Backend tensors as NumPy arrays, for comparisons in tests."""

import numpy as np
from keras import ops


def to_numpy(x):
    """`x` (a backend tensor, variable or array) as a NumPy array."""
    return np.asarray(ops.convert_to_numpy(x))

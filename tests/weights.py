"""Checks that randomly initialised weights were drawn independently."""

import numpy as np

from tests.arrays import to_numpy


def first_rows(variables, length=64):
    """The first `length` values of each randomly drawn (non-constant) weight."""
    rows = {}
    for variable in variables:
        value = to_numpy(variable).astype("float64")
        if value.std() > 0:
            rows[variable.path] = value.reshape(value.shape[0], -1)[0][:length]
    return rows


def assert_independent(rows):
    """No two rows are equal or proportional (one seed drawn twice).

    Draws of one seed at two shapes differ only in scale, so rows are
    compared by correlation: independent rows of 16 or more values have
    |correlation| far below 0.9.
    """
    paths = sorted(rows)
    for i, first in enumerate(paths):
        for second in paths[i + 1 :]:
            size = min(len(rows[first]), len(rows[second]))
            a, b = rows[first][:size], rows[second][:size]
            correlation = np.corrcoef(a, b)[0, 1]
            assert abs(correlation) < 0.9, (first, second, correlation)

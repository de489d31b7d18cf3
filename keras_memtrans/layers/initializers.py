"""A fresh initializer per weight, so that sublayers never start equal."""

import zlib

import keras


def clone_initializer(initializer, salt):
    """A copy of `initializer` with its own seed, for one sublayer.

    A Keras random initializer instance draws the same values on every
    call, so one instance shared by several sublayers gives them identical
    weights (a layer's query, key and value projections would start
    equal). As in keras-hub, each sublayer gets its own copy: an
    initializer created without a seed gets a fresh default seed; one with
    a concrete integer seed, or a `keras.random.SeedGenerator` made with
    one, gets that seed offset by a hash of `salt`, so the sublayers of
    one layer differ and the result stays reproducible.

    Args:
        initializer: a `keras.initializers.Initializer`, or a name or config
            that `keras.initializers.get` accepts.
        salt: str naming the sublayer (e.g. `"query_projection"`).

    Returns:
        A new initializer instance.

    Example:
    >>> import numpy as np
    >>> shared = keras.initializers.GlorotUniform(seed=1)
    >>> first = clone_initializer(shared, "query")((4, 4))
    >>> second = clone_initializer(shared, "key")((4, 4))
    >>> bool(np.array_equal(first, second))
    False
    """
    initializer = keras.initializers.get(initializer)
    config = initializer.get_config()
    seed = config.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        config["seed"] = salted(seed, salt)
    elif isinstance(getattr(initializer, "seed", None), keras.random.SeedGenerator):
        # Rebuilt from its config, each copy's generator would restart from
        # the same state: seeded ones get salted seeds too.
        seed = initializer.seed.get_config()["seed"]
        config["seed"] = keras.random.SeedGenerator(
            None if seed is None else salted(seed, salt)
        )
    return initializer.__class__.from_config(config)


def salted(seed, salt):
    """The int `seed` offset by a hash of the str `salt`, in [0, 2**31)."""
    return (seed + zlib.crc32(salt.encode())) % 2**31

"""Reproducible random generators keyed by (train.seed, purpose, counters).

Everything random in the input pipeline (epoch order, validation split, crop parameters) draws from
a generator derived here instead of global state, so a result depends only on the seed and on the
position of the sample: not on the number of loader workers, on prefetching or on process
boundaries. That is what makes a resumed run see the batches and crops of an uninterrupted
one.
"""

import enum

import numpy as np


class Purpose(enum.IntEnum):
    """Separates the streams so that, e.g., epoch 3's order is unrelated to image 3's crop."""

    EPOCH_ORDER = 1
    VALIDATION_SPLIT = 2
    AUGMENTATION = 3


def derived_rng(seed, purpose, *counters):
    """A generator that is a pure function of (seed, purpose, counters); all must be >= 0."""
    return np.random.default_rng([seed, int(purpose), *counters])

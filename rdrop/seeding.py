"""Every seed of a run, derived from `train.seed` and named by what it is for.

Everything random (epoch order, validation split, crops, dropout masks) depends only on
(train.seed, purpose, counters), never on global state carried across steps: a resumed run draws
what the uninterrupted one would have, whatever the number of loader workers, and there is no
random state to checkpoint. `Purpose` lists every use; its number keeps the streams apart, so
that, e.g., epoch 3's order is unrelated to image 3's crop.

The derivation is NumPy's SeedSequence of [seed, purpose, *counters], except for two purposes
whose older formulas are kept so that past results reproduce bitwise: training dropout is
(seed * 1_000_003 + rank * 7_919 + step) mod (2^31 - 1), and dropout consistency mixes
[seed, batch, sample] without the purpose number.
"""

import enum

import numpy as np

# paddle.seed takes a non-negative 32-bit signed integer.
PADDLE_SEED_MODULUS = 2**31 - 1


class Purpose(enum.IntEnum):
    EPOCH_ORDER = 1  # counters: epoch
    VALIDATION_SPLIT = 2  # no counters
    AUGMENTATION = 3  # counters: epoch, image index
    TRAINING_DROPOUT = 4  # counters: rank, optimizer step
    CONSISTENCY_DROPOUT = 5  # counters: batch of the split, pass


def sequence(seed, purpose, *counters):
    """The seed material of (seed, purpose, counters), all integers >= 0, as a SeedSequence."""
    if purpose is Purpose.CONSISTENCY_DROPOUT:
        return np.random.SeedSequence([seed, *counters])
    return np.random.SeedSequence([seed, int(purpose), *counters])


def generator(seed, purpose, *counters):
    """A NumPy generator that is a pure function of (seed, purpose, counters)."""
    return np.random.default_rng(sequence(seed, purpose, *counters))


def paddle_seed(seed, purpose, *counters):
    """The integer to give `paddle.seed` for (seed, purpose, counters)."""
    if purpose is Purpose.TRAINING_DROPOUT:
        rank, step = counters
        return (seed * 1_000_003 + rank * 7_919 + step) % PADDLE_SEED_MODULUS
    return int(sequence(seed, purpose, *counters).generate_state(1)[0]) % PADDLE_SEED_MODULUS

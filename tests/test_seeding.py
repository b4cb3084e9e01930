"""rdrop/seeding.py: each seed is a pure function of (seed, purpose, counters), the purposes draw
unrelated numbers, and the formulas of earlier versions still give their values."""

import itertools

from rdrop.seeding import Purpose, generator, paddle_seed

import numpy as np
import pytest

GENERATOR_PURPOSES = (Purpose.EPOCH_ORDER, Purpose.VALIDATION_SPLIT, Purpose.AUGMENTATION)


def test_a_generator_depends_on_its_arguments_only():
    first = generator(7, Purpose.AUGMENTATION, 2, 11).random(4)
    np.random.default_rng(0).random(100)  # global or unrelated state must not matter
    np.testing.assert_array_equal(generator(7, Purpose.AUGMENTATION, 2, 11).random(4), first)
    assert not np.array_equal(generator(7, Purpose.AUGMENTATION, 2, 12).random(4), first)
    assert not np.array_equal(generator(8, Purpose.AUGMENTATION, 2, 11).random(4), first)


def test_purposes_draw_unrelated_numbers_for_the_same_counters():
    draws = [tuple(generator(3, purpose, 5).random(3)) for purpose in GENERATOR_PURPOSES]
    assert len(set(draws)) == len(draws)
    dropout = {paddle_seed(3, purpose, 1, 5) for purpose in (Purpose.TRAINING_DROPOUT, Purpose.CONSISTENCY_DROPOUT)}
    assert len(dropout) == 2


@pytest.mark.parametrize("purpose", GENERATOR_PURPOSES)
def test_data_generators_are_the_seed_sequence_of_seed_purpose_and_counters(purpose):
    """The input pipeline's epoch orders, validation splits and crops of earlier runs reproduce:
    its generators were NumPy's default_rng of [seed, purpose number, *counters]."""
    number = {Purpose.EPOCH_ORDER: 1, Purpose.VALIDATION_SPLIT: 2, Purpose.AUGMENTATION: 3}[purpose]
    np.testing.assert_array_equal(
        generator(2**63 + 5, purpose, 4, 9).permutation(50),
        np.random.default_rng([2**63 + 5, number, 4, 9]).permutation(50),
    )


def test_training_dropout_keeps_its_formula():
    assert paddle_seed(0, Purpose.TRAINING_DROPOUT, 0, 0) == 0
    assert paddle_seed(3, Purpose.TRAINING_DROPOUT, 2, 10) == 3 * 1_000_003 + 2 * 7_919 + 10
    assert paddle_seed(5_000, Purpose.TRAINING_DROPOUT, 1, 7) == (5_000_015_000 + 7_919 + 7) % (2**31 - 1)


def test_consistency_dropout_keeps_its_formula():
    for seed, batch, sample in itertools.product((0, 11), (0, 3), (0, 7)):
        expected = int(np.random.SeedSequence([seed, batch, sample]).generate_state(1)[0]) % (2**31 - 1)
        assert paddle_seed(seed, Purpose.CONSISTENCY_DROPOUT, batch, sample) == expected


def test_paddle_seeds_are_valid_for_paddle():
    seeds = [paddle_seed(2**64 - 1, purpose, 2**31, 2**40) for purpose in Purpose]
    assert all(0 <= seed < 2**31 - 1 for seed in seeds)

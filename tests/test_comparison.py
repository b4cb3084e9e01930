"""rdrop/comparison.py: the statistics of compare.py, against values computed here by hand or by
NumPy and SciPy directly (scipy.stats.ttest_rel's own interval)."""

import math

from rdrop import comparison

import numpy as np
import pytest
from scipy import stats


def test_describe_is_the_mean_and_the_sample_standard_deviation():
    mean, sd = comparison.describe([2.0, 4.0, 9.0])
    assert mean == pytest.approx(5.0)
    assert sd == pytest.approx(math.sqrt((9 + 1 + 16) / 2))  # squared deviations over n - 1


def test_one_value_has_no_standard_deviation():
    mean, sd = comparison.describe([7.0])
    assert mean == 7.0 and math.isnan(sd)


def test_paired_interval_is_scipys_paired_t_interval():
    earlier, later = np.array([70.0, 71.5, 69.0, 72.0]), np.array([71.0, 73.5, 69.5, 74.5])
    mean, sd, low, high = comparison.paired_t_interval(list(later - earlier))
    interval = stats.ttest_rel(later, earlier).confidence_interval(0.95)
    assert mean == pytest.approx(1.5) and sd == pytest.approx(np.std(later - earlier, ddof=1))
    assert (low, high) == pytest.approx((interval.low, interval.high))


def test_paired_interval_from_a_printed_t_table():
    _, _, low, high = comparison.paired_t_interval([1.0, 3.0], confidence=0.90)
    half_width = 6.3138 * math.sqrt(2) / math.sqrt(2)  # t(0.95, 1) = 6.3138; sd of 1 and 3 is sqrt(2)
    assert (low, high) == pytest.approx((2 - half_width, 2 + half_width), abs=1e-4)


def test_one_pair_has_a_mean_but_no_interval():
    mean, sd, low, high = comparison.paired_t_interval([0.5])
    assert mean == 0.5 and math.isnan(sd) and math.isnan(low) and math.isnan(high)


def test_summarise_pairs_later_minus_earlier_over_the_seeds_both_have():
    value = {
        ("a", 0, "top1"): 50.0,
        ("a", 1, "top1"): 52.0,
        ("a", 2, "top1"): 51.0,
        ("b", 0, "top1"): 53.0,
        ("b", 2, "top1"): 55.0,  # seed 1 of b is missing
    }
    arms, pairs = comparison.summarise(["a", "b"], [0, 1, 2], ["top1"], value)
    assert [(row["arm"], row["n"], row["mean"]) for row in arms] == [("a", 3, 51.0), ("b", 2, 54.0)]
    assert arms[1]["per_seed"] == {0: 53.0, 2: 55.0}
    (pair,) = pairs
    assert pair["pair"] == "b - a" and pair["n"] == 2 and pair["per_seed"] == {0: 3.0, 2: 4.0}
    interval = stats.ttest_rel([53.0, 55.0], [50.0, 51.0]).confidence_interval(0.95)
    assert pair["mean"] == pytest.approx(3.5)
    assert (pair["ci_low"], pair["ci_high"]) == pytest.approx((interval.low, interval.high))


def test_summarise_leaves_out_arms_and_pairs_without_values():
    arms, pairs = comparison.summarise(["a", "b"], [0], ["top1", "loss"], {("a", 0, "top1"): 1.0})
    assert [(row["arm"], row["metric"]) for row in arms] == [("a", "top1")] and pairs == []

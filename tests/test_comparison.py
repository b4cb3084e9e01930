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
    mean, sd, low, high, undefined = comparison.paired_t_interval(list(later - earlier))
    interval = stats.ttest_rel(later, earlier).confidence_interval(0.95)
    assert undefined is None
    assert mean == pytest.approx(1.5) and sd == pytest.approx(np.std(later - earlier, ddof=1))
    assert (low, high) == pytest.approx((interval.low, interval.high))


def test_paired_interval_from_a_printed_t_table():
    _, _, low, high, _ = comparison.paired_t_interval([1.0, 3.0, 5.0], confidence=0.90)
    half_width = 2.9200 * 2 / math.sqrt(3)  # t(0.95, 2) = 2.9200; sd of 1, 3 and 5 is 2
    assert (low, high) == pytest.approx((3 - half_width, 3 + half_width), abs=1e-4)


@pytest.mark.parametrize("differences", [[0.5], [1.0, 3.0], [1.0, 1.0]])
def test_fewer_than_three_pairs_have_a_mean_but_no_interval(differences):
    mean, _, low, high, undefined = comparison.paired_t_interval(differences)
    assert mean == pytest.approx(np.mean(differences)) and math.isnan(low) and math.isnan(high)
    assert undefined == f"undefined: n = {len(differences)} < 3 seeds"


@pytest.mark.parametrize("differences", [[1.0] * 5, [100 * 2 / 3 - 100 * 1 / 3] * 2 + [100 / 3]])
def test_equal_differences_have_no_interval_rather_than_a_certain_one(differences):
    mean, sd, low, high, undefined = comparison.paired_t_interval(differences)
    assert mean == pytest.approx(differences[0]) and sd == pytest.approx(0, abs=1e-12)
    assert math.isnan(low) and math.isnan(high) and undefined.startswith("undefined: sd = 0")


def test_summarise_pairs_later_minus_earlier_over_the_seeds_both_have():
    value = {
        ("a", 0, "top1"): 50.0,
        ("a", 1, "top1"): 52.0,
        ("a", 2, "top1"): 51.0,
        ("a", 3, "top1"): 50.5,
        ("b", 0, "top1"): 53.0,
        ("b", 2, "top1"): 55.0,  # seed 1 of b is missing
        ("b", 3, "top1"): 53.0,
    }
    arms, pairs = comparison.summarise(["a", "b"], [0, 1, 2, 3], ["top1"], value)
    assert [(row["arm"], row["n"], row["mean"]) for row in arms] == [("a", 4, 50.875), ("b", 3, 53.0 + 2 / 3)]
    assert arms[1]["per_seed"] == {0: 53.0, 2: 55.0, 3: 53.0}
    (pair,) = pairs
    assert pair["pair"] == "b - a" and pair["n"] == 3 and pair["per_seed"] == {0: 3.0, 2: 4.0, 3: 2.5}
    interval = stats.ttest_rel([53.0, 55.0, 53.0], [50.0, 51.0, 50.5]).confidence_interval(0.95)
    assert pair["mean"] == pytest.approx(9.5 / 3) and pair["ci_undefined"] is None
    assert (pair["ci_low"], pair["ci_high"]) == pytest.approx((interval.low, interval.high))


def test_summarise_leaves_out_arms_and_pairs_without_values():
    arms, pairs = comparison.summarise(["a", "b"], [0], ["top1", "loss"], {("a", 0, "top1"): 1.0})
    assert [(row["arm"], row["metric"]) for row in arms] == [("a", "top1")] and pairs == []

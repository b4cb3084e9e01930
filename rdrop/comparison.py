"""The statistics of a comparison of training arms over seeds (scripts/compare.py): per arm the mean and
sample standard deviation over seeds, per pair of arms the mean paired difference with a paired-t
interval. Runs of two arms with the same seed share initialisation, data order and augmentation, so
pairing them removes that variation from the difference."""

import math

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


def describe(values):
    """Mean and sample standard deviation (n - 1); the deviation is nan for a single value."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan


MIN_SEEDS_FOR_INTERVAL = 3


def paired_t_interval(differences, confidence=CONFIDENCE):
    """Mean paired difference, its standard deviation, the paired-t interval
    mean ± t((1 + confidence) / 2, n - 1) · sd / sqrt(n), and why the interval is undefined (nan) or None.

    Below MIN_SEEDS_FOR_INTERVAL pairs the interval is undefined: from 2 pairs, sd and t(., 1) are too
    unreliable for an interval to mean anything. With sd = 0 (equal differences, as happens with few
    test images) the formula gives a zero-width interval that reads as a certain effect, where it only
    says the seeds happened to agree."""
    mean, sd = describe(differences)
    n = len(differences)
    if n < MIN_SEEDS_FOR_INTERVAL:
        return mean, sd, math.nan, math.nan, f"undefined: n = {n} < {MIN_SEEDS_FOR_INTERVAL} seeds"
    if sd <= 1e-12 * max(1.0, abs(mean)):  # zero, up to the rounding of values like 2/3 %
        return mean, sd, math.nan, math.nan, "undefined: sd = 0 (every seed's difference is the same)"
    half_width = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return mean, sd, mean - half_width, mean + half_width, None


def summarise(arms, seeds, metrics, value):
    """`value` maps (arm, seed, metric) to a number, for the runs that measured it. Per arm and metric:
    n, mean, std and the per-seed values; per pair of arms (later minus earlier, in `arms` order) and
    metric: the paired difference over the seeds both have, with its interval (or why it is undefined)."""
    per_arm, pairs = [], []
    for arm in arms:
        for metric in metrics:
            per_seed = {seed: value[arm, seed, metric] for seed in seeds if (arm, seed, metric) in value}
            if per_seed:
                mean, std = describe(list(per_seed.values()))
                per_arm.append(
                    {"arm": arm, "metric": metric, "n": len(per_seed), "mean": mean, "std": std, "per_seed": per_seed}
                )
    for first_index, first in enumerate(arms):
        for second in arms[first_index + 1 :]:
            for metric in metrics:
                common = [s for s in seeds if (first, s, metric) in value and (second, s, metric) in value]
                if not common:
                    continue
                differences = [value[second, s, metric] - value[first, s, metric] for s in common]
                mean, std, low, high, undefined = paired_t_interval(differences)
                pairs.append(
                    {
                        "pair": f"{second} - {first}",
                        "metric": metric,
                        "n": len(common),
                        "mean": mean,
                        "std": std,
                        "ci_low": low,
                        "ci_high": high,
                        "ci_undefined": undefined,
                        "per_seed": dict(zip(common, differences)),
                    }
                )
    return per_arm, pairs

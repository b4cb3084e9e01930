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


def paired_t_interval(differences, confidence=CONFIDENCE):
    """Mean paired difference, its standard deviation, and the paired-t interval
    mean ± t((1 + confidence) / 2, n - 1) · sd / sqrt(n); the interval is nan below two pairs."""
    mean, sd = describe(differences)
    n = len(differences)
    if n < 2:
        return mean, sd, math.nan, math.nan
    half_width = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return mean, sd, mean - half_width, mean + half_width


def summarise(arms, seeds, metrics, value):
    """`value` maps (arm, seed, metric) to a number, for the runs that measured it. Per arm and metric:
    n, mean, std and the per-seed values; per pair of arms (later minus earlier, in `arms` order) and
    metric: the paired difference over the seeds both have, with its interval."""
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
                mean, std, low, high = paired_t_interval(differences)
                pairs.append(
                    {
                        "pair": f"{second} - {first}",
                        "metric": metric,
                        "n": len(common),
                        "mean": mean,
                        "std": std,
                        "ci_low": low,
                        "ci_high": high,
                        "per_seed": dict(zip(common, differences)),
                    }
                )
    return per_arm, pairs

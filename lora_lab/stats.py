"""How sure a sweep's answer is: a rank's metric with its standard error and 95% interval, the
difference between two ranks, the rank to recommend, and the ranks no other beats on both cost and
metric (the Pareto front). Pure functions of numbers; the sweep and `analyze` call them.

A rank's validation metric m has two kinds of noise:
- the data's: the validation set is a sample. Accuracy p on n examples has the binomial standard
  error sqrt(p (1 - p) / n); a mean loss over n examples or tokens, its sample standard deviation
  over sqrt(n) (tokens of one response are not independent, so this one is on the low side).
- the seed's: another initialisation and batch order give another m. With k >= 2 seeds, the
  standard error of their mean is sd / sqrt(k).
A rank's standard error is the larger of the two (seeds that agree exactly say nothing about the
validation set), and its 95% interval is the wider of mean +- t(k-1) * seed SE and mean +- 1.96 *
data SE.

Two ranks a and b are compared on the difference of their means. Seeds pair them (seed s of a and of
b share the data order), so with two or more shared seeds the standard error of the difference is
that of the per-seed differences, sd(d_s) / sqrt(k); never below the data's, sqrt(SE_a^2 + SE_b^2).
Without shared seeds it is sqrt(SE_a^2 + SE_b^2).

The recommended rank follows the one-standard-error rule (Breiman et al. 1984; Hastie et al., The
Elements of Statistical Learning, 7.10): the cheapest rank (fewest trainable parameters) whose mean is
behind the best by no more than the standard error of that difference, i.e. a lead the data cannot
tell from noise. Means within 1e-9 of each other are equal (0.9396 and 0.953 average to 0.9463 exactly, though a
float sum says 0.9462999999999999); ties go to fewer parameters.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

Z95 = 1.959963984540054
# Two-sided 95% quantiles of Student's t by degrees of freedom (1 ... 30); above 30, z.
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
        2.042]  # fmt: skip
TIE = 1e-9


def t95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with `df` degrees of freedom."""
    return _T95[df - 1] if 1 <= df <= len(_T95) else Z95


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n examples; at 0% or 100% that of one example
    either way (p (1 - p) never below (1/n)(1 - 1/n)), as a perfect score on n examples is not certainty."""
    if n <= 0:
        return math.nan
    return math.sqrt(max(p * (1 - p), (1 / n) * (1 - 1 / n)) / n)


@dataclass(frozen=True)
class Estimate:
    """A rank's metric over its seeds: mean, standard error, 95% interval, and the parts."""

    mean: float
    se: float  # max(seed SE, data SE)
    low: float
    high: float
    by_seed: Mapping[str, float]
    seed_se: float  # nan with one seed
    data_se: float  # nan when unknown

    @property
    def seeds(self) -> int:
        return len(self.by_seed)


def _nan_to_zero(x: float) -> float:
    return 0.0 if math.isnan(x) else x


def estimate(
    by_seed: Mapping[str, float], data_se: float = math.nan, bounds: tuple[float, float] = (-math.inf, math.inf)
) -> Estimate:
    """The mean of a rank's metric over seeds (`by_seed`: seed -> value) with its noise; `data_se`
    is one run's standard error from its validation set (binomial, or the loss's over tokens); the
    interval is cut to `bounds` (0 to 1 for an accuracy)."""
    values = list(by_seed.values())
    if not values:
        raise ValueError("no value to estimate from")
    mean = math.fsum(values) / len(values)
    k = len(values)
    seed_se = statistics.stdev(values) / math.sqrt(k) if k > 1 else math.nan
    se = max(_nan_to_zero(seed_se), _nan_to_zero(data_se))
    if math.isnan(seed_se) and math.isnan(data_se):
        se = math.nan  # one seed and no validation size: the noise is unknown, not zero
    half = max(t95(k - 1) * _nan_to_zero(seed_se), Z95 * _nan_to_zero(data_se))
    low, high = max(mean - half, bounds[0]), min(mean + half, bounds[1])
    if math.isnan(se):
        low = high = math.nan
    return Estimate(mean, se, low, high, dict(by_seed), seed_se, data_se)


def difference_se(a: Estimate, b: Estimate) -> float:
    """Standard error of mean(a) - mean(b): paired (seed by seed) when both have the same two or more
    seeds, never below the validation sets' own noise; else as if independent. Unknown noise counts
    as none."""
    floor = _data_floor(a, b)
    if _paired(a, b):
        d = [a.by_seed[s] - b.by_seed[s] for s in a.by_seed]
        return max(statistics.stdev(d) / math.sqrt(len(d)), floor)
    return max(math.hypot(_nan_to_zero(a.se), _nan_to_zero(b.se)), floor)


def _data_floor(a: Estimate, b: Estimate) -> float:
    """The validation sets' own noise of a difference, taken as independent (on the high side)."""
    return math.hypot(_nan_to_zero(a.data_se), _nan_to_zero(b.data_se))


def _paired(a: Estimate, b: Estimate) -> bool:
    return a.seeds >= 2 and set(a.by_seed) == set(b.by_seed)


def difference_basis(a: Estimate, b: Estimate) -> str:
    """What `difference_se(a, b)` came from, in words: the seeds' paired differences, or the
    validation sets' noise, which it never goes below."""
    se, floor = difference_se(a, b), _data_floor(a, b)
    if _paired(a, b) and se > floor + TIE:
        return f"from the paired differences of {a.seeds} seeds"
    if floor > 0:
        seeds = f"; the {a.seeds} seeds' paired differences vary less" if _paired(a, b) else ""
        return f"the validation sets' noise, taken as independent{seeds}"
    return ""


@dataclass(frozen=True)
class Choice:
    """The best rank on the metric alone, the recommended one, and the figures of the reason."""

    best: Hashable
    recommended: Hashable
    lead: float  # how far the best is ahead of the recommended (>= 0, in the metric's units)
    lead_se: float  # the standard error of that difference
    tied: tuple  # every candidate the data cannot tell from the best, cheapest first


def choose(estimates: Mapping[Hashable, Estimate], costs: Mapping[Hashable, float], higher_is_better: bool) -> Choice:
    """The best candidate by mean (ties within 1e-9 to the cheaper), and the cheapest candidate whose
    shortfall to the best is at most one standard error of the difference (the one-SE rule)."""
    if not estimates:
        raise ValueError("no candidate to choose from")
    sign = 1.0 if higher_is_better else -1.0
    top = max(sign * e.mean for e in estimates.values())
    level = [k for k, e in estimates.items() if sign * e.mean >= top - TIE * max(1.0, abs(top))]
    best = min(level, key=lambda k: (costs[k], k))
    leads = {k: sign * (estimates[best].mean - e.mean) for k, e in estimates.items()}
    ses = {k: difference_se(estimates[k], estimates[best]) if k != best else 0.0 for k in estimates}
    tied = sorted((k for k in estimates if leads[k] <= ses[k] + TIE), key=lambda k: (costs[k], k))
    chosen = tied[0]
    return Choice(best, chosen, max(leads[chosen], 0.0), ses[chosen], tuple(tied))


def pareto_front(
    means: Mapping[Hashable, float], costs: Mapping[Hashable, float], higher_is_better: bool
) -> set[Hashable]:
    """The candidates no other beats on both: none is at most as costly and at least as good, and
    strictly one of the two."""
    sign = 1.0 if higher_is_better else -1.0

    def beats(a: Hashable, b: Hashable) -> bool:
        cheaper, better = costs[a] <= costs[b], sign * means[a] >= sign * means[b] - TIE
        strictly = costs[a] < costs[b] or sign * means[a] > sign * means[b] + TIE
        return cheaper and better and strictly

    return {k for k in means if not any(beats(o, k) for o in means if o != k)}

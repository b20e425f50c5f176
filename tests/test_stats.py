"""The noise a sweep reports: standard errors, intervals, paired differences, the one-SE rule, Pareto."""

import math
import statistics

import pytest

from lora_lab import stats as S


def test_one_seed_takes_the_data_noise_and_a_normal_interval():
    e = S.estimate({"1": 0.9}, S.binomial_se(0.9, 100), bounds=(0.0, 1.0))
    assert e.se == pytest.approx(0.03) and math.isnan(e.seed_se)
    assert (e.low, e.high) == pytest.approx((0.9 - 1.959964 * 0.03, 0.9 + 1.959964 * 0.03))


def test_seeds_that_agree_exactly_never_give_zero_noise():
    e = S.estimate({"1": 0.9, "2": 0.9}, S.binomial_se(0.9, 100))
    assert e.seed_se == 0 and e.se == pytest.approx(0.03)


def test_seed_noise_uses_student_t():
    values = {"1": 0.80, "2": 0.90, "3": 0.85}
    e = S.estimate(values, 0.001)
    se = statistics.stdev(values.values()) / math.sqrt(3)
    assert e.se == pytest.approx(se) and e.high - e.mean == pytest.approx(4.303 * se)


def test_intervals_stay_within_bounds():
    e = S.estimate({"1": 0.99}, 0.05, bounds=(0.0, 1.0))
    assert e.high == 1.0


def test_paired_difference_removes_what_the_seeds_share():
    """Seed s moves both ranks alike: the paired SE of the difference is small where the unpaired is not."""
    a = S.estimate({"1": 0.80, "2": 0.90, "3": 0.70})
    b = S.estimate({"1": 0.81, "2": 0.91, "3": 0.71})
    assert S.difference_se(a, b) == pytest.approx(0.0, abs=1e-12)
    assert math.hypot(a.se, b.se) > 0.05
    floored = S.estimate({"1": 0.80, "2": 0.90}, 0.02), S.estimate({"1": 0.81, "2": 0.91}, 0.02)
    assert S.difference_se(*floored) == pytest.approx(math.hypot(0.02, 0.02))  # never below the data's noise
    unpaired = S.estimate({"1": 0.8, "2": 0.9}), S.estimate({"3": 0.8, "4": 0.9})
    assert S.difference_se(*unpaired) == pytest.approx(math.hypot(unpaired[0].se, unpaired[1].se))


def test_choose_ties_go_to_fewer_parameters_even_when_float_means_differ():
    """(140 + 142) / 2 and (141 + 141) / 2 over 149 are equal; fmean says 0.9462999... for one of them."""
    r1 = S.estimate({"1": 140 / 149, "2": 142 / 149})
    r4 = S.estimate({"1": 141 / 149, "2": 141 / 149})
    choice = S.choose({1: r1, 4: r4}, {1: 100, 4: 400}, higher_is_better=True)
    assert choice.best == 1 and choice.recommended == 1


def test_one_standard_error_rule():
    n = 149
    est = {r: S.estimate({"1": v}, S.binomial_se(v, n)) for r, v in {1: 140 / n, 4: 141 / n, 16: 146 / n}.items()}
    costs = {1: 1, 4: 4, 16: 16}
    choice = S.choose(est, costs, True)
    assert choice.best == 16
    # the lead of 16 over 1 (6/149 = 4.0 points) is more than one SE of the difference (2.2 points); over 4, 3.4 > 2.2
    assert choice.recommended == 16 and choice.tied == (16,)
    close = {r: S.estimate({"1": v}, S.binomial_se(v, n)) for r, v in {1: 144 / n, 4: 146 / n}.items()}
    choice = S.choose(close, costs, True)
    assert (choice.best, choice.recommended) == (4, 1) and choice.lead == pytest.approx(2 / n)
    losses = {4: S.estimate({"1": 1.0}, 0.01), 8: S.estimate({"1": 0.9}, 0.01), 16: S.estimate({"1": 0.905}, 0.01)}
    assert S.choose(losses, {4: 4, 8: 8, 16: 16}, higher_is_better=False).recommended == 8


def test_pareto_front():
    means, costs = {1: 0.90, 2: 0.95, 4: 0.94, 8: 0.97, 16: 0.97}, {1: 1, 2: 2, 4: 4, 8: 8, 16: 16}
    assert S.pareto_front(means, costs, True) == {1, 2, 8}
    assert S.pareto_front({1: 1.0, 2: 0.8, 4: 0.9}, {1: 1, 2: 2, 4: 4}, False) == {1, 2}

"""Tests of qhelpers.stats.verdicts: minimum effect of practical size, the too-few-texts rule, and
the one-sided p-values behind a verdict (hand-computed values; scipy's normal distribution)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from qhelpers.stats import verdicts as V
from qhelpers.stats.bootstrap import Estimate
from qhelpers.util.errors import ConfigError


def E(value: float, lo: float, hi: float, n: int = 50) -> Estimate:
    return Estimate(value, lo, hi, n)


def test_min_units_is_ten():
    assert V.MIN_UNITS == 10


@pytest.mark.parametrize("est, threshold, direction, min_effect, expected", [
    # "> 0 by at least 0.1": the boundary is 0.1
    (E(0.5, 0.12, 0.8), 0.0, ">", 0.1, V.SUPPORTED),
    (E(0.5, 0.05, 0.8), 0.0, ">", 0.1, V.INCONCLUSIVE),     # clears 0, not 0.1
    (E(0.05, 0.01, 0.08), 0.0, ">", 0.1, V.NOT_SUPPORTED),  # a real effect, but below the practical size
    (E(0.05, 0.01, 0.10), 0.0, ">", 0.1, V.NOT_SUPPORTED),  # upper end ON the boundary: not beyond it
    (E(0.05, 0.01, 0.08), 0.0, ">", 0.0, V.SUPPORTED),      # the same interval without a minimum effect
    # "< 0 by at least 0.1": the boundary is -0.1
    (E(-0.5, -0.8, -0.12), 0.0, "<", 0.1, V.SUPPORTED),
    (E(-0.5, -0.8, -0.05), 0.0, "<", 0.1, V.INCONCLUSIVE),
    (E(-0.05, -0.08, -0.01), 0.0, "<", 0.1, V.NOT_SUPPORTED),
    # a threshold other than 0: "> 30 % by 5 points" -> 35
    (E(40.0, 36.0, 44.0), 30.0, ">", 5.0, V.SUPPORTED),
    (E(33.0, 31.0, 34.0), 30.0, ">", 5.0, V.NOT_SUPPORTED),
])
def test_min_effect_moves_the_boundary(est, threshold, direction, min_effect, expected):
    assert V.verdict(est, threshold, direction, min_effect=min_effect) == expected
    assert V.boundary(threshold, direction, min_effect) == (threshold + min_effect if direction == ">" else threshold - min_effect)


def test_min_effect_with_abs_value():
    # |r| > 0.7 by 0.1: folded interval must clear 0.8
    assert V.verdict(E(-0.9, -0.95, -0.85), 0.7, abs_value=True, min_effect=0.1) == V.SUPPORTED
    assert V.verdict(E(-0.78, -0.79, -0.75), 0.7, abs_value=True, min_effect=0.1) == V.NOT_SUPPORTED
    assert V.verdict(E(-0.78, -0.79, -0.75), 0.7, abs_value=True) == V.SUPPORTED


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_min_effect_must_be_a_finite_non_negative_number(bad):
    with pytest.raises(ConfigError, match="min_effect"):
        V.verdict(E(1, 0.5, 1.5), 0.0, min_effect=bad)


def test_too_few_texts_is_inconclusive_with_the_reason():
    assert V.verdict_with_reason(E(5.0, 4.0, 6.0, n=4), 0.0) == (V.INCONCLUSIVE, "too few texts (n = 4 < 10)")
    assert V.verdict_with_reason(E(5.0, 4.0, 6.0, n=9), 0.0)[0] == V.INCONCLUSIVE
    assert V.verdict_with_reason(E(5.0, 4.0, 6.0, n=10), 0.0) == (V.SUPPORTED, "")
    assert V.verdict(E(-5.0, -6.0, -4.0, n=3), 0.0) == V.INCONCLUSIVE  # also when it would contradict
    corr = {"r": 0.9, "ci_low": 0.8, "ci_high": 0.95, "n": 7, "defined": True}
    assert V.verdict_with_reason(corr, 0.5) == (V.INCONCLUSIVE, "too few pairs (n = 7 < 10)")
    assert V.verdict({**corr, "n": 12}, 0.5) == V.SUPPORTED
    no_n = {"r": 0.9, "ci_low": 0.8, "ci_high": 0.95}
    assert V.verdict(no_n, 0.5) == V.SUPPORTED  # n unknown: the rule cannot apply
    assert V.verdict(E(5.0, 4.0, 6.0, n=4), 0.0, min_n=3) == V.SUPPORTED


def test_undefined_reason_comes_first():
    v, why = V.verdict_with_reason(Estimate.undefined("collapsed: sw bpb 9", 3), 0.0)
    assert v == V.INCONCLUSIVE and why == "undefined: collapsed: sw bpb 9"


def test_p_value_of_a_correlation_dict_hand_computed():
    # a dict has no bootstrap distribution: normal approximation from the side of the interval that
    # faces the threshold. r 1.0, 95 % CI [0.5, 2.0]; '>' 0.6: se = 0.5 / 1.959964
    d = {"r": 1.0, "ci_low": 0.5, "ci_high": 2.0, "n": 30, "level": 0.95}
    z = sps.norm.ppf(0.975)
    expected = sps.norm.sf((1.0 - 0.6) / (0.5 / z))
    assert V.p_value(d, 0.6, ">") == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(0.05845, abs=5e-5)
    # '<' 1.5 uses the upper half-width: se = 1.0 / z
    assert V.p_value(d, 1.5, "<") == pytest.approx(sps.norm.sf(0.5 / (1.0 / z)), rel=1e-9)
    # at the interval's end the p-value is exactly (1 - level) / 2
    assert V.p_value(d, 0.5, ">") == pytest.approx(0.025, rel=1e-9)
    assert V.p_value({**d, "level": 0.90}, 2.0, "<") == pytest.approx(0.05, rel=1e-9)
    assert math.isnan(V.p_value({**d, "ci_low": None}, 0.5, ">"))


def test_p_value_agrees_with_the_interval():
    """p < (1 - level) / 2 exactly when the interval lies beyond the threshold (both directions)."""
    rng = np.random.default_rng(3)
    for _ in range(300):
        lo, hi = np.sort(rng.normal(0, 1, 2))
        value = rng.uniform(lo, hi)
        t = float(rng.normal(0, 1))
        est = E(float(value), float(lo), float(hi))
        assert (V.p_value(est, t, ">") < 0.025) == (lo > t)
        assert (V.p_value(est, t, "<") < 0.025) == (hi < t)
    assert math.isnan(V.p_value(Estimate.undefined("collapsed: x", 20), 0.0, ">"))


def test_p_value_uses_the_estimates_own_method():
    class WithReplicates(Estimate):
        def p_value(self, threshold: float, direction: str) -> float:
            return 0.123 if direction == ">" else 0.877

    est = WithReplicates(1.0, 0.5, 2.0, 40)
    assert V.p_value(est, 0.0, ">") == 0.123 and V.p_value(est, 0.0, "<") == 0.877


def test_p_value_of_an_absolute_value():
    est = E(-0.9, -0.95, -0.85)
    # |value| > 0.8 holds through the negative side: p is that of value < -0.8
    assert V.p_value(est, 0.8, ">", abs_value=True) == pytest.approx(V.p_value(est, -0.8, "<"))
    assert V.p_value(est, 0.8, ">", abs_value=True) < 0.025


def test_support_p_values_follow_the_three_way_verdict():
    for est, expected in [(E(0.5, 0.12, 0.8), V.SUPPORTED), (E(0.05, 0.01, 0.08), V.NOT_SUPPORTED),
                          (E(0.2, 0.05, 0.3), V.INCONCLUSIVE)]:
        ps, pc = V.support_p_values(est, 0.0, ">", min_effect=0.1)
        assert (ps < 0.025, pc < 0.025) == (expected == V.SUPPORTED, expected == V.NOT_SUPPORTED)
        assert V.verdict(est, 0.0, ">", min_effect=0.1) == expected

"""Tests of qhelpers.stats.multiplicity: Holm's adjustment against a hand-computed example, an
independent step-down loop and statsmodels; the three-way adjusted verdicts."""
from __future__ import annotations

import math

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests

from qhelpers.stats import multiplicity as M
from qhelpers.stats.verdicts import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from qhelpers.util.errors import ConfigError


def _holm_by_hand(p):
    """Holm (1979) step-down, written out: sort, multiply the k-th smallest by (m - k + 1), running max, cap at 1."""
    p = list(p)
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        out[i] = running
    return out


def test_holm_hand_computed_example():
    # sorted: 0.005 x4 = 0.02; 0.01 x3 = 0.03; 0.03 x2 = 0.06; 0.04 x1 = 0.04 -> running max 0.06
    assert M.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert M.holm([0.2]) == pytest.approx([0.2])  # a family of one is unchanged
    assert M.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert M.holm([]).size == 0


def test_holm_matches_an_independent_loop_and_statsmodels():
    rng = np.random.default_rng(11)
    for m in (2, 3, 5, 8, 20):
        p = rng.uniform(0, 0.2, m)
        got = M.holm(p)
        assert got == pytest.approx(_holm_by_hand(p), abs=1e-12)
        assert got == pytest.approx(multipletests(p, method="holm")[1], abs=1e-12)
    for p in ([0.01, 0.01, 0.02], [1.0, 0.0, 0.5, 0.5], [0.3, 0.001, 0.3, 0.02, 0.9]):  # ties, 0 and 1
        assert M.holm(p) == pytest.approx(multipletests(p, method="holm")[1], abs=1e-12)


def test_nan_p_values_count_in_the_family_and_stay_nan():
    got = M.holm([0.01, math.nan, 0.02])  # nan counts as p = 1: 0.01 x3, 0.02 x2
    assert got[0] == pytest.approx(0.03) and math.isnan(got[1]) and got[2] == pytest.approx(0.04)


def test_bad_inputs():
    with pytest.raises(ConfigError, match="Holm"):
        M.adjust_p_values([0.1], method="fdr_bh")
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        M.holm([0.1, 1.5])
    with pytest.raises(ConfigError, match="one entry per hypothesis"):
        M.adjust_verdicts([SUPPORTED], [0.01, 0.02], [0.9])


def test_adjusted_verdicts_hand_computed():
    # three SUPPORTED claims, p_support 0.001, 0.012, 0.02: Holm 0.003, 0.024, 0.024 -> all < 0.025 survive
    out = M.adjust_verdicts([SUPPORTED] * 3, [0.001, 0.012, 0.02], [0.99, 0.98, 0.97])
    assert [a.verdict for a in out] == [SUPPORTED] * 3
    assert [a.p_adjusted for a in out] == pytest.approx([0.003, 0.024, 0.024])
    # p_support 0.001, 0.02, 0.02: Holm 0.003, 0.04, 0.04 -> the last two lose their verdict
    out = M.adjust_verdicts([SUPPORTED] * 3, [0.001, 0.02, 0.02], [0.99] * 3)
    assert [a.verdict for a in out] == [SUPPORTED, INCONCLUSIVE, INCONCLUSIVE]
    assert out[1].p_raw == 0.02 and out[1].family_size == 3 and out[1].method == "holm"
    # NOT_SUPPORTED is judged on the contra p-values, adjusted separately
    out = M.adjust_verdicts([NOT_SUPPORTED] * 3, [0.99, 0.9, 0.9], [0.001, 0.013, 0.014])
    assert [a.verdict for a in out] == [NOT_SUPPORTED, INCONCLUSIVE, INCONCLUSIVE]  # 0.003, 0.026, 0.026
    assert [a.p_contra_adjusted for a in out] == pytest.approx([0.003, 0.026, 0.026])
    # at level 0.90 the bar is 0.05
    out = M.adjust_verdicts([SUPPORTED] * 2, [0.01, 0.04], [0.9, 0.9], level=0.90)
    assert [a.verdict for a in out] == [SUPPORTED, SUPPORTED]


def test_family_of_one_keeps_its_raw_verdict():
    for raw in (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE):
        (a,) = M.adjust_verdicts([raw], [0.03], [0.03])
        assert a.verdict == raw and a.family_size == 1


def test_adjusted_verdict_is_never_more_decisive_than_the_raw_one():
    rng = np.random.default_rng(5)
    choices = [SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE]
    for _ in range(200):
        m = int(rng.integers(2, 7))
        raw = [choices[i] for i in rng.integers(0, 3, m)]
        ps = rng.uniform(0, 0.05, m) ** 2  # tiny p-values, even for INCONCLUSIVE claims
        pc = rng.uniform(0, 0.05, m) ** 2
        for r, a in zip(raw, M.adjust_verdicts(raw, ps, pc)):
            assert a.verdict in (r, INCONCLUSIVE)
    # INCONCLUSIVE (say, too few texts) stays so however small its p-values
    assert M.adjust_verdicts([INCONCLUSIVE, SUPPORTED], [1e-9, 1e-9], [1e-9, 1e-9])[0].verdict == INCONCLUSIVE

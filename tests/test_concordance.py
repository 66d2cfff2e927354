"""Kendall's W, ranking concordance across languages and per-language config differences."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from qhelpers import stats
from qhelpers.util.errors import ConfigError

LN2 = math.log(2)


def test_kendalls_w_known_answers():
    # hand computation: 3 raters, 6 objects, no ties: rank sums 8 14 11 11 11 8, S = 25.5, W = 12 S / (9 * 210)
    r = np.array([[1, 6, 3, 2, 5, 4], [1, 5, 6, 4, 2, 3], [6, 3, 2, 5, 4, 1]])
    sums = r.sum(0)
    s = float(((sums - sums.mean()) ** 2).sum())
    assert s == 25.5
    assert stats.kendalls_w(r) == pytest.approx(12 * 25.5 / (9 * 210), rel=1e-12)
    assert stats.kendalls_w(np.array([[1, 2, 3], [1, 2, 3]])) == 1.0
    assert stats.kendalls_w(np.array([[1, 2, 3], [3, 2, 1]])) == 0.0
    # ties: ranks [1.5 1.5 3] and [1 2.5 2.5]; S = 4.5, T = 6 + 6, W = 12 * 4.5 / (4 * 24 - 2 * 12) = 0.75
    assert stats.kendalls_w(np.array([[1.0, 1.0, 3.0], [1.0, 2.0, 2.0]])) == pytest.approx(0.75, rel=1e-12)
    # vectorised over leading axes = one at a time; scale-free within a rater
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(5, 4, 3))
    assert stats.kendalls_w(batch) == pytest.approx([stats.kendalls_w(b) for b in batch], rel=1e-12)
    assert stats.kendalls_w(batch * 7 + 3) == pytest.approx(stats.kendalls_w(batch), rel=1e-12)
    with pytest.raises(ConfigError, match="at least 2 raters"):
        stats.kendalls_w(np.array([[1, 2, 3]]))


def planted(orders: dict[str, list[float]], n_texts: int = 20, noise: float = 0.002, seed: int = 0) -> pd.DataFrame:
    """Scores where config ``q{j}`` adds ``orders[lang][j]`` bits per byte in ``lang`` (+ text noise)."""
    rng = np.random.default_rng(seed)
    rows = []
    for lang, damages in orders.items():
        for t in range(n_texts):
            n_bytes = int(rng.integers(150, 250))
            fp = 2.0 * n_bytes * LN2
            rows.append(("fp", lang, f"p{t}", fp, 50, n_bytes))
            for j, d in enumerate(damages):
                rows.append((f"q{j}", lang, f"p{t}", fp + (d + rng.normal(scale=noise)) * n_bytes * LN2, 50, n_bytes))
    return pd.DataFrame(rows, columns=["config", "lang", "text_id", "nll", "n_tokens", "n_bytes"])


def test_ranking_concordance_separates_same_from_reversed_rankings():
    same = planted({"en": [0.1, 0.2, 0.3], "de": [0.15, 0.25, 0.4], "sw": [0.3, 0.5, 0.8], "he": [0.2, 0.3, 0.35]})
    est = stats.ranking_concordance(same, ["q0", "q1", "q2"], n_boot=300)
    assert est.value == 1.0 and est.ci_low > 0.9 and est.n == 20
    mixed = planted({"en": [0.1, 0.2, 0.3], "de": [0.1, 0.2, 0.3], "sw": [0.3, 0.2, 0.1], "he": [0.3, 0.2, 0.1]})
    est = stats.ranking_concordance(mixed, ["q0", "q1", "q2"], n_boot=300)
    assert est.value == pytest.approx(0.0, abs=1e-12) and est.ci_high < 0.5
    with pytest.raises(ConfigError, match="at least 2 configurations"):
        stats.ranking_concordance(same, ["q0"])


def test_language_differences_are_the_paired_differences_of_the_language_table():
    scores = planted({"en": [0.1, 0.3], "sw": [0.4, 0.2]}, noise=0.01)
    diff = stats.language_differences(scores, "q1", "q0", n_boot=400)
    table = stats.language_table(scores, n_boot=50).set_index(["config", "lang"])
    for lang, truth in (("en", 0.2), ("sw", -0.2)):
        point = table.loc[("q1", lang), "delta_bpb"] - table.loc[("q0", lang), "delta_bpb"]
        assert diff[lang].value == pytest.approx(point, rel=1e-12)
        assert diff[lang].ci_low < truth < diff[lang].ci_high
        assert diff[lang].ci_high - diff[lang].ci_low < 0.05
    with pytest.raises(ConfigError, match="not in the scores"):
        stats.language_differences(scores, "q1", "q0", langs=["xx"])


def test_config_contrast_is_a_weighted_sum_of_language_deltas():
    scores = planted({"en": [0.1, 0.3], "sw": [0.4, 0.2], "he": [0.5, 0.1]}, noise=0.01)
    table = stats.language_table(scores, n_boot=50).set_index(["config", "lang"])
    terms = {("q1", "sw"): 0.5, ("q0", "sw"): -0.5, ("q1", "he"): 0.5, ("q0", "he"): -0.5}
    est = stats.config_contrast(scores, terms, n_boot=400)
    point = sum(w * table.loc[key, "delta_bpb"] for key, w in terms.items())
    assert est.value == pytest.approx(point, rel=1e-12)
    # planted: mean of (-0.2, -0.4); text noise gives the estimate a standard deviation of about 0.002
    assert abs(est.value + 0.3) < 0.01 and est.ci_low < est.value < est.ci_high and est.ci_high - est.ci_low < 0.03
    # the mean of two languages' differences: the contrast of its four terms
    diffs = stats.language_differences(scores, "q1", "q0", langs=["sw", "he"], n_boot=400)
    assert est.value == pytest.approx((diffs["sw"].value + diffs["he"].value) / 2, rel=1e-12)


def test_a_collapsed_configuration_keeps_its_place_in_the_ranking():
    # q2 pushes sw past 8 bits per byte (the collapse rule of ratios); it is still the worst everywhere
    scores = planted({"en": [0.1, 0.2, 0.3], "de": [0.1, 0.2, 0.4], "sw": [0.1, 0.3, 7.0]})
    assert not stats.disparity_difference(scores, "q2", lr_langs=["sw"], hr_langs=["en"], n_boot=50).defined
    est = stats.ranking_concordance(scores, ["q0", "q1", "q2"], n_boot=200)
    assert est.defined and est.value == 1.0

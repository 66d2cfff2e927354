"""Tests of qhelpers.stats.scores: known answers computed by hand, planted effects, coverage."""
from __future__ import annotations

import math
import time
import zlib

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from qhelpers import stats
from qhelpers.stats.bootstrap import Estimate
from qhelpers.util.errors import ConfigError, MeasurementError

LN2 = math.log(2.0)


def rows_for(config, lang, nll, tok, byt, ids=None):
    ids = ids if ids is not None else [f"t{i}" for i in range(len(nll))]
    return [
        {"config": config, "lang": lang, "text_id": i, "nll": float(a), "n_tokens": int(b), "n_bytes": int(c)}
        for i, a, b, c in zip(ids, nll, tok, byt)
    ]


def planted(degradations: dict[str, float], n_texts=12, seed=0, configs=("q",), per_config=None):
    """Each text of language L gets q nll = fp nll + tok * log1p(d_L): every resample has
    degradation exactly d_L. ``per_config`` maps config -> {lang: d}."""
    rng = np.random.default_rng(seed)
    per_config = per_config or {c: degradations for c in configs}
    rows = []
    for lang in degradations:
        tok = rng.integers(10, 60, n_texts)
        byt = (tok * rng.uniform(2.0, 4.0, n_texts)).astype(int)
        fp = tok * rng.uniform(1.5, 3.5, n_texts)
        rows += rows_for("fp", lang, fp, tok, byt)
        for c, ds in per_config.items():
            rows += rows_for(c, lang, fp + tok * math.log1p(ds[lang]), tok, byt)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_indices_and_counts_agree():
    idx = stats.bootstrap_indices(7, 50, np.random.default_rng(3))
    assert idx.shape == (50, 7) and idx.min() >= 0 and idx.max() <= 6
    counts = stats.bootstrap_counts(7, 50, np.random.default_rng(3))
    assert counts.shape == (50, 7)
    assert np.all(counts.sum(axis=1) == 7)
    expected = np.stack([np.bincount(r, minlength=7) for r in idx])
    np.testing.assert_array_equal(counts, expected)
    with pytest.raises(ConfigError):
        stats.bootstrap_indices(0, 10, np.random.default_rng(0))


def test_language_counts_shared_when_parallel_else_one_generator_per_language():
    shared = stats.language_counts({"en": 5, "he": 5}, 30, seed=4, parallel=True)
    assert shared["en"] is shared["he"]
    np.testing.assert_array_equal(shared["en"], stats.bootstrap_counts(5, 30, np.random.default_rng(4)))
    own = stats.language_counts({"en": 5, "he": 3}, 30, seed=4, parallel=False)
    np.testing.assert_array_equal(own["he"], stats.bootstrap_counts(3, 30, np.random.default_rng([4, zlib.crc32(b"he")])))
    # a language's resample does not depend on which other languages are involved
    np.testing.assert_array_equal(stats.language_counts({"he": 3}, 30, 4, False)["he"], own["he"])
    with pytest.raises(ConfigError, match="same number of units"):
        stats.language_counts({"en": 5, "he": 3}, 30, 4, parallel=True)


def test_check_boot_and_level_return_the_checked_value():
    assert stats.check_boot(2000) == 2000 and isinstance(stats.check_boot(np.int64(7)), int)
    assert stats.check_level(0.9) == 0.9
    for bad in (0, 2.5, True, "2000", math.nan):
        with pytest.raises(ConfigError, match="n_boot"):
            stats.check_boot(bad)
    with pytest.raises(ConfigError, match="level"):
        stats.check_level(1.0)


# --------------------------------------------------------------------------- language_table


def hand_table():
    rows = []
    # en: texts (nll, tok, bytes)
    rows += rows_for("fp", "en", [10, 12, 8], [5, 4, 6], [20, 15, 25])
    rows += rows_for("q", "en", [11, 15, 9], [5, 4, 6], [20, 15, 25])
    # he: byte-heavy texts, stronger damage
    rows += rows_for("fp", "he", [20, 30, 25], [10, 12, 9], [40, 50, 35])
    rows += rows_for("q", "he", [26, 33, 31], [10, 12, 9], [40, 50, 35])
    return pd.DataFrame(rows)


def test_language_table_matches_hand_computation():
    tab = stats.language_table(hand_table(), baseline="fp", n_boot=500)
    assert list(tab["lang"]) == ["en", "he"] and list(tab["config"]) == ["q", "q"]
    en = tab.set_index("lang").loc["en"]
    ppl_fp, ppl_q = math.exp(30 / 15), math.exp(35 / 15)
    assert en["n_texts"] == 3 and en["n_tokens"] == 15 and en["n_bytes"] == 60
    assert en["ppl_fp"] == pytest.approx(ppl_fp, rel=1e-12)
    assert en["ppl_q"] == pytest.approx(ppl_q, rel=1e-12)
    assert en["bpb_fp"] == pytest.approx(30 / LN2 / 60, rel=1e-12)
    assert en["bpb_q"] == pytest.approx(35 / LN2 / 60, rel=1e-12)
    assert en["degradation"] == pytest.approx((ppl_q - ppl_fp) / ppl_fp, rel=1e-12)
    assert en["ppl_ratio"] == pytest.approx(ppl_q / ppl_fp, rel=1e-12)
    assert en["delta_nll"] == pytest.approx(35 / 15 - 30 / 15, rel=1e-12)
    assert en["delta_bpb"] == pytest.approx(5 / LN2 / 60, rel=1e-12)
    he = tab.set_index("lang").loc["he"]
    ppl_fp, ppl_q = math.exp(75 / 31), math.exp(90 / 31)
    assert he["degradation"] == pytest.approx((ppl_q - ppl_fp) / ppl_fp, rel=1e-12)
    assert he["bpb_q"] == pytest.approx(90 / LN2 / 125, rel=1e-12)
    # the same content in both languages: mean over the 3 paragraphs of the bits added
    assert en["delta_bits_per_paragraph"] == pytest.approx((1 + 3 + 1) / LN2 / 3, rel=1e-12)
    assert he["delta_bits_per_paragraph"] == pytest.approx((6 + 3 + 6) / LN2 / 3, rel=1e-12)
    assert tab.attrs["interval_method"] == "studentized" and tab.attrs["parallel"] is True
    # n = 3: 3 of 27 resamples repeat one text (standard error 0, t = +-inf), so the
    # studentized interval is unbounded: NaN interval, value kept, the note says why.
    for k in ("ppl_ratio", "degradation", "delta_nll", "delta_bpb", "delta_bits_per_paragraph"):
        assert tab[f"{k}_ci_low"].isna().all() and tab[f"{k}_ci_high"].isna().all()
        assert tab[k].notna().all()
    assert tab["note"].str.startswith("unbounded CI").all() and "n = 3" in tab.loc[0, "note"]
    assert not tab["collapsed"].any()
    pct = stats.language_table(hand_table(), baseline="fp", n_boot=500, method="percentile")
    assert pct.attrs["interval_method"] == "percentile" and (pct["note"] == "").all()
    for k in ("ppl_ratio", "degradation", "delta_nll", "delta_bpb", "delta_bits_per_paragraph"):
        assert (pct[f"{k}_ci_low"] <= pct[k]).all() and (pct[k] <= pct[f"{k}_ci_high"]).all()
    # ppl_ratio and degradation carry delta_nll's interval through exp and expm1
    np.testing.assert_allclose(pct["ppl_ratio_ci_low"], np.exp(pct["delta_nll_ci_low"]), rtol=1e-12)
    np.testing.assert_allclose(pct["degradation_ci_high"], np.expm1(pct["delta_nll_ci_high"]), rtol=1e-12)

    base = stats.baseline_table(hand_table(), n_boot=200, method="percentile").set_index("lang")
    assert (base["ppl_ci_low"] < base["ppl"]).all() and (base["bpb"] < base["bpb_ci_high"]).all()
    assert base.loc["en", "ppl"] == pytest.approx(math.exp(2.0))
    assert base.loc["he", "bpb"] == pytest.approx(75 / LN2 / 125)
    assert base.loc["he", "bytes_per_token"] == pytest.approx(125 / 31)


def test_constant_per_token_shift_gives_degenerate_interval():
    df = planted({"en": 0.1, "he": 0.4}, n_texts=20)
    tab = stats.language_table(df, n_boot=300).set_index("lang")
    for lang, d in (("en", 0.1), ("he", 0.4)):
        assert tab.loc[lang, "degradation"] == pytest.approx(d, rel=1e-9)
        assert tab.loc[lang, "degradation_ci_low"] == pytest.approx(d, rel=1e-9)
        assert tab.loc[lang, "degradation_ci_high"] == pytest.approx(d, rel=1e-9)
        assert tab.loc[lang, "delta_nll"] == pytest.approx(math.log1p(d), rel=1e-9)


def test_paired_bootstrap_coverage_and_width():
    """200 independent replications (one 'language' each, 60 texts, distinct text ids).
    Between-text spread is large and the within-pair noise small, so only a PAIRED
    bootstrap gives the right width: an unpaired one would cover ~100 % and be ~25x wider."""
    rng = np.random.default_rng(12345)
    n_rep, n_txt, tok, mu, sd = 200, 60, 50, 0.05, 1.0
    rows = []
    for r in range(n_rep):
        lang = f"L{r:03d}"
        ids = [f"{lang}_{i}" for i in range(n_txt)]
        fp = tok * rng.normal(3.0, 0.5, n_txt)
        q = fp + rng.normal(mu * tok, sd, n_txt)
        rows += rows_for("fp", lang, fp, [tok] * n_txt, [4 * tok] * n_txt, ids)
        rows += rows_for("q", lang, q, [tok] * n_txt, [4 * tok] * n_txt, ids)
    df = pd.DataFrame(rows)
    t0 = time.perf_counter()
    tab = stats.language_table(df, n_boot=1000, seed=7)
    assert time.perf_counter() - t0 < 8
    assert tab.attrs["parallel"] is False
    covered = (tab["delta_nll_ci_low"] <= mu) & (mu <= tab["delta_nll_ci_high"])
    rate = covered.mean()
    assert 0.88 <= rate <= 0.99, rate
    width = (tab["delta_nll_ci_high"] - tab["delta_nll_ci_low"]).mean()
    paired_width = 2 * 1.96 * sd / tok / math.sqrt(n_txt)
    assert width == pytest.approx(paired_width, rel=0.2)


def test_parallel_corpus_shares_resamples_across_languages():
    rng = np.random.default_rng(0)
    tok = rng.integers(10, 40, 15)
    fp = tok * rng.uniform(2, 3, 15)
    q = fp + tok * rng.normal(0.1, 0.05, 15)
    rows = []
    for lang in ("en", "he"):
        rows += rows_for("fp", lang, fp, tok, 3 * tok)
        rows += rows_for("q", lang, q, tok, 3 * tok)
    df = pd.DataFrame(rows)
    tab = stats.language_table(df, n_boot=400)
    assert tab.attrs["parallel"] is True
    a, b = tab.iloc[0], tab.iloc[1]
    assert a["delta_nll_ci_low"] == b["delta_nll_ci_low"] and a["delta_nll_ci_high"] == b["delta_nll_ci_high"]
    # Same data under different text ids: each language resampled on its own.
    df2 = df.copy()
    df2.loc[df2["lang"] == "he", "text_id"] = "he_" + df2.loc[df2["lang"] == "he", "text_id"]
    tab2 = stats.language_table(df2, n_boot=400)
    assert tab2.attrs["parallel"] is False
    assert tab2.iloc[0]["delta_nll_ci_low"] != tab2.iloc[1]["delta_nll_ci_low"]
    # Deterministic for a fixed seed, different for another.
    pd.testing.assert_frame_equal(tab, stats.language_table(df, n_boot=400))
    assert not stats.language_table(df, n_boot=400, seed=1).equals(tab)


def test_language_table_is_fast_enough():
    rng = np.random.default_rng(1)
    rows = []
    langs = ["en", "de", "fr", "zh", "ar", "he", "sw"]
    configs = ["fp"] + [f"c{i}" for i in range(15)]
    for lang in langs:
        tok = rng.integers(20, 80, 60)
        fp = tok * rng.uniform(2, 4, 60)
        for k, c in enumerate(configs):
            rows += rows_for(c, lang, fp + k * 0.01 * tok + rng.normal(0, 1, 60) * (k > 0), tok, 4 * tok)
    df = pd.DataFrame(rows)
    t0 = time.perf_counter()
    tab = stats.language_table(df)
    elapsed = time.perf_counter() - t0
    assert len(tab) == 15 * 7
    assert elapsed < 2.0, elapsed


def test_language_table_flags_non_finite_and_collapse():
    df = planted({"en": 0.1, "he": 0.2}, n_texts=5)
    df.loc[(df["config"] == "q") & (df["lang"] == "he") & (df["text_id"] == "t2"), "nll"] = np.inf
    tab = stats.language_table(df, n_boot=100).set_index("lang")
    assert tab.loc["he", "note"].startswith("non-finite") and "t2" in tab.loc["he", "note"]
    assert math.isnan(tab.loc["he", "degradation"]) and math.isnan(tab.loc["he", "ppl_q"])
    assert tab.loc["en", "note"] == "" and tab.loc["en", "degradation"] == pytest.approx(0.1)

    df = planted({"en": 0.1, "he": 0.2}, n_texts=5)
    sel = (df["config"] == "q") & (df["lang"] == "he")
    df.loc[sel, "nll"] = df.loc[sel, "n_bytes"] * 9 * LN2  # 9 bits per byte
    tab = stats.language_table(df, n_boot=100).set_index("lang")
    assert bool(tab.loc["he", "collapsed"]) and tab.loc["he", "note"].startswith("collapsed")
    assert not bool(tab.loc["en", "collapsed"])


def test_input_validation_errors():
    df = hand_table()
    with pytest.raises(ConfigError, match="baseline"):
        stats.language_table(df, baseline="fp16")
    with pytest.raises(MeasurementError, match="lacks columns"):
        stats.language_table(df.drop(columns=["n_bytes"]))
    with pytest.raises(MeasurementError, match="duplicated"):
        stats.language_table(pd.concat([df, df.iloc[:1]]))
    with pytest.raises(MeasurementError, match="same texts"):
        stats.language_table(df.drop(index=df.index[(df["config"] == "q") & (df["text_id"] == "t0") & (df["lang"] == "en")]))
    bad = df.copy()
    bad.loc[0, "nll"] = -3.0
    with pytest.raises(MeasurementError, match="negate"):
        stats.language_table(bad)
    with pytest.raises(ConfigError, match="both"):
        stats.disparity(df, "q", lr_langs=["he", "en"], hr_langs=["en"])
    with pytest.raises(ConfigError, match="not in the scores"):
        stats.disparity(df, "q", lr_langs=["sw"], hr_langs=["en"])
    with pytest.raises(ConfigError, match="metric"):
        stats.disparity(df, "q", metric="ppl")
    with pytest.raises(ConfigError, match="disparity_vs_reference"):
        stats.disparity(df, "q", reference="en")


# --------------------------------------------------------------------------- disparity


DS = {"en": 0.10, "de": 0.20, "he": 0.30, "sw": 0.45}


def test_disparity_planted_ratio():
    df = planted(DS)
    est = stats.disparity(df, "q", n_boot=300)  # default groups restricted to present langs
    assert est.defined and est.reason is None
    assert est.value == pytest.approx(0.375 / 0.15, rel=1e-9)
    assert est.ci_low == pytest.approx(2.5, rel=1e-9) and est.ci_high == pytest.approx(2.5, rel=1e-9)
    assert est.n == 12 and est.level == 0.95
    diff = stats.disparity_difference(df, "q", n_boot=300)
    assert diff.value == pytest.approx(0.225, rel=1e-9)
    ref = stats.disparity_vs_reference(df, "q", reference="en", n_boot=300)
    assert set(ref) == {"de", "he", "sw"}
    assert ref["sw"].value == pytest.approx(4.5, rel=1e-9) and ref["de"].value == pytest.approx(2.0, rel=1e-9)


def test_disparity_pairs_languages_on_a_parallel_corpus():
    rng = np.random.default_rng(4)
    n = 25
    tok = np.full(n, 30)
    fp = tok * rng.uniform(2, 3, n)
    d_hr = rng.normal(0.1, 0.08, n) * tok
    rows = rows_for("fp", "en", fp, tok, 4 * tok) + rows_for("q", "en", fp + d_hr, tok, 4 * tok)
    rows += rows_for("fp", "he", fp, tok, 4 * tok) + rows_for("q", "he", fp + 2 * d_hr, tok, 4 * tok)
    df = pd.DataFrame(rows)
    est = stats.disparity(df, "q", lr_langs=["he"], hr_langs=["en"], metric="delta_nll", n_boot=500)
    assert est.value == pytest.approx(2.0, rel=1e-9)
    assert est.ci_low == pytest.approx(2.0, rel=1e-9) and est.ci_high == pytest.approx(2.0, rel=1e-9)
    df2 = df.copy()
    df2.loc[df2["lang"] == "he", "text_id"] = "x" + df2.loc[df2["lang"] == "he", "text_id"]
    est2 = stats.disparity(df2, "q", lr_langs=["he"], hr_langs=["en"], metric="delta_nll", n_boot=500)
    assert est2.value == pytest.approx(2.0, rel=1e-9)
    assert est2.ci_high - est2.ci_low > 0.1  # unpaired across languages: genuinely wider


def test_disparity_undefined_when_hr_does_not_degrade():
    df = planted({"en": -0.10, "de": 0.05, "he": 0.30, "sw": 0.45})
    est = stats.disparity(df, "q", n_boot=200)
    assert not est.defined and est.reason.startswith("denominator <= 0")
    assert math.isnan(est.value) and math.isnan(est.ci_low) and math.isnan(est.ci_high)
    assert stats.verdict(est, 1.0) == stats.INCONCLUSIVE
    diff = stats.disparity_difference(df, "q", n_boot=200)
    assert diff.defined and diff.value == pytest.approx(0.375 - (-0.025), rel=1e-9)
    ref = stats.disparity_vs_reference(df, "q", reference="en", n_boot=200)
    assert all(not e.defined and e.reason.startswith("denominator <= 0") for e in ref.values())


def test_disparity_unbounded_when_hr_interval_contains_zero():
    n = 20
    tok = np.full(n, 40)
    fp = tok * np.linspace(2.0, 3.0, n)
    hr_delta = np.array([0.3, -0.28] * 10) + 0.005  # mean 0.015 per token, huge spread
    rows = rows_for("fp", "en", fp, tok, 4 * tok) + rows_for("q", "en", fp + tok * hr_delta, tok, 4 * tok)
    rows += rows_for("fp", "he", fp, tok, 4 * tok) + rows_for("q", "he", fp + tok * 0.2, tok, 4 * tok)
    df = pd.DataFrame(rows)
    est = stats.disparity(df, "q", lr_langs=["he"], hr_langs=["en"], metric="delta_nll", n_boot=1000)
    assert not est.defined and est.reason.startswith("unbounded CI")
    assert est.value == pytest.approx(0.2 / 0.015, rel=1e-9)  # point estimate kept
    assert math.isnan(est.ci_low) and math.isnan(est.ci_high)
    assert stats.verdict(est, 1.0) == stats.INCONCLUSIVE
    assert stats.disparity_difference(df, "q", lr_langs=["he"], hr_langs=["en"], metric="delta_nll").defined


def test_disparity_undefined_on_non_finite_and_collapse():
    df = planted(DS)
    df.loc[(df["config"] == "fp") & (df["lang"] == "de") & (df["text_id"] == "t3"), "nll"] = np.nan
    for fn in (stats.disparity, stats.disparity_difference):
        est = fn(df, "q", n_boot=100)
        assert not est.defined and est.reason.startswith("non-finite") and "fp/de" in est.reason
        assert math.isnan(est.value)

    df = planted(DS)
    sel = (df["config"] == "q") & (df["lang"] == "sw")
    df.loc[sel, "nll"] = df.loc[sel, "n_bytes"] * 8.5 * LN2
    est = stats.disparity(df, "q", n_boot=100)
    assert not est.defined and est.reason.startswith("collapsed") and "q/sw" in est.reason
    assert math.isnan(est.value)
    assert stats.disparity(df, "q", n_boot=100, allow_collapsed=True).defined

    # PPL far above a uniform guess over a 1000-token vocabulary but below 8 bits per byte.
    df = planted(DS)
    sel = (df["config"] == "q") & (df["lang"] == "en")
    df.loc[sel, "nll"] = df.loc[sel, "n_tokens"] * math.log(5000.0)
    df.loc[(df["lang"] == "en"), "n_bytes"] = df.loc[(df["lang"] == "en"), "n_tokens"] * 6
    assert stats.disparity(df, "q", n_boot=100).defined
    est = stats.disparity(df, "q", n_boot=100, vocab_size=1000)
    assert not est.defined and "vocab_size" in est.reason


def test_reduction_planted_and_verdict():
    per = {
        "all_int4": {"en": 0.10, "de": 0.20, "he": 0.30, "sw": 0.45},  # ratio 2.5, diff 0.225
        "gateway": {"en": 0.10, "de": 0.20, "he": 0.20, "sw": 0.25},  # ratio 1.5, diff 0.075
    }
    df = planted(per["all_int4"], per_config=per)
    red = stats.reduction(df, "all_int4", "gateway", n_boot=300)
    assert red.defined and red.value == pytest.approx(40.0, rel=1e-9)
    assert red.ci_low == pytest.approx(40.0, rel=1e-9)
    assert stats.verdict(red, 30.0, ">") == stats.SUPPORTED
    red_d = stats.reduction(df, "all_int4", "gateway", measure="difference", n_boot=300)
    assert red_d.value == pytest.approx(100 * (0.225 - 0.075) / 0.225, rel=1e-9)
    with pytest.raises(ConfigError):
        stats.reduction(df, "gateway", "gateway")

    per_bad = {"all_int4": {"en": -0.1, "de": 0.05, "he": 0.3, "sw": 0.4}, "gateway": per["gateway"]}
    df = planted(per_bad["all_int4"], per_config=per_bad)
    red = stats.reduction(df, "all_int4", "gateway", n_boot=200)
    assert not red.defined and red.reason.startswith("denominator <= 0") and "all_int4" in red.reason
    assert stats.verdict(red, 30.0) == stats.INCONCLUSIVE


def test_reduction_ci_reflects_noise():
    rng = np.random.default_rng(11)
    n = 40
    rows = []
    for lang, (a, b) in {"en": (0.10, 0.10), "de": (0.12, 0.12), "he": (0.30, 0.15), "sw": (0.28, 0.16)}.items():
        tok = np.full(n, 30)
        fp = tok * rng.uniform(2, 3, n)
        rows += rows_for("fp", lang, fp, tok, 4 * tok)
        rows += rows_for("before", lang, fp + tok * (a + rng.normal(0, 0.03, n)), tok, 4 * tok)
        rows += rows_for("after", lang, fp + tok * (b + rng.normal(0, 0.03, n)), tok, 4 * tok)
    df = pd.DataFrame(rows)
    red = stats.reduction(df, "before", "after", metric="delta_nll", n_boot=1000)
    assert red.defined and red.ci_low < red.value < red.ci_high
    truth = 100 * ((0.29 / 0.11) - (0.155 / 0.11)) / (0.29 / 0.11)
    assert red.ci_low < truth < red.ci_high


# --------------------------------------------------------------------------- correlation


def test_correlation_matches_scipy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=30)
    y = 0.25 * x + rng.normal(size=30)
    for method, fn in (("pearson", sps.pearsonr), ("spearman", sps.spearmanr)):
        res = stats.correlation(x, y, method=method, n_boot=1000, n_perm=10000, seed=1)
        ref = fn(x, y)
        assert res["defined"] and res["n"] == 30 and res["method"] == method
        assert res["r"] == pytest.approx(float(ref.statistic), abs=1e-12)
        assert res["p_parametric"] == pytest.approx(float(ref.pvalue), rel=1e-9)
        assert 0.005 < ref.pvalue < 0.2  # a moderate effect, so the p-values are comparable
        assert res["p_perm"] == pytest.approx(float(ref.pvalue), abs=0.015)
        assert not res["perm_exact"]
        assert res["ci_low"] < res["r"] < res["ci_high"]


def test_correlation_perfect_and_exact_small_n():
    x = np.arange(12.0)
    res = stats.correlation(x, 3 * x + 1, n_perm=5000)
    assert res["r"] == pytest.approx(1.0) and res["p_perm"] == pytest.approx(1 / 5001)
    # n = 5: 120 permutations enumerated; only identity and reversal reach |r| = 1.
    res = stats.correlation([1, 2, 3, 4, 5], [2, 4, 6, 8, 10], n_perm=10000)
    assert res["perm_exact"] and res["p_perm"] == pytest.approx(2 / 120)
    res = stats.correlation([1, 2, 3, 4, 5], [5, 4, 3, 2, 1], method="spearman")
    assert res["r"] == pytest.approx(-1.0) and res["p_perm"] == pytest.approx(2 / 120)


def test_correlation_undefined_cases():
    r = stats.correlation([1.0, 2.0], [3.0, 4.0])
    assert not r["defined"] and r["reason"].startswith("too few") and math.isnan(r["r"])
    r = stats.correlation([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0])
    assert not r["defined"] and r["reason"].startswith("constant")
    r = stats.correlation([1.0, np.nan, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0])
    assert not r["defined"] and r["reason"].startswith("non-finite")
    assert stats.verdict(r, 0.7, abs_value=True) == stats.INCONCLUSIVE
    with pytest.raises(ConfigError):
        stats.correlation([1, 2, 3], [1, 2])


# --------------------------------------------------------------------------- verdict / Estimate


def test_verdict_outcomes_and_boundaries():
    E = lambda v, lo, hi: Estimate(v, lo, hi, 10)  # noqa: E731
    assert stats.verdict(E(35, 31, 40), 30, ">") == stats.SUPPORTED
    assert stats.verdict(E(25, 20, 29), 30, ">") == stats.NOT_SUPPORTED
    assert stats.verdict(E(31, 29, 33), 30, ">") == stats.INCONCLUSIVE
    assert stats.verdict(E(32, 30, 33), 30, ">") == stats.INCONCLUSIVE  # lower bound ON the threshold
    assert stats.verdict(E(29, 28, 30), 30, ">") == stats.NOT_SUPPORTED  # upper bound on it: not beyond
    assert stats.verdict(E(30, 30, 30), 30, ">") == stats.NOT_SUPPORTED
    assert stats.verdict(E(25, 20, 29), 30, "<") == stats.SUPPORTED
    assert stats.verdict(E(35, 30, 40), 30, "<") == stats.NOT_SUPPORTED
    assert stats.verdict(E(30, 29, 31), 30, "<") == stats.INCONCLUSIVE
    assert stats.verdict(Estimate.undefined("collapsed: x", 10), 30) == stats.INCONCLUSIVE
    assert stats.verdict(Estimate.undefined("unbounded CI: x", 10, value=99.0), 30) == stats.INCONCLUSIVE
    # |r| criteria
    assert stats.verdict(E(-0.9, -0.95, -0.8), 0.7, abs_value=True) == stats.SUPPORTED
    assert stats.verdict(E(-0.9, -0.95, -0.8), 0.7) == stats.NOT_SUPPORTED
    assert stats.verdict(E(0.1, -0.9, 0.9), 0.7, abs_value=True) == stats.INCONCLUSIVE
    assert stats.verdict(E(0.1, -0.5, 0.6), 0.7, abs_value=True) == stats.NOT_SUPPORTED
    assert stats.verdict({"r": 0.9, "ci_low": 0.75, "ci_high": 0.97, "defined": True}, 0.7, abs_value=True) == stats.SUPPORTED
    with pytest.raises(ConfigError):
        stats.verdict(E(1, 0, 2), 1, direction=">=")


def test_estimate_invariants():
    with pytest.raises(ConfigError):
        Estimate(math.nan, 0.0, 1.0, 5)
    with pytest.raises(ConfigError):
        Estimate(1.0, math.inf, 2.0, 5)
    with pytest.raises(ConfigError):
        Estimate(math.nan, math.nan, math.nan, 5, defined=False)
    e = Estimate.undefined("denominator <= 0: x", 5)
    assert math.isnan(e.value) and not e.defined
    assert set(e.to_dict()) == {"value", "ci_low", "ci_high", "n", "level", "defined", "reason"}


def test_disparity_contrast_synergy_by_hand():
    from qhelpers.stats.tables import disparity_contrast

    shifts = {  # nats per token added to the baseline's 1.0, per config and language
        "all": {"en": 0.10, "he": 0.30},
        "first": {"en": 0.05, "he": 0.10},
        "last": {"en": 0.08, "he": 0.20},
        "gateway": {"en": 0.04, "he": 0.04},
    }
    rows = []
    for lang in ("en", "he"):
        for i in range(3):
            rows.append(dict(config="fp", lang=lang, text_id=f"t{i}", nll=10.0, n_tokens=10, n_bytes=20))
            for config, by_lang in shifts.items():
                rows.append(dict(config=config, lang=lang, text_id=f"t{i}", nll=10.0 * (1 + by_lang[lang]), n_tokens=10, n_bytes=20))
    scores = pd.DataFrame(rows)
    d = {c: math.expm1(v["he"]) / math.expm1(v["en"]) for c, v in shifts.items()}
    expected = d["first"] + d["last"] - d["all"] - d["gateway"]
    est = disparity_contrast(scores, {"first": 1, "last": 1, "all": -1, "gateway": -1}, lr_langs=["he"], hr_langs=["en"], n_boot=200)
    assert est.defined
    assert est.value == pytest.approx(expected, rel=1e-12)
    assert est.ci_low == pytest.approx(expected, rel=1e-9) and est.ci_high == pytest.approx(expected, rel=1e-9)
    diff = disparity_contrast(scores, {"all": 1, "gateway": -1}, measure="difference", lr_langs=["he"], hr_langs=["en"], n_boot=200)
    expected_diff = (math.expm1(0.30) - math.expm1(0.10)) - (math.expm1(0.04) - math.expm1(0.04))
    assert diff.value == pytest.approx(expected_diff, rel=1e-12)


# --------------------------------------------------------------------------- interval methods


def one_language(x_bits, byt=None, seed=0, lang="xx", ids=None):
    """Scores of one language whose per-text Δ bits per byte are ``x_bits``."""
    rng = np.random.default_rng(seed)
    n = len(x_bits)
    byt = np.full(n, 200) if byt is None else np.asarray(byt)
    fp = byt * LN2 * rng.uniform(1.0, 2.0, n)
    ids = ids or [f"t{i:03d}" for i in range(n)]
    return pd.DataFrame(
        rows_for("fp", lang, fp, byt // 4, byt, ids) + rows_for("q", lang, fp + np.asarray(x_bits) * byt * LN2, byt // 4, byt, ids)
    )


def test_studentized_delta_bpb_equals_an_explicit_loop():
    """The vectorised influence algebra against a loop over the resamples that recomputes
    Δbpb and its delta-method standard error from the resampled texts themselves."""
    rng = np.random.default_rng(5)
    n, B = 12, 400
    byt = rng.integers(50, 400, n)
    df = one_language(rng.exponential(0.1, n), byt=byt, seed=1)
    fp = df[df.config == "fp"]["nll"].to_numpy()
    q = df[df.config == "q"]["nll"].to_numpy()
    tab = stats.language_table(df, n_boot=B, seed=3)

    def delta_bpb_and_se(sel):
        yq, yf, b = q[sel], fp[sel], byt[sel]
        theta = yq.sum() / LN2 / b.sum() - yf.sum() / LN2 / b.sum()
        d = ((yq - yq.sum() / b.sum() * b) - (yf - yf.sum() / b.sum() * b)) / LN2 / b.sum()
        return theta, math.sqrt((d**2).sum())

    theta, se = delta_bpb_and_se(np.arange(n))
    se *= math.sqrt(n / (n - 1))  # the point's standard error uses the unbiased variance
    t = []
    for row in stats.bootstrap_indices(n, B, np.random.default_rng(3)):
        th, s = delta_bpb_and_se(row)
        t.append((th - theta) / s)
    q_lo, q_hi = np.percentile(t, [2.5, 97.5])
    row = tab.iloc[0]
    assert row["delta_bpb"] == pytest.approx(theta, rel=1e-12)
    assert row["delta_bpb_ci_low"] == pytest.approx(theta - q_hi * se, rel=1e-9)
    assert row["delta_bpb_ci_high"] == pytest.approx(theta - q_lo * se, rel=1e-9)


def numeric_studentized(theta_of, counts_of, units, level=0.95, h=1e-6):
    """Studentized interval of ``theta_of(weights)`` with the influence values taken by
    central differences of the weights (independent of the analytic chain rule); the point's
    variance is the unbiased one (n / (n - 1) per group), the replicates' the plug-in one.
    ``units``: {group: n}; ``counts_of``: {group: (B, n)} resample counts."""
    def se_at(w, unbiased=False):
        var = 0.0
        for g, n in units.items():
            factor = n / (n - 1) if unbiased else 1.0
            for i in range(n):
                up = {k: v.copy() for k, v in w.items()}
                dn = {k: v.copy() for k, v in w.items()}
                up[g][i] += h
                dn[g][i] -= h
                d = (theta_of(up) - theta_of(dn)) / (2 * h)
                var += factor * w[g][i] * d * d
        return math.sqrt(var)

    ones = {g: np.ones(n) for g, n in units.items()}
    theta, se = theta_of(ones), se_at(ones, unbiased=True)
    B = next(iter(counts_of.values())).shape[0]
    t = []
    for b in range(B):
        w = {g: counts_of[g][b].copy() for g in units}
        t.append((theta_of(w) - theta) / se_at(w))
    q_lo, q_hi = np.percentile(t, [50 * (1 - level), 50 * (1 + level)])
    return theta, theta - q_hi * se, theta - q_lo * se


def test_studentized_disparity_and_reduction_match_numeric_derivatives():
    """Ratio disparity of degradations (exp, means over languages, a ratio) on independent
    languages, and the percent reduction of the Δbpb difference between two configs on a
    parallel corpus: intervals equal those from numerically differentiated statistics."""
    rng = np.random.default_rng(8)
    n, B = 8, 60
    langs = {"en": 0.05, "de": 0.08, "he": 0.20, "sw": 0.25}
    rows, data = [], {}
    for lang, shift in langs.items():
        tok = rng.integers(20, 60, n)
        byt = tok * 4
        fp = tok * rng.uniform(2.0, 3.0, n)
        a = fp + tok * rng.normal(shift, 0.05, n)
        b = fp + tok * rng.normal(shift * 0.5, 0.05, n)
        ids = [f"{lang}{i}" for i in range(n)]  # distinct ids: languages resampled independently
        rows += rows_for("fp", lang, fp, tok, byt, ids) + rows_for("a", lang, a, tok, byt, ids) + rows_for("b", lang, b, tok, byt, ids)
        data[lang] = (fp, a, b, tok, byt)
    df = pd.DataFrame(rows)
    lr, hr = ["he", "sw"], ["en", "de"]
    counts = stats.language_counts({lang: n for lang in langs}, B, seed=2, parallel=False)

    def degradation(w, lang, col):
        fp, a, b, tok, _ = data[lang]
        y = {"a": a, "b": b}[col]
        return math.expm1((w[lang] @ y) / (w[lang] @ tok) - (w[lang] @ fp) / (w[lang] @ tok))

    def disparity_of(w):
        return np.mean([degradation(w, g, "a") for g in lr]) / np.mean([degradation(w, g, "a") for g in hr])

    est = stats.disparity(df, "a", lr_langs=lr, hr_langs=hr, n_boot=B, seed=2)
    theta, lo, hi = numeric_studentized(disparity_of, counts, {lang: n for lang in langs})
    assert est.defined and est.value == pytest.approx(theta, rel=1e-12)
    assert (est.ci_low, est.ci_high) == pytest.approx((lo, hi), rel=1e-5)

    # parallel corpus: the same ids in every language, one shared resample
    par = df.copy()
    par["text_id"] = par["text_id"].str[2:]
    shared = stats.language_counts({"all": n}, B, seed=2, parallel=True)["all"]

    def diff_of(w, col):
        def dbpb(lang):
            fp, a, b, _, byt = data[lang]
            y = {"a": a, "b": b}[col]
            return (w["all"] @ y - w["all"] @ fp) / LN2 / (w["all"] @ byt)
        return np.mean([dbpb(g) for g in lr]) - np.mean([dbpb(g) for g in hr])

    def reduction_of(w):
        return 100 * (diff_of(w, "a") - diff_of(w, "b")) / diff_of(w, "a")

    red = stats.reduction(par, "a", "b", lr_langs=lr, hr_langs=hr, metric="delta_bpb", measure="difference", n_boot=B, seed=2)
    theta, lo, hi = numeric_studentized(reduction_of, {"all": shared}, {"all": n})
    assert red.defined and red.value == pytest.approx(theta, rel=1e-12)
    assert (red.ci_low, red.ci_high) == pytest.approx((lo, hi), rel=1e-5)


def test_bca_and_percentile_options_reproduce_scipy():
    """Same generator, same resamples: scipy.stats.bootstrap's BCa and percentile intervals of
    the mean per-text Δbpb equal language_table's (method="bca" / "percentile")."""
    rng = np.random.default_rng(11)
    x = rng.exponential(0.1, 25)
    df = one_language(x, seed=2)
    for method, scipy_method in (("bca", "BCa"), ("percentile", "percentile")):
        tab = stats.language_table(df, n_boot=3000, seed=4, method=method)
        ref = sps.bootstrap((x,), np.mean, method=scipy_method, n_resamples=3000, rng=np.random.default_rng(4))
        assert tab.attrs["interval_method"] == method
        assert tab.loc[0, "delta_bpb"] == pytest.approx(x.mean(), rel=1e-12)
        assert tab.loc[0, "delta_bpb_ci_low"] == pytest.approx(ref.confidence_interval.low, rel=1e-9)
        assert tab.loc[0, "delta_bpb_ci_high"] == pytest.approx(ref.confidence_interval.high, rel=1e-9)
    bca = stats.language_table(df, n_boot=3000, seed=4, method="bca").iloc[0]
    pct = stats.language_table(df, n_boot=3000, seed=4, method="percentile").iloc[0]
    assert bca["delta_bpb_ci_high"] > pct["delta_bpb_ci_high"]  # BCa moves right for right-skewed data
    with pytest.raises(ConfigError, match="interval method"):
        stats.language_table(df, method="basic")
    with pytest.raises(ConfigError, match="interval method"):
        stats.disparity_difference(df, "q", lr_langs=["xx"], hr_langs=["xx"], method="t")


def test_p_value_is_consistent_with_the_interval():
    """p < (1 - level)/2 iff the interval lies strictly beyond the threshold, for the
    studentized, percentile, transformed (ppl_ratio) and BCa (normal approximation) estimates."""
    rng = np.random.default_rng(3)
    x = rng.exponential(0.1, 30) - 0.02
    df = one_language(x, seed=4)
    eng = stats.PairedScores(df, "fp", None, None, 999, 0, 0.95)
    cases = [eng.metric_estimate("q", "xx", "delta_bpb"), eng.metric_estimate("q", "xx", "ppl_ratio")]
    eng_p = stats.PairedScores(df, "fp", None, None, 999, 0, 0.95, method="percentile")
    eng_b = stats.PairedScores(df, "fp", None, None, 999, 0, 0.95, method="bca")
    cases += [eng_p.metric_estimate("q", "xx", "delta_bpb"), eng_b.metric_estimate("q", "xx", "degradation")]
    assert cases[0].distribution.kind == "studentized" and cases[1].distribution.transform == "exp"
    assert cases[2].distribution.kind == "percentile" and cases[3].distribution is None
    for est in cases:
        span = est.ci_high - est.ci_low
        grid = np.linspace(est.ci_low - span, est.ci_high + span, 301)
        grid = np.concatenate([grid, [est.ci_low, est.ci_high]])
        for thr in grid:
            for direction in (">", "<"):
                p = est.p_value(thr, direction)
                assert 0.0 <= p <= 1.0
                verdict = stats.verdict(est, thr, direction)
                if abs(thr - est.ci_low) > 1e-12 * span and abs(thr - est.ci_high) > 1e-12 * span:
                    assert (p < 0.025) == (verdict == stats.SUPPORTED), (est, thr, direction, p)
        # monotone in the threshold; with a stored distribution p(>) + p(<) = 1
        ps = [est.p_value(t, ">") for t in grid[:301]]
        assert all(a <= b + 1e-12 for a, b in zip(ps, ps[1:]))
        mid = 0.5 * (est.ci_low + est.ci_high)
        if est.distribution is not None:
            assert est.p_value(mid, ">") + est.p_value(mid, "<") == pytest.approx(1.0, abs=1e-12)
    # the studentized p-value by hand: the share of t* at or beyond the observed t
    est, thr = cases[0], 0.07
    d = est.distribution
    t_obs = (d.theta - thr) / d.se
    assert est.p_value(thr, ">") == pytest.approx(np.mean(d.values >= t_obs), abs=1.5 / d.values.size)
    assert math.isnan(Estimate.undefined("collapsed: x", 10).p_value(0.0, ">"))
    with pytest.raises(ConfigError):
        est.p_value(0.0, ">=")


def test_p_value_from_interval_normal_approximation():
    # 95 % interval [1, 3] around 2: se = 1 / 1.959964 on each side
    z = sps.norm.ppf(0.975)
    assert stats.p_value_from_interval(2.0, 1.0, 3.0, 0.95, 0.0, ">") == pytest.approx(sps.norm.sf(2 * z), rel=1e-12)
    assert stats.p_value_from_interval(2.0, 1.0, 3.0, 0.95, 1.0, ">") == pytest.approx(0.025, rel=1e-12)
    assert stats.p_value_from_interval(2.0, 1.0, 3.0, 0.95, 3.0, "<") == pytest.approx(0.025, rel=1e-12)
    # asymmetric interval: the side facing the threshold sets the scale
    assert stats.p_value_from_interval(2.0, 1.5, 5.0, 0.95, 1.0, ">") == pytest.approx(sps.norm.sf(2 * z), rel=1e-12)
    assert stats.p_value_from_interval(2.0, 2.0, 2.0, 0.95, 1.0, ">") == 0.0
    assert stats.p_value_from_interval(2.0, 2.0, 2.0, 0.95, 2.5, ">") == 1.0
    assert math.isnan(stats.p_value_from_interval(math.nan, 1.0, 3.0, 0.95, 0.0, ">"))
    e = Estimate(2.0, 1.0, 3.0, 12)
    assert e.distribution is None and e.p_value(1.0, ">") == pytest.approx(0.025, rel=1e-12)
    # the distribution is neither shown, compared nor serialized
    df = one_language(np.random.default_rng(0).normal(0.1, 0.05, 15))
    est = stats.PairedScores(df, "fp", None, None, 200, 0, 0.95).metric_estimate("q", "xx", "delta_bpb")
    assert est.distribution is not None and "distribution" not in repr(est)
    assert "distribution" not in est.to_dict() and est == Estimate(est.value, est.ci_low, est.ci_high, est.n)


def test_delta_bits_per_paragraph_by_hand_and_parallel_only():
    # two languages, the same three paragraphs; bits added per paragraph by hand
    add = {"en": [2.0, 4.0, 3.0], "he": [5.0, 9.0, 7.0]}  # bits
    rows = []
    for lang, bits in add.items():
        fp = [30.0, 40.0, 35.0]
        byt = [100, 150, 120] if lang == "en" else [180, 260, 220]  # Hebrew: more bytes, same content
        rows += rows_for("fp", lang, fp, [10, 12, 11], byt)
        rows += rows_for("q", lang, [f + b * LN2 for f, b in zip(fp, bits)], [10, 12, 11], byt)
    df = pd.DataFrame(rows)
    tab = stats.language_table(df, n_boot=300, method="percentile").set_index("lang")
    assert tab.loc["en", "delta_bits_per_paragraph"] == pytest.approx(3.0, rel=1e-12)
    assert tab.loc["he", "delta_bits_per_paragraph"] == pytest.approx(7.0, rel=1e-12)
    assert tab.loc["he", "delta_bpb"] == pytest.approx(21.0 / 660, rel=1e-12)
    d = stats.disparity(df, "q", lr_langs=["he"], hr_langs=["en"], metric="delta_bits_per_paragraph", n_boot=300, method="percentile")
    assert d.value == pytest.approx(7.0 / 3.0, rel=1e-12)
    dd = stats.disparity_difference(df, "q", lr_langs=["he"], hr_langs=["en"], metric="delta_bits_per_paragraph", n_boot=300, method="percentile")
    assert dd.value == pytest.approx(4.0, rel=1e-12)
    # paragraph 2 (index 1) adds the most in both languages: on a parallel corpus the shared
    # resample keeps the he - en difference within its per-paragraph range [3, 5]
    assert 3.0 - 1e-9 <= dd.ci_low <= dd.ci_high <= 5.0 + 1e-9
    ref = stats.disparity_vs_reference(df, "q", reference="en", metric="delta_bits_per_paragraph", n_boot=300, method="percentile")
    assert ref["he"].value == pytest.approx(7.0 / 3.0, rel=1e-12)

    # not parallel: NaN with a note in the table, ConfigError naming delta_bpb elsewhere
    other = df.copy()
    other.loc[other["lang"] == "he", "text_id"] = "he_" + other.loc[other["lang"] == "he", "text_id"]
    tab = stats.language_table(other, n_boot=300, method="percentile")
    assert tab["delta_bits_per_paragraph"].isna().all() and tab["delta_bits_per_paragraph_ci_low"].isna().all()
    assert tab["note"].str.contains("not a parallel corpus").all() and tab["delta_bpb"].notna().all()
    for fn in (stats.disparity, stats.disparity_difference):
        with pytest.raises(ConfigError, match="delta_bpb"):
            fn(other, "q", lr_langs=["he"], hr_langs=["en"], metric="delta_bits_per_paragraph")
    with pytest.raises(ConfigError, match="parallel corpus"):
        stats.disparity_vs_reference(other, "q", reference="en", metric="delta_bits_per_paragraph")
    assert "delta_bits_per_paragraph" in stats.METRICS


def test_small_n_intervals_are_unbounded_with_the_point_kept():
    """n = 3: the studentized interval is unbounded (a resample of one repeated text has
    standard error 0); the estimate is undefined with the observed value kept. n = 1: too few."""
    df = hand_table()
    expected = 15 / LN2 / 125 - 5 / LN2 / 60  # he Δbpb - en Δbpb, by hand
    for est in (
        stats.disparity_difference(df, "q", lr_langs=["he"], hr_langs=["en"], metric="delta_bpb", n_boot=300),
        stats.disparity_contrast(df, {"q": 1.0}, lr_langs=["he"], hr_langs=["en"], metric="delta_bpb",
                                 measure="difference", n_boot=300),
    ):
        assert not est.defined and est.reason.startswith("unbounded CI"), est.reason
        assert est.value == pytest.approx(expected, rel=1e-12) and math.isnan(est.ci_low)
        assert stats.verdict(est, 0.0) == stats.INCONCLUSIVE and math.isnan(est.p_value(0.0, ">"))
    assert stats.disparity_difference(df, "q", lr_langs=["he"], hr_langs=["en"], metric="delta_bpb",
                                      method="percentile", n_boot=300).defined
    one = df[df["text_id"] == "t0"]
    est = stats.disparity_difference(one, "q", lr_langs=["he"], hr_langs=["en"], metric="delta_bpb", n_boot=50)
    assert not est.defined and est.reason.startswith("too few") and est.value == pytest.approx(6 / LN2 / 40 - 1 / LN2 / 20)

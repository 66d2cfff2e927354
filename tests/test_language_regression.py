"""Tests of qhelpers.experiments.language_regression against hand-computed values, statsmodels,
and a planted slope; plus one end-to-end run on a tiny model."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from qhelpers.experiments import language_regression as lr
from qhelpers.util.errors import ConfigError, MeasurementError

sm = pytest.importorskip("statsmodels.api")
LN2 = math.log(2.0)


def scores_frame(rows):
    return pd.DataFrame(rows, columns=["config", "lang", "text_id", "nll", "n_tokens", "n_bytes"])


# ---------------------------------------------------------------------------- texts
def test_select_paragraphs_shortest_first_random():
    from qhelpers.text.corpora import Corpus, load_corpus

    c = Corpus.from_texts("p", {"en": ["aaaa", "a", "aaa", "aa"], "he": ["שש", "ש", "ששששש", "ש"]}, parallel=True)
    # bytes per id over both languages: t0 4+4, t1 1+2, t2 3+10, t3 2+2 -> shortest two: t1, t3 (corpus order)
    assert lr.select_paragraphs(c, 2, "shortest").ids["en"] == ("t1", "t3")
    assert lr.select_paragraphs(c, 2, "first").ids["he"] == ("t0", "t1")
    assert lr.select_paragraphs(c, None, "shortest") == c
    udhr = load_corpus("udhr", langs=["en", "de"])
    assert lr.select_paragraphs(udhr, 1, "shortest").texts["en"] == ("Everyone has the right to a nationality.",)
    assert lr.select_paragraphs(udhr, 3, "random", seed=4) == udhr.select(n_texts=3, sample="random", seed=4)
    with pytest.raises(ConfigError, match="must be one of"):
        lr.select_paragraphs(c, 2, "longest")
    with pytest.raises(ConfigError, match="not parallel"):
        lr.select_paragraphs(Corpus.from_texts("x", {"en": ["a"]}), 1)


# ---------------------------------------------------------------------------- measures
def test_per_text_table_and_measures_by_hand():
    scores = scores_frame([
        ("fp", "en", "a", 10 * LN2, 5, 20), ("fp", "en", "b", 30 * LN2, 10, 60),
        ("q", "en", "a", 14 * LN2, 5, 20), ("q", "en", "b", 36 * LN2, 10, 60),
        ("fp", "he", "a", 40 * LN2, 20, 40), ("fp", "he", "b", 20 * LN2, 20, 40),
        ("q", "he", "a", 41 * LN2, 20, 40), ("q", "he", "b", 21 * LN2, 20, 40),
    ])
    per_text = lr.per_text_table(scores, "q", baseline="fp", parallel=True)
    assert list(per_text.columns) == ["lang", "text_id", "nll_fp", "nll_q", "n_bytes", "n_tokens"]
    assert per_text.attrs["parallel"]
    m = lr.language_measures(per_text).set_index("lang")
    # en: 40 bits over 80 bytes baseline, 50 bits quantized; 15 tokens; 2 paragraphs
    assert m.loc["en", "bpb_fp"] == pytest.approx(0.5)
    assert m.loc["en", "delta_bpb"] == pytest.approx(10 / 80)
    assert m.loc["en", "delta_bits_per_paragraph"] == pytest.approx(5.0)
    assert m.loc["en", "bits_per_paragraph_fp"] == pytest.approx(20.0)
    assert m.loc["en", "bytes_per_token"] == pytest.approx(80 / 15)
    assert m.loc["he", "bpb_fp"] == pytest.approx(60 / 80) and m.loc["he", "delta_bits_per_paragraph"] == pytest.approx(1.0)
    assert m.loc["he", "log2_bytes_per_token"] == pytest.approx(1.0)


def test_per_text_table_errors():
    base = [("fp", "en", "a", 1.0, 1, 1), ("q", "en", "a", 1.0, 1, 1), ("fp", "he", "b", 1.0, 1, 1), ("q", "he", "b", 1.0, 1, 1)]
    with pytest.raises(ConfigError, match="config 'int4' is not in the scores"):
        lr.per_text_table(scores_frame(base), "int4")
    with pytest.raises(ConfigError, match="parallel corpus"):
        lr.per_text_table(scores_frame(base), "q", parallel=True)
    assert not lr.per_text_table(scores_frame(base), "q").attrs["parallel"]
    with pytest.raises(MeasurementError, match="different texts"):
        lr.per_text_table(scores_frame(base[:3]), "q")


def test_measures_agree_with_the_stats_language_table():
    """Per-language bits per byte and Δ bits per paragraph equal qhelpers.stats' own tables."""
    from qhelpers import stats

    rng = np.random.default_rng(0)
    rows = []
    for lang in ("en", "de", "he"):
        for t in range(6):
            nll, tok, nb = rng.uniform(50, 100), int(rng.integers(10, 30)), int(rng.integers(60, 200))
            rows += [("fp", lang, f"t{t}", nll, tok, nb), ("int4", lang, f"t{t}", nll * rng.uniform(1.0, 1.3), tok, nb)]
    scores = scores_frame(rows)
    m = lr.language_measures(lr.per_text_table(scores, "int4")).set_index("lang")
    table = stats.language_table(scores, baseline="fp", n_boot=50).set_index("lang")
    for lang in ("en", "de", "he"):
        assert m.loc[lang, "bpb_fp"] == pytest.approx(table.loc[lang, "bpb_fp"], rel=1e-12)
        assert m.loc[lang, "delta_bpb"] == pytest.approx(table.loc[lang, "delta_bpb"], rel=1e-12)
        if "delta_bits_per_paragraph" in table.columns:
            assert m.loc[lang, "delta_bits_per_paragraph"] == pytest.approx(table.loc[lang, "delta_bits_per_paragraph"], rel=1e-10)


# ---------------------------------------------------------------------------- regression
def planted(n_langs: int = 40, n_texts: int = 10, slope: float = 0.3, seed: int = 0, base: float = 50.0):
    """Texts whose damage (bits per paragraph) is mean_damage * (1 + slope * (bpb - mean bpb)) up to
    per-language and per-text noise: a relative slope of ``slope`` per bit per byte."""
    rng = np.random.default_rng(seed)
    langs = [f"l{i:02d}" for i in range(n_langs)]
    bpb = rng.uniform(1.0, 4.0, n_langs)
    bpc = rng.choice([1.0, 1.8, 2.9], n_langs)
    rows = []
    for i, lang in enumerate(langs):
        u = rng.normal(scale=0.05)
        for t in range(n_texts):
            n_bytes = int(rng.integers(150, 250))
            nll_fp_bits = bpb[i] * n_bytes * rng.normal(1.0, 0.02)
            damage_bits = base * (1 + slope * (bpb[i] - 2.5) + u) + rng.normal(scale=5.0)
            n_tokens = int(n_bytes / (2.0 + bpc[i]))
            rows += [("fp", lang, f"p{t}", nll_fp_bits * LN2, n_tokens, n_bytes),
                     ("int4", lang, f"p{t}", (nll_fp_bits + damage_bits) * LN2, n_tokens, n_bytes)]
    covariates = pd.DataFrame({"lang": langs, "joshi_class": rng.integers(0, 6, n_langs).astype(float),
                               "utf8_bytes_per_char": bpc, "script_bytes": np.round(bpc).astype(int)})
    return lr.per_text_table(scores_frame(rows), "int4", parallel=True), covariates


def test_regression_recovers_a_planted_slope_and_matches_statsmodels():
    per_text, cov = planted(slope=0.3)
    spec = lr.RegressionSpec("delta_bits_per_paragraph", "bpb_fp", ("utf8_bytes_per_char",), relative=True)
    fit = lr.fit_language_regression(per_text, cov, spec, n_boot=400, seed=1)
    assert fit.slope.defined and fit.slope.n == 40
    assert fit.slope.ci_low < 0.3 < fit.slope.ci_high
    assert fit.slope.ci_low > 0.15  # a clear effect is detected
    # independent point estimate: statsmodels on a per-language table built with pandas
    g = per_text.groupby("lang", sort=False)
    table = pd.DataFrame({
        "bpb": g["nll_fp"].sum() / LN2 / g["n_bytes"].sum(),
        "dmg": (g["nll_q"].sum() - g["nll_fp"].sum()) / LN2 / g.size(),
    }).join(cov.set_index("lang"))
    y = table["dmg"] / table["dmg"].mean()
    ref = sm.OLS(y.to_numpy(), sm.add_constant(table[["bpb", "utf8_bytes_per_char"]].to_numpy())).fit()
    assert fit.slope.value == pytest.approx(ref.params[1], rel=1e-9)
    assert fit.coefficients["value"].to_numpy() == pytest.approx(ref.params, rel=1e-9)
    assert fit.r_squared == pytest.approx(ref.rsquared, rel=1e-9)
    # absolute (not relative) slope is the relative one times the mean damage
    abs_fit = lr.fit_language_regression(per_text, cov, lr.RegressionSpec("delta_bits_per_paragraph", "bpb_fp",
                                                                         ("utf8_bytes_per_char",), relative=False), n_boot=50)
    assert abs_fit.slope.value == pytest.approx(fit.slope.value * fit.response_mean, rel=1e-9)


def test_relative_slope_needs_clearly_positive_average_damage():
    # no damage at all (per-text noise around 0): a slope relative to the mean damage is undefined,
    # the absolute slope is not, and the mean damage's interval covers 0
    per_text, cov = planted(base=0.0, seed=4)
    fit = lr.fit_language_regression(per_text, cov, lr.RegressionSpec(controls=()), n_boot=400, seed=2)
    assert not fit.slope.defined and fit.slope.reason.startswith("no scale")
    assert fit.mean_damage.ci_low < 0.0 < fit.mean_damage.ci_high
    dmg = (per_text["nll_q"] - per_text["nll_fp"]).groupby(per_text["lang"], sort=False).mean() / LN2
    assert fit.mean_damage.value == pytest.approx(dmg.mean(), rel=1e-9)
    absolute = lr.fit_language_regression(per_text, cov, lr.RegressionSpec(controls=(), relative=False), n_boot=400, seed=2)
    assert absolute.slope.defined and absolute.slope.ci_low < 0.0 < absolute.slope.ci_high
    # clear damage: defined, and the mean damage's interval is above 0
    per_text, cov = planted(base=50.0, seed=4)
    fit = lr.fit_language_regression(per_text, cov, lr.RegressionSpec(controls=()), n_boot=400, seed=2)
    assert fit.slope.defined and fit.mean_damage.ci_low > 0.0
    assert fit.to_dict()["mean_damage"]["value"] == pytest.approx(fit.response_mean, rel=1e-12)


def test_no_effect_gives_an_interval_around_zero():
    per_text, cov = planted(slope=0.0, seed=3)
    fit = lr.fit_language_regression(per_text, cov, lr.RegressionSpec(controls=()), n_boot=400, seed=2)
    assert fit.slope.ci_low < 0.0 < fit.slope.ci_high


def test_missing_covariates_are_dropped_and_named_and_too_few_is_undefined():
    per_text, cov = planted(n_langs=12)
    cov.loc[[0, 3], "joshi_class"] = np.nan
    fit = lr.fit_language_regression(per_text, cov, lr.RegressionSpec(predictor="joshi_class", controls=()), n_boot=100)
    assert fit.dropped == ("l00", "l03") and len(fit.languages) == 10 and "dropped" in fit.notes[0]
    tiny = lr.fit_language_regression(per_text[per_text.lang.isin(["l01", "l02", "l04"])], cov,
                                      lr.RegressionSpec(controls=()), n_boot=50)
    assert not tiny.slope.defined and tiny.slope.reason.startswith("too few")


def test_spec_validation():
    with pytest.raises(ConfigError, match="response must be"):
        lr.RegressionSpec(response="ppl")
    with pytest.raises(ConfigError, match="unknown predictor"):
        lr.RegressionSpec(predictor="speakers")
    with pytest.raises(ConfigError, match="repeat"):
        lr.RegressionSpec(predictor="bpb_fp", controls=("bpb_fp",))
    assert lr.RegressionSpec().describe() == "delta_bits_per_paragraph / mean ~ bpb_fp | utf8_bytes_per_char, log2_bytes_per_token"
    per_text, cov = planted(n_langs=10)
    per_text.attrs["parallel"] = False
    with pytest.raises(ConfigError, match="parallel corpus"):
        lr.fit_language_regression(per_text, cov, lr.RegressionSpec(), n_boot=10)


def test_damage_plot_draws_every_language(tmp_path):
    per_text, cov = planted(n_langs=15)
    measures = lr.language_measures(per_text, cov)
    fit = lr.fit_language_regression(per_text, cov, lr.RegressionSpec(controls=()), n_boot=50)
    fig = lr.damage_plot(measures, fit=fit)
    ax = fig.axes[0]
    assert {t.get_text() for t in ax.texts} == set(measures["lang"])
    assert len(ax.lines) == 1  # the fitted slope
    with pytest.raises(ConfigError, match="needs column"):
        lr.damage_plot(measures, x="speakers")


# ---------------------------------------------------------------------------- end to end
def test_end_to_end_on_a_tiny_model():
    from qhelpers.measure.scoring import MeasureConfig
    from qhelpers.measure.sweep import run_sweep
    from qhelpers.models.loading import load_model
    from qhelpers.quant import strategies
    from qhelpers.quant.engine import Variant
    from qhelpers.text.corpora import language_covariates, load_corpus

    langs = ["en", "de", "zh", "ar", "he", "sw", "ru", "hi", "ja", "am"]
    loaded = load_model("tiny:gpt2")
    corpus = load_corpus("udhr", langs=langs, n_texts=2)
    quant, scope = strategies.protocol_settings("sound", 4)
    kwargs = {"damage": False} if "damage" in MeasureConfig.__dataclass_fields__ else {}
    sweep = run_sweep(loaded, corpus, {"int4": Variant("int4", quant, scope=scope)},
                      MeasureConfig(max_length=64, truncate=True, **kwargs), progress=False)
    per_text = lr.per_text_table(sweep.scores, "int4", parallel=True)
    fit = lr.fit_language_regression(per_text, language_covariates(langs), lr.RegressionSpec(controls=(), relative=False),
                                     n_boot=50)
    assert fit.languages == tuple(langs) and fit.slope.n == 10 and math.isfinite(fit.slope.value)
    # a random tiny model has no systematic damage: the relative slope is undefined for want of a scale
    relative = lr.fit_language_regression(per_text, language_covariates(langs), lr.RegressionSpec(controls=()), n_boot=50)
    assert relative.mean_damage.ci_low < 0.0 < relative.mean_damage.ci_high
    assert not relative.slope.defined and "no scale" in relative.slope.reason

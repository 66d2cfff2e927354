"""Tests of qhelpers.experiments.kurtosis (EXP-003): known answers computed by hand or by a direct route."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from qhelpers import stats
from qhelpers.experiments import kurtosis as K
from qhelpers.measure.activations import capture_residual
from qhelpers.measure.scoring import MeasureConfig
from qhelpers.text.corpora import Corpus
from qhelpers.text.encoding import encode_text
from qhelpers.util.errors import ConfigError

LN2 = math.log(2.0)


def _corpus() -> Corpus:
    # texts of clearly different lengths, so batching pads
    return Corpus.from_texts(
        "t",
        {
            "en": ["All human beings are born free and equal in dignity and rights.", "Hello world.",
                   "Everyone has the right to life, liberty and security of person, and to a fair trial."],
            "he": ["כל בני האדם נולדו בני חורין ושווים בערכם ובזכויותיהם.", "שלום עולם.",
                   "לכל אדם הזכות לחיים, לחירות ולבטחון אישי."],
        },
        parallel=True,
    )


# --------------------------------------------------------------------------- outliers, k_eff


def test_outlier_layers_follow_the_seed_rule():
    values = pd.Series([0.0] * 9 + [10.0], index=range(10))
    out = K.outlier_layers(values)
    # mean 1, population sd 3 -> threshold 7
    assert out["mean"] == pytest.approx(1.0)
    assert out["sd"] == pytest.approx(3.0)
    assert out["threshold"] == pytest.approx(7.0)
    assert out["layers"] == [9]
    assert K.outlier_layers({0: 1.0, 1: 1.0, 2: float("nan")})["layers"] == []


def _magnitudes() -> pd.DataFrame:
    rows = []
    for text, mags, n in (("A", [1.0, 1.0, 2.0], 10), ("B", [2.0, 1.0, 1.0], 30)):
        for layer, m in enumerate(mags):
            rows.append({"lang": "xx", "text_id": text, "layer": layer, "mean_abs": m, "n_tokens": n})
    return pd.DataFrame(rows)


def test_effective_kurtosis_is_the_hand_computed_weighted_average():
    kappa = pd.Series({0: 1.0, 1: 2.0, 2: 10.0})
    per_text = K.effective_kurtosis(kappa, _magnitudes()).set_index("text_id")["k_eff"]
    # A: a = [.25, .25, .5] -> .25 + .5 + 5 ; B: a = [.5, .25, .25] -> .5 + .5 + 2.5
    assert per_text["A"] == pytest.approx(5.75)
    assert per_text["B"] == pytest.approx(3.5)
    per_lang = K.effective_kurtosis(kappa, _magnitudes(), by="lang")
    # token-weighted m = (10 * [1, 1, 2] + 30 * [2, 1, 1]) / 40 = [1.75, 1, 1.25] -> a = m / 4
    assert per_lang["k_eff"].iloc[0] == pytest.approx(1.75 / 4 * 1 + 1 / 4 * 2 + 1.25 / 4 * 10)
    assert per_lang["n_texts"].iloc[0] == 2
    weights = K.activation_weights(_magnitudes())
    assert weights.groupby("text_id")["weight"].sum().to_numpy() == pytest.approx([1.0, 1.0])


def test_effective_kurtosis_missing_layer_is_an_error_and_nan_kurtosis_gives_nan():
    with pytest.raises(ConfigError, match="no value for layers \\[2\\]"):
        K.effective_kurtosis({0: 1.0, 1: 2.0}, _magnitudes())
    out = K.effective_kurtosis({0: 1.0, 1: float("nan"), 2: 3.0}, _magnitudes())
    assert out["k_eff"].isna().all()


# --------------------------------------------------------------------------- activations


def _direct(lm, text: str, skip_bos: bool = True) -> dict[int, float]:
    ids = encode_text(lm.tokenizer, text)
    acts = capture_residual(lm.model, torch.tensor([ids]))
    bos = lm.tokenizer.bos_token_id if lm.tokenizer.bos_token_id is not None else lm.tokenizer.eos_token_id
    start = 1 if (skip_bos and ids[0] == bos) else 0
    return {layer: float(h[0, start:].double().abs().mean()) for layer, h in acts.items()}


@pytest.mark.parametrize("arch", ["llama", "bloom"])  # RoPE and ALiBi under padding
def test_layer_activation_magnitudes_equal_a_direct_capture_and_ignore_padding(tiny_model, arch):
    lm = tiny_model(arch)
    corpus = _corpus()
    batched = K.layer_activation_magnitudes(lm, corpus, max_length=512)
    single = K.layer_activation_magnitudes(lm, corpus, max_length=512, batch_tokens=1)  # one text per batch
    assert list(batched.columns) == ["lang", "text_id", "layer", "mean_abs", "n_tokens", "truncated"]
    assert len(batched) == len(corpus) * lm.n_layers
    np.testing.assert_allclose(batched["mean_abs"], single["mean_abs"], rtol=1e-5)
    for lang, text_id, text in corpus.items():
        want = _direct(lm, text)
        got = batched[(batched.lang == lang) & (batched.text_id == text_id)].set_index("layer")["mean_abs"]
        np.testing.assert_allclose(got.to_numpy(), [want[i] for i in got.index], rtol=1e-5)
        n_ids = len(encode_text(lm.tokenizer, text))
        assert set(batched[(batched.lang == lang) & (batched.text_id == text_id)]["n_tokens"]) == {n_ids - 1}


def test_layer_activation_magnitudes_keep_bos_and_truncate_on_request(tiny_model):
    lm = tiny_model("llama")
    corpus = _corpus().select(langs=["en"], n_texts=1)
    text = corpus.texts["en"][0]
    with_bos = K.layer_activation_magnitudes(lm, corpus, skip_bos=False).set_index("layer")["mean_abs"]
    want = _direct(lm, text, skip_bos=False)
    np.testing.assert_allclose(with_bos.to_numpy(), [want[i] for i in with_bos.index], rtol=1e-5)
    cut = K.layer_activation_magnitudes(lm, corpus, max_length=5)
    assert cut["truncated"].all() and set(cut["n_tokens"]) == {4}


# --------------------------------------------------------------------------- per-text changes, contrasts


def _scores() -> pd.DataFrame:
    rows = []
    # per text: (lang, text_id, n_tokens, n_bytes, nll_fp, nll_a, nll_b)
    data = [
        ("en", "t0", 10, 40, 20.0, 22.0, 21.0),
        ("en", "t1", 20, 80, 40.0, 46.0, 42.0),
        ("he", "t0", 30, 60, 60.0, 63.0, 61.0),
        ("he", "t1", 10, 20, 25.0, 26.0, 25.5),
    ]
    for lang, tid, tok, byt, fp, a, b in data:
        for cfg, nll in (("fp", fp), ("a", a), ("b", b)):
            rows.append({"config": cfg, "lang": lang, "text_id": tid, "nll": nll, "n_tokens": tok, "n_bytes": byt})
    return pd.DataFrame(rows)


def test_text_changes_by_hand():
    out = K.text_changes(_scores(), "a").set_index(["lang", "text_id"])
    row = out.loc[("en", "t1")]
    assert row["delta_nll"] == pytest.approx(6.0 / 20)
    assert row["degradation"] == pytest.approx(math.exp(46 / 20) / math.exp(40 / 20) - 1)
    assert row["delta_bpb"] == pytest.approx(6.0 / LN2 / 80)
    assert row["ppl_fp"] == pytest.approx(math.exp(2.0))


def test_config_difference_by_hand():
    # two texts per language: a studentized interval is unbounded (resamples that repeat one text have
    # no spread), so the interval checks here use percentile intervals; the default is tested below
    est = K.config_difference(_scores(), "a", "b", n_boot=500, method="percentile")
    # per language: delta_bpb(a) - delta_bpb(b) = (sum nll_a - sum nll_b) / ln2 / sum bytes
    en = (68.0 - 63.0) / LN2 / 120
    he = (89.0 - 86.5) / LN2 / 80
    assert est.value == pytest.approx((en + he) / 2)
    assert est.defined and est.ci_low <= est.value <= est.ci_high
    assert est.n == 2
    flipped = K.config_difference(_scores(), "b", "a", n_boot=500, method="percentile")
    assert flipped.value == pytest.approx(-est.value)
    assert flipped.ci_low == pytest.approx(-est.ci_high) and flipped.ci_high == pytest.approx(-est.ci_low)
    # degradation metric: mean over languages of expm1(dnll_a) - expm1(dnll_b)
    deg = K.config_difference(_scores(), "a", "b", metric="degradation", n_boot=50)
    want = np.mean([math.expm1(68 / 30 - 60 / 30) - math.expm1(63 / 30 - 60 / 30),
                    math.expm1(89 / 40 - 85 / 40) - math.expm1(86.5 / 40 - 85 / 40)])
    assert deg.value == pytest.approx(want)


def test_config_difference_ci_collapses_when_every_text_agrees():
    s = _scores()
    # make nll_a - nll_b proportional to the bytes of each text: every resample gives the same value
    b = s[s.config == "b"].copy()
    a = b.assign(config="a", nll=b["nll"] + 0.01 * b["n_bytes"])
    s = pd.concat([s[s.config == "fp"], a, b], ignore_index=True)
    est = K.config_difference(s, "a", "b", n_boot=300)
    assert est.value == pytest.approx(0.01 / LN2)
    assert est.ci_low == pytest.approx(0.01 / LN2) and est.ci_high == pytest.approx(0.01 / LN2)


def test_config_difference_is_undefined_for_a_collapsed_model():
    s = _scores()
    s.loc[s.config == "a", "nll"] *= 100  # > 8 bits per byte
    est = K.config_difference(s, "a", "b", n_boot=50)
    assert not est.defined and est.reason.startswith("collapsed")
    assert K.config_difference(s, "a", "b", n_boot=50, allow_collapsed=True, method="percentile").defined


def test_config_difference_uses_the_stats_interval_of_the_paired_difference():
    """The default interval is the stats layer's (studentized, issue 11), not a percentile interval of
    the replicates: it equals stats.stat_estimate of the paired mean-over-languages difference."""
    rng = np.random.default_rng(3)
    rows = []
    for lang in ("en", "he"):
        for t in range(12):
            base = rng.uniform(50, 80)
            for config, extra in (("fp", 0.0), ("a", rng.uniform(4, 6)), ("b", rng.uniform(1, 3))):
                rows.append({"config": config, "lang": lang, "text_id": f"t{t}", "nll": base + extra, "n_tokens": 30, "n_bytes": 100})
    s = pd.DataFrame(rows)
    est = K.config_difference(s, "a", "b", n_boot=400, seed=1)
    eng = stats.PairedScores(s, "fp", ["a", "b"], ["en", "he"], 400, 1, 0.95)
    ref = stats.stat_estimate(eng.group_stat("a", ["en", "he"], "delta_bpb") - eng.group_stat("b", ["en", "he"], "delta_bpb"), 12)
    assert est.defined and (est.value, est.ci_low, est.ci_high) == pytest.approx((ref.value, ref.ci_low, ref.ci_high), abs=1e-12)
    pct = K.config_difference(s, "a", "b", n_boot=400, seed=1, method="percentile")
    assert pct.value == pytest.approx(est.value) and (pct.ci_low, pct.ci_high) != pytest.approx((est.ci_low, est.ci_high))


def test_correlation_table_rows_feed_hypotheses():
    from qhelpers.report.results import Hypothesis

    k = np.arange(1, 13, dtype=float)  # 12 languages: enough units for a verdict (stats.verdicts.MIN_UNITS = 10)
    frame = pd.DataFrame({"lang": [f"l{i}" for i in range(12)], "k_eff": k, "degradation": 2 * k, "delta_bpb": 13 - k})
    table = K.correlation_table({"languages": frame}, n_boot=200)
    assert len(table) == 4
    assert table["r"].to_numpy() == pytest.approx([1.0, 1.0, -1.0, -1.0])
    row = table[(table.y == "delta_bpb") & (table.method == "pearson")].iloc[0].to_dict()
    h = Hypothesis.evaluate("H", "x", row, 0.7, abs_value=True)
    assert h.verdict == "SUPPORTED" and h.n == 12
    few = K.correlation_table({"languages": frame.head(5)}, n_boot=200)
    row5 = few[(few.y == "delta_bpb") & (few.method == "pearson")].iloc[0].to_dict()
    h5 = Hypothesis.evaluate("H", "x", row5, 0.7, abs_value=True)
    assert h5.verdict == "INCONCLUSIVE" and h5.n == 5 and "too few" in h5.notes  # 5 languages decide nothing


# --------------------------------------------------------------------------- NF4 paths


def test_choose_nf4_path(monkeypatch):
    assert K.choose_nf4_path("simulated")[0] == "simulated"
    with pytest.raises(ConfigError):
        K.choose_nf4_path("gpu")
    import qhelpers.quant.bnb as qbnb

    monkeypatch.setattr(qbnb, "bnb_available", lambda device=None: (False, "no kernel"))
    path, reason = K.choose_nf4_path("auto", "cpu")
    assert path == "simulated" and "no kernel" in reason
    with pytest.raises(ConfigError, match="no kernel"):
        K.choose_nf4_path("bitsandbytes", "cpu")
    monkeypatch.setattr(qbnb, "bnb_available", lambda device=None: (True, "bitsandbytes 0.50.2 on cpu"))
    assert K.choose_nf4_path("auto", "cpu", torch.float32)[0] == "bitsandbytes"
    path, reason = K.choose_nf4_path("auto", "cpu", torch.float64)  # bitsandbytes has no float64 kernels
    assert path == "simulated" and "torch.float64" in reason
    with pytest.raises(ConfigError, match="torch.float64"):
        K.choose_nf4_path("bitsandbytes", "cpu", torch.float64)
    with pytest.raises(ConfigError, match="not torch.float64.*dtype='fp32'"):
        qbnb.load_bnb_model("/nonexistent", "nf4", compute_dtype=torch.float64)


def test_real_bitsandbytes_nf4_scores_equal_the_simulation(tiny_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    from qhelpers.quant.bnb import bnb_available

    ok, why = bnb_available("cpu")
    if not ok:
        pytest.skip(why)
    lm = tiny_model("llama")
    corpus = _corpus()
    measure = MeasureConfig(max_length=64)
    real = K.run_nf4(lm, corpus, measure, "bitsandbytes", workdir=tmp_path / "m")
    sim = K.run_nf4(lm, corpus, measure, "simulated")
    assert real.path == "bitsandbytes" and sim.path == "simulated"
    assert "scope_note" not in real.info  # same 4 x 7 linear modules on both paths
    assert real.info["n_quantized_modules"] == lm.n_layers * 7
    key = ["config", "lang", "text_id"]
    a = real.scores.sort_values(key).reset_index(drop=True)
    b = sim.scores.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[key + ["n_tokens", "n_bytes"]], b[key + ["n_tokens", "n_bytes"]])
    np.testing.assert_allclose(a["nll"], b["nll"], rtol=1e-5)
    # NF4 really changed something
    q = a[a.config == "nf4"]["nll"].to_numpy()
    f = a[a.config == "fp"]["nll"].to_numpy()
    assert np.abs(q - f).max() > 1e-4


def test_within_correlation_removes_group_differences():
    # within each group y rises with x; between groups the means go the other way
    x = [1, 2, 3, 11, 12, 13.0]
    y = [12, 14, 16, 2, 4, 6.0]
    g = ["a", "a", "a", "b", "b", "b"]
    assert np.corrcoef(x, y)[0, 1] < -0.8
    res = K.within_correlation(x, y, g, n_boot=300, n_perm=20000, seed=1)
    assert res["r"] == pytest.approx(1.0) and res["n"] == 6 and res["n_groups"] == 2
    assert res["ci_low"] == pytest.approx(1.0)  # every within-group resample is still perfectly linear
    # within-group permutations: 3! * 3! = 36, of which 2 give |r| = 1 (both identity, both reversed)
    assert res["p_perm"] == pytest.approx(2 / 36, abs=0.01)
    sp = K.within_correlation(x, y, g, method="spearman", n_boot=50, n_perm=100)
    assert sp["r"] == pytest.approx(1.0)
    # hand-computed pooled within-group correlation
    x2 = [1, 2, 4, 0, 1, 5.0]
    y2 = [1, 3, 2, 2, 0, 4.0]
    xc = np.array(x2) - np.repeat([7 / 3, 2.0], 3)
    yc = np.array(y2) - np.repeat([2.0, 2.0], 3)
    want = (xc @ yc) / math.sqrt((xc @ xc) * (yc @ yc))
    assert K.within_correlation(x2, y2, g, n_boot=50, n_perm=100)["r"] == pytest.approx(want)
    # singletons carry no within-group information
    few = K.within_correlation([1, 2, 3], [1, 2, 3], ["a", "b", "c"], n_boot=10, n_perm=10)
    assert not few["defined"] and few["reason"].startswith("too few")
    table = K.correlation_table({"within": (pd.DataFrame({"k_eff": x, "degradation": y, "delta_bpb": y, "lang": g}), "lang")},
                                n_boot=50, n_perm=100)
    assert table["r"].to_numpy() == pytest.approx([1.0] * 4) and set(table["n_groups"]) == {2}


def test_language_means_by_hand():
    per_text = K.text_changes(_scores(), "a")
    out = K.language_means(per_text, ["delta_bpb"]).set_index("lang")
    assert out.loc["en", "n_texts"] == 2
    assert out.loc["en", "bytes_per_token"] == pytest.approx(120 / 30)
    assert out.loc["he", "delta_bpb"] == pytest.approx(np.mean([3 / LN2 / 60, 1 / LN2 / 20]))


def test_weight_error_table_matches_a_direct_computation(tiny_model):
    from qhelpers.quant.engine import Variant
    from qhelpers.quant.quantizers import QuantConfig, fake_quantize

    lm = tiny_model("llama")
    variants = {"abs": Variant("abs", QuantConfig(bits=4)), "clip": Variant("clip", QuantConfig(bits=4, clipping="kurtosis_heuristic")),
                "fp": Variant("fp")}
    table = K.weight_error_table(lm, variants, layers=[1]).set_index("config")
    assert list(table.index) == ["abs", "clip"]
    layer = lm.model.model.layers[1]
    ws = [m.weight.detach() for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    assert table.loc["abs", "n_tensors"] == len(ws) == 7
    for cfg, quant in (("abs", variants["abs"].quant), ("clip", variants["clip"].quant)):
        err = ref = oerr = oref = 0.0
        for w in ws:
            e = (fake_quantize(w, quant).double() - w.double())
            far = (w - w.mean()).abs().double() > 3 * w.double().std(unbiased=False)
            err += float((e ** 2).sum()); ref += float((w.double() ** 2).sum())
            oerr += float((e[far] ** 2).sum()); oref += float((w.double()[far] ** 2).sum())
        assert table.loc[cfg, "rel_mse"] == pytest.approx(err / ref)
        assert table.loc[cfg, "outlier_rel_mse"] == pytest.approx(oerr / oref)

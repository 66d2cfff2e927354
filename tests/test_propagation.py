"""qhelpers.experiments.error_propagation (seed 004, T-004 / T-006): metrics against hand computations and
references, planted error correlations and additivity recovered, and on tiny:gpt2 the exact
facts the experiments rest on (nothing quantized -> cosine 1 and error 0; only the last layer
quantized -> earlier layers bit-identical; the model restored exactly)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import entropy

from qhelpers import stats
from qhelpers.experiments import error_propagation as P
from qhelpers.measure.activations import capture_residual, residual_divergence
from qhelpers.measure.divergence import kl_divergence
from qhelpers.quant.engine import QuantEngine, Variant
from qhelpers.quant.protection import ProtectionSpec
from qhelpers.quant.strategies import protocol_settings
from qhelpers.text.corpora import Corpus
from qhelpers.text.encoding import encode_text
from qhelpers.util.errors import ConfigError, MeasurementError

EN = "All human beings are born free and equal in dignity and rights."
DE = "Alle Menschen sind frei und gleich an Würde und Rechten geboren."
HE = "כל בני האדם נולדו בני חורין ושווים בערכם ובזכויותיהם."
SW = "Watu wote wamezaliwa huru, hadhi na haki zao ni sawa."


def small_corpus() -> Corpus:
    texts = {"en": [EN, "They are endowed with reason and conscience."],
             "he": [HE, "לכולם שכל ומצפון, לפיכך חובה עליהם לנהוג איש ברעהו ברוח של אחוה."]}
    return Corpus.from_texts("tiny-test", texts)


@pytest.fixture(scope="module")
def gpt2(tiny_model):
    return tiny_model("gpt2")


@pytest.fixture(scope="module")
def corpus():
    return small_corpus()


# ----------------------------------------------------------------------------- metrics by hand


def test_cosine_and_relative_error_by_hand_with_padding():
    # text 0: two real tokens and one padded slot whose values must not count
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]],
                      [[3.0, 4.0], [1.0, 1.0], [2.0, 0.0]]])
    b = torch.tensor([[[1.0, 1.0], [0.0, 2.0], [-9.0, 9.0]],
                      [[3.0, 4.0], [-1.0, -1.0], [1.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    cos = P.text_cosine(a, b, mask)
    rel = P.text_relative_error(a, b, mask)
    fro = P.text_relative_error(a, b, mask, pooled=True)
    # text 0: cos(1,0 | 1,1) = 1/sqrt2, cos(0,1 | 0,2) = 1; per token ||a-b||/||b|| = 1/sqrt2, 1/2;
    #         pooled ||a-b||^2 = 1 + 1, ||b||^2 = 2 + 4
    # text 1: cosines 1, -1, 1; per token 0, sqrt8/sqrt2 = 2, 1/1; pooled 0 + 8 + 1 over 25 + 2 + 1
    np.testing.assert_allclose(cos, [(1 / math.sqrt(2) + 1) / 2, 1 / 3], rtol=0, atol=1e-15)
    np.testing.assert_allclose(rel, [(1 / math.sqrt(2) + 0.5) / 2, 1.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(fro, [math.sqrt(2 / 6), math.sqrt(9 / 28)], rtol=0, atol=1e-15)
    # one text at a time, the package's pooled residual_divergence gives the same numbers
    ref = residual_divergence({0: a[:1, :2]}, {0: b[:1, :2]})
    assert ref["cosine"][0] == pytest.approx(cos[0], abs=1e-15)
    assert ref["rel_l2"][0] == pytest.approx(fro[0], abs=1e-15)


def test_massive_token_dominates_only_the_pooled_error():
    """A planted token with a 1000x larger norm and a 1 % error, beside 9 tokens with 10 % errors."""
    b = torch.ones(1, 10, 4, dtype=torch.float64)
    b[0, 0] *= 1000.0
    a = b * 1.1
    a[0, 0] = b[0, 0] * 1.01
    assert P.text_relative_error(a, b)[0] == pytest.approx((0.01 + 9 * 0.1) / 10, rel=1e-12)
    assert P.text_relative_error(a, b, pooled=True)[0] == pytest.approx(
        math.sqrt((1000**2 * 0.01**2 + 9 * 0.1**2) / (1000**2 + 9)), rel=1e-12)


def test_identical_inputs_give_exactly_one_and_zero():
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(0)) * 50
    mask = torch.ones(3, 7)
    mask[1, 5:] = 0
    assert P.text_cosine(x, x.clone(), mask).tolist() == [1.0, 1.0, 1.0]
    assert P.text_relative_error(x, x.clone(), mask).tolist() == [0.0, 0.0, 0.0]
    assert P.text_relative_error(x, x.clone(), mask, pooled=True).tolist() == [0.0, 0.0, 0.0]
    logp = torch.log_softmax(torch.randn(5, 11), dim=-1)
    assert kl_divergence(logp, logp.clone()).tolist() == [0.0] * 5


def test_kl_matches_scipy():
    g = torch.Generator().manual_seed(1)
    lp = torch.log_softmax(torch.randn(4, 50, generator=g, dtype=torch.float64), dim=-1)
    lq = torch.log_softmax(torch.randn(4, 50, generator=g, dtype=torch.float64), dim=-1)
    expected = [entropy(lp[i].exp().numpy(), lq[i].exp().numpy()) for i in range(4)]
    np.testing.assert_allclose(kl_divergence(lp, lq), expected, rtol=1e-12)
    # float32 inputs (the runner's) agree to float32 precision
    np.testing.assert_allclose(kl_divergence(lp.float(), lq.float()), expected, rtol=1e-5)


def test_metric_shape_errors_name_the_problem():
    with pytest.raises(ConfigError, match="same shape"):
        P.text_cosine(torch.zeros(1, 2, 3), torch.zeros(1, 3, 3))
    with pytest.raises(ConfigError, match="mask shape"):
        P.text_relative_error(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 3))
    with pytest.raises(MeasurementError, match="no token in the mask"):
        P.text_cosine(torch.ones(2, 2, 3), torch.ones(2, 2, 3), torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(ConfigError, match="same number"):
        P.error_correlation(torch.zeros(3), torch.zeros(4))


# ----------------------------------------------------------------------------- planted errors


def planted(rho: float, n: int = 1000, seed: int = 0):
    """Centred orthonormal u, v and e_a = 3u, e_b = 2(rho u + sqrt(1 - rho^2) v): r = rho exactly."""
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, 3))
    m -= m.mean(axis=0)
    q, _ = np.linalg.qr(m)
    u, v, w = q.T
    e_a = 3 * u
    e_b = 2 * (rho * u + math.sqrt(1 - rho**2) * v)
    return torch.from_numpy(e_a), torch.from_numpy(e_b), torch.from_numpy(w)


def test_planted_negative_correlation_is_recovered_exactly():
    e_a, e_b, _ = planted(-0.6)
    assert P.error_correlation(e_a, e_b) == pytest.approx(-0.6, abs=1e-12)
    assert P.error_correlation(e_a.reshape(10, 100), e_b.reshape(10, 100)) == pytest.approx(
        np.corrcoef(e_a.numpy(), e_b.numpy())[0, 1], abs=1e-12)


def test_planted_correlation_recovered_from_random_draws():
    rng = np.random.default_rng(3)
    x, z = rng.standard_normal((2, 200_000))
    r = P.error_correlation(torch.from_numpy(x), torch.from_numpy(-0.4 * x + math.sqrt(1 - 0.16) * z))
    assert abs(r - (-0.4)) < 0.01  # sd of r is about (1 - 0.16) / sqrt(2e5) = 0.002


def test_zero_error_has_no_correlation():
    assert math.isnan(P.error_correlation(torch.zeros(5, 4), torch.randn(5, 4)))


def test_additive_errors_have_zero_interaction():
    e_a, e_b, _ = planted(-0.6)
    out = P.error_additivity(e_a, e_b, e_a + e_b)
    # <e_a, e_b> = 3 * 2 * rho = -3.6; ||e_a||^2 = 9, ||e_b||^2 = 4
    assert out["interaction"] == pytest.approx(0.0, abs=1e-25)
    assert out["interaction_share"] == pytest.approx(0.0, abs=1e-12)
    assert out["cross"] == pytest.approx(-7.2, abs=1e-12)
    assert out["additive"] == pytest.approx(13 - 7.2, abs=1e-12)
    assert out["n_both"] == pytest.approx(5.8, abs=1e-12)
    assert out["energy_ratio"] == pytest.approx(5.8 / 13, abs=1e-12)
    assert out["cross_share"] == pytest.approx(-7.2 / 13, abs=1e-12)
    assert out["r"] == pytest.approx(-0.6, abs=1e-12)


def test_planted_interaction_is_recovered_and_the_identity_holds():
    e_a, e_b, w = planted(0.3)
    both = e_a + e_b + 0.5 * w  # w is orthogonal to e_a and e_b, ||w|| = 1
    out = P.error_additivity(e_a, e_b, both)
    assert out["interaction"] == pytest.approx(0.25, abs=1e-12)
    assert out["n_both"] == pytest.approx(13 + 2 * 3 * 2 * 0.3 + 0.25, abs=1e-12)
    assert out["interaction_share"] == pytest.approx(math.sqrt(0.25 / out["n_both"]), abs=1e-12)
    # the general identity, with an interaction that is not orthogonal to e_a + e_b
    both = 0.7 * e_a + 1.2 * e_b + w
    out = P.error_additivity(e_a, e_b, both)
    inter = both - e_a - e_b
    identity = out["additive"] + 2 * float((e_a + e_b).dot(inter)) + out["interaction"]
    assert out["n_both"] == pytest.approx(identity, rel=1e-12)


# ----------------------------------------------------------------------------- configurations


def test_configurations_protect_what_their_names_say():
    v = P.propagation_variants(30)
    assert {k: x.protect.layers for k, x in v.items()} == {
        "all_quantized": (), "last_protected": (29,), "gateway_protected": (0, 29), "first_protected": (0,)}
    assert P.depth_layers(30) == [0, 7, 15, 22, 29]
    assert P.depth_layers(4) == [0, 1, 2, 3]
    errs = P.error_variants(4)
    assert list(errs) == ["quantize_L0", "quantize_L1", "quantize_L2", "quantize_L3", "quantize_L0+L3"]
    assert errs["quantize_L0+L3"].protect.layers == (1, 2)


@pytest.mark.parametrize("protocol", ["sound", "seed"])
def test_quantize_only_touches_that_layer(gpt2, protocol):
    engine = QuantEngine(gpt2)
    plan = engine.plan(P.error_variants(gpt2.n_layers, [1], protocol=protocol)["quantize_L1"])
    assert plan.tensors and all(".h.1." in name for name in plan.tensors)


# ----------------------------------------------------------------------------- on a model


def test_nothing_quantized_gives_cosine_one_and_error_zero_exactly(gpt2, corpus):
    quant, scope = protocol_settings("sound", 4)
    variants = {
        "baseline_again": Variant("baseline_again"),
        "all_protected": Variant("all_protected", quant, ProtectionSpec(layers=tuple(range(gpt2.n_layers))), scope),
        "all_quantized": P.propagation_variants(gpt2.n_layers)["all_quantized"],
    }
    prop = P.residual_propagation(gpt2, corpus, variants, max_length=24)
    same = prop.layers[prop.layers["config"] != "all_quantized"]
    assert len(same) == 2 * 4 * gpt2.n_layers
    assert (same["cosine"] == 1.0).all() and (same["rel_l2"] == 0.0).all() and (same["rel_l2_fro"] == 0.0).all()
    assert (prop.logits.loc[prop.logits["config"] != "all_quantized", "kl"] == 0.0).all()
    q = prop.layers[prop.layers["config"] == "all_quantized"]
    assert (q["rel_l2"] > 0).all() and (q["cosine"] < 1).all()
    assert (prop.logits.loc[prop.logits["config"] == "all_quantized", "kl"] > 0).all()


def test_only_last_layer_quantized_leaves_earlier_layers_bit_identical(gpt2, corpus):
    last = gpt2.n_layers - 1
    only_last = P.error_variants(gpt2.n_layers, [last])[f"quantize_L{last}"]
    prop = P.residual_propagation(gpt2, corpus, {"only_last": only_last}, max_length=24, prefix=False)
    early = prop.layers[prop.layers["layer"] < last]
    assert (early["rel_l2"] == 0.0).all() and (early["cosine"] == 1.0).all()
    assert (prop.layers.loc[prop.layers["layer"] == last, "rel_l2"] > 0).all()
    inter = P.error_interaction(gpt2, corpus, layers=[0, last], max_length=12)
    assert inter.before_last["layer"].tolist() == list(range(last))
    assert (inter.before_last["max_abs_diff"] == 0.0).all()
    assert (inter.before_last["rel_diff"] == 0.0).all() and inter.before_last_matches()
    assert inter.parameters["dtype"] == "float32"


def test_rounding_tolerance_per_dtype():
    assert P.rounding_tolerance("float32") == pytest.approx(1000 * 2.0**-23)
    assert P.rounding_tolerance(torch.float64) == pytest.approx(1000 * 2.0**-52)
    assert P.rounding_tolerance("bfloat16") == P.rounding_tolerance("float16") == 1e-3
    with pytest.raises(ConfigError, match="not a floating-point torch dtype name: 'int8'"):
        P.rounding_tolerance("int8")


def test_before_last_check_tells_rounding_from_a_leak(gpt2, corpus):
    """A planted difference: rounding-sized passes, quantization-sized fails."""
    last = gpt2.n_layers - 1
    inter = P.error_interaction(gpt2, corpus, layers=[0, last], max_length=12)
    assert inter.before_last_matches()
    inter.before_last["rel_diff"] = 3e-7  # what one CI machine's float32 kernels left
    assert inter.before_last_matches()
    inter.before_last.loc[0, "rel_diff"] = 1e-2  # a 4-bit error reaching layer 0
    assert not inter.before_last_matches()
    assert inter.before_last_matches(tolerance=0.1)


def test_values_match_an_independent_capture(gpt2, corpus):
    """One text through capture_residual and the model's own logits, by hand."""
    variant = P.propagation_variants(gpt2.n_layers)["last_protected"]
    prop = P.residual_propagation(gpt2, corpus, {"last_protected": variant}, max_length=24)
    lang, text_id, text = list(corpus.items())[1]  # en, second text (padded in its batch)
    ids = torch.tensor([encode_text(gpt2.tokenizer, text)[:24]])
    engine = QuantEngine(gpt2)
    with torch.no_grad():
        fp = capture_residual(gpt2.model, ids)
        fp_logits = gpt2.model(ids).logits[0, :-1].double()
        with engine.applied(variant):
            q = capture_residual(gpt2.model, ids)
            q_logits = gpt2.model(ids).logits[0, :-1].double()
    mask = torch.ones(ids.shape)
    mask[0, 0] = 0  # the BOS token is left out of the activation metrics
    expected = residual_divergence(q, fp, mask).set_index("layer")
    got = prop.layers[(prop.layers["lang"] == lang) & (prop.layers["text_id"] == text_id)].set_index("layer")
    np.testing.assert_allclose(got["cosine"], expected["cosine"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["rel_l2_fro"], expected["rel_l2"], rtol=1e-5)
    per_token = [float(((q[l] - fp[l])[0, 1:].norm(dim=-1) / fp[l][0, 1:].norm(dim=-1)).mean()) for l in sorted(q)]
    np.testing.assert_allclose(got["rel_l2"], per_token, rtol=1e-5)
    kl = F.kl_div(torch.log_softmax(q_logits, -1), torch.log_softmax(fp_logits, -1), log_target=True,
                  reduction="none").sum(-1).mean()
    row = prop.logits[(prop.logits["lang"] == lang) & (prop.logits["text_id"] == text_id)].iloc[0]
    assert row["kl"] == pytest.approx(float(kl), rel=1e-4)
    assert row["n_predictions"] == ids.shape[1] - 1
    assert row["kl_bpb"] == pytest.approx(row["kl_sum"] / math.log(2) / len(text.encode("utf-8")), rel=1e-12)


def test_error_interaction_matches_a_hand_computation(gpt2):
    """e0, eL, eb of one text from capture_residual and the model's own logits, then numpy."""
    corpus = Corpus.from_texts("one", {"en": [EN, "Everyone has the right to life."]})
    inter = P.error_interaction(gpt2, corpus, layers=[0, 3], max_length=16)
    ids = torch.tensor([encode_text(gpt2.tokenizer, EN)[:16]])
    engine = QuantEngine(gpt2)
    out = {}
    with torch.no_grad():
        for name, variant in [("fp", Variant("fp")), *P.error_variants(gpt2.n_layers, [0, 3]).items()]:
            with engine.applied(variant):
                hidden = capture_residual(gpt2.model, ids, layers=[3])[3][0, 1:].double()
                logp = torch.log_softmax(gpt2.model(ids).logits[0, :-1].double(), dim=-1)
            out[name] = (hidden, logp)
    rows = inter.additivity[inter.additivity["text_id"] == "t0"].set_index("site")
    for k, site in enumerate(["hidden", "logprobs"]):
        e0, el, eb = (out[c][k] - out["fp"][k] for c in ("quantize_L0", "quantize_L3", "quantize_L0+L3"))
        scale = out["fp"][k].norm(dim=-1, keepdim=True)
        r = np.corrcoef(e0.numpy().ravel(), el.numpy().ravel())[0, 1]
        r_scaled = np.corrcoef((e0 / scale).numpy().ravel(), (el / scale).numpy().ravel())[0, 1]
        ratio = float((eb**2).sum() / ((e0**2).sum() + (el**2).sum()))
        assert rows.loc[site, "r"] == pytest.approx(r, abs=1e-4)
        assert rows.loc[site, "r_scaled"] == pytest.approx(r_scaled, abs=1e-4)
        assert rows.loc[site, "energy_ratio"] == pytest.approx(ratio, rel=1e-4)
        rel = inter.rel_error[(inter.rel_error["text_id"] == "t0") & (inter.rel_error["site"] == site)]
        got = rel.set_index("config").loc["quantize_L0", "rel_error"]
        assert got == pytest.approx(float((e0.norm(dim=-1) / scale[:, 0]).mean()), rel=1e-4)


def test_sweeps_restore_the_model_exactly(tiny_model):
    lm = tiny_model("gpt2", fresh=True)
    corpus = Corpus.from_texts("two", {"en": [EN, "Everyone has the right to life."], "sw": [SW, "Kila mtu ana haki ya kuishi."]})
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ids = torch.tensor([encode_text(lm.tokenizer, EN)])
    with torch.no_grad():
        logits = lm.model(ids).logits.clone()
    engine = QuantEngine(lm)
    P.residual_propagation(lm, corpus, max_length=12, engine=engine)
    inter = P.error_interaction(lm, corpus, max_length=12, engine=engine)
    assert engine.active is None
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, logits)
    # the tidy tables: every pair of layers at `hidden`, the pair at `logprobs`
    n_pairs = len(inter.layers) * (len(inter.layers) - 1) // 2
    assert len(inter.pairs) == len(list(corpus.items())) * (n_pairs + 1)
    h = inter.pairs[(inter.pairs["site"] == "hidden") & (inter.pairs["layer_a"] == 0) & (inter.pairs["layer_b"] == 3)]
    add = inter.additivity[inter.additivity["site"] == "hidden"]
    np.testing.assert_array_equal(h["r"].to_numpy(), add["r"].to_numpy())
    np.testing.assert_array_equal(h["r_scaled"].to_numpy(), add["r_scaled"].to_numpy())
    assert add["r_scaled"].between(-1, 1).all() and inter.rel_error["rel_error"].gt(0).all()
    m = inter.matrix()
    assert np.allclose(m.to_numpy(), m.to_numpy().T, equal_nan=True) and np.isnan(np.diag(m)).all()
    assert m.loc[0, 3] == pytest.approx(h["r"].mean(), abs=1e-15)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prefix_reuse_gives_identical_results_with_fewer_layers(tiny_model, arch):
    """Skipped blocks are taken from the configuration that computed them: bit-identical tables."""
    lm = tiny_model(arch)
    corpus = Corpus.from_texts("two", {"en": EN, "de": DE})
    fast = P.residual_propagation(lm, corpus, max_length=10)
    slow = P.residual_propagation(lm, corpus, max_length=10, prefix=False)
    pd.testing.assert_frame_equal(fast.layers, slow.layers, check_exact=True)
    pd.testing.assert_frame_equal(fast.logits, slow.logits, check_exact=True)
    n = lm.n_layers
    # fp n, all_quantized n, last_protected 1, first_protected n - 1 (after fp's L0), gateway 1
    assert fast.parameters["layers_run"] == 3 * n + 1 and slow.parameters["layers_run"] == 5 * n
    fast_e = P.error_interaction(lm, corpus, max_length=10)
    slow_e = P.error_interaction(lm, corpus, max_length=10, prefix=False)
    for name in ("pairs", "additivity", "before_last", "rel_error"):
        pd.testing.assert_frame_equal(getattr(fast_e, name), getattr(slow_e, name), check_exact=True)
    assert fast_e.parameters["layers_run"] < slow_e.parameters["layers_run"]


def test_bad_model_inputs_name_the_fix(gpt2, corpus):
    with pytest.raises(ConfigError, match="two different layers"):
        P.error_interaction(gpt2, corpus, pair=(0, 0))
    with pytest.raises(ConfigError, match="at least 2 layers"):
        P.error_interaction(gpt2, corpus, layers=[1])
    with pytest.raises(ConfigError, match="out of range"):
        P.error_interaction(gpt2, corpus, pair=(0, 9))
    with pytest.raises(ConfigError, match="FP reference"):
        P.residual_propagation(gpt2, corpus, {"fp": Variant("fp")})
    with pytest.raises(ConfigError, match="max_length"):
        P.residual_propagation(gpt2, corpus, max_length=2)
    with pytest.raises(ConfigError, match="depth fractions"):
        P.depth_layers(10, [0.5, 1.5])


# ----------------------------------------------------------------------------- summaries


def frame(values: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"lang": lang, "text_id": f"t{i}", "value": v}
                         for lang, vs in values.items() for i, v in enumerate(vs)])


def test_text_means_match_a_hand_bootstrap():
    rng = np.random.default_rng(11)
    vals = {"en": rng.normal(2.5, 1.0, 12), "de": rng.normal(0.5, 0.5, 12), "he": rng.gamma(2.0, 2.5, 12)}
    table = P.text_means(frame(vals), lr_langs=["he"], hr_langs=["en", "de"], n_boot=500, seed=7).set_index("lang")
    assert list(table.index) == ["en", "de", "he", "all", "LR", "HR", "LR-HR"]
    means = {k: np.mean(v) for k, v in vals.items()}
    assert table.loc["en", "value"] == pytest.approx(means["en"], abs=1e-15)
    assert table.loc["all", "value"] == pytest.approx(np.mean(list(means.values())), abs=1e-15)
    want = means["he"] - (means["en"] + means["de"]) / 2
    assert table.loc["LR-HR", "value"] == pytest.approx(want, abs=1e-15)
    # by hand: the same text resample for every language (parallel ids), so LR - HR is the mean of the
    # per-text s_t = he_t - (en_t + de_t) / 2; studentized (bootstrap-t) interval with the standard
    # error of a mean (ddof 1 at the point, the plug-in form inside each resample)
    s = vals["he"] - (vals["en"] + vals["de"]) / 2
    ids = sorted(range(12), key=lambda i: f"t{i}")  # text ids sort as strings: t0, t1, t10, t11, t2, ...
    s = s[ids]
    counts = stats.bootstrap_counts(12, 500, np.random.default_rng(7))
    m_b = counts @ s / 12
    se = s.std(ddof=1) / math.sqrt(12)
    se_b = np.sqrt(np.einsum("bi,bi->b", counts, (s[None, :] - m_b[:, None]) ** 2)) / 12
    t = np.sort((m_b - want) / se_b)
    q_lo, q_hi = np.quantile(t, [0.025, 0.975])
    lo, hi = want - q_hi * se, want - q_lo * se
    assert table.loc["LR-HR", "value_ci_low"] == pytest.approx(lo, abs=1e-10)
    assert table.loc["LR-HR", "value_ci_high"] == pytest.approx(hi, abs=1e-10)
    est = P.text_mean(frame(vals), langs=["he"], minus=["en", "de"], n_boot=500, seed=7)
    assert (est.value, est.ci_low, est.ci_high, est.n) == pytest.approx((want, lo, hi, 12), abs=1e-10)
    # the percentile interval stays available
    pct = P.text_mean(frame(vals), langs=["he"], minus=["en", "de"], n_boot=500, seed=7, method="percentile")
    assert (pct.ci_low, pct.ci_high) == pytest.approx(tuple(np.percentile(m_b, [2.5, 97.5])), abs=1e-12)


def test_constant_shift_has_a_collapsed_interval_and_undefined_cases_say_why():
    est = P.text_mean(frame({"en": [0.2] * 5, "sw": [0.2] * 5}), n_boot=100)
    assert (est.value, est.ci_low, est.ci_high) == pytest.approx((0.2, 0.2, 0.2), abs=1e-15)
    nan = P.text_mean(frame({"en": [1.0, math.nan, 2.0]}), n_boot=100)
    assert not nan.defined and nan.reason.startswith("non-finite") and "t1" in nan.reason
    one = P.text_mean(frame({"en": [1.0]}), n_boot=100)
    assert not one.defined and one.reason.startswith("too few")
    with pytest.raises(ConfigError, match="were not measured"):
        P.text_means(frame({"en": [1.0, 2.0]}), lr_langs=["he"], hr_langs=["en"])
    with pytest.raises(ConfigError, match="both lr_langs and hr_langs"):
        P.text_means(frame({"en": [1.0, 2.0]}), lr_langs=["en"], hr_langs=["en"])


def test_text_contrast_is_the_paired_per_text_difference():
    rows = []
    for lang in ("en", "he"):
        for i in range(3):
            for layer in (0, 1):
                rows += [{"lang": lang, "text_id": f"t{i}", "config": "a", "layer": layer, "m": 10 * i + layer},
                         {"lang": lang, "text_id": f"t{i}", "config": "b", "layer": layer, "m": i * i}]
    df = pd.DataFrame(rows)
    d = P.text_contrast(df, "m", {"a": 1, "b": -1}, layer=1)
    assert d["value"].tolist() == [10 * i + 1 - i * i for i in range(3)] * 2
    assert list(d.columns) == ["lang", "text_id", "value"]
    with pytest.raises(ConfigError, match="several rows"):
        P.text_contrast(df, "m", {"a": 1, "b": -1})
    with pytest.raises(ConfigError, match="not in the frame"):
        P.text_contrast(df, "m", {"a": 1, "c": -1}, layer=0)


def test_t004_hypotheses_label_the_tautology_a_sanity_check_and_declare_one_primary(gpt2, corpus):
    """Issue 11: H2.1 (one more full-precision layer is closer to FP) is true by construction, so it is a
    sanity check, not a finding; the seed's claim is tested by the interaction, the one primary."""
    prop = P.residual_propagation(gpt2, corpus, P.propagation_variants(gpt2.n_layers), max_length=24)
    from qhelpers.report.results import Hypothesis

    hyps = {c["id"]: Hypothesis.evaluate(**c) for c in P.t004_claims(prop, ["he"], ["en"], n_boot=50)}
    assert list(hyps) == ["H2.1-interaction", "H2.1", "H2.1-output", "LR-error-L_last", "LR-error-output"]
    assert hyps["H2.1"].kind == "sanity check" and hyps["H2.1-output"].kind == "sanity check"
    assert [h.id for h in hyps.values() if h.primary] == ["H2.1-interaction"]
    assert hyps["H2.1-interaction"].family == "primary" and hyps["H2.1-interaction"].kind == "finding"
    assert {hyps[k].family for k in ("LR-error-L_last", "LR-error-output")} == {"LR vs HR"}
    assert hyps["H2.1-interaction"].min_effect == P.T004_MIN_EFFECTS["kl"] > 0
    # the values are the plain per-text contrasts, averaged over texts and languages
    logits = prop.logits.set_index(["config", "lang", "text_id"])["kl"]
    by_text = (logits["first_protected"] - logits["gateway_protected"] - logits["all_quantized"] + logits["last_protected"])
    assert hyps["H2.1-interaction"].value == pytest.approx(by_text.groupby("lang").mean().mean())
    assert all(h.verdict == stats.INCONCLUSIVE for h in hyps.values())  # 2 texts per language: too few

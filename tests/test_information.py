"""qhelpers.experiments.information_content (T-001): entropy estimators, ridge decoding probe, text split, capture.

Every quantity is checked against an independent known answer: closed-form Gaussian
entropies (by hand and scipy), hand-computed spectra, Wishart moments, planted linear
codes that the probe must recover, pure noise that it must not decode beyond chance, and
the model's own ``output_hidden_states``.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps
from scipy.special import digamma

from qhelpers import stats
from qhelpers.experiments import information_content as inf
from qhelpers.text.corpora import Corpus
from qhelpers.util.errors import ConfigError, MeasurementError

COV = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]])


# ----------------------------------------------------------------------------- entropy


def test_gaussian_entropy_closed_form_matches_hand_and_scipy():
    d = COV.shape[0]
    hand = 0.5 * (d * math.log2(2 * math.pi * math.e) + math.log2(np.linalg.det(COV)))
    assert inf.gaussian_entropy_from_cov(COV) == pytest.approx(hand, rel=1e-12)
    scipy_nats = sps.multivariate_normal(mean=np.zeros(d), cov=COV).entropy()
    assert inf.gaussian_entropy_from_cov(COV, base=math.e) == pytest.approx(scipy_nats, rel=1e-12)
    # diagonal: sum of 1-D entropies 0.5 * log2(2 pi e sigma^2)
    diag = np.diag([0.25, 4.0])
    assert inf.gaussian_entropy_from_cov(diag) == pytest.approx(
        sum(0.5 * math.log2(2 * math.pi * math.e * v) for v in (0.25, 4.0)), rel=1e-12)
    with pytest.raises(MeasurementError, match="singular"):
        inf.gaussian_entropy_from_cov(np.ones((2, 2)))
    with pytest.raises(ConfigError, match="symmetric"):
        inf.gaussian_entropy_from_cov(np.array([[1.0, 0.5], [0.0, 1.0]]))


def test_gaussian_entropy_sample_estimates_converge_to_the_closed_forms():
    rng = np.random.default_rng(0)
    x = rng.multivariate_normal(np.zeros(3), COV, size=200_000)
    raw = inf.gaussian_entropy(x, standardize=None)
    assert raw == pytest.approx(inf.gaussian_entropy_from_cov(COV), abs=0.01)
    sd = np.sqrt(np.diag(COV))
    corr = COV / np.outer(sd, sd)
    feat = inf.gaussian_entropy(x, standardize="feature")
    assert feat == pytest.approx(inf.gaussian_entropy_from_cov(corr), abs=0.01)
    glob = inf.gaussian_entropy(x, standardize="global")
    assert glob == pytest.approx(inf.gaussian_entropy_from_cov(COV / (np.trace(COV) / 3)), abs=0.01)


def test_feature_standardized_entropy_is_invariant_to_unit_scales_and_global_to_one_scale():
    rng = np.random.default_rng(1)
    x = rng.multivariate_normal(np.zeros(3), COV, size=500)
    scaled = x * np.array([1e3, 1.0, 1e-3]) + 7.0
    assert inf.gaussian_entropy(scaled, standardize="feature") == pytest.approx(
        inf.gaussian_entropy(x, standardize="feature"), abs=1e-8)
    assert inf.gaussian_entropy(50.0 * x, standardize="global") == pytest.approx(
        inf.gaussian_entropy(x, standardize="global"), abs=1e-8)
    # raw entropy moves by d * log2(c) under x -> c x
    assert inf.gaussian_entropy(50.0 * x, standardize=None) == pytest.approx(
        inf.gaussian_entropy(x, standardize=None) + 3 * math.log2(50.0), abs=1e-8)


def test_bias_correction_removes_the_wishart_bias():
    """Mean over 4000 small samples (n=10, d=4): the corrected estimate is unbiased; the
    plug-in is biased by exactly 0.5 * [d log(2/(n-1)) + sum psi((n-i)/2)] nats."""
    n, d, reps = 10, 4, 4000
    cov = np.array([[1.0, 0.6, 0.0, 0.2], [0.6, 2.0, 0.4, 0.0], [0.0, 0.4, 1.5, 0.3], [0.2, 0.0, 0.3, 0.8]])
    sd = np.sqrt(np.diag(cov))
    truth_raw = inf.gaussian_entropy_from_cov(cov)
    truth_feat = inf.gaussian_entropy_from_cov(cov / np.outer(sd, sd))
    rng = np.random.default_rng(2)
    samples = rng.multivariate_normal(np.zeros(d), cov, size=(reps, n))
    corrected = np.array([inf.gaussian_entropy(s, standardize=None) for s in samples])
    plugin = np.array([inf.gaussian_entropy(s, standardize=None, bias_correct=False) for s in samples])
    feat = np.array([inf.gaussian_entropy(s, standardize="feature") for s in samples])
    se = lambda a: a.std(ddof=1) / math.sqrt(reps)  # noqa: E731
    assert abs(corrected.mean() - truth_raw) < 4 * se(corrected)
    assert abs(feat.mean() - truth_feat) < 4 * se(feat)
    i = np.arange(1, d + 1)
    bias_bits = 0.5 * (d * math.log(2 / (n - 1)) + digamma((n - i) / 2).sum()) / math.log(2)
    assert bias_bits < -0.5  # a real bias at this n
    assert abs(plugin.mean() - (truth_raw + bias_bits)) < 4 * se(plugin)


def test_spectral_entropy_hand_computed():
    x = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert inf.spectral_entropy(x) == pytest.approx(1.0, abs=1e-12)  # two equal variances
    y = np.array([[math.sqrt(3), 0.0], [-math.sqrt(3), 0.0], [0.0, 1.0], [0.0, -1.0]])
    expected = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))  # spectrum 6 : 2
    assert inf.spectral_entropy(y) == pytest.approx(expected, abs=1e-12)
    assert inf.spectral_entropy(1e4 * y + 3.0) == pytest.approx(expected, abs=1e-12)
    # wide input (n < d) uses the Gram matrix: same nonzero spectrum
    assert inf.spectral_entropy(np.hstack([y, np.zeros((4, 10))])) == pytest.approx(expected, abs=1e-12)


def test_entropy_needs_more_rows_than_units_and_no_constant_unit():
    with pytest.raises(MeasurementError, match="N_TEXTS"):
        inf.gaussian_entropy(np.random.default_rng(0).normal(size=(5, 5)))
    x = np.random.default_rng(0).normal(size=(50, 3))
    x[:, 1] = 2.0
    with pytest.raises(MeasurementError, match="constant"):
        inf.gaussian_entropy(x, standardize="feature")
    with pytest.raises(ConfigError, match="standardize"):
        inf.gaussian_entropy(x, standardize="layer")


# ----------------------------------------------------------------------------- probe


def _planted(rng, n, k, d, noise, m):
    y = rng.integers(0, k, size=n)
    x = np.eye(k)[y] @ m + noise * rng.normal(size=(n, d))
    return x, y + 100  # token ids need not be 0..k-1


def test_ridge_probe_recovers_a_planted_linear_code():
    rng = np.random.default_rng(3)
    k, d = 8, 32
    m = rng.normal(size=(k, d))
    (xf, yf), (xv, yv), (xt, yt) = (_planted(rng, n, k, d, 0.1, m) for n in (800, 200, 400))
    probe = inf.fit_ridge_probe(xf, yf, xv, yv, classes=np.arange(100, 100 + k))
    assert np.mean(probe.predict(xt) == yt) > 0.99
    logp = probe.log_proba(xt)
    assert np.allclose(np.exp(logp).sum(axis=1), 1.0)
    idx = yt - 100
    assert -logp[np.arange(len(idx)), idx].mean() / math.log(2) < 0.2  # near 0 bits left
    assert probe.alpha in inf.DEFAULT_ALPHAS and probe.temperature > 0
    with pytest.raises(ConfigError, match="not among the classes"):
        inf.fit_ridge_probe(xf, yf, xv, yv, classes=np.arange(100, 100 + k - 1))


def test_ridge_probe_on_pure_noise_stays_at_chance():
    rng = np.random.default_rng(4)
    k, d = 5, 20
    n_test = 3000
    xf, xv, xt = (rng.normal(size=(n, d)) for n in (2000, 500, n_test))
    yf, yv, yt = (rng.integers(0, k, size=n) for n in (2000, 500, n_test))
    probe = inf.fit_ridge_probe(xf, yf, xv, yv, classes=np.arange(k))
    hits = int(np.sum(probe.predict(xt) == yt))
    lo, hi = sps.binom.interval(0.999, n_test, 1.0 / k)
    assert lo <= hits <= hi
    # held-out cross-entropy cannot beat the uniform prior by more than noise
    ce = -probe.log_proba(xt)[np.arange(n_test), yt].mean() / math.log(2)
    assert ce > math.log2(k) - 0.02


def test_top_k_classes_orders_by_frequency_then_id():
    assert inf.top_k_classes([5, 5, 3, 3, 9, 9, 9, 1], 3).tolist() == [9, 3, 5]
    with pytest.raises(ConfigError, match="k must be"):
        inf.top_k_classes([1, 2], 1)


def test_ratio_bootstrap_matches_a_direct_loop():
    num = np.array([3.0, 1.0, 4.0, 0.0, 5.0])
    den = np.array([4.0, 4.0, 5.0, 2.0, 5.0])
    est = inf.ratio_bootstrap(num, den, n_boot=500, seed=11)
    assert est.value == pytest.approx(13.0 / 20.0)
    idx = stats.bootstrap_indices(5, 500, np.random.default_rng(11))
    reps = np.array([num[r].sum() / den[r].sum() for r in idx])
    assert est.ci_low == pytest.approx(np.percentile(reps, 2.5))
    assert est.ci_high == pytest.approx(np.percentile(reps, 97.5))
    assert est.n == 5
    one = inf.ratio_bootstrap([1.0], [2.0])
    assert not one.defined and one.value == 0.5 and one.reason.startswith("too few")


# ----------------------------------------------------------------------------- split


def _texts(langs, ids):
    return pd.DataFrame([(lang, i) for lang in langs for i in ids[lang]], columns=["lang", "text_id"])


def test_split_is_by_text_and_parallel_ids_share_a_split():
    langs = ["en", "he", "sw"]
    ids = {lang: [f"p{i:02d}" for i in range(10)] for lang in langs}
    split = inf.split_texts(_texts(langs, ids), test_frac=0.3, val_frac=0.2, seed=5)
    assert split.groupby("text_id")["split"].nunique().max() == 1  # same split in every language
    train = set(split.loc[split["split"] != "test", "text_id"])
    test = set(split.loc[split["split"] == "test", "text_id"])
    assert not train & test
    counts = split[split["lang"] == "en"]["split"].value_counts().to_dict()
    assert counts == {"test": 3, "val": 1, "fit": 6}  # 3 = round(0.3*10), 1 = round(0.2*7)
    assert (split["unit"] == split["text_id"]).all()
    again = inf.split_texts(_texts(langs, ids), test_frac=0.3, val_frac=0.2, seed=5)
    pd.testing.assert_frame_equal(split, again)


def test_split_of_non_parallel_texts_is_per_language():
    ids = {"en": [f"e{i}" for i in range(6)], "he": [f"h{i}" for i in range(4)]}
    split = inf.split_texts(_texts(["en", "he"], ids), seed=0)
    keys = split.groupby(["lang", "text_id"])["split"].nunique()
    assert keys.max() == 1 and len(keys) == 10
    for lang, g in split.groupby("lang"):
        assert set(g["split"]) == {"fit", "val", "test"}
    assert split["unit"].str.contains("/").all()
    with pytest.raises(ConfigError, match="at least 3 texts"):
        inf.split_texts(_texts(["en"], {"en": ["a", "b"]}))
    with pytest.raises(ConfigError, match="test_frac"):
        inf.split_texts(_texts(["en"], {"en": ["a", "b", "c"]}), test_frac=1.0)


# ----------------------------------------------------------------------------- decoding (planted)


def _synthetic_token_acts(seed=0, n_texts=12, length=40, vocab=6, d=24, noise=0.05, sw_offset=0, sw_length=None):
    """Layer 0 = code of the current token, layer 1 = code of the previous token.

    Swahili texts use token ids ``sw_offset + 0 .. vocab - 1`` and ``sw_length`` tokens."""
    rng = np.random.default_rng(seed)
    e_cur, e_prev = rng.normal(size=(vocab, d)), rng.normal(size=(vocab, d))
    rows, a0, a1, texts = [], [], [], []
    for lang in ("en", "sw"):
        offset = sw_offset if lang == "sw" else 0
        n = (sw_length or length) if lang == "sw" else length
        for t in range(n_texts):
            seq = rng.integers(0, vocab, size=n)
            ids = seq + offset
            for pos in range(1, n):
                rows.append((lang, f"t{t}", pos, int(ids[pos]), int(ids[pos - 1])))
                a0.append(e_cur[seq[pos]] + noise * rng.normal(size=d))
                a1.append(e_prev[seq[pos - 1]] + noise * rng.normal(size=d))
            texts.append({"lang": lang, "text_id": f"t{t}", "n_tokens": n, "n_candidates": n - 1,
                          "n_kept": n - 1, "truncated": False})
    frame = pd.DataFrame(rows, columns=["lang", "text_id", "position", "token_id", "prev_id"])
    acts = {0: np.asarray(a0, dtype=np.float32), 1: np.asarray(a1, dtype=np.float32)}
    return inf.TokenActivations(acts, frame, pd.DataFrame(texts), 2, None, seed, 64, parallel=True)


def test_decoding_finds_the_planted_current_and_previous_token():
    ta = _synthetic_token_acts()
    result = inf.layer_information(ta, k=6, n_boot=200, seed=0)
    t = result.table.set_index("layer")
    assert t.loc[0, "accuracy_current"] > 0.99 and t.loc[1, "accuracy_previous"] > 0.99
    chance = 1.0 / 6
    assert t.loc[1, "accuracy_current"] < chance + 0.1 and t.loc[0, "accuracy_previous"] < chance + 0.1
    # decoded information: about log2(6) bits where planted, about 0 where not
    assert t.loc[0, "info_bits_current"] > math.log2(6) - 0.3
    assert abs(t.loc[1, "info_bits_current"]) < 0.1
    for col in ("accuracy_current", "accuracy_previous"):
        assert (t[f"{col[:8]}_ci_low_{col[9:]}"] <= t[col] + 1e-12).all()
        assert (t[col] <= t[f"{col[:8]}_ci_high_{col[9:]}"] + 1e-12).all()
    dec = result.decoding
    n_test = int((result.split["split"] == "test").sum() / 2)  # parallel: units are text ids
    assert (dec["n_test_texts"] == n_test).all() and (dec["coverage"] == 1.0).all()
    pl = result.per_language
    assert set(pl["lang"]) == {"en", "sw"} and (pl["coverage"] == 1.0).all()
    assert pl.groupby(["layer", "target"])["n_test_rows"].sum().eq(dec.set_index(["layer", "target"])["n_test_rows"]).all()


def test_decoding_drops_rows_outside_the_top_k_and_reports_them():
    ta = _synthetic_token_acts(vocab=6)
    split = inf.split_texts(ta.texts, seed=0)
    per_layer, per_lang = inf.decoding_table(ta, split, target="current", k=3, n_boot=100)
    train = ta.rows.merge(split, on=["lang", "text_id"])
    top = inf.top_k_classes(train.loc[train["split"] != "test", "token_id"], 3)
    assert (per_layer["n_classes"] == 3).all()
    assert (per_layer["n_dropped_rows"] == int((~ta.rows["token_id"].isin(top)).sum())).all()
    test_rows = train[train["split"] == "test"]
    assert per_layer["coverage"].iloc[0] == pytest.approx(test_rows["token_id"].isin(top).mean())
    assert (per_lang["coverage"] < 1.0).all()
    with pytest.raises(ConfigError, match="target"):
        inf.decoding_table(ta, split, target="next")


def test_a_language_without_scored_rows_is_reported_not_dropped():
    """Swahili uses its own, rarer token ids: none is among the top 6, so none of its rows is scored."""
    ta = _synthetic_token_acts(sw_offset=50, sw_length=10)
    split = inf.split_texts(ta.texts, seed=0)
    per_layer, per_lang = inf.decoding_table(ta, split, target="current", k=6, n_boot=100)
    sw = per_lang[per_lang["lang"] == "sw"]
    assert len(sw) == 2 and (sw["coverage"] == 0).all() and sw["accuracy"].isna().all()
    en = per_lang[per_lang["lang"] == "en"]
    assert (en["coverage"] == 1.0).all() and en["n_test_rows"].tolist() == per_layer["n_test_rows"].tolist()


# ----------------------------------------------------------------------------- capture (tiny:gpt2)


TEXTS = {
    "en": ["All human beings are born free and equal in dignity and rights.",
           "Everyone has the right to life, liberty and security of person.",
           "No one shall be held in slavery or servitude; slavery and the slave trade shall be prohibited in all their forms."],
    "sw": ["Watu wote wamezaliwa huru, hadhi na haki zao ni sawa.",
           "Kila mtu anayo haki ya kuishi, haki ya uhuru na haki ya kuwa salama."],
}


def test_capture_equals_output_hidden_states(tiny_model):
    loaded = tiny_model("gpt2")
    corpus = Corpus.from_texts("t", TEXTS)
    ta = inf.capture_token_activations(loaded, corpus, layers=[0, 1, 2], max_tokens_per_text=None,
                                       batch_tokens=64, progress=False)
    assert ta.layers == [0, 1, 2] and ta.n_rows == len(ta.rows)
    bos = loaded.tokenizer.eos_token_id
    for lang, texts in TEXTS.items():
        for i, text in enumerate(texts):
            ids = [bos] + loaded.tokenizer(text)["input_ids"]
            sel = ((ta.rows["lang"] == lang) & (ta.rows["text_id"] == f"t{i}")).to_numpy()
            part = ta.rows[sel]
            assert part["position"].tolist() == list(range(2, len(ids)))  # BOS and first token left out
            assert part["token_id"].tolist() == ids[2:] and part["prev_id"].tolist() == ids[1:-1]
            with torch.no_grad():
                hs = loaded.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            for layer in (0, 1, 2):
                ref = hs[layer + 1][0, 2:].numpy()
                np.testing.assert_allclose(ta.layer(layer)[sel], ref, rtol=1e-5, atol=1e-5)


def test_capture_cap_is_seeded_and_independent_of_the_other_texts(tiny_model):
    loaded = tiny_model("gpt2")
    corpus = Corpus.from_texts("t", TEXTS)
    a = inf.capture_token_activations(loaded, corpus, max_tokens_per_text=5, seed=3, progress=False)
    assert (a.texts["n_kept"] == np.minimum(5, a.texts["n_candidates"])).all()
    assert a.rows.groupby(["lang", "text_id"]).size().max() == 5
    b = inf.capture_token_activations(loaded, corpus, max_tokens_per_text=5, seed=3, progress=False)
    pd.testing.assert_frame_equal(a.rows, b.rows)
    alone = inf.capture_token_activations(loaded, Corpus.from_texts("t", {"sw": TEXTS["sw"]}),
                                          max_tokens_per_text=5, seed=3, batch_tokens=10_000, progress=False)
    sel = (a.rows["lang"] == "sw").to_numpy()
    assert a.rows[sel].reset_index(drop=True).equals(alone.rows)
    np.testing.assert_allclose(a.layer(3)[sel], alone.layer(3), rtol=1e-5, atol=1e-5)
    other = inf.capture_token_activations(loaded, corpus, max_tokens_per_text=5, seed=4, progress=False)
    assert not other.rows["position"].equals(a.rows["position"])
    with pytest.raises(ConfigError, match="max_tokens_per_text"):
        inf.capture_token_activations(loaded, corpus, max_tokens_per_text=0)


def test_thread_limit_is_restored_and_validated():
    before = torch.get_num_threads()
    x = np.random.default_rng(0).normal(size=(40, 3))
    assert inf.gaussian_entropy(x, threads=1) == pytest.approx(inf.gaussian_entropy(x, threads=None), abs=1e-10)
    assert torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="threads"):
        inf.spectral_entropy(x, threads=0)
    assert torch.get_num_threads() == before

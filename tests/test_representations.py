"""Tests of qhelpers.experiments.representation_geometry against independent answers: the model's own
hidden_states, brute-force recomputation on duplicated rows, hand-computed numbers and
synthetic activations with a planted answer."""
from __future__ import annotations

import math
import zlib

import numpy as np
import pandas as pd
import pytest
import torch

from qhelpers import stats
from qhelpers.experiments.representation_geometry import (
    LayerActivations,
    bottleneck,
    centered_cosines,
    collect_activations,
    convergence,
    dimensionality,
    group_peak_difference,
    language_variance,
    layer_correlation,
    peak_depth,
    retrieval_accuracy,
    text_bootstrap_counts,
    weighted_linear_cka,
    weighted_spectrum_stats,
)
from qhelpers.measure.activations import (
    effective_dimension,
    linear_cka,
    participation_ratio,
)
from qhelpers.quant.engine import Variant
from qhelpers.quant.quantizers import QuantConfig
from qhelpers.text.corpora import Corpus, load_corpus
from qhelpers.text.encoding import encode_text
from qhelpers.util.errors import ConfigError

TEXTS = {
    "en": ["All human beings are born free and equal.", "Everyone has the right to life.",
           "No one shall be held in slavery or servitude; slavery shall be prohibited in all its forms."],
    "de": ["Alle Menschen sind frei und gleich geboren.", "Jeder hat das Recht auf Leben.",
           "Niemand darf in Sklaverei oder Leibeigenschaft gehalten werden."],
}


def small_corpus() -> Corpus:
    ids = ["t0", "t1", "t2"]
    return Corpus("small", {g: tuple(v) for g, v in TEXTS.items()}, {g: tuple(ids) for g in TEXTS}, parallel=True)


@pytest.fixture(scope="module")
def gpt2(tiny_model):
    return tiny_model("gpt2")


# ----------------------------------------------------------------------------- capture


def manual_means(loaded, corpus):
    """Per text: mean over real tokens (BOS excluded) of hidden_states[i + 1], one text at a time."""
    out = {}
    bos = loaded.tokenizer.bos_token_id if loaded.tokenizer.bos_token_id is not None else loaded.tokenizer.eos_token_id
    for lang, tid, text in corpus.items():
        ids = encode_text(loaded.tokenizer, text)
        first = 1 if ids[0] == bos else 0
        with torch.no_grad():
            hs = loaded.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        out[(lang, tid)] = [h[0, first:].double().mean(0).numpy() for h in hs[1:]], [h[0].numpy() for h in hs[1:]]
    return out


def test_pooled_means_equal_hidden_states_and_batching_changes_nothing(gpt2):
    corpus = small_corpus()
    batched = collect_activations(gpt2, corpus, pooling="tokens", batch_size=4, progress=False, max_tokens_per_text=5)
    single = collect_activations(gpt2, corpus, pooling="tokens", batch_size=1, progress=False, max_tokens_per_text=5)
    ref = manual_means(gpt2, corpus)
    n = gpt2.n_layers
    assert batched.layers == list(range(n))
    for k, (lang, tid) in enumerate(zip(batched.index["lang"], batched.index["text_id"])):
        means, full = ref[(lang, tid)]
        for layer in range(n - 1):  # hidden_states[-1] has the final norm applied (activations docstring)
            np.testing.assert_allclose(batched.pooled[layer][k], means[layer], atol=1e-5)
    for layer in range(n):
        np.testing.assert_allclose(batched.pooled[layer], single.pooled[layer], atol=1e-5)
        np.testing.assert_allclose(batched.tokens[layer], single.tokens[layer], atol=1e-5)
    # sampled token rows are the rows of hidden_states at the recorded positions
    ti = batched.token_index
    for r in range(len(ti)):
        _, full = ref[(ti["lang"][r], ti["text_id"][r])]
        np.testing.assert_allclose(batched.tokens[0][r], full[0][ti["position"][r]], atol=1e-5)
    # the cap, the BOS exclusion, and the same positions whatever else is in the corpus
    assert (batched.index["n_sampled"] == np.minimum(batched.index["n_tokens"], 5)).all()
    assert (ti["position"] >= 1).all()
    alone = collect_activations(gpt2, corpus.select(langs=["de"], n_texts=2), pooling="tokens", progress=False,
                                max_tokens_per_text=5, layers=[0])
    mine = ti[(ti["lang"] == "de") & ti["text_id"].isin(["t0", "t1"])]["position"].to_numpy()
    np.testing.assert_array_equal(alone.token_index["position"].to_numpy(), mine)


def test_variant_is_applied_and_restored(gpt2):
    corpus = small_corpus().select(langs=["en"], n_texts=2)
    before = collect_activations(gpt2, corpus, layers=[1], progress=False)
    variant = Variant("int2", QuantConfig(bits=2))
    quant = collect_activations(gpt2, corpus, layers=[1], progress=False, variant=variant)
    after = collect_activations(gpt2, corpus, layers=[1], progress=False)
    assert quant.variant == "int2"
    assert np.abs(quant.pooled[1] - before.pooled[1]).max() > 1e-3
    np.testing.assert_array_equal(before.pooled[1], after.pooled[1])


def test_bad_inputs_name_the_fix(gpt2):
    corpus = small_corpus()
    with pytest.raises(ConfigError, match="pooling"):
        collect_activations(gpt2, corpus, pooling="max", progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        collect_activations(gpt2, corpus, batch_size=0, progress=False)
    acts = collect_activations(gpt2, corpus, layers=[0, 1], progress=False)
    with pytest.raises(ConfigError, match="pooling='tokens'"):
        language_variance(acts)
    with pytest.raises(ConfigError, match="reference language"):
        convergence(acts, ref="fr")
    index = pd.DataFrame({"lang": ["en", "en", "en", "de", "de", "de"], "text_id": ["a", "b", "c", "a", "b", "x"]})
    rng = np.random.default_rng(0)
    odd = LayerActivations.from_arrays({0: rng.normal(size=(6, 4))}, index)
    with pytest.raises(ConfigError, match="parallel"):
        convergence(odd, ref="en")


# ----------------------------------------------------------------------------- helpers


def synthetic_tokens(rows_per_text, langs=("en", "de"), n_texts=3, d=5, n_layers=2, seed=0, scale=None):
    """LayerActivations with random token rows; ``scale[lang]`` multiplies a language's rows."""
    rng = np.random.default_rng(seed)
    index = pd.DataFrame([(g, f"t{t}") for g in langs for t in range(n_texts)], columns=["lang", "text_id"])
    tr, tl, tt = [], [], []
    for k, (g, t) in enumerate(index.itertuples(index=False)):
        m = rows_per_text if np.ndim(rows_per_text) == 0 else rows_per_text[k]
        tr += [k] * m
        tl += [g] * m
        tt += [t] * m
    token_index = pd.DataFrame({"text_row": tr, "lang": tl, "text_id": tt, "position": np.arange(len(tr))})
    tokens, pooled = {}, {}
    for layer in range(n_layers):
        X = rng.normal(size=(len(tr), d)) + rng.normal(size=d) * 3
        if scale:
            X *= np.array([scale.get(g, 1.0) for g in tl])[:, None]
        tokens[layer] = X.astype(np.float32)
        pooled[layer] = np.stack([X[np.array(tr) == k].mean(0) for k in range(len(index))])
    return LayerActivations.from_arrays(pooled, index, n_layers, tokens, token_index)


def duplicated(X, text_of_row, counts_row):
    return np.concatenate([np.repeat(X[text_of_row == t], int(c), axis=0) for t, c in enumerate(counts_row) if c > 0])


# ----------------------------------------------------------------------------- T-003


def test_language_variance_hand_computed_and_bootstrap_equals_duplicated_rows():
    acts = synthetic_tokens([2, 3, 4, 3, 2, 5], scale={"de": 2.0})
    res = language_variance(acts, n_boot=40, seed=3)
    ti = acts.token_index
    for layer in acts.layers:
        X = acts.tokens[layer].astype(np.float64)
        v = {g: np.var(X[(ti["lang"] == g).to_numpy()], axis=0).mean() for g in ("en", "de")}
        v_all = {g: np.var(X[(ti["lang"] == g).to_numpy()]) for g in ("en", "de")}
        pl = res.per_language[res.per_language["layer"] == layer].set_index("lang")
        for g in v:
            assert pl.loc[g, "variance"] == pytest.approx(v[g], rel=1e-9)
            assert pl.loc[g, "variance_all"] == pytest.approx(v_all[g], rel=1e-9)
        vals = np.array([v["en"], v["de"]])
        cr = res.cross[res.cross["layer"] == layer].iloc[0]
        assert cr["cross_var"] == pytest.approx(np.var(vals), rel=1e-9)
        assert cr["cross_cv"] == pytest.approx(np.std(vals) / np.mean(vals), rel=1e-9)
        # the CI: every replicate recomputed by brute force on duplicated rows
        counts, paired = text_bootstrap_counts(acts, None, 40, 3)
        assert paired
        reps = []
        for b in range(40):
            per = []
            for g in ("en", "de"):
                sel = (ti["lang"] == g).to_numpy()
                pos = ti["text_row"].to_numpy()[sel] - acts.text_rows(g)[0]
                per.append(np.var(duplicated(X[sel], pos, counts[g][b]), axis=0).mean())
            reps.append(np.std(per) / np.mean(per))
        lo, hi = np.percentile(reps, [2.5, 97.5])
        assert cr["cross_cv_ci_low"] == pytest.approx(lo, rel=1e-9)
        assert cr["cross_cv_ci_high"] == pytest.approx(hi, rel=1e-9)


def test_language_variance_finds_the_planted_language_difference():
    # de rows are scaled by 3 at every layer: its variance is 9x en's, cross_cv = (9-1)/(9+1) = 0.8
    acts = synthetic_tokens(60, n_texts=8, d=4, scale={"de": 3.0}, seed=5)
    cr = language_variance(acts, n_boot=200).cross
    assert np.allclose(cr["cross_cv"], 0.8, atol=0.15)
    assert (cr["cross_cv_ci_low"] > 0.5).all()


# ----------------------------------------------------------------------------- T-007


@pytest.mark.parametrize("measure", ["participation_ratio", "eff_dim"])
def test_weighted_spectrum_equals_measure_on_duplicated_rows(measure):
    rng = np.random.default_rng(1)
    text_of_row = np.repeat(np.arange(5), [3, 4, 2, 5, 3])
    X = rng.normal(size=(17, 6)) @ np.diag([5, 3, 2, 1, 0.5, 0.1]) + 10.0
    counts = np.vstack([np.ones(5), stats.bootstrap_counts(5, 12, rng)])
    got = weighted_spectrum_stats(X, text_of_row, counts, measure=measure, threshold=0.9)
    # the memory-bounded path (per-text second moments recomputed chunk by chunk) gives the same numbers
    low_memory = weighted_spectrum_stats(X, text_of_row, counts, measure=measure, threshold=0.9, max_bytes=600, chunk=5)
    np.testing.assert_allclose(low_memory, got, rtol=1e-12)
    for b in range(counts.shape[0]):
        D = duplicated(X, text_of_row, counts[b])
        want = participation_ratio(D) if measure == "participation_ratio" else effective_dimension(D, 0.9)
        assert got[b] == pytest.approx(want, rel=1e-8)


def test_dimensionality_matches_activations_functions():
    acts = synthetic_tokens([6, 7, 5, 8, 6, 9], d=4)
    table = dimensionality(acts, threshold=0.8, seed=2)
    ti = acts.token_index
    for layer in acts.layers:
        X = acts.tokens[layer].astype(np.float64)
        row = table[(table["layer"] == layer) & (table["scope"] == "all")].iloc[0]
        assert row["eff_dim"] == effective_dimension(X, 0.8)
        assert row["participation_ratio"] == pytest.approx(participation_ratio(X), rel=1e-9)
        assert row["rank_limit"] == min(len(X) - 1, 4)
    per = table[table["scope"] != "all"]
    assert set(per["n_rows"]) == {18}  # the smallest language (en: 6 + 7 + 5 rows)


def planted_bottleneck(low_layer, n_layers=6, n_texts=10, rows=12, d=8, seed=0):
    """Token rows spread over all d dimensions, except at ``low_layer`` where they live in 2."""
    rng = np.random.default_rng(seed)
    index = pd.DataFrame([(g, f"t{t}") for g in ("en", "he") for t in range(n_texts)], columns=["lang", "text_id"])
    n = len(index) * rows
    token_index = pd.DataFrame({"text_row": np.repeat(np.arange(len(index)), rows),
                                "lang": np.repeat(index["lang"].to_numpy(), rows),
                                "text_id": np.repeat(index["text_id"].to_numpy(), rows), "position": np.arange(n)})
    tokens, pooled = {}, {}
    for layer in range(n_layers):
        scales = np.ones(d) if layer != low_layer else np.r_[np.ones(2), np.full(d - 2, 0.01)]
        X = rng.normal(size=(n, d)) * scales
        tokens[layer] = X
        pooled[layer] = X.reshape(len(index), rows, d).mean(1)
    return LayerActivations.from_arrays(pooled, index, n_layers, tokens, token_index)


@pytest.mark.parametrize("measure", ["participation_ratio", "eff_dim"])
def test_bottleneck_recovers_the_planted_layer(measure):
    acts = planted_bottleneck(low_layer=4)  # depth 4/5 = 0.8
    res = bottleneck(acts, measure=measure, n_boot=60, seed=1)
    assert res.layers == [4]
    assert res.depth.value == pytest.approx(0.8) and res.depth.ci_low == pytest.approx(0.8) and res.depth.ci_high == pytest.approx(0.8)
    assert res.distance.value == pytest.approx(0.05)
    assert res.n_rows == 240 and res.n_texts == 10 and res.paired
    # block 0 is not searched by default: a bottleneck planted there is not reported
    at0 = bottleneck(planted_bottleneck(low_layer=0), measure=measure, n_boot=20)
    assert 0 not in at0.layers
    assert bottleneck(planted_bottleneck(low_layer=0), measure=measure, n_boot=20, search_layers=range(6)).layers == [0]


def test_peak_depth_hand_example_with_ties():
    layers = [0, 1, 2, 3, 4]
    values = np.array([
        [5, 1, 3, 1, 4],   # observed: tie at layers 1 and 3 -> depth (0.25 + 0.75) / 2 = 0.5
        [5, 1, 3, 2, 4],   # layer 1 -> 0.25
        [5, 2, 3, 1, 4],   # layer 3 -> 0.75
        [0, 2, 3, 1, 4],   # layer 0 -> 0
    ], dtype=float)
    res = peak_depth(values, layers, 5, mode="min", target=0.75)
    assert res["layers"] == [1, 3]
    assert res["depth"].value == 0.5
    np.testing.assert_allclose(res["replicates"], [0.25, 0.75, 0.0])
    assert res["distance"].value == 0.25
    lo, hi = np.percentile([0.5, 0.0, 0.75], [2.5, 97.5])
    assert res["distance"].ci_low == pytest.approx(lo) and res["distance"].ci_high == pytest.approx(hi)
    assert peak_depth(values, layers, 5, mode="max")["layers"] == [0]


# ----------------------------------------------------------------------------- T-009


def test_centered_cosine_hand_made_vectors():
    A = np.array([[2.0, 1.0], [0.0, 1.0]])
    B = np.array([[1.0, 3.0], [1.0, 1.0]])
    # raw: cos((2,1),(1,3)) = 5/sqrt(50); cos((0,1),(1,1)) = 1/sqrt(2): both 0.7071
    assert centered_cosines(A, B, center=False)[0] == pytest.approx(1 / math.sqrt(2))
    # centred: A -> (1,0),(-1,0); B -> (0,1),(0,-1): orthogonal, 0
    assert centered_cosines(A, B)[0] == pytest.approx(0.0, abs=1e-12)
    C = np.array([[3.0, 5.0], [-1.0, 5.0]])  # centred (2,0),(-2,0): parallel to A's -> 1
    assert centered_cosines(A, C)[0] == pytest.approx(1.0)


def test_centered_cosine_and_cka_replicates_equal_duplicated_rows():
    rng = np.random.default_rng(4)
    A = rng.normal(size=(6, 5)) + 4.0
    B = A @ rng.normal(size=(5, 5)) * 0.3 + rng.normal(size=(6, 5)) + 2.0
    counts = stats.bootstrap_counts(6, 10, rng)
    cen = centered_cosines(A, B, counts)
    cka = weighted_linear_cka(A, B, counts)
    for b in range(10):
        idx = np.repeat(np.arange(6), counts[b].astype(int))
        Ad, Bd = A[idx], B[idx]
        Ac, Bc = Ad - Ad.mean(0), Bd - Bd.mean(0)
        brute = np.mean([Ac[i] @ Bc[i] / np.linalg.norm(Ac[i]) / np.linalg.norm(Bc[i]) for i in range(len(idx))])
        assert cen[b] == pytest.approx(brute, rel=1e-9)
        assert cka[b] == pytest.approx(linear_cka(Ad, Bd), rel=1e-9)


def test_retrieval_accuracy_hand_computed():
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    k = np.array([[0.9, 0.1], [1.0, 0.9], [0.1, 1.0]])  # text 0 -> 0 (hit), 1 -> 2 (miss), 2 -> 1 (miss)
    np.testing.assert_array_equal(retrieval_accuracy(q, k, center=False), [1.0, 0.0, 0.0])


def planted_convergence(peak_layer, n_layers=7, n_texts=12, d=16, lr_noise=1.0, seed=0):
    """Pooled vectors = common direction (huge) + language offset + text meaning + noise whose
    scale is smallest at ``peak_layer``; LR languages get ``lr_noise`` times more noise."""
    rng = np.random.default_rng(seed)
    langs = ["en", "de", "fr", "he", "sw"]
    meaning = rng.normal(size=(n_texts, d))
    common = rng.normal(size=d) * 40.0
    index = pd.DataFrame([(g, f"t{t}") for g in langs for t in range(n_texts)], columns=["lang", "text_id"])
    pooled = {}
    for layer in range(n_layers):
        noise = 0.3 + 2.0 * abs(layer - peak_layer)
        blocks = []
        for g in langs:
            s = noise * (lr_noise if g in ("he", "sw") else 1.0)
            blocks.append(common + rng.normal(size=d) * 5.0 + meaning + s * rng.normal(size=(n_texts, d)))
        pooled[layer] = np.vstack(blocks)
    return LayerActivations.from_arrays(pooled, index, n_layers)


def test_convergence_finds_the_planted_peak_and_raw_cosine_does_not():
    acts = planted_convergence(peak_layer=5)
    conv = convergence(acts, ref="en", n_boot=200, seed=0)
    peak = conv.peak(target=0.75)
    assert peak["layers"] == [5]
    assert peak["depth"].value == pytest.approx(5 / 6)
    # the raw cosine is dominated by the common direction: near 1 at every layer
    assert (conv.curve["raw_cos"] > 0.9).all()
    at = conv.reference[conv.reference["layer"] == 5]
    assert (at["retrieval"] == 1.0).all() and np.allclose(at["chance"], 1 / 12)
    assert (at["centered_cos"] > 0.8).all()
    far = conv.reference[conv.reference["layer"] == 0]
    assert (far["centered_cos"] < at["centered_cos"].min()).all()
    # centred non-parallel pairs sit near -1/(n-1), far below the parallel ones
    assert (conv.curve["centered_cos_nonparallel"].abs() < 0.2).all()
    peaks = conv.language_peaks()
    assert peaks["lang"].tolist() == ["de", "fr", "he", "sw"]
    assert all(layers == [5] for layers in peaks["peak_layers"])


def test_group_peak_difference_sign_follows_the_planted_noise():
    worse = convergence(planted_convergence(3, lr_noise=3.0, seed=1), n_boot=300)
    d = group_peak_difference(worse, ["he", "sw"], ["en", "de", "fr"])
    assert d.defined and d.ci_high < 0
    # he and sw are copies of de and fr shifted by a constant (removed by the centring): difference 0
    acts = planted_convergence(3, seed=2)
    rows = {g: acts.text_rows(g) for g in acts.langs}
    for layer in acts.layers:
        acts.pooled[layer][rows["he"]] = acts.pooled[layer][rows["de"]] + 7.0
        acts.pooled[layer][rows["sw"]] = acts.pooled[layer][rows["fr"]] - 3.0
    same = convergence(acts, n_boot=300)
    d0 = group_peak_difference(same, ["he", "sw"], ["de", "fr"])
    assert d0.value == pytest.approx(0.0, abs=1e-12)
    assert d0.ci_low == pytest.approx(0.0, abs=1e-12) and d0.ci_high == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ConfigError, match="besides the reference"):
        group_peak_difference(same, ["he"], ["en"])


# ----------------------------------------------------------------------------- shared


def test_layer_correlation_aligns_layers_and_reports_undefined():
    x = pd.Series({0: 1.0, 1: 2.0, 2: 3.0, 3: 5.0, 4: 4.0})
    y = pd.Series({4: 40.0, 3: 50.0, 2: 30.0, 1: 20.0, 0: 10.0, 7: 0.0})
    res = layer_correlation(x, y, n_boot=100)
    assert res["r"] == pytest.approx(1.0) and res["layers"] == [0, 1, 2, 3, 4]
    y[2] = np.nan
    undefined = layer_correlation(x, y, n_boot=100)
    assert not undefined["defined"] and undefined["reason"].startswith("non-finite")


def test_udhr_capture_is_parallel(gpt2):
    corpus = load_corpus("udhr", langs=["en", "he"], n_texts=3)
    acts = collect_activations(gpt2, corpus, layers=[0], progress=False)
    assert acts.parallel() and acts.text_ids("he") == list(corpus.ids["he"])


def test_massive_tokens_are_flagged_and_dropped_at_every_layer():
    acts = synthetic_tokens(10, n_texts=3, d=4, seed=7)
    acts.tokens[1][13] *= 50.0  # one planted massive token (text row 1), at layer 1 only
    flagged = acts.massive_tokens(10.0)
    assert flagged["position"].tolist() == [13] and flagged["layer"].tolist() == [1]
    assert flagged["max_ratio"].iloc[0] > 10
    clean = acts.without_massive_tokens(10.0)
    assert len(clean.token_index) == len(acts.token_index) - 1 and len(clean.dropped_tokens) == 1
    keep = np.r_[0:13, 14:len(acts.token_index)]
    for layer in acts.layers:
        np.testing.assert_array_equal(clean.tokens[layer], acts.tokens[layer][keep])
    # the variance of English (text rows 0..2) without the dropped row, by hand
    X = acts.tokens[1].astype(np.float64)[keep][:29]
    got = language_variance(clean, n_boot=10).per_language
    want = np.var(X, axis=0).mean()
    assert got[(got["layer"] == 1) & (got["lang"] == "en")]["variance"].iloc[0] == pytest.approx(want, rel=1e-9)
    with pytest.raises(ConfigError, match="ratio"):
        acts.massive_tokens(0.5)


def test_unpaired_bootstrap_when_texts_differ():
    index = pd.DataFrame({"lang": ["en"] * 3 + ["de"] * 4, "text_id": ["a", "b", "c", "a", "b", "c", "d"]})
    rng = np.random.default_rng(0)
    acts = LayerActivations.from_arrays({0: rng.normal(size=(7, 3))}, index)
    assert not acts.parallel()
    counts, paired = text_bootstrap_counts(acts, None, 25, seed=4)
    assert not paired and counts["en"].shape == (25, 3) and counts["de"].shape == (25, 4)
    want = stats.bootstrap_counts(4, 25, np.random.default_rng([4, zlib.crc32(b"de")]))
    np.testing.assert_array_equal(counts["de"], want)
    assert (counts["en"].sum(axis=1) == 3).all()

"""Tests of qhelpers.experiments.morphology: minimal-pair data, sentence log-probabilities, the logit lens,
agreement statistics (T-008), each against an independent known answer."""
from __future__ import annotations

import json
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib import pyplot as plt

from qhelpers.experiments import morphology as mo
from qhelpers.measure.activations import capture_residual
from qhelpers.quant.engine import QuantEngine
from qhelpers.text.encoding import encode_text
from qhelpers.util.errors import ConfigError, CorpusError, MeasurementError

TEXTS = ["The children play", "Die Kinder spielen im Garten heute", "הילדים צוחקים בחצר", "Watoto"]
PAIRS = pd.DataFrame({
    "pair_id": ["en-a", "de-a", "he-a"],
    "lang": ["en", "de", "he"],
    "correct": ["The dogs bark at night", "Der Hund bellt sehr laut", "הילדים צוחקים בחצר"],
    "wrong": ["The dogs barks at night", "Der Hund bellen sehr laut", "הילדים צוחק בחצר"],
})


def hand_logprob(model, tokenizer, text: str) -> float:
    """Sum of log p(token_t | tokens_<t) from one unbatched model(ids).logits call."""
    ids = encode_text(tokenizer, text)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())


# ----------------------------------------------------------------------------- data


def test_packaged_pairs_are_valid_and_large_enough():
    pairs = mo.load_minimal_pairs()
    counts = pairs.groupby("lang").size()
    for lang in ("he", "ar", "en", "de", "fr", "sw"):
        assert counts[lang] >= 24, f"{lang} has only {counts[lang]} pairs"
    assert set(pairs["feature"]) <= set(mo.FEATURES)
    assert pairs["pair_id"].is_unique
    # exactly one whitespace token differs, and it is the recorded one
    for row in pairs.itertuples():
        a, b = row.correct.split(), row.wrong.split()
        assert len(a) == len(b)
        assert [i for i in range(len(a)) if a[i] != b[i]] == [row.position]
        assert (a[row.position], b[row.position]) == (row.correct_word, row.wrong_word)
    for lang in ("he", "ar"):  # the MRLs test more than one feature
        assert pairs.loc[pairs["lang"] == lang, "feature"].nunique() >= 3
    info = mo.minimal_pairs_info()
    assert "not native-speaker validated" in info["provenance"]
    assert info["n_pairs"] == counts.to_dict()
    assert pairs.attrs["provenance"] == info["provenance"]


def test_load_filters_and_samples_deterministically():
    he = mo.load_minimal_pairs(["he", "en"])
    assert list(dict.fromkeys(he["lang"])) == ["he", "en"]
    a = mo.load_minimal_pairs(["he", "ar"], n_pairs=5, seed=3)
    b = mo.load_minimal_pairs(["he", "ar"], n_pairs=5, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert a.groupby("lang").size().to_dict() == {"he": 5, "ar": 5}
    assert set(a["pair_id"]) <= set(mo.load_minimal_pairs(["he", "ar"])["pair_id"])
    # a language's sample does not depend on which other languages are loaded
    only_he = mo.load_minimal_pairs(["he"], n_pairs=5, seed=3)
    assert only_he["pair_id"].tolist() == a.loc[a["lang"] == "he", "pair_id"].tolist()


def _doc(**pair_overrides):
    pair = {"id": "he-1", "lang": "he", "feature": "number", "phenomenon": "subject-verb",
            "correct": "הילדים צוחקים בחצר", "wrong": "הילדים צוחק בחצר", "gloss": ""}
    pair.update(pair_overrides)
    return {"provenance": "test", "pairs": [pair]}


@pytest.mark.parametrize(
    "doc, match",
    [
        ({"pairs": _doc()["pairs"]}, "provenance"),
        ({"provenance": "", "pairs": _doc()["pairs"]}, "provenance"),
        ({"provenance": "x", "pairs": []}, "non-empty list"),
        (_doc(wrong="הילדים צוחק בגן"), "differ in 2 whitespace tokens"),
        (_doc(wrong="הילדים צוחקים בחצר"), "differ in 0 whitespace tokens"),
        (_doc(wrong="הילדים צוחק"), "different numbers of whitespace tokens"),
        (_doc(correct="  "), "'correct' is empty"),
        (_doc(lang="xx"), "unknown language 'xx'"),
        (_doc(feature="case"), "unknown feature 'case'"),
        (_doc(gloss=None), "'gloss' must be a string"),
        ({"provenance": "x", "pairs": [{"id": "a", "lang": "he"}]}, "missing keys"),
        ({"provenance": "x", "pairs": [dict(_doc()["pairs"][0], note="x")]}, "unknown keys \\['note'\\]"),
        ({"provenance": "x", "pairs": _doc()["pairs"] * 2}, "id used twice"),
    ],
)
def test_validation_names_the_problem(tmp_path, doc, match):
    with pytest.raises(CorpusError, match=match):
        mo.validate_pairs(doc)
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(CorpusError, match=match):
        mo.load_minimal_pairs(path=path)


def test_load_errors_name_the_fix(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(CorpusError, match="not valid JSON"):
        mo.load_minimal_pairs(path=bad)
    with pytest.raises(CorpusError, match="not found"):
        mo.load_minimal_pairs(path=tmp_path / "missing.json")
    with pytest.raises(CorpusError, match="no minimal pairs for \\['zh'\\]"):
        mo.load_minimal_pairs(["he", "zh"])
    with pytest.raises(CorpusError, match="unknown language codes"):
        mo.load_minimal_pairs(["klingon"])
    with pytest.raises(ConfigError, match="n_pairs must be a positive int"):
        mo.load_minimal_pairs(n_pairs=0)


def test_depth_convention():
    assert [mo.depth_layer(n) for n in (12, 30, 4, 1)] == [9, 22, 3, 0]
    assert mo.depth_layer(30, 0.0) == 0 and mo.depth_layer(30, 1.0) == 29
    assert mo.layer_depth(9, 12) == 0.75
    with pytest.raises(ConfigError, match="fraction"):
        mo.depth_layer(12, 75)


# ----------------------------------------------------------------------------- scoring


def test_sentence_logprob_equals_a_hand_loop(tiny_model):
    lm = tiny_model("gpt2")
    got = mo.sentence_logprobs(lm, TEXTS)  # batched with padding, last-layer lens
    want = [hand_logprob(lm.model, lm.tokenizer, t) for t in TEXTS]
    assert got.shape == (len(TEXTS), 1)
    np.testing.assert_allclose(got[:, 0], want, rtol=0, atol=1e-4)
    # one text per batch gives the same numbers
    single = mo.sentence_logprobs(lm, TEXTS, batch_tokens=2)
    np.testing.assert_allclose(single[:, 0], want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt", "bloom", "qwen2", "gpt_neox", "gemma3_text"])
def test_logit_lens_at_the_last_layer_is_the_models_output(tiny_model, arch):
    lm = tiny_model(arch)
    ids = torch.tensor([encode_text(lm.tokenizer, "The children play in the garden")])
    with torch.no_grad():
        want = lm.model(ids).logits[0].float()
    last = lm.n_layers - 1
    hidden = capture_residual(lm.model, ids, layers=last)[last][0]
    got = mo.logit_lens(lm, hidden)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-5
    # an intermediate layer is a different read-out (the lens really uses the layer)
    early = mo.logit_lens(lm, capture_residual(lm.model, ids, layers=0)[0][0])
    assert float((early - want).abs().max()) > 1e-3


def test_logit_lens_rejects_a_residual_of_the_wrong_width(tiny_model):
    lm = tiny_model("gpt2")
    with pytest.raises(MeasurementError, match="width"):
        mo.logit_lens(lm, torch.zeros(3, 7))


def test_pair_margins_equal_full_sentence_differences(tiny_model):
    lm = tiny_model("gpt2")
    fast = mo.score_pairs(lm, PAIRS)  # from the first differing token
    full = mo.score_pairs(lm, PAIRS, from_divergence=False)
    hand = [hand_logprob(lm.model, lm.tokenizer, c) - hand_logprob(lm.model, lm.tokenizer, w)
            for c, w in zip(PAIRS["correct"], PAIRS["wrong"])]
    np.testing.assert_allclose(fast["margin"], hand, rtol=0, atol=1e-4)
    np.testing.assert_allclose(full["margin"], hand, rtol=0, atol=1e-4)
    np.testing.assert_allclose(full["logp_correct"], [hand_logprob(lm.model, lm.tokenizer, c) for c in PAIRS["correct"]],
                               rtol=0, atol=1e-4)
    assert (fast["n_scored_correct"] < full["n_scored_correct"]).all()  # the shared prefix is skipped
    assert (fast["solved"] == (fast["margin"] > 0)).all()
    assert list(fast.columns) == list(mo.SCORE_COLUMNS)
    assert fast["layer"].tolist() == [lm.n_layers - 1] * 3 and fast["config"].unique().tolist() == ["fp"]


def test_a_token_prefix_pair_is_refused(tiny_model):
    lm = tiny_model("gpt2")
    c, w = "קנינו בית גדול", "קנינו בית גדולה"  # no full stop: the correct form's tokens prefix the wrong one's
    c_ids, w_ids = encode_text(lm.tokenizer, c), encode_text(lm.tokenizer, w)
    assert w_ids[: len(c_ids)] == c_ids
    bad = pd.DataFrame({"pair_id": ["he-x"], "lang": ["he"], "correct": [c], "wrong": [w]})
    with pytest.raises(MeasurementError, match="prefix .* end both sentences with punctuation"):
        mo.score_pairs(lm, bad)
    ok = pd.DataFrame({"pair_id": ["he-x"], "lang": ["he"], "correct": [c + "."], "wrong": [w + "."]})
    assert len(mo.score_pairs(lm, ok)) == 1


def test_per_layer_scores_use_each_layers_lens(tiny_model):
    lm = tiny_model("llama")
    scores = mo.score_pairs(lm, PAIRS.iloc[:2], layers=None)
    assert sorted(scores["layer"].unique()) == list(range(lm.n_layers))
    np.testing.assert_allclose(scores["depth"], scores["layer"] / lm.n_layers)
    # the lens of layer 0, by hand: final norm + head on the captured residual, one sentence
    text = PAIRS["correct"].iloc[0]
    ids = encode_text(lm.tokenizer, text)
    hidden = capture_residual(lm.model, torch.tensor([ids]), layers=0)[0][0]
    with torch.no_grad():
        norm, head = lm.model.model.norm, lm.model.lm_head
        logp = torch.log_softmax(head(norm(hidden)).double(), dim=-1)
    full = mo.score_pairs(lm, PAIRS.iloc[:1], layers=0, from_divergence=False)
    assert full["logp_correct"].iloc[0] == pytest.approx(float(sum(logp[t - 1, ids[t]] for t in range(1, len(ids)))), abs=1e-4)
    by_layer = scores.groupby("layer")["margin"].apply(list)
    assert not np.allclose(by_layer[0], by_layer[lm.n_layers - 1])


def test_variants_are_scored_under_quantization_and_restored(tiny_model):
    lm = tiny_model("gpt2", fresh=True)
    variants = mo.agreement_variants(lm.n_layers, bits=4)
    assert [v.protect.layers for v in variants.values()] == [(), (0, lm.n_layers - 1), (mo.depth_layer(lm.n_layers),)]
    engine = QuantEngine(lm, resident=True)
    scores = mo.score_variants(lm, PAIRS, variants, engine=engine)
    assert list(dict.fromkeys(scores["config"])) == ["fp", *variants]
    with engine.applied(variants["all_quantized"]):
        hand = [hand_logprob(lm.model, lm.tokenizer, c) - hand_logprob(lm.model, lm.tokenizer, w)
                for c, w in zip(PAIRS["correct"], PAIRS["wrong"])]
    q = scores[scores["config"] == "all_quantized"]
    np.testing.assert_allclose(q["margin"], hand, rtol=0, atol=1e-4)
    fp_after = mo.score_pairs(lm, PAIRS)
    np.testing.assert_allclose(fp_after["margin"], scores.loc[scores["config"] == "fp", "margin"], rtol=0, atol=1e-9)
    assert not np.allclose(q["margin"], fp_after["margin"], atol=1e-6)
    # reusing per-layer full-precision scores gives the same table as scoring fp again
    lens = mo.score_pairs(lm, PAIRS, layers=None)
    reused = mo.score_variants(lm, PAIRS, {"all_quantized": variants["all_quantized"]}, baseline_scores=lens, engine=engine)
    expect = scores[scores["config"].isin(["fp", "all_quantized"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(reused.drop(columns=["logp_correct", "logp_wrong", "margin"]),
                                  expect.drop(columns=["logp_correct", "logp_wrong", "margin"]))
    np.testing.assert_allclose(reused["margin"], expect["margin"], rtol=0, atol=1e-4)
    assert reused.attrs["n_layers"] == lm.n_layers
    with pytest.raises(ConfigError, match="covering every pair"):
        mo.score_variants(lm, PAIRS, {}, baseline_scores=lens[lens["pair_id"] != "de-a"])


# ----------------------------------------------------------------------------- statistics


def table(margins: dict[tuple[str, str, int], list[float]]) -> pd.DataFrame:
    """A score table from {(config, lang, layer): margins per pair}."""
    rows = []
    for (config, lang, layer), values in margins.items():
        for i, m in enumerate(values):
            rows.append({"config": config, "lang": lang, "pair_id": f"{lang}-{i}", "layer": layer,
                         "margin": m, "solved": m > 0})
    return pd.DataFrame(rows)


def test_accuracy_and_margin_on_a_hand_made_table():
    scores = table({
        ("fp", "he", 3): [1.0, 2.0, -1.0, 0.0],   # solved: 1, 1, 0, 0 (a tie is not solved)
        ("fp", "en", 3): [0.5, 0.5, 0.5],
        ("q", "he", 3): [-1.0, 2.0, -1.0, -4.0],
        ("q", "en", 3): [0.5, -0.5, 0.5],
    })
    acc = mo.accuracy_table(scores, n_boot=500, seed=1).set_index(["config", "lang"])
    assert acc.loc[("fp", "he"), "accuracy"] == 0.5
    assert acc.loc[("fp", "he"), "margin"] == pytest.approx(0.5)
    assert acc.loc[("q", "he"), "accuracy"] == 0.25 and acc.loc[("q", "he"), "margin"] == pytest.approx(-1.0)
    assert acc.loc[("q", "en"), "accuracy"] == pytest.approx(2 / 3)
    # every en pair solved under fp: every resample gives 1, a degenerate interval
    assert (acc.loc[("fp", "en"), "accuracy_ci_low"], acc.loc[("fp", "en"), "accuracy_ci_high"]) == (1.0, 1.0)
    assert acc.loc[("fp", "en"), "margin_ci_low"] == pytest.approx(0.5)
    assert (acc["n"].to_dict() == {("fp", "he"): 4, ("fp", "en"): 3, ("q", "he"): 4, ("q", "en"): 3})
    # the CI matches a numpy percentile bootstrap with the same resamples
    rng = np.random.default_rng([1, zlib.crc32(b"he")])
    idx = rng.integers(0, 4, size=(500, 4))
    reps = np.array([1, 1, 0, 0])[idx].mean(axis=1)
    assert acc.loc[("fp", "he"), "accuracy_ci_low"] == pytest.approx(np.percentile(reps, 2.5))
    assert acc.loc[("fp", "he"), "accuracy_ci_high"] == pytest.approx(np.percentile(reps, 97.5))

    drop = mo.accuracy_contrast(scores, {"fp": 1, "q": -1}, ["he"], ["en"], n_boot=500)
    assert drop.value == pytest.approx((0.5 - 0.25) - (1.0 - 2 / 3))
    per_lang = mo.language_contrast(scores, {"fp": 1, "q": -1}, n_boot=500).set_index("lang")
    assert per_lang.loc["he", "value"] == pytest.approx(0.25) and per_lang.loc["en", "value"] == pytest.approx(1 / 3)


def test_contrasts_are_paired_within_a_language():
    solved = [1.0, -1.0] * 10
    scores = table({("fp", "he", 0): solved, ("q", "he", 0): solved,
                    ("fp", "en", 0): solved, ("q", "en", 0): [-1.0] * 20})
    per_lang = mo.language_contrast(scores, {"fp": 1, "q": -1}, n_boot=300).set_index("lang")
    # identical per-pair outcomes: the drop is 0 in every paired resample
    assert (per_lang.loc["he", "value_ci_low"], per_lang.loc["he", "value_ci_high"]) == (0.0, 0.0)
    est = mo.accuracy_contrast(scores, {"fp": 1, "q": -1}, ["he"], ["en"], n_boot=300)
    assert est.value == pytest.approx(-0.5) and est.defined


def test_chance_baseline_makes_a_contrast_undefined():
    scores = table({("fp", "he", 0): [1.0, -1.0] * 10, ("q", "he", 0): [-1.0] * 20,
                    ("fp", "en", 0): [1.0] * 20, ("q", "en", 0): [1.0] * 20})
    est = mo.accuracy_contrast(scores, {"fp": 1, "q": -1}, ["he"], ["en"], baseline="fp", n_boot=300)
    assert not est.defined and est.reason.startswith("chance:") and "lr_langs" in est.reason
    assert mo.accuracy_contrast(scores, {"fp": 1, "q": -1}, ["he"], ["en"], n_boot=300).value == pytest.approx(0.5)


def planted(k: int, n_layers: int, n_pairs: int, langs=("he", "ar"), seed: int = 0) -> pd.DataFrame:
    """Layer k separates the pairs (90 % solved); every other layer is at chance."""
    rng = np.random.default_rng(seed)
    margins = {}
    for lang in langs:
        for layer in range(n_layers):
            p = 0.9 if layer == k else 0.5
            margins[("fp", lang, layer)] = list(np.where(rng.random(n_pairs) < p, 1.0, -1.0))
    return table(margins)


@pytest.mark.parametrize("k", [2, 9, 13])
def test_planted_separating_layer_is_found(k):
    n_layers = 16
    scores = planted(k, n_layers, n_pairs=60, seed=k)
    est = mo.peak_depth(scores, ["he", "ar"], n_layers, n_boot=400)
    assert est.defined and est.value == k / n_layers
    assert est.ci_low <= k / n_layers <= est.ci_high
    shifted = mo.peak_depth(scores, ["he", "ar"], n_layers, n_boot=400, offset=0.75)
    assert (shifted.value, shifted.ci_low, shifted.ci_high) == pytest.approx(
        (est.value - 0.75, est.ci_low - 0.75, est.ci_high - 0.75))
    peaks = mo.peak_table(scores, n_layers, {"MRL": ["he", "ar"]}, n_boot=400).set_index("langs")
    assert peaks.loc["MRL", "peak_layer"] == k and peaks.loc["he", "peak_layer"] == k


def test_peak_ties_and_no_signal():
    n_layers = 8
    margins = {("fp", "he", layer): ([1.0] * 20 if layer >= 4 else [1.0, -1.0] * 10) for layer in range(n_layers)}
    scores = table(margins)
    assert mo.peak_depth(scores, ["he"], n_layers, n_boot=200, tie="first").value == 4 / 8
    assert mo.peak_depth(scores, ["he"], n_layers, n_boot=200, tie="last").value == 7 / 8
    assert mo.peak_depth(scores, ["he"], n_layers, n_boot=200, tie="mean").value == pytest.approx(5.5 / 8)
    flat = table({("fp", "he", layer): [1.0, -1.0] * 10 for layer in range(n_layers)})
    est = mo.peak_depth(flat, ["he"], n_layers, n_boot=200)
    assert not est.defined and est.reason.startswith("no signal:")


def test_statistics_reject_bad_input():
    scores = table({("fp", "he", 0): [1.0, -1.0], ("fp", "he", 1): [1.0, 1.0]})
    with pytest.raises(ConfigError, match="no scores for languages \\['ar'\\]"):
        mo.peak_depth(scores, ["ar"], 2)
    with pytest.raises(ConfigError, match="tie must be"):
        mo.peak_depth(scores, ["he"], 2, tie="middle")
    with pytest.raises(ConfigError, match="no scores for configurations"):
        mo.accuracy_contrast(scores, {"fp": 1, "int4": -1}, ["he"], ["en"])
    with pytest.raises(ConfigError, match="in both groups"):
        mo.accuracy_contrast(scores, {"fp": 1}, ["he"], ["he"])
    with pytest.raises(ConfigError, match="lacks columns"):
        mo.accuracy_table(scores.drop(columns="solved"))
    uneven = table({("fp", "he", 0): [1.0, -1.0], ("q", "he", 0): [1.0]})
    with pytest.raises(ConfigError, match="different pairs"):
        mo.accuracy_table(uneven)


def test_layer_curve_figure_plots_the_table():
    scores = planted(2, 4, n_pairs=10, langs=("he", "en"))
    curve = mo.accuracy_table(scores, n_boot=100)
    fig = mo.plot_layer_curves(curve, 4)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["he (n = 10 pairs)", "en (n = 10 pairs)"]
    line = visible[0].get_lines()[0]
    he = curve[curve["lang"] == "he"].sort_values("layer")
    np.testing.assert_allclose(line.get_xdata(), he["layer"] / 4)
    np.testing.assert_allclose(line.get_ydata(), he["accuracy"])
    with pytest.raises(ConfigError, match="several configurations"):
        mo.plot_layer_curves(pd.concat([curve, curve.assign(config="q")]), 4)
    plt.close(fig)

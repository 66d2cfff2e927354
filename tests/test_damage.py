"""The damage card's per-text measures: KL to the full model, top-1 agreement, KL histogram."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qhelpers.measure.divergence import token_kl
from qhelpers.measure.scoring import MeasureConfig, Scorer
from qhelpers.measure.sweep import run_sweep
from qhelpers.models.loading import load_model
from qhelpers.quant.engine import QuantEngine, Variant
from qhelpers.quant.quantizers import QuantConfig
from qhelpers.stats.quantities import KL_HIST_EDGES, histogram_quantile
from qhelpers.text.encoding import encode_text
from qhelpers.util.errors import MeasurementError

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "All human beings are born free and equal in dignity and rights.",
    "השועל החום המהיר קופץ מעל הכלב העצלן.",
    "Kila mtu anayo haki ya kuishi, uhuru na usalama wa maisha yake. " * 3,
]
INT4 = Variant("int4", QuantConfig(bits=4, granularity="channel"))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny:llama", device="cpu")


def test_token_kl_equals_torch_kl_div():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(5, 50, generator=g), -1)
    logq = torch.log_softmax(torch.randn(5, 50, generator=g), -1)
    expected = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1).double()
    torch.testing.assert_close(token_kl(logp, logq), expected, rtol=1e-6, atol=1e-9)
    assert torch.equal(token_kl(logp, logp), torch.zeros(5, dtype=torch.float64))


def test_histogram_quantile_matches_numpy_within_one_bin():
    rng = np.random.default_rng(0)
    x = rng.lognormal(-4, 2, size=50_000)
    counts, _ = np.histogram(x, KL_HIST_EDGES)
    for q in (0.5, 0.9, 0.99):
        got, want = histogram_quantile(counts, q), np.percentile(x, 100 * q)
        assert abs(np.log(got / want)) < np.log(10) / 40  # within one bin (5.9 %)
    assert np.isnan(histogram_quantile(np.zeros_like(counts), 0.99))
    batch = np.stack([counts, 2 * counts])  # replicates: same distribution, same quantile
    np.testing.assert_allclose(histogram_quantile(batch, 0.99), histogram_quantile(counts, 0.99))


def test_compare_equals_hand_computation_and_batching(tiny):
    engine = QuantEngine(tiny)
    scorer_batched = Scorer(tiny, texts=TEXTS, config=MeasureConfig(batch_tokens=4096))
    scorer_single = Scorer(tiny, texts=TEXTS, config=MeasureConfig(max_batch=1))
    assert max(len(b) for b in scorer_batched.batches) > 1
    frames = {}
    for name, scorer in (("batched", scorer_batched), ("single", scorer_single)):
        scorer.score(damage="reference")
        with engine.applied(INT4):
            frames[name] = scorer.score(damage="compare")
    a, b = frames["batched"], frames["single"]
    # batched and single-text forwards run other GEMM shapes: equal up to the float32 rounding of the
    # card's log-probabilities (~1e-7 nats per token, as against the float64 hand computation below),
    # not bit for bit (MKL on an Intel CPU happened to give equal bits; on an AMD EPYC 4e-7 nats apart)
    n_tokens = np.array([sum(h) for h in a["kl_hist"]])
    assert (np.abs(a["kl_nats"].to_numpy() - b["kl_nats"].to_numpy()) <= 1e-6 * n_tokens).all()
    np.testing.assert_allclose(a["top1_agree"], b["top1_agree"], rtol=0, atol=1e-12)
    # against two plain forward passes of the full and the quantized model
    with torch.no_grad(), engine.applied(INT4):
        q_logits = [tiny.model(torch.tensor([encode_text(tiny.tokenizer, t)])).logits for t in TEXTS]
    for i, text in enumerate(TEXTS):
        ids = torch.tensor([encode_text(tiny.tokenizer, text)])
        with torch.no_grad():
            lp = torch.log_softmax(tiny.model(ids).logits[0, :-1].double(), -1)
        lq = torch.log_softmax(q_logits[i][0, :-1].detach().double(), -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        # the card's log-probabilities are float32 (token_kl's docstring): ~1e-7 nats per token of rounding
        assert abs(a["kl_nats"][i] - float(kl.sum())) <= 1e-6 * len(kl)
        assert a["kl_nats"][i] == pytest.approx(float(kl.sum()), rel=2e-3)
        assert a["top1_agree"][i] == pytest.approx(float((lp.argmax(-1) == lq.argmax(-1)).double().mean()))
        assert sum(a["kl_hist"][i]) == len(kl)
        # a token may sit in a neighbouring bin when its KL lies within float32 rounding of an edge
        k = kl.clamp_min(0).numpy()
        hand = np.histogram(k, KL_HIST_EDGES)[0]
        ambiguous = int((np.digitize(k - 1e-6, KL_HIST_EDGES) != np.digitize(k + 1e-6, KL_HIST_EDGES)).sum())
        assert np.abs(np.asarray(a["kl_hist"][i]) - hand).sum() <= 2 * ambiguous
    assert (a["kl_nats"] > 0).all() and (a["top1_agree"] <= 1).all()


def test_identical_variant_has_exactly_zero_kl(tiny):
    everything = Variant("all-protected", QuantConfig(bits=4, granularity="channel"), protect={"layers": list(range(tiny.n_layers))})
    sweep = run_sweep(tiny, _corpus(), {"same": everything}, MeasureConfig(), progress=False, prefix_cache=False)
    rows = sweep.scores[sweep.scores["config"] == "same"]
    assert (rows["kl_nats"] == 0.0).all() and (rows["top1_agree"] == 1.0).all()
    base = sweep.scores[sweep.scores["config"] == "fp"]
    assert (base["kl_nats"] == 0.0).all() and (base["top1_agree"] == 1.0).all()


def test_sweep_damage_with_prefix_cache_equals_without(tiny):
    variants = {"int4": INT4, "int4-l0": Variant("int4-l0", INT4.quant, protect={"layers": [0]})}
    on = run_sweep(tiny, _corpus(), variants, progress=False, prefix_cache=True).scores
    off = run_sweep(tiny, _corpus(), variants, progress=False, prefix_cache=False).scores
    np.testing.assert_allclose(on["kl_nats"], off["kl_nats"], rtol=1e-9)
    np.testing.assert_array_equal(on["top1_agree"], off["top1_agree"])
    plain = run_sweep(tiny, _corpus(), variants, MeasureConfig(damage=False), progress=False).scores
    assert "kl_nats" not in plain.columns
    np.testing.assert_array_equal(on["nll"], plain["nll"])  # the damage card leaves NLL as it was


def test_compare_without_reference_is_a_clear_error(tiny):
    scorer = Scorer(tiny, texts=TEXTS)
    with pytest.raises(MeasurementError, match="damage='reference'"):
        scorer.score(damage="compare")


def _corpus():
    from qhelpers.text.corpora import load_corpus

    return load_corpus("udhr", langs=["en", "he"], n_texts=2)


# ------------------------------------------------------------------ the damage card in stats


def planted_damage_scores(n_texts: int = 12, seed: int = 0):
    """Scores with known KL per byte, flips and per-token KL histograms."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for lang, kl_per_byte, flip in (("en", 0.01, 0.05), ("he", 0.03, 0.20)):
        for t in range(n_texts):
            n_bytes, n_tokens = int(rng.integers(200, 400)), int(rng.integers(50, 100))
            token_kl = rng.exponential(kl_per_byte * n_bytes / n_tokens, size=n_tokens)
            hist = np.histogram(token_kl, KL_HIST_EDGES)[0].tolist()
            agree = 1.0 - round(flip * n_tokens) / n_tokens
            base = dict(lang=lang, text_id=f"t{t:02d}", n_tokens=n_tokens, n_bytes=n_bytes)
            rows.append({**base, "config": "fp", "nll": 100.0, "kl_nats": 0.0, "top1_agree": 1.0,
                         "kl_hist": np.histogram(np.zeros(n_tokens), KL_HIST_EDGES)[0].tolist()})
            rows.append({**base, "config": "q", "nll": 101.0, "kl_nats": float(token_kl.sum()),
                         "top1_agree": agree, "kl_hist": hist, "_kl": token_kl})
    return pd.DataFrame(rows)


def test_language_table_damage_card_equals_hand_aggregates():
    from qhelpers.stats.tables import DAMAGE_CARD_COLUMNS, language_table

    scores = planted_damage_scores()
    table = language_table(scores, n_boot=300).set_index("lang")
    for k in DAMAGE_CARD_COLUMNS:
        assert {k, f"{k}_ci_low", f"{k}_ci_high"} <= set(table.columns)
    for lang in ("en", "he"):
        q = scores[(scores["config"] == "q") & (scores["lang"] == lang)]
        kl_bpb = q["kl_nats"].sum() / np.log(2) / q["n_bytes"].sum()
        agree = (q["top1_agree"] * q["n_tokens"]).sum() / q["n_tokens"].sum()
        all_kl = np.concatenate(q["_kl"].to_list())
        row = table.loc[lang]
        assert row["kl_bpb"] == pytest.approx(kl_bpb, rel=1e-12)
        assert row["top1_agree"] == pytest.approx(agree, rel=1e-12)
        assert abs(np.log(row["kl_p99"] / np.percentile(all_kl, 99))) < 2 * np.log(10) / 40  # within two bins
        for k in DAMAGE_CARD_COLUMNS:
            assert row[f"{k}_ci_low"] <= row[k] <= row[f"{k}_ci_high"]
    assert table.loc["he", "kl_bpb_ci_low"] > table.loc["en", "kl_bpb_ci_high"]  # planted: he 3x en
    assert table.loc["he", "top1_agree_ci_high"] < table.loc["en", "top1_agree_ci_low"]


def test_damage_disparity_and_missing_columns():
    from qhelpers.stats.tables import disparity_difference, language_table
    from qhelpers.util.errors import ConfigError

    scores = planted_damage_scores()
    d = disparity_difference(scores, "q", lr_langs=["he"], hr_langs=["en"], metric="kl_bpb", n_boot=300)
    table = language_table(scores, n_boot=300).set_index("lang")
    assert d.value == pytest.approx(table.loc["he", "kl_bpb"] - table.loc["en", "kl_bpb"], rel=1e-12)
    assert d.ci_low > 0
    flips = disparity_difference(scores, "q", lr_langs=["he"], hr_langs=["en"], metric="flip_rate", n_boot=300)
    assert flips.value == pytest.approx(0.15, abs=0.02)
    plain = scores.drop(columns=["kl_nats", "top1_agree", "kl_hist"])
    assert "kl_bpb" not in language_table(plain, n_boot=50).columns
    with pytest.raises(ConfigError, match="damage=True"):
        disparity_difference(plain, "q", lr_langs=["he"], hr_langs=["en"], metric="kl_bpb", n_boot=50)


def test_damage_card_table_records_and_report():
    import json

    from qhelpers.report import html
    from qhelpers.report.damage import damage_card, damage_card_records
    from qhelpers.report.results import to_jsonable
    from qhelpers.stats.tables import language_table

    table = language_table(planted_damage_scores(), n_boot=200)
    card = damage_card(table, "q")
    assert list(card.columns) == ["config", "lang", "n", "Δ bits/byte", "KL bits/byte", "top-1 agreement", "p99 KL (nats)"]
    he = table.set_index("lang").loc["he"]
    assert card.set_index("lang").loc["he", "top-1 agreement"] == (
        f"{he['top1_agree']:.4g} [{he['top1_agree_ci_low']:.4g}, {he['top1_agree_ci_high']:.4g}]")
    records = json.loads(json.dumps(to_jsonable(damage_card_records(table))))
    row = {"model": "m", "stem": "nb", "results": {"metrics": {"damage_card": records}}}
    (stem, cells), = html.damage_cards([row]).values()
    assert stem == "nb" and [c[:2] for c in cells] == [["q", "en"], ["q", "he"]]
    assert cells[1][5] == card.set_index("lang").loc["he", "top-1 agreement"]
    assert "Damage card, m" in "\n".join(html.headline_markdown([row]))
    assert "Damage card, m" in html.headline_html([row])
    with pytest.raises(Exception, match="damage card"):
        damage_card(table.drop(columns=["kl_bpb"]))


def test_sliding_windows_keep_one_reference_per_window(tiny):
    """A text longer than max_length is scored in overlapping windows; each keeps its own reference."""
    long_text = " ".join(["Everyone has the right to life, liberty and security of person."] * 12)
    engine = QuantEngine(tiny)
    windowed = Scorer(tiny, texts=[long_text, TEXTS[0]], config=MeasureConfig(max_length=32, stride=12))
    whole = Scorer(tiny, texts=[long_text, TEXTS[0]], config=MeasureConfig(max_length=256))
    assert len(windowed._windows) > 3
    for scorer in (windowed, whole):
        scorer.score(damage="reference")
    same = windowed.score(damage="compare")  # nothing applied: the full model against itself
    assert (same["kl_nats"] == 0.0).all() and (same["top1_agree"] == 1.0).all()
    with engine.applied(INT4):
        frame = windowed.score(damage="compare")
    assert (frame["kl_nats"] > 0).all()
    assert sum(frame["kl_hist"][0]) == windowed.n_tokens[0]

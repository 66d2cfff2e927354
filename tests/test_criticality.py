"""qhelpers.measure.criticality: planted per-layer effects recovered exactly; a real sweep is consistent."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from qhelpers import stats
from qhelpers.measure.criticality import criticality_variants, layer_criticality
from qhelpers.measure.sweep import SweepResult
from qhelpers.models.loading import load_model
from qhelpers.text.corpora import load_corpus
from qhelpers.util.errors import ConfigError

LN2 = math.log(2.0)
N_LAYERS = 4


class _Loaded:
    n_layers = N_LAYERS


def planted_sweep(delta_bpb: dict[str, dict[str, float]], n_texts: int = 8, mode: str = "protect") -> SweepResult:
    """Scores where config c shifts every text of language L by exactly delta_bpb[c][L] bits per byte."""
    rng = np.random.default_rng(0)
    rows = []
    langs = list(next(iter(delta_bpb.values())))
    for lang in langs:
        byt = rng.integers(200, 400, n_texts)
        tok = byt // 3
        fp = byt * LN2 * rng.uniform(1.0, 2.0, n_texts)
        for config, shifts in {"fp": {x: 0.0 for x in langs}, **delta_bpb}.items():
            nll = fp + shifts[lang] * byt * LN2
            rows += [{"config": config, "lang": lang, "text_id": f"t{i}", "nll": float(a), "n_tokens": int(t),
                      "n_bytes": int(b)} for i, (a, t, b) in enumerate(zip(nll, tok, byt))]
    variants = {"fp": None, **criticality_variants(N_LAYERS, mode=mode)}
    overhead = pd.DataFrame({"config": list(variants), "protected_fraction": [0.0] * len(variants)})
    return SweepResult(scores=pd.DataFrame(rows), variants=variants, overhead=overhead, baseline="fp")


def test_planted_critical_layer_is_recovered_with_exact_values():
    hr, lr = {"en": 0.1, "de": 0.1}, {"he": 0.5, "sw": 0.7}  # D(all) = 0.6 - 0.1 = 0.5
    shifts = {"all_quantized": {**hr, **lr}}
    for i in range(N_LAYERS):
        # protecting layer 2 removes 0.4 bpb of the LR excess, the others 0.1 * i / 3
        removed = 0.4 if i == 2 else 0.1 * i / 3
        shifts[f"protect_L{i}"] = {**hr, **{k: v - removed for k, v in lr.items()}}
    crit = layer_criticality(_Loaded(), None, sweep=planted_sweep(shifts), lr_langs=["he", "sw"],
                             hr_langs=["en", "de"], n_boot=200)
    table = crit.table.set_index("layer")
    expected = [0.1 * i / 3 if i != 2 else 0.4 for i in range(N_LAYERS)]
    np.testing.assert_allclose(table["criticality"], expected, atol=1e-12)
    np.testing.assert_allclose(table["disparity"], 0.5 - np.array(expected), atol=1e-12)
    # every text shifts by the same amount, so the bootstrap interval collapses onto the value
    np.testing.assert_allclose(table["criticality_ci_low"], expected, atol=1e-12)
    np.testing.assert_allclose(table["mean_delta_bpb"], [0.35 - e / 2 for e in expected], atol=1e-12)
    assert crit.most_critical(2) == [2, 3]
    assert list(table["depth"]) == pytest.approx([0, 1 / 3, 2 / 3, 1])


def test_quantize_mode_is_the_single_layer_disparity():
    shifts = {f"quantize_L{i}": {"en": 0.0, "he": 0.1 * i} for i in range(N_LAYERS)}
    variants = criticality_variants(N_LAYERS, mode="quantize")
    assert list(variants) == [f"quantize_L{i}" for i in range(N_LAYERS)]
    assert variants["quantize_L1"].protect.layers == (0, 2, 3)
    sweep = planted_sweep(shifts, mode="quantize")
    crit = layer_criticality(_Loaded(), None, mode="quantize", sweep=sweep, lr_langs=["he"], hr_langs=["en"], n_boot=100)
    np.testing.assert_allclose(crit.values(), [0.0, 0.1, 0.2, 0.3], atol=1e-12)


def test_bad_inputs_name_the_fix():
    with pytest.raises(ConfigError, match="mode must be one of"):
        criticality_variants(4, mode="drop")
    with pytest.raises(ConfigError, match="out of range"):
        criticality_variants(4, layers=[7])
    with pytest.raises(ConfigError, match="measure must be"):
        layer_criticality(_Loaded(), None, measure="mean")


def test_real_sweep_on_tiny_model_matches_stats_directly():
    loaded = load_model("tiny:gpt2", device="cpu")
    corpus = load_corpus("udhr", langs=["en", "de", "he", "sw"], n_texts=2)
    crit = layer_criticality(loaded, corpus, n_boot=50, progress=False, allow_collapsed=True, layers=[0, 3])
    assert list(crit.table["layer"]) == [0, 3]
    for _, row in crit.table.iterrows():
        d_all = stats.disparity_difference(crit.sweep.scores, "all_quantized", metric="delta_bpb", n_boot=50,
                                           allow_collapsed=True)
        d_i = stats.disparity_difference(crit.sweep.scores, row["config"], metric="delta_bpb", n_boot=50,
                                         allow_collapsed=True)
        assert row["criticality"] == pytest.approx(d_all.value - d_i.value, abs=1e-12)
    # without allow_collapsed a random-init model's disparities are undefined, with the reason given
    strict = layer_criticality(loaded, corpus, sweep=crit.sweep, layers=[0, 3], n_boot=50)
    assert not strict.table["defined"].any() and strict.table["reason"].str.startswith("collapsed").all()


@pytest.mark.parametrize("protocol", ["sound", "seed"])
def test_quantize_mode_touches_only_that_layer_under_either_protocol(protocol):
    from qhelpers.quant.engine import QuantEngine

    loaded = load_model("tiny:gpt2", device="cpu")
    variant = criticality_variants(loaded.n_layers, mode="quantize", protocol=protocol, layers=[1])["quantize_L1"]
    plan = QuantEngine(loaded).plan(variant)
    # the seed scope would also quantize wte, wpe and ln_f unless they are protected explicitly
    assert plan.tensors and all(".h.1." in name for name in plan.tensors)

"""Strategy sets (qhelpers.quant.strategies) and the seed 002 study computations (qhelpers.experiments.protection_index).

Known answers are written out by hand; the seed-equivalence test compares the notebook's
computation path with a hand-written loop of the precursor's method.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from qhelpers.experiments import protection_index
from qhelpers.measure.scoring import protocol_measure
from qhelpers.measure.sweep import SweepResult, run_sweep
from qhelpers.quant import strategies
from qhelpers.quant.engine import QuantEngine, Variant
from qhelpers.quant.protection import ProtectionSpec, resolve_plan
from qhelpers.quant.quantizers import QuantConfig
from qhelpers.util.errors import ConfigError


@pytest.fixture(scope="module")
def gpt2(tiny_model):
    return tiny_model("gpt2")


# ----------------------------------------------------------------------------- seed 000 sets


def test_exp005_layer_sets_by_hand():
    sets = strategies.exp005_layer_sets(6)
    assert list(sets) == [
        "fp16_baseline", "all_quantized", "first_protected", "last_protected", "gateway_protected",
        "middle_protected", "first_half_protected", "second_half_protected",
    ]
    quantized = {name: entry["quantized"] for name, entry in sets.items()}
    assert quantized == {
        "fp16_baseline": [],
        "all_quantized": [0, 1, 2, 3, 4, 5],
        "first_protected": [1, 2, 3, 4, 5],
        "last_protected": [0, 1, 2, 3, 4],
        "gateway_protected": [1, 2, 3, 4],
        "middle_protected": [0, 5],
        "first_half_protected": [3, 4, 5],
        "second_half_protected": [0, 1, 2],
    }
    with pytest.raises(ConfigError, match="at least 2"):
        strategies.exp005_layer_sets(1)


@pytest.mark.parametrize("protocol", ["sound", "seed"])
def test_exp005_variants_protect_the_right_layers(protocol):
    variants = strategies.exp005_variants(6, protocol=protocol, bits=3)
    assert len(variants) == 7  # the 8 configurations minus the full-precision baseline
    protected = {name: v.protect.layers for name, v in variants.items()}
    assert protected == {
        "all_quantized": (),
        "first_protected": (0,),
        "last_protected": (5,),
        "gateway_protected": (0, 5),
        "middle_protected": (1, 2, 3, 4),
        "first_half_protected": (0, 1, 2),
        "second_half_protected": (3, 4, 5),
    }
    for v in variants.values():
        assert v.quant.bits == 3
        assert v.quant.granularity == ("tensor" if protocol == "seed" else "channel")
        assert v.scope == ("seed" if protocol == "seed" else "linear")
        assert ("outside_layers" in v.protect.components) == (protocol == "seed")


def test_exp005_seed_protocol_keeps_globals_out_of_quantization(gpt2):
    variants = strategies.exp005_variants(gpt2.n_layers, protocol="seed")
    plan = resolve_plan(gpt2.model, variants["all_quantized"].protect, variants["all_quantized"].scope)
    # every 'weight' inside the blocks (LayerNorms included, as seed 000 did), nothing outside them
    expected = sorted(n for n, _ in gpt2.model.named_parameters() if "weight" in n and ".h." in n)
    assert sorted(plan.tensors) == expected
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"):
        assert name not in plan.tensors
    gateway = resolve_plan(gpt2.model, variants["gateway_protected"].protect, "seed")
    assert not any(".h.0." in n or ".h.3." in n for n in gateway.tensors)
    assert any(".h.1." in n for n in gateway.tensors)


# ----------------------------------------------------------------------------- seed 002 sets


def test_sweep_layers():
    assert strategies.sweep_layers(4) == (0, 1, 2, 3)
    assert strategies.sweep_layers(4, 10) == (0, 1, 2, 3)
    assert strategies.sweep_layers(30, 10) == (0, 3, 6, 10, 13, 16, 19, 23, 26, 29)
    assert strategies.sweep_layers(12, 2) == (0, 11)
    with pytest.raises(ConfigError):
        strategies.sweep_layers(12, 1)


def test_index_variants_quick_sound_without_biases():
    groups = strategies.index_variants(6, "sound", 4, has_biases=False, layers=(0, 3, 5))
    names = {group: list(members) for group, members in groups.items()}
    assert names == {
        "all quantized": ["none"],
        "per-layer": ["L0", "L3", "L5"],
        "gateway": ["L0+L5"],
        "layer-0 components": ["L0.attn", "L0.mlp"],
        "norms, biases, embeddings": ["all:none", "all:all_norms", "all:embed_tokens"],
        "even/odd": ["even_layers", "odd_layers"],
    }
    flat = {n: v for members in groups.values() for n, v in members.items()}
    assert flat["L0+L5"].protect.layers == (0, 5)
    assert flat["even_layers"].protect.layers == (0, 2, 4)
    assert flat["odd_layers"].protect.layers == (1, 3, 5)
    assert flat["all:all_norms"].protect.components == ("norm", "final_norm")
    assert {flat[n].scope for n in ("none", "L3", "L0.mlp", "odd_layers")} == {"linear"}
    assert {flat[n].scope for n in ("all:none", "all:embed_tokens")} == {"all"}


def test_index_variants_seed_full_with_biases():
    groups = strategies.index_variants(4, "seed", 4, has_biases=True, layer_sweep=("layer", "mlp"), detail="full")
    flat = {n: v for members in groups.values() for n, v in members.items()}
    # the seeds' scope already quantizes norms and embeddings: no prefix; biases need scope all
    for name in ("all_norms", "embed_tokens", "L0.norm", "L0+L3+final_norm", "L0+L3+all_norms"):
        assert flat[name].scope == "seed"
    for name in ("all:none", "all:biases", "all:L0+L3+final_norm+biases"):
        assert flat[name].scope == "all"
    assert flat["all:biases"].protect.components == ("bias",)
    assert "L2.mlp" in groups["per-layer"] and "L0.mlp" in groups["per-layer"]
    assert "L0.mlp" not in groups["layer-0 components"]  # already in the sweep: names stay unique
    assert {"L0.attn_qkv", "L0.attn_out", "L0.mlp_in", "L0.mlp_out"} <= set(groups["layer-0 components"])
    assert all(v.quant.granularity == "tensor" for v in flat.values())
    with pytest.raises(ConfigError, match="layer_sweep"):
        strategies.index_variants(4, layer_sweep=("heads",))


def test_equal_overhead_precision_and_custom_variants():
    controls = strategies.equal_overhead_variants(0.25, 8, "sound", 4, k=2, draws=3, seed=5, exclude=(0, 7))
    assert controls["random_elements"].protect.random_fraction == 0.25
    assert controls["random_elements"].protect.seed == 5
    assert controls["magnitude_elements"].protect.magnitude_fraction == 0.25
    for j in (1, 2, 3):
        layers = controls[f"random_layers_{j}"].protect.layers
        assert layers == strategies.random_layers(8, 2, seed=5 + j - 1, exclude=(0, 7))
        assert len(layers) == 2 and not {0, 7} & set(layers)

    precision = strategies.precision_variants(4, [2, 4, 8], "seed", skip_bits=4)
    assert list(precision) == ["int2:none", "int2:L0+L3", "int8:none", "int8:L0+L3"]
    assert precision["int8:L0+L3"].quant.bits == 8 and precision["int8:L0+L3"].scope == "seed"

    custom = strategies.custom_variants({"none": [], "layer0": ["h.0."], "wide": {"layers": [1], "scope": "all", "bits": 3}}, "seed")
    assert custom["layer0"].protect.patterns == ("h.0.",) and custom["layer0"].scope == "seed"
    assert custom["wide"].scope == "all" and custom["wide"].quant.bits == 3 and custom["wide"].protect.layers == (1,)
    with pytest.raises(ConfigError):
        strategies.custom_variants({}, "sound")


def test_top_layers_and_protocol_measure():
    assert strategies.top_layers_by({0: 0.3, 1: 0.1, 2: 0.5, 3: 0.2}, 2) == (0, 2)
    assert strategies.top_layers_by({0: 0.3, 1: 0.1, 2: 0.5, 3: 0.2}, 2, largest=False) == (1, 3)
    seed = protocol_measure("seed", 512, context_length=8192)
    assert (seed.max_length, seed.truncate, seed.prepend_bos, seed.max_batch) == (256, True, False, 1)
    assert protocol_measure("seed", context_length=128).max_length == 128
    assert protocol_measure("sound", 512, context_length=256).max_length == 256
    assert protocol_measure("sound", 512, context_length=1024).truncate is False
    assert strategies.wide_scope("seed") == "seed" and strategies.wide_scope("sound") == "all"


def test_plan_strategies_on_tiny_gpt2(gpt2):
    engine = QuantEngine(gpt2)
    plan = protection_index.plan_strategies(gpt2, engine, "sound", 4, precision_bits=[2, 4, 8], random_draws=1)
    assert plan.gateway == "L0+L3" and plan.sweep_layers == (0, 1, 2, 3)
    for name in ("none", "L0", "L3", "L0+L3", "all:biases", "random_elements", "magnitude_elements",
                 "random_layers_1", "top2_variance", "int2:none", "int8:L0+L3"):
        assert name in plan.variants, name
    assert "int4:none" not in plan.variants
    # two of four equally sized blocks are protected: half of the linear scope stays in fp
    assert plan.gateway_kept_fraction == pytest.approx(0.5)
    gate = engine.plan(plan.variants["L0+L3"])
    rand = engine.plan(plan.variants["random_elements"])
    assert rand.scope_kept_fraction == pytest.approx(gate.scope_kept_fraction, abs=1e-3)
    variance = dict(zip(plan.variance["layer"], plan.variance["variance_pooled"]))
    assert plan.top_variance == strategies.top_layers_by(variance, 2)
    table = plan.table(engine)
    assert list(table["strategy"]) == list(plan.variants)

    custom = protection_index.plan_strategies(gpt2, engine, "seed", 4, custom={"none": [], "layer0": ["h.0."]})
    assert custom.custom and list(custom.variants) == ["none", "layer0"]
    assert custom.groups == {"none": "custom", "layer0": "custom"}


# ----------------------------------------------------------------------------- IndexStudy on known scores


def synthetic_sweep(n_texts: int, factors: dict[str, dict[str, float]]) -> SweepResult:
    """Scores where every text of ``lang`` has 10 tokens, 40 bytes, fp nll 2.0 nats per token and,
    under config ``c``, nll per token ``2.0 + ln(factors[c][lang])`` (so ppl_q / ppl_fp = factor)."""
    rows = []
    langs = list(next(iter(factors.values())))
    for config in ["fp", *factors]:
        for lang in langs:
            for t in range(n_texts):
                per_token = 2.0 + (0.0 if config == "fp" else math.log(factors[config][lang]))
                rows.append({"config": config, "lang": lang, "text_id": f"t{t}", "nll": 10 * per_token, "n_tokens": 10, "n_bytes": 40})
    variants = {"fp": Variant("fp"), **{c: Variant(c, QuantConfig.seed(), ProtectionSpec(), "seed") for c in factors}}
    overhead = pd.DataFrame({"config": list(variants), "protected_fraction": [1.0] + [0.1 * (i + 1) for i in range(len(factors))]})
    return SweepResult(scores=pd.DataFrame(rows), variants=variants, overhead=overhead)


FACTORS = {
    "a": {"en": 1.5, "he": 2.0, "ar": 3.0},
    "b": {"en": 2.0, "he": 2.0, "ar": 2.0},
}


def test_strategy_metrics_seed_known_answers():
    study = protection_index.IndexStudy(synthetic_sweep(2, FACTORS), protocol="seed", lr_langs=["he", "ar"], hr_langs=["en"], n_boot=50)
    metrics = study.strategy_metrics()
    assert list(metrics) == ["a", "b"]
    a = metrics["a"]
    assert a["protected_fraction"] == pytest.approx(0.1)
    ppl_fp = math.exp(2.0)
    for lang, factor in FACTORS["a"].items():
        entry = a["per_language"][lang]
        assert entry["ppl_fp"] == pytest.approx(ppl_fp)
        assert entry["ppl_q"] == pytest.approx(ppl_fp * factor)
        assert entry["degradation"] == pytest.approx(factor - 1.0)
        assert entry["delta_bpb"] == pytest.approx(10 * 2 * math.log(factor) / math.log(2) / 80)
        assert entry["degradation_ci_low"] == pytest.approx(factor - 1.0)  # identical texts: no spread
    assert a["per_language"]["he"]["disparity"] == pytest.approx(1.0 / 0.5)
    assert a["per_language"]["ar"]["disparity"] == pytest.approx(2.0 / 0.5)
    assert a["per_language"]["ar"]["disparity_defined"] is True
    assert a["per_language"]["ar"]["disparity_ci_low"] == pytest.approx(4.0)
    assert a["per_language"]["en"]["disparity"] == 1.0
    assert a["disparity"]["value"] == pytest.approx((1.0 + 2.0) / 2 / 0.5)
    assert a["disparity"]["defined"] is True
    assert (a["disparity"]["ci_low"], a["disparity"]["ci_high"]) == pytest.approx((3.0, 3.0))
    assert metrics["b"]["disparity"]["value"] == pytest.approx(1.0)
    # contrast: D(a) - D(b) = 3 - 1
    assert study.contrast({"a": 1, "b": -1}).value == pytest.approx(2.0)
    assert study.definition()["hr_langs"] == ["en"]


def test_strategy_metrics_sound_known_answers_and_single_text():
    study = protection_index.IndexStudy(synthetic_sweep(2, FACTORS), protocol="sound", lr_langs=["he", "ar"], hr_langs=["en"], n_boot=50)
    bpb = {lang: 10 * 2 * math.log(f) / math.log(2) / 80 for lang, f in FACTORS["a"].items()}
    d = study.disparity("a")
    assert d.defined and d.value == pytest.approx((bpb["he"] + bpb["ar"]) / 2 - bpb["en"])
    per_lang = study.strategy_metrics()["a"]["per_language"]
    assert per_lang["ar"]["disparity"] == pytest.approx(bpb["ar"] - bpb["en"])
    assert per_lang["en"]["disparity"] == 0.0

    single = protection_index.IndexStudy(synthetic_sweep(1, FACTORS), protocol="seed", lr_langs=["he", "ar"], hr_langs=["en"], n_boot=50)
    one = single.strategy_metrics()["a"]
    assert one["disparity"]["value"] == pytest.approx(3.0)  # the seeds' number is kept ...
    assert one["disparity"]["defined"] is False  # ... but one text gives no interval
    assert one["disparity"]["reason"].startswith("too few")
    assert "disparity_ci_low" not in one["per_language"]["he"] and "degradation_ci_low" not in one["per_language"]["he"]
    assert one["per_language"]["he"]["disparity"] == pytest.approx(2.0)


def test_collapse_keeps_the_value_and_says_why():
    factors = {"a": {"en": 1e9, "he": 2e9, "ar": 3e9}}
    study = protection_index.IndexStudy(synthetic_sweep(3, factors), protocol="seed", lr_langs=["he", "ar"], hr_langs=["en"],
                                   n_boot=50, vocab_size=50000)
    d = study.disparity("a")
    expected = ((2e9 - 1) + (3e9 - 1)) / 2 / (1e9 - 1)
    assert not d.defined and d.value == pytest.approx(expected) and d.reason.startswith("collapsed")
    assert "collapses under 1 of 1" in study.collapse_note()
    assert protection_index.short_reason("collapsed: a; b; c; d (the model is destroyed, x)") == (
        "collapsed: a; b; and 2 more (the model is destroyed, x)"
    )


# ----------------------------------------------------------------------------- seed equivalence


def seed_quantize(tensor: torch.Tensor) -> torch.Tensor:
    """The precursor's per-tensor symmetric INT4."""
    scale = tensor.abs().max() / 7
    return torch.clamp(torch.round(tensor / scale), -8, 7) * scale


def test_notebook_path_equals_the_seeds_method_on_seed_exp032(tiny_model):
    loaded = tiny_model("gpt2", fresh=True)
    model, tokenizer = loaded.model, loaded.tokenizer
    user = {"none": [], "layer0": ["h.0."], "L0+L3": ["h.0.", "h.3."]}

    # the notebook's computation path (PROTOCOL "seed", CORPUS "seed-exp032")
    corpus, _ = protection_index.load_study_corpus("seed-exp032", ["en", "de", "fr", "zh", "ar", "he", "sw"], 3)
    engine = QuantEngine(loaded)
    plan = protection_index.plan_strategies(loaded, engine, "seed", 4, custom=user)
    sweep = run_sweep(loaded, corpus, plan.variants, protocol_measure("seed", 512, loaded.context_length),
                      engine=engine, progress=False)
    study = protection_index.IndexStudy(sweep, plan, "seed", ["ar", "he", "sw"], ["en", "de", "fr", "zh"], n_boot=20,
                                   vocab_size=model.config.vocab_size)
    metrics = study.strategy_metrics()

    # the precursor's loop
    state = copy.deepcopy(model.state_dict())
    ppl = {}
    with torch.no_grad():
        for strategy, patterns in [("fp", None), *user.items()]:
            model.load_state_dict(state)
            if patterns is not None:
                for name, param in model.named_parameters():
                    if "weight" in name and not any(p in name for p in patterns):
                        param.copy_(seed_quantize(param.data))
            for lang, _, text in corpus.items():
                ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=256).input_ids
                # per-token NLL from the fp32 logits, mean reduced in float64 (HF's own fp32 loss
                # reduction alone carries ~2e-6 relative noise, too much for degradations of ~1e-2)
                token_nll = F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
                ppl[(strategy, lang)] = math.exp(float(token_nll.double().mean()))
        model.load_state_dict(state)

    assert list(metrics) == list(user)
    for strategy in user:
        degradation = {lang: (ppl[(strategy, lang)] - ppl[("fp", lang)]) / ppl[("fp", lang)] for lang in corpus.langs}
        for lang in corpus.langs:
            got = metrics[strategy]["per_language"][lang]
            assert got["ppl_q"] == pytest.approx(ppl[(strategy, lang)], rel=1e-6), (strategy, lang)
            assert got["degradation"] == pytest.approx(degradation[lang], rel=1e-6), (strategy, lang)
            assert got["disparity"] == pytest.approx(degradation[lang] / degradation["en"], rel=1e-6), (strategy, lang)
        avg_lr = np.mean([degradation[lang] / degradation["en"] for lang in ("he", "ar")])
        assert metrics[strategy]["disparity"]["value"] == pytest.approx(avg_lr, rel=1e-6)
        assert metrics[strategy]["disparity"]["defined"] is False  # one sentence per language: no interval


# ----------------------------------------------------------------------------- equal-overhead controls (issue 11)


def bpb_sweep(delta_bpb: dict[str, dict[str, float]], kept: dict[str, int], n_texts: int = 12) -> SweepResult:
    """Scores whose change in bits per byte is exactly ``delta_bpb[config][lang]`` (every text:
    10 tokens, 40 bytes, fp nll 2.0 nats per token), and an overhead table in which ``config``
    keeps ``kept[config]`` of 1000 in-scope parameters in full precision."""
    rows = []
    langs = list(next(iter(delta_bpb.values())))
    for config in ["fp", *delta_bpb]:
        for lang in langs:
            for t in range(n_texts):
                extra = 0.0 if config == "fp" else delta_bpb[config][lang] * 40 * math.log(2)
                rows.append({"config": config, "lang": lang, "text_id": f"t{t}", "nll": 20.0 + extra, "n_tokens": 10, "n_bytes": 40})
    variants = {"fp": Variant("fp"), **{c: Variant(c, QuantConfig.seed(), ProtectionSpec(), "linear") for c in delta_bpb}}
    overhead = pd.DataFrame([{"config": "fp", "protected_fraction": 1.0, "scope_params": 1000, "quantized_params": 0}] + [
        {"config": c, "protected_fraction": kept[c] / 1000, "scope_params": 1000, "quantized_params": 1000 - kept[c]} for c in delta_bpb])
    return SweepResult(scores=pd.DataFrame(rows), variants=variants, overhead=overhead)


def test_magnitude_control_that_beats_the_structure_on_both_groups_does_not_fail():
    """SmolLM2's numbers (issue 11): magnitude protection leaves HR 0.19 and LR 0.14 bits per byte,
    L0 + L_last leaves HR 0.41 and LR 0.15. D(magnitude) - D(L0+L_last) = 0.21 > 0 (the old criterion
    said "magnitude fails"), yet magnitude protection is better for both groups."""
    langs = {"en": "HR", "de": "HR", "he": "LR", "ar": "LR"}
    level = {"L0+L3": {"HR": 0.41, "LR": 0.15}, "magnitude_elements": {"HR": 0.19, "LR": 0.14}, "none": {"HR": 0.5, "LR": 0.3}}
    delta = {c: {lang: level[c][g] for lang, g in langs.items()} for c in level}
    study = protection_index.IndexStudy(bpb_sweep(delta, {"L0+L3": 500, "magnitude_elements": 500, "none": 0}), protocol="sound",
                                        lr_langs=["he", "ar"], hr_langs=["en", "de"], n_boot=50)
    from qhelpers import stats
    old = study.contrast({"magnitude_elements": 1, "L0+L3": -1})
    assert old.value == pytest.approx(0.21) and stats.verdict(old, 0.0, ">") == stats.SUPPORTED  # the old, wrong verdict
    comp = study.control_comparison("magnitude_elements", "L0+L3")
    assert comp["LR"].value == pytest.approx(-0.01) and comp["HR"].value == pytest.approx(-0.22)
    assert comp["kept"] == {"magnitude_elements": 500, "L0+L3": 500} and comp["reason"] is None
    fails = study.control_fails("magnitude_elements", "L0+L3")
    assert fails.value == pytest.approx(-0.01)
    assert stats.verdict(fails, 0.0, ">") == stats.NOT_SUPPORTED
    table = study.control_table({"magnitude": "magnitude_elements"}, "L0+L3")
    assert list(table["group"]) == ["LR", "HR"] and table["extra_delta_bpb"].tolist() == pytest.approx([-0.01, -0.22])


def test_control_that_hurts_lr_more_fails_and_unequal_overhead_is_undefined():
    langs = {"en": "HR", "he": "LR", "ar": "LR"}
    level = {"L0+L3": {"HR": 0.2, "LR": 0.1}, "random_layers_1": {"HR": 0.2, "LR": 0.3}, "random_layers_2": {"HR": 0.2, "LR": 0.5},
             "magnitude_elements": {"HR": 0.1, "LR": 0.4}}
    delta = {c: {lang: level[c][g] for lang, g in langs.items()} for c in level}
    kept = {"L0+L3": 500, "random_layers_1": 500, "random_layers_2": 502, "magnitude_elements": 400}
    study = protection_index.IndexStudy(bpb_sweep(delta, kept), protocol="sound", lr_langs=["he", "ar"], hr_langs=["en"], n_boot=50)
    from qhelpers import stats
    draws = study.control_fails({"random_layers_1": 0.5, "random_layers_2": 0.5}, "L0+L3")
    assert draws.value == pytest.approx(0.3) and stats.verdict(draws, 0.0, ">") == stats.SUPPORTED  # 502 vs 500: within 1 %
    unequal = study.control_fails("magnitude_elements", "L0+L3")
    assert not unequal.defined and unequal.reason.startswith("unequal overhead")
    assert "400" in unequal.reason and unequal.value == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="sum to 1"):
        study.control_fails({"random_layers_1": 1, "random_layers_2": 1}, "L0+L3")

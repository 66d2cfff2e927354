"""Apply / restore engine: bit-identical restore, equality with hand-written loops."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from seed_reference import quantize_tensor_symmetric  # seed 000's quantizer, verbatim

from qhelpers.measure.scoring import MeasureConfig, corpus_scorer
from qhelpers.models.loading import load_model
from qhelpers.quant.engine import QuantEngine, Variant
from qhelpers.quant.protection import ProtectionSpec
from qhelpers.quant.quantizers import QuantConfig, fake_quantize
from qhelpers.text.corpora import load_corpus
from qhelpers.util.errors import ConfigError

INT4 = QuantConfig(bits=4, granularity="channel")


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def logits(model, text="All human beings are born free and equal."):
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]])
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["gpt2", "opt", "bloom", "gpt_neox", "llama", "gemma3_text", "qwen2"])
def test_restore_is_bit_identical_and_hooks_removed(arch):
    loaded = load_model(f"tiny:{arch}", device="cpu")
    model = loaded.model
    reference = logits(model)  # transformers may attach its own hooks on a first forward
    before = snapshot(model)
    hooks_before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    engine = QuantEngine(loaded)
    variants = [
        Variant("all", INT4),
        Variant("seed", QuantConfig.seed(), ProtectionSpec(layers=(0,)), scope="seed"),
        Variant("all-scope", QuantConfig(bits=3, symmetric=False), ProtectionSpec(components=("L0.attn_q", "mlp")), scope="all"),
        Variant("mag", INT4, ProtectionSpec(magnitude_fraction=0.05)),
    ]
    for variant in variants:
        with engine.applied(variant):
            quantized = logits(model)
            assert not torch.equal(quantized, reference), f"{variant.name} changed nothing"
        for name, tensor in model.named_parameters():
            assert torch.equal(tensor, before[name]), f"{name} not restored after {variant.name}"
        assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks_before
        assert torch.equal(logits(model), reference)


def test_engine_equals_overwriting_weights_by_hand():
    loaded = load_model("tiny:llama", device="cpu")
    engine = QuantEngine(loaded)
    variant = Variant("l0", INT4, ProtectionSpec(layers=(0,), components=("L-1.attn_v",)))
    with engine.applied(variant):
        via_engine = logits(loaded.model)
    manual = copy.deepcopy(loaded.model)
    for name, param in manual.named_parameters():
        is_linear = any(k in name for k in ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"))
        protected = name.startswith("model.layers.0.") or name.startswith("model.layers.3.self_attn.v_proj")
        if is_linear and not protected:
            param.data = fake_quantize(param.data, INT4, out_dim=0)
    assert torch.equal(via_engine, logits(manual))


def test_resident_mode_equals_streaming():
    loaded = load_model("tiny:gpt2", device="cpu")
    variant = Variant("x", QuantConfig(bits=3, granularity="group", group_size=32), ProtectionSpec(components=("L1.attn_k",)))
    streaming = QuantEngine(loaded)
    with streaming.applied(variant):
        a = logits(loaded.model)
    resident = QuantEngine(loaded, resident=True)
    with resident.applied(variant):
        b = logits(loaded.model)
    assert torch.equal(a, b)


def test_fused_protected_rows_keep_original_values():
    loaded = load_model("tiny:gpt2", device="cpu")
    engine = QuantEngine(loaded)
    variant = Variant("q", INT4, ProtectionSpec(components=("L0.attn_q",)))
    weights = dict(engine.quantized_weights(variant))
    original = loaded.model.transformer.h[0].attn.c_attn.weight
    fused = weights["transformer.h.0.attn.c_attn.weight"]
    assert torch.equal(fused[:, :64], original[:, :64])
    assert not torch.equal(fused[:, 64:], original[:, 64:])


def test_cache_reuses_quantized_tensors_and_respects_budget():
    loaded = load_model("tiny:gpt2", device="cpu")
    engine = QuantEngine(loaded)
    for index in range(4):
        with engine.applied(Variant(f"p{index}", INT4, ProtectionSpec(layers=(index,)))):
            pass
    # 16 linear weights over 4 layers: each quantized once, then reused
    assert engine.counters["quantized"] == 16
    assert engine.counters["cache_hits"] == 4 * 12 - 16  # 12 quantized tensors per variant
    small = QuantEngine(loaded, cache_fraction=0.001)
    with small.applied(Variant("all", INT4)):
        pass
    assert small.cache_bytes <= max(small.cache_budget, max(e.nbytes for e in small._cache.values()))
    assert small.counters["evicted"] > 0


def test_apply_twice_without_restore_is_an_error():
    loaded = load_model("tiny:gpt2", device="cpu")
    engine = QuantEngine(loaded)
    engine.apply(Variant("a", INT4))
    with pytest.raises(ConfigError, match="still applied"):
        engine.apply(Variant("b", INT4))
    engine.restore()


def test_seed_exp032_protocol_equals_hand_written_loop():
    """Seed scope, per-tensor INT4, name patterns: qhelpers == the precursor's loop to 1e-6."""
    loaded = load_model("tiny:gpt2", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    corpus = load_corpus("seed-exp032")
    strategies = {"none": [], "layer0": ["h.0."], "L0+L3": ["h.0.", "h.3."], "L0+ln_f": ["h.0.", "ln_f"]}

    # the precursor's loop: clone state, quantize every *weight* not matching a pattern, score
    state = copy.deepcopy(model.state_dict())
    expected = {}
    with torch.no_grad():
        for strategy, patterns in strategies.items():
            model.load_state_dict(state)
            for name, param in model.named_parameters():
                if "weight" in name and not any(p in name for p in patterns):
                    param.copy_(quantize_tensor_symmetric(param.data, 4))
            for lang, text_id, text in corpus.items():
                ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=256).input_ids
                # the precursor used exp(model(ids, labels=ids).loss); HF reduces that loss in fp32,
                # which alone carries ~2e-6 relative rounding, so the reference reduces in float64
                logits = model(ids).logits[0, :-1].double()
                expected[(strategy, lang)] = float(torch.exp(F.cross_entropy(logits, ids[0, 1:])))
                assert expected[(strategy, lang)] == pytest.approx(float(torch.exp(model(ids, labels=ids).loss)), rel=1e-5)
        model.load_state_dict(state)

    engine = QuantEngine(loaded)
    scorer = corpus_scorer(loaded, corpus, MeasureConfig.seed())
    for strategy, patterns in strategies.items():
        with engine.applied(Variant(strategy, QuantConfig.seed(), patterns, scope="seed")):
            frame = scorer.score()
        for row in frame.itertuples():
            ppl = float(np.exp(row.nll / row.n_tokens))
            assert ppl == pytest.approx(expected[(strategy, row.lang)], rel=1e-6), (strategy, row.lang)


class _DispatchedOps(TorchDispatchMode):
    """Names of the aten operations run under it (what a GPU would launch kernels for, views aside)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_resident_engine_keeps_dequantized_tensors_and_reapplies_without_tensor_work():
    loaded = load_model("tiny:llama", device="cpu")
    model = loaded.model
    before = snapshot(model)
    variants = [Variant(f"p{i}", INT4, ProtectionSpec(layers=(i,))) for i in range(3)]
    variants.append(Variant("mag", INT4, ProtectionSpec(magnitude_fraction=0.05)))  # element masks
    fresh = QuantEngine(loaded, resident=True, dense_fraction=0)  # dequantizes at every application
    expected = {}
    for variant in variants:
        with fresh.applied(variant):
            expected[variant.name] = logits(model)
    assert fresh.dense_bytes == 0 and fresh.counters["dense_hits"] == 0

    engine = QuantEngine(loaded, resident=True)
    for round_ in range(2):
        for variant in variants:
            probe = _DispatchedOps()
            with probe:
                engine.apply(variant)
            try:
                got = logits(model)
            finally:
                engine.restore()
            assert torch.equal(got, expected[variant.name]), (round_, variant.name)
            if round_ == 1:  # every tensor kept: swapping it in is a view of the parameter, no kernel
                assert set(probe.ops) <= {"aten.detach.default"}, (variant.name, sorted(set(probe.ops)))
            for name, tensor in model.named_parameters():
                assert torch.equal(tensor, before[name]), f"{name} not restored after {variant.name}"
    per_variant = {v.name: len(engine.plan(v).tensors) for v in variants}
    # round 0: each layer-protection variant reuses the tensors its predecessors kept; round 1: all kept
    assert engine.counters["dense_hits"] >= sum(per_variant.values())
    assert engine.dense_bytes <= engine.dense_budget
    engine.clear_cache()
    assert engine.dense_bytes == 0


def test_resident_engine_dense_budget_keeps_what_fits_and_evicts_nothing():
    loaded = load_model("tiny:llama", device="cpu")
    variant = Variant("all", INT4)
    reference = QuantEngine(loaded, resident=True, dense_fraction=0)
    with reference.applied(variant):
        expected = logits(loaded.model)
    probe = QuantEngine(loaded, resident=True)  # budget 1.0 = every parameter's bytes
    quantized_bytes = sum(probe.params[name].numel() * probe.params[name].element_size()
                          for name in probe.plan(variant).tensors)
    engine = QuantEngine(loaded, resident=True, dense_fraction=0.5 * quantized_bytes / probe.dense_budget)
    for _ in range(3):
        with engine.applied(variant):
            assert torch.equal(logits(loaded.model), expected)
    assert 0 < engine.dense_bytes <= engine.dense_budget
    kept = len(engine._dense)
    quantized = len(engine.plan(variant).tensors)
    assert 0 < kept < quantized
    # the same tensors stay kept and serve the later applications (none evicted in the cycle)
    assert engine.counters["dense_hits"] == 2 * kept
    with pytest.raises(ConfigError, match="dense_fraction"):
        QuantEngine(loaded, resident=True, dense_fraction=-1)

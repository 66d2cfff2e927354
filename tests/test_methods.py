"""The method interface (qhelpers.quant.methods): tensor roles from the architecture table, bits per
weight, and the engine applying any WeightMethod like a QuantConfig."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from qhelpers.models.loading import load_model
from qhelpers.quant.engine import QuantEngine, Variant
from qhelpers.quant.methods import DenseEncoded, TensorRole, WeightMethod, tensor_roles
from qhelpers.quant.quantizers import QuantConfig, fake_quantize
from qhelpers.util.errors import ConfigError


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bloom"])
def test_roles_name_every_linear_of_every_layer(arch):
    loaded = load_model(f"tiny:{arch}")
    roles = tensor_roles(loaded.model)
    n_layers = loaded.model.config.num_hidden_layers if hasattr(loaded.model.config, "num_hidden_layers") else loaded.model.config.n_layer
    linear = [r for r in roles.values() if r.layer is not None]
    assert {r.layer for r in linear} == set(range(n_layers))
    assert all(r.n_layers == n_layers for r in roles.values())
    comps = {r.component for r in linear}
    assert {"attn_q", "attn_out", "mlp_in", "mlp_out"} <= comps
    emb = [r for r in roles.values() if r.component == "embed_tokens"]
    assert len(emb) == 1 and emb[0].layer is None
    norms = [r for n, r in roles.items() if "ln" in n or "norm" in n]
    assert norms and all(r.component is None for r in norms)
    for role in linear:  # out_dim points at the output features (GPT-2 Conv1D: 1)
        weight = dict(loaded.model.named_parameters())[role.name]
        assert role.out_dim == (1 if arch == "gpt2" else 0) and weight.dim() == 2


def test_fused_qkv_is_one_tensor_with_three_components():
    roles = tensor_roles(load_model("tiny:gpt2").model)
    c_attn = roles["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.component == "attn_q" and c_attn.fused == ("attn_q", "attn_k", "attn_v")
    llama = tensor_roles(load_model("tiny:llama").model)
    assert llama["model.layers.1.self_attn.v_proj.weight"] == TensorRole(
        "model.layers.1.self_attn.v_proj.weight", "attn_v", 1, llama["model.layers.1.self_attn.v_proj.weight"].n_layers, 0)


def test_bits_per_weight_of_round_to_nearest_is_codes_plus_scales():
    loaded = load_model("tiny:llama")
    engine = QuantEngine(loaded)
    plan = engine.plan(Variant("q", QuantConfig(bits=4)))
    params = dict(loaded.model.named_parameters())
    # per-channel INT4: 4 bits per weight + one fp32 scale per output row (hand count)
    bits = sum(4 * params[n].numel() + 32 * params[n].shape[0] for n in plan.tensors)
    numel = sum(params[n].numel() for n in plan.tensors)
    assert engine.bits_per_weight(Variant("q", QuantConfig(bits=4))) == pytest.approx(bits / numel, rel=1e-12)
    # NF4 blocks of 64 with an fp32 absmax: 4 + 32 / 64
    assert engine.bits_per_weight(Variant("n", QuantConfig(method="nf4"))) == pytest.approx(4.5, rel=1e-12)
    with pytest.raises(ConfigError, match="baseline"):
        engine.bits_per_weight(Variant("fp"))


@dataclass(frozen=True)
class _Halve(WeightMethod):
    """A deterministic method for the plumbing test: weights halved, counted as 16-bit; records
    what prepare saw."""

    @property
    def label(self) -> str:
        return "halve"

    def prepare(self, model, roles, tokenizer=None):
        return {"n_roles": len(roles), "tokenizer": tokenizer is not None,
                "fingerprint": float(sum(p.double().sum() for p in model.parameters()))}

    def encode(self, weight, role, exclude, prepared):
        assert prepared["n_roles"] > 0
        return DenseEncoded(weight * 0.5, 16 * weight.numel())


@pytest.mark.parametrize("resident", [False, True])
def test_engine_applies_a_method_and_restores_bit_identically(resident):
    loaded = load_model("tiny:llama")
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    engine = QuantEngine(loaded, resident=resident)
    variant = Variant("halve", _Halve(), protect={"layers": [0]})
    ids = loaded.tokenizer("a short text to score", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = loaded.model(ids).logits
        with engine.applied(variant) as plan:
            out = loaded.model(ids).logits
            halved = dict(engine.quantized_weights(variant))
        back = loaded.model(ids).logits
    assert not torch.equal(out, ref) and torch.equal(back, ref)
    assert all(".layers.0." not in n for n in plan.tensors)  # protection spec honoured
    for name, weight in halved.items():
        assert torch.equal(weight, before[name] * 0.5)
    for name, p in loaded.model.named_parameters():
        assert torch.equal(p, before[name])
    prepared = next(iter(engine._prepared.values()))  # noqa: SLF001 - test inspects the engine's cache
    assert prepared["tokenizer"] and prepared["fingerprint"] == pytest.approx(
        float(sum(p.double().sum() for p in before.values())), rel=1e-12)
    assert engine.bits_per_weight(variant) == 16.0


def test_a_quant_config_and_a_method_agree_when_they_are_the_same_thing():
    @dataclass(frozen=True)
    class _RTN(WeightMethod):
        @property
        def label(self) -> str:
            return "rtn"

        def encode(self, weight, role, exclude, prepared):
            return DenseEncoded(fake_quantize(weight, QuantConfig(bits=3), out_dim=role.out_dim, exclude=exclude),
                                3 * weight.numel())

    loaded = load_model("tiny:gpt2")
    engine = QuantEngine(loaded)
    a = dict(engine.quantized_weights(Variant("a", QuantConfig(bits=3))))
    b = dict(engine.quantized_weights(Variant("b", _RTN())))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_variant_rejects_other_objects():
    with pytest.raises(ConfigError, match="WeightMethod"):
        Variant("x", quant="int4")



def test_a_calibrated_method_is_not_prepared_while_another_variant_is_applied():
    loaded = load_model("tiny:llama")
    engine = QuantEngine(loaded)  # hook mode: the applied variant's hooks would run during calibration
    with engine.applied(Variant("q", QuantConfig(bits=4))):
        with pytest.raises(ConfigError, match="restore"):
            engine.bits_per_weight(Variant("halve", _Halve()))
    assert engine.bits_per_weight(Variant("halve", _Halve())) == 16.0


def test_sizes_never_cost_a_second_quantization():
    loaded = load_model("tiny:llama")
    engine = QuantEngine(loaded, cache_fraction=1e-6)  # every code evicted at once
    variant = Variant("q", QuantConfig(bits=4))
    with engine.applied(variant):
        pass
    quantized = engine.counters["quantized"]
    assert engine.counters["evicted"] > 0
    params = dict(loaded.model.named_parameters())
    plan = engine.plan(variant)
    hand = sum(4 * params[n].numel() + 32 * params[n].shape[0] for n in plan.tensors) / sum(
        params[n].numel() for n in plan.tensors)
    assert engine.bits_per_weight(variant) == pytest.approx(hand, rel=1e-12)
    assert engine.counters["quantized"] == quantized  # sizes recorded when the codes were made

"""Protection specs: hand-counted protected fractions, fused rows, errors."""
from __future__ import annotations

import pytest
import torch

from qhelpers.models.loading import load_model
from qhelpers.quant.protection import ProtectionSpec, resolve_plan, scope_names
from qhelpers.util.errors import ConfigError

# tiny:gpt2 is built with n_embd=64, n_layer=4, n_inner=256, n_positions=256, vocab 50257
D, FF, VOCAB, POS, LAYERS = 64, 256, 50257, 256, 4
LN = 2 * D
C_ATTN = D * 3 * D + 3 * D
ATTN_PROJ = D * D + D
C_FC = D * FF + FF
MLP_PROJ = FF * D + D
LAYER = 2 * LN + C_ATTN + ATTN_PROJ + C_FC + MLP_PROJ
TOTAL = VOCAB * D + POS * D + LAYERS * LAYER + LN
LINEAR_WEIGHTS = LAYERS * (3 * D * D + D * D + D * FF + FF * D)


@pytest.fixture(scope="module")
def gpt2():
    loaded = load_model("tiny:gpt2", device="cpu")
    cfg = loaded.model.config
    assert (cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.n_positions) == (D, LAYERS, VOCAB, POS)
    assert (cfg.n_inner or 4 * D) == FF
    return loaded.model


def test_total_and_scope_counts_by_hand(gpt2):
    plan = resolve_plan(gpt2, None, "linear")
    assert plan.total_params == TOTAL
    assert plan.scope_params == plan.quantized_params == LINEAR_WEIGHTS
    assert plan.protected_params == 0
    seed = resolve_plan(gpt2, None, "seed")
    # every *weight*: wte (tied lm_head counted once), wpe, 4 layers of weights, ln_f
    seed_weights = VOCAB * D + POS * D + LAYERS * (2 * D + 3 * D * D + D * D + D * FF + FF * D) + D
    assert seed.scope_params == seed_weights


def test_protect_layer_zero_fraction(gpt2):
    plan = resolve_plan(gpt2, ProtectionSpec(layers=(0,)), "linear")
    assert plan.protected_fraction == pytest.approx(LAYER / TOTAL)
    assert plan.quantized_params == LINEAR_WEIGHTS * 3 // 4
    same = resolve_plan(gpt2, ["h.0."], "linear")  # the seeds' pattern form
    assert same.protected_params == plan.protected_params
    last = resolve_plan(gpt2, ProtectionSpec(layers=(-1,)), "linear")
    assert "transformer.h.3.mlp.c_fc.weight" not in last.tensors
    assert "transformer.h.0.mlp.c_fc.weight" in last.tensors


def test_fused_q_rows_are_columns_of_conv1d(gpt2):
    plan = resolve_plan(gpt2, ProtectionSpec(components=("L0.attn_q",)), "linear")
    tplan = plan.tensors["transformer.h.0.attn.c_attn.weight"]
    assert tplan.out_dim == 1  # Conv1D stores [in, out]
    assert torch.equal(tplan.keep_rows, torch.arange(D))
    mask = tplan.exclude_mask(gpt2.transformer.h[0].attn.c_attn.weight)
    assert mask[:, :D].all() and not mask[:, D:].any()
    # q weight + q bias protected
    assert plan.protected_params == D * D + D
    qkv = resolve_plan(gpt2, ProtectionSpec(components=("L0.attn_qkv",)), "linear")
    assert "transformer.h.0.attn.c_attn.weight" not in qkv.tensors
    assert qkv.protected_params == C_ATTN


def test_components_everywhere_and_bias_and_norm(gpt2):
    mlp = resolve_plan(gpt2, ProtectionSpec(components=("mlp",)), "linear")
    assert mlp.protected_params == LAYERS * (C_FC + MLP_PROJ)
    bias = resolve_plan(gpt2, ProtectionSpec(components=("bias",)), "all")
    n_bias = LAYERS * (2 * D + 3 * D + D + FF + D) + D
    assert bias.protected_params == n_bias
    norms = resolve_plan(gpt2, ProtectionSpec(components=("L0.norm", "final_norm")), "seed")
    assert norms.protected_params == 2 * LN + LN
    head = resolve_plan(gpt2, ProtectionSpec(components=("lm_head",)), "seed")
    assert "transformer.wte.weight" in head.protected_names  # tied to the embeddings


def test_magnitude_and_random_element_masks(gpt2):
    plan = resolve_plan(gpt2, ProtectionSpec(magnitude_fraction=0.1), "linear")
    name = "transformer.h.1.mlp.c_fc.weight"
    weight = gpt2.get_parameter(name)
    mask = plan.tensors[name].exclude_mask(weight)
    k = round(0.1 * weight.numel())
    assert int(mask.sum()) == k
    assert weight.abs()[mask].min() >= weight.abs()[~mask].max()
    a = resolve_plan(gpt2, ProtectionSpec(random_fraction=0.2, seed=3), "linear").tensors[name].keep_mask
    b = resolve_plan(gpt2, ProtectionSpec(random_fraction=0.2, seed=3), "linear").tensors[name].keep_mask
    c = resolve_plan(gpt2, ProtectionSpec(random_fraction=0.2, seed=4), "linear").tensors[name].keep_mask
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.sum()) == round(0.2 * weight.numel())


def test_llama_gate_and_scope(gpt2):
    llama = load_model("tiny:llama", device="cpu").model
    names = scope_names(llama, "linear")
    assert len(names) == 7 * llama.config.num_hidden_layers
    plan = resolve_plan(llama, ProtectionSpec(components=("mlp_gate",)), "linear")
    assert all("gate_proj" not in n for n in plan.tensors)


@pytest.mark.parametrize(
    "spec, scope, message",
    [
        (ProtectionSpec(layers=(4,)), "linear", "out of range.*4 decoder layers"),
        (ProtectionSpec(layers=(-5,)), "linear", "out of range"),
        (ProtectionSpec(components=("mlp_gate",)), "linear", "gpt2 has no 'mlp_gate'"),
        (ProtectionSpec(components=("L9.mlp",)), "linear", "out of range"),
        (["layers.0."], "linear", "matches no parameter"),
        (None, "everything", "unknown scope"),
    ],
)
def test_bad_specs_raise(gpt2, spec, scope, message):
    with pytest.raises(ConfigError, match=message):
        resolve_plan(gpt2, spec, scope)


def test_spec_validation():
    with pytest.raises(ConfigError, match="unknown component 'mlpp'"):
        ProtectionSpec(components=("mlpp",))
    with pytest.raises(ConfigError, match="model-level component"):
        ProtectionSpec(components=("L0.lm_head",))
    with pytest.raises(ConfigError, match="bare string"):
        ProtectionSpec.from_any("h.0.")
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        ProtectionSpec(magnitude_fraction=1.5)
    assert ProtectionSpec.from_any({"layers": [0, -1]}).layers == (0, -1)
    assert ProtectionSpec.from_any(["h.0.", "ln_f"]).patterns == ("h.0.", "ln_f")

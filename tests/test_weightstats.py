"""Tests of qhelpers.measure.weight_stats against scipy, hand counts and hand-built matrices."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import qhelpers.measure.weight_stats as ws
from qhelpers.measure.weight_stats import (
    STAT_KEYS,
    layer_table,
    tensor_stats,
    weight_table,
)
from qhelpers.models.archs import decoder_layers, get_arch
from qhelpers.util.errors import ConfigError, MeasurementError

HIDDEN = 64
N_LAYERS = 3

TINY = {
    "gpt2": dict(n_embd=HIDDEN, n_layer=N_LAYERS, n_head=4, vocab_size=1000, n_positions=128),
    "llama": dict(
        hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=1000, max_position_embeddings=128,
    ),
    "opt": dict(
        hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=4, ffn_dim=128,
        vocab_size=1000, max_position_embeddings=128, word_embed_proj_dim=HIDDEN,
    ),
    "bloom": dict(hidden_size=HIDDEN, n_layer=N_LAYERS, n_head=4, vocab_size=1000),
    "gpt_neox": dict(
        hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=4, intermediate_size=128,
        vocab_size=1000, max_position_embeddings=128,
    ),
    "qwen2": dict(
        hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=1000, max_position_embeddings=128,
    ),
    "gemma3_text": dict(
        hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=1000, max_position_embeddings=128, head_dim=16,
    ),
}


def tiny(model_type: str, perturb: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **TINY[model_type])).eval()
    if perturb:  # make every tensor non-constant (fresh LayerNorms are all ones / zeros)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    return model


# ----------------------------------------------------------------------------- moments


@pytest.mark.parametrize(
    "sample",
    [
        lambda rng: rng.standard_normal(5000),
        lambda rng: rng.exponential(size=(37, 53)),
        lambda rng: rng.standard_t(3, size=(20, 30, 4)),
        lambda rng: rng.uniform(-1, 1, size=17),
    ],
)
def test_moments_equal_numpy_and_scipy(sample):
    x = sample(np.random.default_rng(0))
    st = tensor_stats(torch.from_numpy(x).float())
    x32 = x.astype(np.float32).astype(np.float64)  # what the float32 tensor holds
    assert st["kurtosis"] == pytest.approx(scipy.stats.kurtosis(x32, axis=None, fisher=True, bias=True), rel=1e-9)
    assert st["mean"] == pytest.approx(x32.mean(), rel=1e-9, abs=1e-12)
    assert st["variance"] == pytest.approx(x32.var(), rel=1e-9)
    assert st["std"] == pytest.approx(x32.std(), rel=1e-9)
    assert st["absmax"] == np.abs(x32).max()
    assert set(st) == set(STAT_KEYS)


def test_chunked_moments_equal_single_pass(monkeypatch):
    x = torch.from_numpy(np.random.default_rng(3).laplace(size=(101, 13)))
    whole = tensor_stats(x, svd=False)
    monkeypatch.setattr(ws, "_CHUNK", 7)  # many chunks, a ragged last one
    chunked = tensor_stats(x, svd=False)
    for key in ("mean", "variance", "kurtosis", "absmax", "outlier_frac", "sparsity"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-12, abs=1e-15)
    assert chunked["kurtosis"] == pytest.approx(scipy.stats.kurtosis(x.numpy(), axis=None), rel=1e-9)


def test_laplace_kurtosis_is_three_within_standard_error():
    n = 1_000_000
    x = torch.from_numpy(np.random.default_rng(0).laplace(size=n))
    k = tensor_stats(x, svd=False)["kurtosis"]
    # Asymptotic variance of the sample kurtosis of a symmetric distribution:
    # (mu8/mu2^4 - 4 mu6 mu4/mu2^5 + 4 mu4^3/mu2^6 - mu4^2/mu2^4) / n; Laplace(b=1) has
    # mu_2k = (2k)!: 2520 - 2160 + 864 - 36 = 1188, so SE = sqrt(1188 / n) = 0.0345.
    se = math.sqrt(1188 / n)
    assert abs(k - 3.0) < 4 * se


def test_outlier_fraction_and_sparsity_hand_counted():
    # nine zeros and a ten: mean 1, variance (9 * 1 + 81) / 10 = 9, std 3, |10 - 1| = 9
    w = torch.tensor([0.0] * 9 + [10.0], dtype=torch.float64)
    st = tensor_stats(w, outlier_sigma=2.0)
    assert (st["mean"], st["variance"], st["std"]) == (1.0, 9.0, 3.0)
    assert st["outlier_frac"] == pytest.approx(1 / 10)
    assert tensor_stats(w, outlier_sigma=3.0)["outlier_frac"] == 0.0  # 9 > 9 is false: strict
    assert st["sparsity"] == pytest.approx(9 / 10)
    v = torch.tensor([0.0, 0.0005, -0.002, 0.0021, 0.5, -2.0], dtype=torch.float64)
    st = tensor_stats(v)
    assert st["sparsity_eps"] == pytest.approx(0.002)  # 1e-3 * absmax
    assert st["sparsity"] == pytest.approx(3 / 6)  # 0, 0.0005, -0.002 (<= eps)
    assert tensor_stats(v, sparsity_eps=0.0)["sparsity"] == pytest.approx(1 / 6)


def test_constant_empty_and_nonfinite():
    st = tensor_stats(torch.full((4, 4), 0.1))
    assert math.isnan(st["kurtosis"]) and st["variance"] == 0.0 and st["outlier_frac"] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns about the cancellation
        assert math.isnan(scipy.stats.kurtosis(np.full(16, 0.1)))  # scipy agrees: undefined
    with pytest.raises(MeasurementError):
        tensor_stats(torch.tensor([1.0, float("nan")]))
    with pytest.raises(MeasurementError):
        tensor_stats(torch.tensor([1.0, float("inf")]))
    with pytest.raises(MeasurementError):
        tensor_stats(torch.zeros(0))


# ----------------------------------------------------------------------------- spectrum


def test_effective_rank_identity_and_rank_one():
    for n in (1, 5, 32):
        st = tensor_stats(torch.eye(n))
        assert st["effective_rank"] == pytest.approx(n)
        assert st["count_rank"] == n and st["stable_rank"] == pytest.approx(n)
        assert st["condition_number"] == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(30, 1, generator=g, dtype=torch.float64)
    v = torch.randn(1, 20, generator=g, dtype=torch.float64)
    st = tensor_stats(u @ v)
    assert st["effective_rank"] == pytest.approx(1.0, abs=1e-9)
    assert st["count_rank"] == 1
    assert st["stable_rank"] == pytest.approx(1.0)
    assert st["s_max"] == pytest.approx(float(u.norm() * v.norm()))
    assert st["condition_number"] > 1e10  # rounding-level s_min, not 0


def test_condition_and_stable_rank_hand_computed():
    st = tensor_stats(torch.diag(torch.tensor([1.0, 2.0, 4.0])))
    assert st["condition_number"] == pytest.approx(4.0)
    assert st["stable_rank"] == pytest.approx((1 + 4 + 16) / 16)
    assert (st["s_max"], st["s_min"]) == (pytest.approx(4.0), pytest.approx(1.0))
    assert st["svd_note"] == ""
    assert tensor_stats(torch.diag(torch.tensor([1.0, 0.005, 2.0])))["count_rank"] == 2  # 0.005 < 0.02
    singular = tensor_stats(torch.diag(torch.tensor([1.0, 2.0, 0.0])))
    assert singular["condition_number"] == math.inf and "inf" in singular["svd_note"]
    assert singular["effective_rank"] == pytest.approx(math.exp(-(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3)))


def test_orientation_agnostic_and_svd_switches():
    w = torch.randn(12, 7, generator=torch.Generator().manual_seed(1))
    a, b = tensor_stats(w), tensor_stats(w.T.contiguous())
    for key in STAT_KEYS:
        if key != "svd_note":
            assert a[key] == pytest.approx(b[key], rel=1e-10)
    off = tensor_stats(w, svd=False)
    assert all(math.isnan(off[k]) for k in ("effective_rank", "condition_number", "stable_rank"))
    assert "svd=False" in off["svd_note"]
    skipped = tensor_stats(w, svd_max_numel=50)
    assert math.isnan(skipped["effective_rank"]) and "svd=True" in skipped["svd_note"]
    forced = tensor_stats(w, svd=True, svd_max_numel=50)
    assert forced["effective_rank"] == pytest.approx(a["effective_rank"])
    assert "1-D" in tensor_stats(torch.randn(5))["svd_note"]


def test_auto_skips_svd_of_large_matrix():
    big = torch.zeros(2049, 2049)  # smaller side > 2048: a fp64 SVD would take ~10 s here
    st = tensor_stats(big)
    assert math.isnan(st["condition_number"]) and "skipped" in st["svd_note"]
    assert st["sparsity"] == 1.0 and st["absmax"] == 0.0


def test_weight_table_opt_without_final_norm():
    torch.manual_seed(0)
    config = AutoConfig.for_model("opt", **{**TINY["opt"], "do_layer_norm_before": False, "word_embed_proj_dim": 32})
    model = AutoModelForCausalLM.from_config(config)
    assert model.model.decoder.final_layer_norm is None  # opt-350m layout
    df = weight_table(model, svd=False)
    assert "final_norm" not in set(df.component)
    assert {"embed_tokens", "embed_positions", "lm_head"} <= set(df[df.layer == -1].component)


# ----------------------------------------------------------------------------- weight_table


def _row(df, layer, component, kind="weight"):
    sel = df[(df.layer == layer) & (df.component == component) & (df.kind == kind)]
    assert len(sel) == 1, sel
    return sel.iloc[0]


def test_weight_table_gpt2_fused_conv1d():
    model = tiny("gpt2", perturb=True)  # non-zero biases
    df = weight_table(model)
    c_attn = decoder_layers(model)[1].attn.c_attn
    assert tuple(c_attn.weight.shape) == (HIDDEN, 3 * HIDDEN)  # Conv1D: [in, out]
    parts = df[(df.layer == 1) & df.component.isin(["attn_q", "attn_k", "attn_v"]) & (df.kind == "weight")]
    assert len(parts) == 3 and (parts.numel == HIDDEN * HIDDEN).all()
    assert set(parts.param) == {"transformer.h.1.attn.c_attn.weight"}
    for i, comp in enumerate(("attn_q", "attn_k", "attn_v")):
        expected = tensor_stats(c_attn.weight[:, i * HIDDEN : (i + 1) * HIDDEN])
        row = _row(df, 1, comp)
        assert row["shape"] == (HIDDEN, HIDDEN)
        for key in ("mean", "variance", "kurtosis", "absmax", "effective_rank", "condition_number"):
            assert row[key] == pytest.approx(expected[key], rel=1e-12)
        bias = tensor_stats(c_attn.bias[i * HIDDEN : (i + 1) * HIDDEN])
        assert _row(df, 1, comp, "bias")["mean"] == pytest.approx(bias["mean"], rel=1e-12)
    # the three slices really differ (a wrong split would often repeat one of them)
    assert len({_row(df, 1, c)["kurtosis"] for c in ("attn_q", "attn_k", "attn_v")}) == 3
    whole = _row(df, 1, "attn_qkv")
    assert whole["numel"] == 3 * HIDDEN * HIDDEN
    assert whole["kurtosis"] == pytest.approx(tensor_stats(c_attn.weight)["kurtosis"], rel=1e-12)
    glob = df[df.layer == -1].set_index("component")
    assert {"embed_tokens", "embed_positions", "final_norm", "lm_head"} <= set(glob.index)
    assert glob.loc["lm_head", "tied_to"] == "transformer.wte.weight"
    assert glob.loc["lm_head", "kurtosis"] == glob.loc["embed_tokens", "kurtosis"]
    assert glob.loc["embed_tokens", "numel"] == 1000 * HIDDEN
    assert list(df.columns[:7]) == ["layer", "component", "param", "kind", "numel", "shape", "tied_to"]


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_weight_table_covers_every_block_parameter(model_type):
    model = tiny(model_type)
    df = weight_table(model, include_global=False, svd=False)
    prefix = get_arch(model).layers
    for i, block in enumerate(decoder_layers(model)):
        names = {f"{prefix}.{i}.{n}" for n, _ in block.named_parameters()}
        rows = df[(df.layer == i) & (df.component != "attn_qkv")]
        assert set(rows.param) == names
        # numel adds up when fused parts are counted once
        total = sum(p.numel() for p in block.parameters())
        assert rows.numel.sum() == total


@pytest.mark.parametrize("model_type,path", [("bloom", "self_attention"), ("gpt_neox", "attention")])
def test_weight_table_per_head_fused_split(model_type, path):
    model = tiny(model_type, perturb=True)  # non-zero biases
    df = weight_table(model, components=["attn_qkv"], layers=[0], include_global=False)
    qkv = getattr(decoder_layers(model)[0], path).query_key_value
    heads, head_dim = 4, HIDDEN // 4
    by_head = qkv.weight.view(heads, 3, head_dim, HIDDEN)  # the models' own split in their forward
    for i, comp in enumerate(("attn_q", "attn_k", "attn_v")):
        expected = tensor_stats(by_head[:, i].reshape(HIDDEN, HIDDEN))
        assert _row(df, 0, comp)["kurtosis"] == pytest.approx(expected["kurtosis"], rel=1e-12)
        assert _row(df, 0, comp)["effective_rank"] == pytest.approx(expected["effective_rank"], rel=1e-10)
        bias = qkv.bias.view(heads, 3, head_dim)[:, i].reshape(-1)
        assert _row(df, 0, comp, "bias")["mean"] == pytest.approx(tensor_stats(bias)["mean"], rel=1e-12)
        assert _row(df, 0, comp, "bias")["mean"] != pytest.approx(tensor_stats(qkv.bias[i * HIDDEN : (i + 1) * HIDDEN])["mean"])
    assert set(df.component) == {"attn_q", "attn_k", "attn_v", "attn_qkv"}


def test_weight_table_llama_filters_and_errors():
    model = tiny("llama")
    df = weight_table(model, components=["mlp", "attn_k"], layers=[-1])
    assert set(df.layer) == {N_LAYERS - 1}
    assert set(df.component) == {"mlp_in", "mlp_gate", "mlp_out", "attn_k"}
    assert _row(df, N_LAYERS - 1, "attn_k")["numel"] == 2 * 16 * HIDDEN  # 2 kv heads x head_dim 16
    assert _row(df, N_LAYERS - 1, "mlp_gate")["shape"] == (128, HIDDEN)
    full = weight_table(model, svd=False)
    glob = full[full.layer == -1]
    assert set(glob.component) == {"embed_tokens", "final_norm", "lm_head"}
    assert (full.component == "norm").sum() == 2 * N_LAYERS
    with pytest.raises(ConfigError):
        weight_table(model, components=["attn_z"])
    with pytest.raises(ConfigError):
        weight_table(model, layers=[N_LAYERS])
    with pytest.raises(ConfigError):
        weight_table(model, components=["bias"])


# ----------------------------------------------------------------------------- layer_table


def _seed003_layer_kurtosis(block, dtype=np.float64):
    """Seed 003's extract_layer_kurtosis for one block (the seed itself uses float32)."""
    ks, ns = [], []
    for _, p in block.named_parameters():
        w = p.detach().cpu().numpy().astype(dtype).flatten()
        ks.append(scipy.stats.kurtosis(w, fisher=True))
        ns.append(len(w))
    return sum(k * n / sum(ns) for k, n in zip(ks, ns))


def test_layer_table_matches_seed003_and_pooled_scipy():
    model = tiny("gpt2", perturb=True)
    df = layer_table(model)
    assert df.layer.tolist() == list(range(N_LAYERS))
    for i, block in enumerate(decoder_layers(model)):
        row = df.iloc[i]
        assert row["n_constant"] == 0
        assert row["kurtosis_weighted"] == pytest.approx(_seed003_layer_kurtosis(block), rel=1e-9)
        # the seed's float32 scipy call differs only by float32 rounding of m4 / m2^2
        assert row["kurtosis_weighted"] == pytest.approx(_seed003_layer_kurtosis(block, np.float32), abs=1e-5)
        allw = np.concatenate([p.detach().double().numpy().ravel() for p in block.parameters()])
        assert row["n_params"] == allw.size
        assert row["kurtosis_pooled"] == pytest.approx(scipy.stats.kurtosis(allw, bias=True), rel=1e-9)
        assert row["variance_pooled"] == pytest.approx(allw.var(), rel=1e-9)
        assert row["kurtosis"] == row["kurtosis_weighted"]
    pooled = layer_table(model, how="pooled", layers=[0])
    assert pooled.loc[0, "kurtosis"] == pooled.loc[0, "kurtosis_pooled"]
    assert pooled.loc[0, "kurtosis_weighted"] != pytest.approx(pooled.loc[0, "kurtosis_pooled"], rel=1e-3)
    mats = layer_table(model, params="matrices", layers=[0])
    assert mats.loc[0, "n_tensors"] == 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    with pytest.raises(ConfigError):
        layer_table(model, how="median")


def test_layer_table_skips_constant_tensors():
    model = tiny("opt")  # fresh LayerNorm weights are all ones, biases all zeros
    row = layer_table(model, layers=[0]).iloc[0]
    block = decoder_layers(model)[0]
    varying = [p for p in block.parameters() if p.detach().min() != p.detach().max()]
    assert row["n_constant"] == sum(1 for _ in block.parameters()) - len(varying) > 0
    ks = [scipy.stats.kurtosis(p.detach().double().numpy().ravel()) for p in varying]
    ns = [p.numel() for p in varying]
    assert row["kurtosis_weighted"] == pytest.approx(np.dot(ks, ns) / sum(ns), rel=1e-9)
    assert row["kurtosis_mean"] == pytest.approx(np.mean(ks), rel=1e-9)

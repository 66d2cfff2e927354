"""Tests of qhelpers.experiments.weight_structure (seed 004 T-002 relative error, T-005 gateway structure)
against closed forms, hand-computed examples, numpy/scipy references and planted truths."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qhelpers.experiments import weight_structure as wt
from qhelpers.models.archs import decoder_layers, get_module
from qhelpers.models.loading import TINY_CONFIGS
from qhelpers.quant.quantizers import QuantConfig, fake_quantize
from qhelpers.report.results import Hypothesis
from qhelpers.util.errors import ConfigError, MeasurementError

SEED_Q = QuantConfig.seed()  # per-tensor symmetric absmax INT4
SOUND_Q = QuantConfig(method="int", bits=4, symmetric=True, granularity="channel", clipping="absmax")


def llama(n_layers: int, seed: int = 0):
    """A random-init llama with the tiny:llama shapes (hidden 64, GQA k/v 32 rows, MLP 128)."""
    cfg = AutoConfig.for_model("llama", **{**TINY_CONFIGS["llama"], "num_hidden_layers": n_layers, "vocab_size": 256})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg)


def plant_low_rank(model, layers, rank: int = 2, seed: int = 1) -> None:
    """Replace every matrix of ``layers`` by a rank-``rank`` matrix of the same std."""
    g = torch.Generator().manual_seed(seed)
    for li in layers:
        for _, p in decoder_layers(model)[li].named_parameters():
            if p.dim() == 2:
                low = torch.randn(p.shape[0], rank, generator=g) @ torch.randn(rank, p.shape[1], generator=g)
                with torch.no_grad():
                    p.copy_(low * (p.std() / low.std()))


# ============================================================================ T-002


def test_uniform_relative_error_closed_form():
    assert wt.uniform_relative_error(4) == pytest.approx(1 / 196, rel=1e-15)  # qmax 7: 1 / (4 * 49)
    assert wt.uniform_relative_error(8) == pytest.approx(1 / (4 * 127**2), rel=1e-15)
    with pytest.raises(ConfigError, match="bits"):
        wt.uniform_relative_error(1)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_uniform_weights_match_delta_squared_over_12(bits):
    a = 0.37
    g = torch.Generator().manual_seed(bits)
    w = (torch.rand(600, 600, generator=g, dtype=torch.float64) * 2 - 1) * a
    cfg = QuantConfig(method="int", bits=bits, symmetric=True, granularity="tensor")
    out = wt.tensor_quant_error(w.float(), cfg)
    # independent reference: errors of the same rounding computed here in float64
    qmax = 2 ** (bits - 1) - 1
    x = w.float().double()
    step = float(x.abs().max()) / qmax
    delta = a / qmax
    assert out["mse"] == pytest.approx(delta**2 / 12, rel=0.01)
    # sampling error of the ratio estimator sum(e^2) / sum(w^2) (delta method), from the data
    e2 = ((torch.round(x / step) * step - x) ** 2).numpy().ravel()
    w2 = (x * x).numpy().ravel()
    ratio = e2.sum() / w2.sum()
    se = np.sqrt(np.var(e2 - ratio * w2) / e2.size) / w2.mean()
    assert abs(out["rel_error"] - wt.uniform_relative_error(bits)) < 4 * se
    assert out["rel_error"] == pytest.approx(ratio, rel=1e-6)
    # the uniform-noise model uses the actual step (absmax / qmax), here ~ a / qmax
    assert out["rel_error_model"] == pytest.approx((step**2 / 12) / w2.mean(), rel=1e-6)
    assert abs(out["rel_error_model"] - wt.uniform_relative_error(bits)) < 4 * se
    assert out["sqnr_db"] == pytest.approx(-10 * math.log10(out["rel_error"]), rel=1e-12)


def test_tensor_on_the_grid_has_zero_error():
    step = 2.0**-5  # a power of two: k * step and the scale absmax / 7 are exact in float32
    k = torch.tensor([[-7, -3, 0, 1, 5, 7], [2, -1, 4, -7, 0, 6]], dtype=torch.float32)
    w = k * step
    out = wt.tensor_quant_error(w, SEED_Q)
    assert out["mse"] == 0.0 and out["rel_error"] == 0.0 and out["sqnr_db"] == math.inf
    # per channel: each row its own step, each row reaching +-7 steps
    rows = torch.tensor([[7, -2, 3, 0], [1, -7, 5, 2], [-7, 6, 0, -4]], dtype=torch.float32)
    w2 = rows * torch.tensor([[2.0**-3], [2.0**-6], [2.0**1]])
    assert wt.tensor_quant_error(w2, SOUND_Q, out_dim=0)["mse"] == 0.0
    # along the wrong dimension the same tensor is off the grid
    assert wt.tensor_quant_error(w2, SOUND_Q, out_dim=1)["mse"] > 0


def test_hand_computed_small_tensor():
    # w = [1, -0.6, 0.3, 0.1]; absmax 1, step 1/7; w / step = [7, -4.2, 2.1, 0.7] -> [7, -4, 2, 1]
    # errors: 0, 0.6 - 4/7 = 1/35, 2/7 - 0.3 = -1/70, 1/7 - 0.1 = 3/70
    # squared: 0, 4/4900, 1/4900, 9/4900 -> sum 14/4900 = 1/350 -> mse 1/1400
    # power (1 + 0.36 + 0.09 + 0.01) / 4 = 0.365 -> relative error 1 / (1400 * 0.365) = 1/511
    # mean 0.2, deviations 0.8, -0.8, 0.1, -0.1 -> variance 1.3 / 4 = 0.325
    # kurtosis: m4 = (2 * 0.4096 + 2 * 0.0001) / 4 = 0.20485; 0.20485 / 0.325**2 - 3
    w = torch.tensor([1.0, -0.6, 0.3, 0.1])
    out = wt.tensor_quant_error(w, SEED_Q)
    assert out["numel"] == 4
    assert out["mse"] == pytest.approx(1 / 1400, rel=1e-6)
    assert out["power"] == pytest.approx(0.365, rel=1e-6)
    assert out["rel_error"] == pytest.approx(1 / 511, rel=1e-6)
    assert out["sqnr_db"] == pytest.approx(10 * math.log10(511), rel=1e-6)
    assert out["variance"] == pytest.approx(0.325, rel=1e-6)
    assert out["kurtosis"] == pytest.approx(0.20485 / 0.325**2 - 3, rel=1e-6)
    assert out["absmax"] == pytest.approx(1.0)
    assert out["crest_factor"] == pytest.approx(1 / math.sqrt(0.365), rel=1e-6)
    assert out["step_rms"] == pytest.approx(1 / 7, rel=1e-6)
    assert out["rel_error_model"] == pytest.approx((1 / 49) / 12 / 0.365, rel=1e-6)


@pytest.mark.parametrize("cfg", [SEED_Q, SOUND_Q], ids=["tensor", "channel"])
def test_relative_error_is_scale_invariant(cfg):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 80, generator=g) * 0.02
    base = wt.tensor_quant_error(w, cfg)
    # a power of two scales every float32 operation exactly: identical codes, identical error
    quad = wt.tensor_quant_error(w * 4.0, cfg)
    assert quad["rel_error"] == base["rel_error"]
    assert quad["variance"] == pytest.approx(16 * base["variance"], rel=1e-12)
    # any other factor: the codes can differ only where w / step lies within float32 rounding
    # of a half-integer, where both roundings give the same squared error to first order
    odd = wt.tensor_quant_error(w * 3.7, cfg)
    assert odd["rel_error"] == pytest.approx(base["rel_error"], rel=1e-5)
    assert odd["variance"] == pytest.approx(3.7**2 * base["variance"], rel=1e-6)


def test_relative_error_follows_shape_not_variance():
    # same variance, heavier tails: Laplace (excess kurtosis 3) has a larger crest factor and,
    # under per-tensor absmax, a larger relative error than the uniform (excess kurtosis -1.2)
    n = 400_000
    rng = np.random.default_rng(5)
    sigma = 0.02
    uni = torch.tensor(rng.uniform(-1, 1, n) * sigma * math.sqrt(3), dtype=torch.float32)
    lap = torch.tensor(rng.laplace(0, sigma / math.sqrt(2), n), dtype=torch.float32)
    u, l = wt.tensor_quant_error(uni, SEED_Q), wt.tensor_quant_error(lap, SEED_Q)
    assert u["variance"] == pytest.approx(sigma**2, rel=0.01) and l["variance"] == pytest.approx(sigma**2, rel=0.02)
    assert u["kurtosis"] == pytest.approx(-1.2, abs=0.02) and l["kurtosis"] == pytest.approx(3.0, abs=0.3)
    assert l["crest_factor"] > 2 * u["crest_factor"]
    assert l["rel_error"] > 3 * u["rel_error"]


def _numpy_channel_sse(w: np.ndarray, out_dim: int, bits: int = 4) -> float:
    """Independent per-output-channel symmetric absmax INT-b in float32 numpy."""
    qmax = 2 ** (bits - 1) - 1
    x = w.astype(np.float32)
    if out_dim == 1:
        x = x.T
    scale = (np.abs(x).max(axis=1, keepdims=True) / np.float32(qmax)).astype(np.float32)
    q = np.clip(np.round(x / scale), -qmax - 1, qmax) * scale
    return float(((q.astype(np.float64) - x.astype(np.float64)) ** 2).sum())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_table_matches_numpy_per_channel_reference(tiny_model, arch):
    lm = tiny_model(arch)
    table = wt.quant_error_table(lm, {"sound": SOUND_Q, "seed": SEED_Q})
    n_layers = lm.n_layers
    comps = {"llama": {"attn_q", "attn_k", "attn_v", "attn_out", "mlp_in", "mlp_gate", "mlp_out"},
             "gpt2": {"attn_qkv", "attn_out", "mlp_in", "mlp_out"}}[arch]
    assert len(table) == 2 * n_layers * len(comps)  # a fused c_attn is one row, not three
    assert set(table["component"]) == comps
    assert set(table["group"]) == {"attn", "mlp"}
    for row in table[table["config"] == "sound"].itertuples():
        module_path = row.param.rsplit(".", 1)[0]
        module = get_module(lm.model, module_path)
        w = module.weight.detach().numpy()
        out_dim = 1 if arch == "gpt2" else 0  # GPT-2 Conv1D stores [in, out]
        assert row.sse == pytest.approx(_numpy_channel_sse(w, out_dim), rel=1e-9)
        assert row.variance == pytest.approx(float(np.var(w.astype(np.float64))), rel=1e-9)


def test_pooling_equals_concatenation(tiny_model):
    lm = tiny_model("llama")
    table = wt.quant_error_table(lm, {"seed": SEED_Q}, layers=[1, 2])
    pooled = wt.pool_quant_error(table, ["config", "layer"])
    by_group = wt.pool_quant_error(table, ["config", "layer", "group"])
    assert list(pooled["layer"]) == [1, 2] and set(by_group["group"]) == {"attn", "mlp"}
    blocks = decoder_layers(lm.model)
    for row in pooled.itertuples():
        mats = [p.detach() for p in blocks[row.layer].parameters() if p.dim() == 2]
        x = torch.cat([m.reshape(-1) for m in mats]).double().numpy()
        sse = sum(float(((fake_quantize(m, SEED_Q) - m).double() ** 2).sum()) for m in mats)
        assert row.numel == x.size and row.n_tensors == 7
        assert row.rel_error == pytest.approx(sse / float((x * x).sum()), rel=1e-9)
        assert row.variance == pytest.approx(float(np.var(x)), rel=1e-9)
        assert row.kurtosis == pytest.approx(float(scipy.stats.kurtosis(x)), rel=1e-7)
        assert row.absmax == pytest.approx(float(np.abs(x).max()))
        assert row.depth == pytest.approx(row.layer / (lm.n_layers - 1))


def test_quant_error_bad_inputs(tiny_model):
    lm = tiny_model("llama")
    with pytest.raises(ConfigError, match="unknown per-layer component 'attention'"):
        wt.quant_error_table(lm, SEED_Q, components="attention")
    with pytest.raises(ConfigError, match="QuantConfig"):
        wt.quant_error_table(lm, {"x": "int4"})
    with pytest.raises(ConfigError, match="QuantConfig"):
        wt.quant_error_table(lm, {})
    with pytest.raises(ConfigError, match="missing columns"):
        wt.pool_quant_error(pd.DataFrame({"config": ["a"], "layer": [0]}))
    with pytest.raises(ConfigError, match="out of range"):
        wt.quant_error_table(lm, SEED_Q, layers=[9])
    with pytest.raises(MeasurementError, match="NaN or inf"):
        wt.tensor_quant_error(torch.tensor([1.0, float("nan")]), SEED_Q)


# ============================================================================ T-005


def test_svd_profile_of_hand_built_matrices():
    model = llama(4)
    q = [decoder_layers(model)[i].self_attn.q_proj.weight for i in range(3)]
    u = torch.tensor([2.0 ** -(i % 5) for i in range(64)])  # exact products: exactly rank 1
    diag = torch.zeros(64, 64)
    diag[0, 0], diag[1, 1], diag[2, 2], diag[3, 3] = 1.0, 0.5, 2.0**-5, 2.0**-8  # exact in float32
    with torch.no_grad():
        q[0].copy_(torch.eye(64))
        q[1].copy_(torch.outer(u, u.flip(0)))
        q[2].copy_(diag)
    prof = wt.svd_profile(model, components="attn_q", layers=[0, 1, 2]).set_index("layer")
    eye, one, dg = prof.loc[0], prof.loc[1], prof.loc[2]
    assert eye.count_rank == 64 and eye.effective_rank == pytest.approx(64, rel=1e-12)
    assert eye.stable_rank == pytest.approx(64, rel=1e-12) and eye.log10_condition == pytest.approx(0, abs=1e-12)
    assert one.count_rank == 1 and one.effective_rank == pytest.approx(1, rel=1e-12)
    assert one.stable_rank == pytest.approx(1, rel=1e-12)
    assert one.log10_condition == pytest.approx(math.log10(wt.MAX_CONDITION))  # s_min == 0: capped
    s = np.array([1.0, 0.5, 2.0**-5, 2.0**-8])
    p = s / s.sum()
    assert dg.count_rank == 3  # 2**-8 = 0.0039 <= 0.01 * s_max < 2**-5
    assert dg.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert dg.stable_rank == pytest.approx((s**2).sum(), rel=1e-12)
    assert dg.log10_s_max == pytest.approx(0.0, abs=1e-12)


def test_gpt2_fused_qkv_is_split_into_parts(tiny_model):
    prof = wt.svd_profile(tiny_model("gpt2"), layers=[0])
    assert list(prof["component"]) == ["attn_q", "attn_k", "attn_v", "attn_out", "mlp_in", "mlp_out"]
    assert all(s == (64, 64) for s in prof["shape"][:3])


def test_distinctiveness_hand_computed():
    # one column [0, 0, 0, 0, 10]: MAD 0, so the scale falls back to the std (4); leave-one-out
    # medians are 0 for every layer, so z = x / 4 and only layer 4 is distinct (2.5)
    m = pd.DataFrame({"a": [0.0, 0.0, 0.0, 0.0, 10.0]}, index=pd.Index(range(5), name="layer"))
    d = wt.layer_distinctiveness(m, n_boot=10)
    assert d.values().tolist() == pytest.approx([0, 0, 0, 0, 2.5])
    # two columns: b = [1, 2, 3, 4, 5]: median 3, MAD 1 -> scale 1.4826;
    # leave-one-out medians: 3.5, 3.5, 3, 2.5, 2.5
    m["b"] = [1.0, 2.0, 3.0, 4.0, 5.0]
    d = wt.layer_distinctiveness(m, gateways=(0, 4), n_boot=10)
    zb = (np.array([1, 2, 3, 4, 5]) - np.array([3.5, 3.5, 3, 2.5, 2.5])) / 1.4826
    za = np.array([0, 0, 0, 0, 2.5])
    assert d.values().to_numpy() == pytest.approx(np.sqrt((za**2 + zb**2) / 2), rel=1e-12)
    assert d.z.columns.tolist() == ["a", "b"] and d.dropped_columns == []
    assert d.table["rank"].tolist() == [2, 3, 5, 4, 1]


def test_gateway_pvalue_hand_computed_and_calibrated():
    # d = [5, 1, 2, 4, 3], gateways (0, 4): min 3; pairs with min >= 3: {0,3}, {0,4}, {3,4}
    assert wt.gateway_pair_pvalue([5, 1, 2, 4, 3], (0, 4)) == (pytest.approx(3 / 10), 10)
    assert wt.gateway_pair_pvalue([1, 2, 3, 4, 5], (3, 4)) == (pytest.approx(1 / 10), 10)
    # under exchangeable layers the p-value is exact: P(p <= 1/28) = 1/28 for 8 layers
    rng = np.random.default_rng(0)
    trials = 20000
    hits = sum(wt.gateway_pair_pvalue(rng.random(8), (0, 7))[0] <= 1 / 28 + 1e-12 for _ in range(trials))
    expected = trials / 28
    assert abs(hits - expected) < 4 * math.sqrt(expected * (1 - 1 / 28))


def test_vs_chance_is_positive_exactly_when_p_is_at_most_alpha():
    rng = np.random.default_rng(1)
    seen = set()
    for trial in range(150):
        n = int(rng.integers(7, 14))
        m = pd.DataFrame(rng.normal(size=(n, 6)), index=pd.Index(range(n), name="layer"))
        m.iloc[[0, n - 1]] *= rng.uniform(0.5, 4.0)  # sometimes distinct gateways, sometimes not
        d = wt.layer_distinctiveness(m, n_boot=20, seed=trial)
        assert (d.gateway_vs_chance.value > 0) == (d.p_perm <= 0.05)
        seen.add(d.gateway_vs_chance.value > 0)
    assert seen == {True, False}


def test_planted_low_rank_gateways_are_found():
    model = llama(12)
    plant_low_rank(model, [0, 11])
    d = wt.layer_distinctiveness(wt.svd_profile(model), n_boot=200, seed=0)
    assert d.gateways == (0, 11)
    assert d.top(2) == [0, 11]
    assert d.p_perm == pytest.approx(1 / 66)  # the smallest attainable with 12 layers
    assert d.gateway_vs_chance.defined and d.gateway_vs_chance.ci_low > 0
    assert d.gateway_margin.ci_low > 0
    h = Hypothesis.evaluate("H2.2", "gateways distinct", d.gateway_vs_chance, 0.0, ">")
    assert h.verdict == "SUPPORTED"


def test_planted_middle_layers_contradict_the_gateway_claim():
    model = llama(12)
    plant_low_rank(model, [3, 7])
    d = wt.layer_distinctiveness(wt.svd_profile(model), n_boot=200, seed=0)
    assert d.top(2) == [3, 7]
    assert d.p_perm > 0.05
    assert d.gateway_vs_chance.ci_high < 0
    assert Hypothesis.evaluate("H2.2", "gateways distinct", d.gateway_vs_chance, 0.0, ">").verdict == "NOT_SUPPORTED"


def test_four_layers_can_never_be_beyond_chance(tiny_model):
    # 4 layers give 6 pairs: the smallest attainable p is 1/6 > 0.05, whatever the weights
    d = wt.layer_distinctiveness(wt.svd_profile(tiny_model("llama")), n_boot=200)
    assert d.n_pairs == 6 and d.p_perm >= 1 / 6 - 1e-12
    assert not d.gateway_vs_chance.defined and d.gateway_vs_chance.reason.startswith("too few")
    assert Hypothesis.evaluate("H2.2", "gateways distinct", d.gateway_vs_chance, 0.0, ">").verdict == "INCONCLUSIVE"


def test_distinctiveness_bad_inputs():
    idx = pd.Index(range(4), name="layer")
    with pytest.raises(MeasurementError, match="constant"):
        wt.layer_distinctiveness(pd.DataFrame({"a": [1.0] * 4}, index=idx))
    with pytest.raises(ConfigError, match="at least 3 layers"):
        wt.layer_distinctiveness(pd.DataFrame({"a": [1.0, 2.0]}, index=pd.Index([0, 1])))
    with pytest.raises(ConfigError, match="gateways"):
        wt.layer_distinctiveness(pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0]}, index=idx), gateways=(0, 9))
    with pytest.raises(MeasurementError, match="NaN"):
        wt.layer_distinctiveness(pd.DataFrame({"a": [1.0, np.nan, 3.0, 4.0]}, index=idx))
    with pytest.raises(ConfigError, match="alpha"):
        wt.layer_distinctiveness(pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0]}, index=idx), alpha=5)
    with pytest.raises(ConfigError, match="components"):
        wt.svd_profile(llama(3), components="norm")


def test_threads_are_restored_and_checked(tiny_model):
    lm = tiny_model("llama")
    before = torch.get_num_threads()
    wt.quant_error_table(lm, SEED_Q, layers=[0], threads=1)
    wt.svd_profile(lm, layers=[0], threads=1)
    assert torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="threads"):
        wt.svd_profile(lm, layers=[0], threads=0)


def test_correlation_table_matches_scipy_per_group():
    rng = np.random.default_rng(2)
    x = rng.normal(size=20)
    t = pd.DataFrame({"config": ["a"] * 10 + ["b"] * 10, "u": x, "v": x ** 3 + rng.normal(scale=0.1, size=20)})
    t.loc[t["config"] == "b", "v"] = -t.loc[t["config"] == "b", "v"]
    corr = wt.correlation_table(t, [("u", "v")], by="config", n_boot=200)
    a, b = t[t.config == "a"], t[t.config == "b"]
    assert corr.loc[("a", "u", "v", "spearman"), "r"] == pytest.approx(scipy.stats.spearmanr(a.u, a.v)[0], rel=1e-12)
    assert corr.loc[("b", "u", "v", "pearson"), "r"] == pytest.approx(scipy.stats.pearsonr(b.u, b.v)[0], rel=1e-12)
    row = corr.loc[("b", "u", "v", "spearman")].to_dict()
    assert row["n"] == 10 and row["ci_low"] <= row["r"] <= row["ci_high"]
    assert Hypothesis.evaluate("h", "negative", row, 0.0, "<").verdict == "SUPPORTED"
    with pytest.raises(ConfigError, match="not in the table"):
        wt.correlation_table(t, [("u", "w")])

"""Classifiers on LoRA weight spaces (qhelpers.experiments.lora.classify): metrics against hand computation,
the batched trainer against a plain torch reference (Adam, ReduceLROnPlateau, early
stopping), and a synthetic zoo with class information planted in 2 of 8 matrices."""
from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from qhelpers.experiments.lora import batched
from qhelpers.experiments.lora import classify as C
from qhelpers.experiments.lora import features as lf
from qhelpers.util.errors import ConfigError

FAST = dict(hidden=64, max_epochs=300, patience=10, lr_patience=5, n_boot=1000)  # small and quick; logic as default


# --------------------------------------------------------------------------- metrics


def test_accuracy_and_macro_f1_by_hand():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    assert C.accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    # class 0: TP 1, FP 1, FN 1 -> 2/4; class 1: TP 2, FP 1, FN 0 -> 4/5; class 2: TP 1, FP 0, FN 1 -> 2/3
    assert C.macro_f1(y_true, y_pred) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # a predicted class absent from the truth counts with F1 0 (scikit-learn's label set)
    assert C.macro_f1([0, 0, 1, 1], [0, 2, 1, 1]) == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert C.macro_f1(["en", "he"], ["en", "he"]) == 1.0
    with pytest.raises(ConfigError, match="equal length"):
        C.macro_f1([0, 1], [0])


# --------------------------------------------------------------------------- splits


def test_splits_are_stratified_rotating_and_deterministic():
    y = np.repeat(["de", "en", "he"], 6)
    cfg = C.ClassifierConfig(n_runs=6, seed=3)
    s = C.make_splits(y, cfg)
    assert s.shape == (6, 18)
    for r in range(6):
        for c in ("de", "en", "he"):
            part = s[r, y == c]
            assert (part == 2).sum() == 1 and (part == 1).sum() == 1 and (part == 0).sum() == 4
    assert ((s == 2).sum(0) == 1).all()  # 6 runs x 1 test adapter per class: each adapter tested once
    np.testing.assert_array_equal(s, C.make_splits(y, cfg))
    assert not np.array_equal(s, C.make_splits(y, C.ClassifierConfig(n_runs=6, seed=4)))


def test_splits_refuse_tiny_classes_and_bad_fractions():
    with pytest.raises(ConfigError, match=r"class 'sw' has 2 adapters: too few .*at least 3 per class"):
        C.make_splits(np.array(["en"] * 5 + ["sw"] * 2), C.ClassifierConfig(n_runs=2))
    with pytest.raises(ConfigError, match="sum to 1"):
        C.ClassifierConfig(train_frac=0.5, val_frac=0.2, test_frac=0.2)
    with pytest.raises(ConfigError, match=r"ClassifierConfig.n_runs must be an integer >= 1"):
        C.ClassifierConfig(n_runs=0)
    with pytest.raises(ConfigError, match="single class"):
        C.make_splits(np.zeros(6), C.ClassifierConfig())


# --------------------------------------------------------------------------- batched trainer vs torch


def test_batched_trainer_equals_torch_reference():
    """Two MLPs trained as one stack == each trained alone with torch.optim.Adam,
    ReduceLROnPlateau and early stopping on the validation loss (best weights restored)."""
    rng = np.random.default_rng(0)
    N, d, hidden, n_cls = 14, 3, 8, 2
    X = torch.tensor(rng.normal(size=(N, d)), dtype=torch.float32)
    y = (X[:, 0] + 0.5 * torch.tensor(rng.normal(size=N), dtype=torch.float32) > 0).long()  # a noisy signal
    tr = torch.arange(0, 8)
    va = torch.arange(8, 14)
    lr, factor, lr_pat, patience = 0.01, 0.5, 2, 6
    reductions = []
    gen = torch.Generator().manual_seed(0)
    params = {}
    widths = [d, hidden, hidden, n_cls]
    for i in range(3):
        params[f"l{i}.w"], params[f"l{i}.b"] = batched.init_linear(2, widths[i], widths[i + 1], gen)
    init = {k: v.clone() for k, v in params.items()}
    data = {"X": X.expand(2, N, d).clone(), "train_rows": tr.expand(2, -1).clone(), "val_rows": va.expand(2, -1).clone()}
    got = {}

    def loss_on(P, D, rows):
        x = torch.take_along_dim(D["X"], rows[..., None], dim=1)
        logits = C._mlp_forward(P, x, 3, 0.0, False, None)
        return F.cross_entropy(logits.reshape(-1, n_cls), y[rows].reshape(-1), reduction="none").view(rows.shape).mean(1)

    def finish(P, Bf, D, ids, epochs):
        logits = C._mlp_forward(P, D["X"], 3, 0.0, False, None)
        for j, g in enumerate(ids):
            got[int(g)] = (logits[j].clone(), int(epochs[j]))

    spec = batched.FitSpec(lambda P, Bf, D, rows, n: loss_on(P, D, rows), lambda P, Bf, D: loss_on(P, D, D["val_rows"]),
                           finish, lr=lr, max_epochs=200, patience=patience, batch_size=32, lr_factor=factor,
                           lr_patience=lr_pat)
    batched.fit_batched(params, {}, data, spec, gen)

    for g in range(2):
        net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                                  torch.nn.ReLU(), torch.nn.Linear(hidden, n_cls))
        with torch.no_grad():
            for i, layer in enumerate([net[0], net[2], net[4]]):
                layer.weight.copy_(init[f"l{i}.w"][g].T)
                layer.bias.copy_(init[f"l{i}.b"][g, 0])
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=factor, patience=lr_pat)
        best, best_state, wait, epochs = math.inf, None, 0, 0
        for _ in range(200):
            opt.zero_grad()
            F.cross_entropy(net(X[tr]), y[tr]).backward()
            opt.step()
            epochs += 1
            with torch.no_grad():
                v = float(F.cross_entropy(net(X[va]), y[va]))
            sched.step(v)
            if v < best:
                best, best_state, wait = v, copy.deepcopy(net.state_dict()), 0
            else:
                wait += 1
            if wait >= patience:
                break
        net.load_state_dict(best_state)
        logits, ep = got[g]
        assert ep == epochs
        torch.testing.assert_close(logits, net(X).detach(), rtol=1e-4, atol=1e-4)
        reductions.append(opt.param_groups[0]["lr"] < lr)
    assert any(reductions)  # the learning-rate schedule acted before early stopping


# --------------------------------------------------------------------------- evaluate


def _separable(n_per=8, n_cls=3, d=5, seed=0, gap=4.0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_cls), n_per)
    centers = rng.normal(size=(n_cls, d)) * gap
    return centers[y] + rng.normal(size=(y.size, d)), y


def test_evaluate_bookkeeping_matches_hand_computation():
    X, y = _separable(n_per=6, gap=0.7, seed=2)
    res = C.evaluate(X, y, C.ClassifierConfig(n_runs=4, **FAST))
    assert res.n == 18 and res.n_classes == 3 and res.n_features == 5 and res.chance == pytest.approx(1 / 3)
    for r in range(4):
        for part, code in (("train", 0), ("val", 1), ("test", 2)):
            m = res.splits[r] == code
            assert res.runs.loc[r, f"{part}_accuracy"] == pytest.approx(np.mean(res.predictions[r, m] == res.y[m]))
            assert res.runs.loc[r, f"{part}_f1"] == pytest.approx(C.macro_f1(res.y[m], res.predictions[r, m]))
    assert res.mean["test_accuracy"] == pytest.approx(res.runs["test_accuracy"].mean())
    assert res.std["test_accuracy"] == pytest.approx(np.std(res.runs["test_accuracy"], ddof=1))
    per = [np.mean([res.predictions[r, i] == res.y[i] for r in range(4) if res.splits[r, i] == 2])
           for i in range(18) if (res.splits[:, i] == 2).any()]
    assert res.test_accuracy.value == pytest.approx(np.mean(per)) and res.test_accuracy.n == len(per)
    assert res.test_accuracy.ci_low <= res.test_accuracy.value <= res.test_accuracy.ci_high
    again = C.evaluate(X, y, C.ClassifierConfig(n_runs=4, **FAST))
    np.testing.assert_array_equal(res.predictions, again.predictions)  # deterministic given the seed


def test_evaluate_chance_is_majority_rate():
    X, y = _separable(n_per=5, gap=3.0, seed=5)
    y = np.concatenate([y, np.zeros(4, dtype=int)])
    X = np.concatenate([X, X[:4]])
    res = C.evaluate(X, y, C.ClassifierConfig(n_runs=2, **FAST))
    assert res.chance == pytest.approx(9 / 19)


def test_evaluate_separable_vs_noise():
    X, y = _separable(n_per=10, gap=5.0)
    good = C.evaluate(X, y, C.ClassifierConfig(n_runs=3, **FAST))
    assert good.mean["test_accuracy"] == 1.0 and good.test_accuracy.ci_low > good.chance
    noise = np.random.default_rng(9).normal(size=X.shape)
    bad = C.evaluate(noise, y, C.ClassifierConfig(n_runs=5, **FAST))
    assert bad.test_accuracy.ci_low <= bad.chance <= bad.test_accuracy.ci_high


def test_wide_inputs_are_rotated_onto_the_training_span():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(12, 40))
    tr = np.arange(8)
    Z = C._project_span(X, tr, 8)
    dist = lambda A: np.linalg.norm(A[:, None] - A[None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(dist(Z[tr]), dist(X[tr]), atol=1e-9)  # training geometry kept exactly
    Xs, y = _separable(n_per=8, d=60, gap=2.0, seed=3)
    res = C.evaluate(Xs, y, C.ClassifierConfig(n_runs=2, max_dim=20, **FAST))
    assert res.mean["test_accuracy"] == 1.0 and res.n_features == 60


def test_paired_difference_by_hand():
    y = np.array([0, 0, 1, 1])
    splits = np.array([[2, 0, 2, 1], [1, 2, 0, 2]])  # 0 train, 1 val, 2 test; each adapter tested once
    cfg = C.ClassifierConfig(n_runs=2)
    right = np.tile(y, (2, 1))
    wrong0 = right.copy()
    wrong0[0, 0] = 1  # adapter 0 misclassified in the run that tests it
    a = C._result(right, np.ones(2, int), splits, y, np.array([0, 1]), 3, cfg)
    b = C._result(wrong0, np.ones(2, int), splits, y, np.array([0, 1]), 3, cfg)
    d = C.paired_difference(a, b, n_boot=4000, seed=1)
    assert d.value == pytest.approx(0.25) and d.n == 4  # per-adapter differences [1, 0, 0, 0]
    assert d.ci_low == pytest.approx(0.0) and d.ci_high == pytest.approx(0.75)
    other = C._result(right, np.ones(2, int), splits[::-1], y, np.array([0, 1]), 3, cfg)
    with pytest.raises(ConfigError, match="same splits"):
        C.paired_difference(a, other)


def test_degenerate_bootstrap_falls_back_to_clopper_pearson():
    from scipy.stats import binomtest

    all_right = C._bootstrap_mean(np.ones(12), 1000, 0.95, 0, "tested")
    cp = binomtest(12, 12).proportion_ci(0.95, method="exact")
    assert (all_right.value, all_right.ci_low, all_right.ci_high) == pytest.approx((1.0, cp.low, 1.0))
    same = C._bootstrap_mean(np.zeros(12), 1000, 0.95, 0, "tested", bounds=(-1.0, 1.0))
    u = binomtest(0, 12).proportion_ci(0.95, method="exact").high  # share of adapters that may disagree
    assert (same.value, same.ci_low, same.ci_high) == pytest.approx((0.0, -u, u))


# --------------------------------------------------------------------------- planted zoo


def _planted_zoo(n_per=12, n_cls=3, seed=0):
    """8 matrices [4, 24]; only L2 and L5 carry the class (a class-dependent singular-value
    profile); the others are i.i.d. noise of a fixed scale."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_cls), n_per)
    mats = {}
    for layer in range(8):
        X = rng.normal(size=(y.size, 4, 24)) * 0.5
        if layer in (2, 5):
            for i, c in enumerate(y):
                u, _ = np.linalg.qr(rng.normal(size=(4, 4)))
                v, _ = np.linalg.qr(rng.normal(size=(24, 4)))
                s = np.array([3.0, 2.0, 1.0, 0.5]) * (1.0 + c)
                X[i] = u @ np.diag(s) @ v.T
        mats[f"L{layer}.self_attn.q_proj.lora_A"] = X.astype(np.float32)
    return mats, y


def test_planted_zoo_rank_then_ablate():
    mats, y = _planted_zoo(n_per=20)
    cfg = C.ClassifierConfig(n_runs=3, **FAST)
    depth = {n: int(n[1]) for n in mats}
    table = C.rank_layers(mats, y, "stats", cfg, depth=depth, progress=False)
    top = C.top_layers(table, 2)
    assert set(top) == {"L2.self_attn.q_proj.lora_A", "L5.self_attn.q_proj.lora_A"}
    assert (table["accuracy"].head(2) >= 0.9).all()
    assert list(table["rank"]) == list(range(1, 9)) and table["depth"].tolist()[:2] in ([2.0, 5.0], [5.0, 2.0])
    assert set(table["kind"]) == {"q_proj.lora_A"}
    ab = C.ablation_study(mats, y, top, ["stats", "spectral"], cfg, progress=False)
    for rep in ("stats", "spectral"):
        before, after = ab.result(rep, "all"), ab.result(rep, "ablated")
        # with all 8 matrices the 6 noise matrices cost a little (the MLP can overfit them), but the
        # accuracy stays far above chance (1/3); after ablating the 2 planted matrices it is chance
        assert before.mean["test_accuracy"] >= 0.8 and before.test_accuracy.ci_low > 0.6
        assert after.test_accuracy.ci_low <= after.chance <= after.test_accuracy.ci_high
        drop = ab.drops.set_index("representation").loc[rep]
        assert drop["drop_ci_low"] > 0
    assert set(ab.table["setting"]) == {"all", "ablated"}
    row = ab.table.set_index(["representation", "setting"]).loc[("spectral", "ablated")]
    assert row["n_features"] == 6 * 32
    text = C.format_results(table, ab, 2)
    assert "L2.self_attn.q_proj.lora_A" in text and "spectral" in text and "chance" in text
    import matplotlib.pyplot as plt

    for fig in (C.plot_layer_accuracy(table, chance=1 / 3), C.plot_ablation(ab.table, chance=1 / 3)):
        assert len(fig.axes) == 1 and fig.axes[0].get_ylabel().startswith("test accuracy")
        plt.close(fig)


def test_ablation_with_coupling_and_learned():
    mats, y = _planted_zoo(n_per=6, n_cls=2, seed=1)
    mats = {n: v for n, v in mats.items() if n[1] in "23"}
    b = {n.replace("lora_A", "lora_B"): np.transpose(v, (0, 2, 1))[:, :10, :] for n, v in mats.items()}
    mats = {**mats, **b}
    pairs = [(n, n.replace("lora_A", "lora_B")) for n in mats if n.endswith("lora_A")]
    cfg = C.ClassifierConfig(n_runs=2, **FAST)
    ab = C.ablation_study(mats, y, ["L2.self_attn.q_proj.lora_B"], ["coupling", "vae"], cfg, pairs=pairs,
                          ae_config=lf.AutoencoderConfig(epochs=3, patience=2), progress=False)
    t = ab.table.set_index(["representation", "setting"])
    assert t.loc[("coupling", "all"), "n_features"] == 2 * 4 and t.loc[("coupling", "ablated"), "n_features"] == 1 * 4
    assert t.loc[("vae", "all"), "n_features"] == 4 * 64 and t.loc[("vae", "ablated"), "n_features"] == 3 * 64


def test_bad_calls_name_the_fix():
    mats, y = _planted_zoo(n_per=4, n_cls=2)
    with pytest.raises(ConfigError, match="rank_layers needs a per-matrix representation; 'coupling' is pair"):
        C.rank_layers(mats, y, "coupling", progress=False)
    with pytest.raises(ConfigError, match="removed matrices \\['L9.x'\\] are not in matrices"):
        C.ablation_study(mats, y, ["L9.x"], ["stats"], progress=False)
    with pytest.raises(ConfigError, match="needs pairs="):
        C.ablation_study(mats, y, [], ["coupling"], C.ClassifierConfig(n_runs=1, **FAST), progress=False)
    with pytest.raises(ConfigError, match="leaves none"):
        C.ablation_study(mats, y, list(mats), ["stats"], progress=False)
    with pytest.raises(ConfigError, match=r"X must be \[N=8, n_features\]"):
        C.evaluate(np.zeros((7, 2)), y)
    table = pd.DataFrame({"rank": [1, 2], "layer": ["a", "b"]})
    with pytest.raises(ConfigError, match=r"k must be an integer in \[0, 1\]"):
        C.top_layers(table, 2)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_on_a_planted_zoo():
    mats, y = _planted_zoo(n_per=10)
    cpu = C.ClassifierConfig(n_runs=2, **FAST)
    gpu = C.ClassifierConfig(n_runs=2, device="cuda", **FAST)
    a = C.rank_layers(mats, y, "stats", cpu, progress=False)
    b = C.rank_layers(mats, y, "stats", gpu, progress=False)
    assert set(C.top_layers(a, 2)) == set(C.top_layers(b, 2)) == {"L2.self_attn.q_proj.lora_A", "L5.self_attn.q_proj.lora_A"}
    splits = C.make_splits(y, gpu)
    ae = lf.AutoencoderConfig(epochs=5, patience=3, device="cuda")
    one = lf.learned_features("contrastive", mats, splits, ae, names=["L2.self_attn.q_proj.lora_A"])
    two = lf.learned_features("contrastive", mats, splits, ae, names=["L2.self_attn.q_proj.lora_A"])
    np.testing.assert_allclose(one["L2.self_attn.q_proj.lora_A"], two["L2.self_attn.q_proj.lora_A"], atol=1e-5)
    base = lf.learned_features("contrastive", mats, splits, lf.AutoencoderConfig(epochs=5, patience=3),
                               names=["L2.self_attn.q_proj.lora_A"])
    np.testing.assert_allclose(one["L2.self_attn.q_proj.lora_A"], base["L2.self_attn.q_proj.lora_A"], atol=1e-3)

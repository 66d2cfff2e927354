"""LoRA weight-space representations (qhelpers.experiments.lora.features) against independent answers:
numpy/scipy references, hand-computed spectra of diagonal matrices, planted FFT peaks,
histogram entropies of known distributions, and no-leakage checks of the learned codes."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats as sps

from qhelpers.experiments.lora import batched
from qhelpers.experiments.lora import features as lf
from qhelpers.util.errors import ConfigError


@pytest.fixture(scope="module")
def mats():
    rng = np.random.default_rng(0)
    return {
        "wide": rng.normal(size=(5, 4, 9)),
        "tall": rng.standard_t(3, size=(5, 11, 4)) + 0.3,
        "square": rng.normal(size=(3, 6, 6)) * 0.01,
    }


# --------------------------------------------------------------------------- norms


@pytest.mark.parametrize("key", ["wide", "tall", "square"])
def test_norms_match_numpy(mats, key):
    X = mats[key]
    got = lf.norm_features(X)
    for i, m in enumerate(X):
        fro, nuc, spec = np.linalg.norm(m, "fro"), np.linalg.norm(m, "nuc"), np.linalg.norm(m, 2)
        want = [fro, nuc, spec, np.linalg.norm(m, 1), np.linalg.norm(m, np.inf), nuc / fro, spec / fro]
        np.testing.assert_allclose(got[i], want, rtol=1e-10)
    assert got.shape == (X.shape[0], 7) == (X.shape[0], lf.REPRESENTATIONS["norms"].dim)


# --------------------------------------------------------------------------- spectral


def _embed(diag_values, rows, cols, seed=0):
    """U diag(s) V^T with random orthogonal U, V: singular values exactly diag_values."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(rows, rows)))
    v, _ = np.linalg.qr(rng.normal(size=(cols, cols)))
    d = np.zeros((rows, cols))
    d[np.arange(len(diag_values)), np.arange(len(diag_values))] = diag_values
    return u @ d @ v.T


def test_spectral_of_known_spectra():
    f = lf.spectral_features(_embed([3, 2, 1, 0], 4, 6)[None])[0]
    names = lf.FEATURE_NAMES["spectral"]
    assert len(names) == 32 and f.shape == (32,)
    got = dict(zip(names, f))
    np.testing.assert_allclose(f[:10], [3, 2, 1, 0, 0, 0, 0, 0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(f[10:20], [0.5, 1 / 3, 1 / 6, 0, 0, 0, 0, 0, 0, 0], atol=1e-12)
    h = -(0.5 * math.log(0.5) + (1 / 3) * math.log(1 / 3) + (1 / 6) * math.log(1 / 6))
    assert got["effective_rank"] == pytest.approx(math.exp(h), rel=1e-10)
    assert got["condition_number"] == lf.CONDITION_CAP  # s_4 = 0: numerically singular
    np.testing.assert_allclose(f[22:31], [1, 1, 1, 0, 0, 0, 0, 0, 0], atol=1e-12)
    assert got["nuclear"] == pytest.approx(6.0)


def test_effective_rank_of_equal_singular_values_is_their_count():
    for values, rows, cols in (([2, 2, 2], 3, 5), ([1, 1, 1, 1, 1], 5, 8), ([0.5], 1, 4)):
        X = _embed(values, rows, cols, seed=rows)[None]
        f = lf.spectral_features(X)[0]
        assert f[20] == pytest.approx(len(values), rel=1e-10)
        assert f[21] == pytest.approx(1.0, rel=1e-10)  # condition number of equal values
        assert lf.effective_rank_features(X)[0, 0] == pytest.approx(len(values), rel=1e-10)
    # rank-deficient: three equal values and two zeros -> effective rank 3, capped condition number
    f = lf.spectral_features(_embed([2, 2, 2, 0, 0], 5, 8)[None])[0]
    assert f[20] == pytest.approx(3.0, rel=1e-10) and f[21] == lf.CONDITION_CAP


def test_spectral_condition_and_more_than_ten_values():
    s = np.arange(12, 0, -1, dtype=float)  # 12 singular values 12..1
    X = _embed(s, 12, 14)[None]
    f = lf.spectral_features(X)[0]
    np.testing.assert_allclose(f[:10], s[:10], rtol=1e-10)
    np.testing.assert_allclose(f[10:20], s[:10] / s.sum(), rtol=1e-10)  # normalised by ALL values
    p = s / s.sum()
    assert f[20] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-10)
    assert f[21] == pytest.approx(12.0, rel=1e-10)
    np.testing.assert_allclose(f[22:31], np.ones(9), rtol=1e-9)
    assert f[31] == pytest.approx(s.sum(), rel=1e-10)


def test_zero_matrix_gives_zeros_not_nan():
    X = np.zeros((2, 3, 4))
    for name in ("spectral", "norms", "distribution", "frequency", "information", "ensemble", "stats"):
        f = lf.matrix_features(name, X)
        assert np.isfinite(f).all() and not f.any(), name


# --------------------------------------------------------------------------- distribution


@pytest.mark.parametrize("key", ["wide", "tall", "square"])
def test_distribution_matches_numpy_scipy(mats, key):
    X = mats[key]
    got = lf.distribution_features(X)
    for i, m in enumerate(X):
        v = m.ravel()
        q = np.quantile(v, [0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95])
        want = list(q) + [q[4] - q[2], np.mean(np.abs(v - v.mean())), np.std(np.abs(v)) / np.mean(np.abs(v)),
                          sps.skew(v), sps.kurtosis(v)]
        np.testing.assert_allclose(got[i], want, rtol=1e-9, atol=1e-12)


def test_stats_features_by_hand():
    X = np.array([[[1.0, -2.0], [3.0, 6.0]]])
    np.testing.assert_allclose(lf.stats_features(X)[0], [2.0, math.sqrt(8.5), -2, 6, 2.0, 3.0, math.sqrt(50)])


# --------------------------------------------------------------------------- frequency


@pytest.mark.parametrize("key", ["wide", "tall", "square"])
def test_frequency_matches_numpy_fft(mats, key):
    X = mats[key]
    got = lf.frequency_features(X)
    for i, m in enumerate(X):
        mag = np.abs(np.fft.fft2(m)).ravel()
        top = np.sort(mag)[::-1][:10]
        want = list(top) + [mag.mean(), mag.std(), mag.max(), (top**2).sum() / (mag**2).sum()]
        np.testing.assert_allclose(got[i], want, rtol=1e-10)


def test_frequency_planted_cosine_peaks():
    rows, cols, k = 4, 16, 3
    m = np.tile(np.cos(2 * np.pi * k * np.arange(cols) / cols), (rows, 1))
    f = lf.frequency_features(m[None])[0]
    # two peaks (frequency k and -k in the row direction) of magnitude rows*cols/2, nothing else
    np.testing.assert_allclose(f[:3], [rows * cols / 2, rows * cols / 2, 0.0], atol=1e-9)
    assert f[12] == pytest.approx(rows * cols / 2)
    assert f[13] == pytest.approx(1.0)  # all energy in the top 10


# --------------------------------------------------------------------------- information


def test_information_matches_numpy_histogram(mats):
    for X in mats.values():
        got = lf.information_features(X)
        for i, m in enumerate(X):
            counts, _ = np.histogram(m.ravel(), bins=50)
            p = counts[counts > 0] / counts.sum()
            h = -(p * np.log(p)).sum()
            np.testing.assert_allclose(got[i], [h, h / math.log(50)], rtol=1e-12)


def test_information_known_entropies():
    one_per_bin = np.arange(50, dtype=float).reshape(1, 5, 10)  # 50 distinct values, one per bin
    halves = np.array([0.0] * 10 + [1.0] * 10).reshape(1, 4, 5)  # two bins, half each
    const = np.full((1, 3, 3), 0.7)
    np.testing.assert_allclose(lf.information_features(one_per_bin)[0], [math.log(50), 1.0], rtol=1e-12)
    np.testing.assert_allclose(lf.information_features(halves)[0], [math.log(2), math.log(2) / math.log(50)], rtol=1e-12)
    np.testing.assert_allclose(lf.information_features(const)[0], [0.0, 0.0])


def test_histogram_binning_equals_numpy_on_edge_values():
    rng = np.random.default_rng(5)
    v = np.round(rng.normal(size=(20, 300)), 1)  # many ties and values exactly on bin edges
    v[:, 0], v[:, 1] = -2.5, 2.5
    for row, counts in zip(v, lf._histogram_counts(v, 50)):
        np.testing.assert_array_equal(counts, np.histogram(row, bins=50)[0])


# --------------------------------------------------------------------------- ensemble, registry


def test_ensemble_is_the_concatenation(mats):
    X = mats["wide"]
    parts = [lf.spectral_features(X), lf.norm_features(X), lf.distribution_features(X), lf.frequency_features(X),
             lf.information_features(X)]
    np.testing.assert_array_equal(lf.ensemble_features(X), np.concatenate(parts, axis=1))
    assert lf.ensemble_features(X).shape[1] == 67 == len(lf.FEATURE_NAMES["ensemble"])


def test_registry_dims_and_names(mats):
    X = mats["tall"]
    for name, rep in lf.REPRESENTATIONS.items():
        if rep.kind != "matrix":
            continue
        f = lf.matrix_features(name, X)
        want = X.shape[1] * X.shape[2] if rep.dim is None else rep.dim
        assert f.shape == (X.shape[0], want), name
        if name in lf.FEATURE_NAMES:
            assert len(lf.FEATURE_NAMES[name]) == want
    np.testing.assert_array_equal(lf.flat_features(X), X.reshape(X.shape[0], -1))


def test_unknown_representation_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown representation 'fourier'; valid names: flat, stats, spectral"):
        lf.get_representation("fourier")
    with pytest.raises(ConfigError, match="per_pair_features"):
        lf.matrix_features("coupling", np.zeros((2, 2, 2)))


def test_bad_matrix_input():
    with pytest.raises(ConfigError, match=r"expected \[n_adapters, rows, cols\]; for one matrix pass X\[None\]"):
        lf.spectral_features(np.zeros((3, 4)))
    bad = np.zeros((2, 3, 3))
    bad[1, 2, 0] = np.nan
    with pytest.raises(ConfigError, match=r"NaN/inf \(first at \(1, 2, 0\)\)"):
        lf.norm_features(bad)


def test_feature_matrix_concatenates_and_excludes():
    rng = np.random.default_rng(1)
    m = {"L0.q.lora_A": rng.normal(size=(4, 2, 6)), "L0.q.lora_B": rng.normal(size=(4, 5, 2)),
         "L1.q.lora_A": rng.normal(size=(4, 2, 6)), "L1.q.lora_B": rng.normal(size=(4, 5, 2))}
    pairs = [("L0.q.lora_A", "L0.q.lora_B"), ("L1.q.lora_A", "L1.q.lora_B")]
    full = lf.feature_matrix("norms", m)
    assert full.shape == (4, 28)
    np.testing.assert_array_equal(full[:, 7:14], lf.norm_features(m["L0.q.lora_B"]))
    part = lf.feature_matrix("norms", m, exclude=["L0.q.lora_B"])
    np.testing.assert_array_equal(part, np.delete(full, np.s_[7:14], axis=1))
    cp = lf.feature_matrix("coupling", m, pairs, exclude=["L0.q.lora_B"])  # the whole L0 pair goes
    np.testing.assert_array_equal(cp, lf.coupling_features(m["L1.q.lora_A"], m["L1.q.lora_B"]))
    with pytest.raises(ConfigError, match="every matrix is excluded"):
        lf.feature_matrix("stats", m, exclude=list(m))


# --------------------------------------------------------------------------- coupling


@pytest.mark.parametrize("n_in,n_out", [(7, 7), (10, 6), (5, 9)])
def test_coupling_matches_hand_computation(n_in, n_out):
    rng = np.random.default_rng(n_in * 31 + n_out)
    r, N = 3, 4
    A = rng.normal(size=(N, r, n_in))
    B = rng.normal(size=(N, n_out, r)) + 0.2
    got = lf.coupling_features(A, B)
    m = min(n_in, n_out)
    for i in range(N):
        a = A[i][:, :m].ravel()
        b = B[i].T[:, :m].ravel()
        sa, sb = np.linalg.svd(A[i], compute_uv=False), np.linalg.svd(B[i], compute_uv=False)
        want = [np.corrcoef(a, b)[0, 1], a @ b / np.linalg.norm(a) / np.linalg.norm(b),
                np.linalg.norm(B[i] @ A[i], "fro"), np.corrcoef(sa, sb)[0, 1]]
        np.testing.assert_allclose(got[i], want, rtol=1e-9)


def test_coupling_planted_relations():
    rng = np.random.default_rng(3)
    A = rng.normal(size=(1, 2, 6))
    B = np.transpose(A, (0, 2, 1)) * 3.0  # B = 3 A^T: aligned values proportional
    f = lf.coupling_features(A, B)[0]
    assert f[0] == pytest.approx(1.0) and f[1] == pytest.approx(1.0) and f[3] == pytest.approx(1.0)
    assert f[2] == pytest.approx(np.linalg.norm(B[0] @ A[0]))
    with pytest.raises(ConfigError, match=r"expected A \[N, r, in\] and B \[N, out, r\]"):
        lf.coupling_features(A, A)


# --------------------------------------------------------------------------- batched Adam


@pytest.mark.parametrize("fused", [True, False])
def test_batched_adam_equals_torch_adam_per_model(fused):
    torch.manual_seed(0)
    w0 = torch.randn(2, 5, 3)
    grads = [torch.randn(2, 5, 3) for _ in range(6)]
    lr = torch.tensor([1e-2, 3e-3])
    stacked = {"w": w0.clone()}
    opt = batched.Adam(stacked, lr.clone())
    opt.fused = fused and opt.fused
    for g in grads:
        opt.step({"w": g})
    for k in range(2):
        p = torch.nn.Parameter(w0[k].clone())
        ref = torch.optim.Adam([p], lr=float(lr[k]))
        for g in grads:
            p.grad = g[k].clone()
            ref.step()
        torch.testing.assert_close(stacked["w"][k], p.detach(), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- learned


def _cluster_zoo(n_per=8, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n_per)
    base = rng.normal(size=(2, 3, 6)) * 2.0
    X = base[y] + 0.3 * rng.normal(size=(2 * n_per, 3, 6))
    return {"L0.m.lora_A": X, "L1.m.lora_A": rng.normal(size=(2 * n_per, 2, 5))}, y


def _splits(y):
    from qhelpers.experiments.lora.classify import ClassifierConfig, make_splits

    return make_splits(y, ClassifierConfig(n_runs=2, seed=0))


CHEAP = lf.AutoencoderConfig(epochs=15, patience=5, seed=3)


@pytest.mark.parametrize("name", lf.LEARNED)
def test_learned_codes_shape_determinism_and_no_test_leakage(name):
    m, y = _cluster_zoo()
    splits = _splits(y)
    codes = lf.learned_features(name, m, splits, CHEAP)
    dim = lf.REPRESENTATIONS[name].dim
    assert set(codes) == set(m) and all(c.shape == (2, y.size, dim) for c in codes.values())
    assert all(np.isfinite(c).all() for c in codes.values())
    again = lf.learned_features(name, m, splits, CHEAP)
    for k in m:
        np.testing.assert_array_equal(codes[k], again[k])
    # changing the TEST adapters' weights must not change the code of any other adapter. Those rows
    # train split 1's network, stacked with split 0's: no early stopping here, so the stack keeps its
    # shape in both runs (a stack of one runs other float kernels than a stack of two: on an AMD EPYC
    # the contrastive codes then moved by 1 ulp when split 1 stopped at another epoch)
    full = replace(CHEAP, patience=CHEAP.epochs)
    codes = lf.learned_features(name, m, splits, full)
    changed = {k: v.copy() for k, v in m.items()}
    for k in changed:
        changed[k][splits[0] == 2] += 100.0
    moved = lf.learned_features(name, changed, splits, full)
    other = splits[0] != 2
    for k in m:
        np.testing.assert_array_equal(codes[k][0][other], moved[k][0][other])
        assert not np.allclose(codes[k][0][~other], moved[k][0][~other])


def test_learned_codes_keep_planted_clusters_apart():
    m, y = _cluster_zoo(n_per=10, seed=4)
    splits = _splits(y)
    codes = lf.learned_features("denoising", m, splits, lf.AutoencoderConfig(epochs=40, patience=10, seed=0),
                                names=["L0.m.lora_A"])["L0.m.lora_A"][0]
    tr, te = splits[0] == 0, splits[0] == 2
    centroids = np.stack([codes[tr & (y == c)].mean(0) for c in (0, 1)])
    pred = np.argmin(((codes[te][:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == y[te]).all()


def test_learned_bad_inputs():
    m, y = _cluster_zoo()
    with pytest.raises(ConfigError, match="splits must be an int array"):
        lf.learned_features("vae", m, np.zeros((2, 3)), CHEAP)
    with pytest.raises(ConfigError, match="is not learned; valid learned representations: vae, contrastive, denoising"):
        lf.learned_features("stats", m, _splits(y), CHEAP)
    with pytest.raises(ConfigError, match=r"AutoencoderConfig.dropout must be in \[0, 1\)"):
        lf.AutoencoderConfig(dropout=1.0)

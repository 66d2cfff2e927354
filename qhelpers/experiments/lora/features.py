"""Representations of LoRA weight matrices (seed 001): hand-crafted features, pair coupling
features and learned autoencoder codes, each vectorised over the adapters of a zoo.

Everything works on plain arrays: ``X`` is one matrix of every adapter, a float array
``[N adapters, rows, cols]`` (what :meth:`qhelpers.experiments.lora.zoo.Zoo.matrices` returns per name), so
nothing here needs a zoo. Features are computed in float64 and returned as ``[N, d]``.

Per-matrix representations (``x`` = the matrix's ``rows * cols`` values, ``s_1 >= ... >= s_k``
its ``k = min(rows, cols)`` singular values; "zero-padded" = missing entries are 0)
----------------------------------------------------------------------------------------
``flat`` (rows*cols)
    the raveled matrix (row-major).
``stats`` (7)
    mean, std (population, ddof 0), min, max, median, mean |x|, Frobenius norm.
``spectral`` (32 = 10 + 10 + 1 + 1 + 9 + 1)
    ``s_1..s_10`` (zero-padded); ``p_1..p_10`` with ``p_i = s_i / sum_j s_j`` over ALL k values
    (zero-padded); effective rank ``exp(-sum_i p_i ln p_i)`` over all k (Roy & Vetterli 2007;
    it is m for m equal nonzero singular values); condition number ``s_1 / s_k`` (set to
    :data:`CONDITION_CAP` when ``s_k <= s_1 / CONDITION_CAP``, i.e. numerically singular); 9
    spectral gaps ``s_i - s_{i+1}``, i = 1..9, of the zero-padded top-10 (so the gap after the
    last nonzero value is that value); nuclear norm ``sum_i s_i``.
``norms`` (7)
    Frobenius, nuclear (sum of s), spectral (s_1), L1 = max column sum of |x_ij|
    (``numpy.linalg.norm(ord=1)``), Linf = max row sum (``ord=inf``), nuclear/Frobenius,
    spectral/Frobenius.
``distribution`` (12)
    quantiles 5, 10, 25, 50, 75, 90, 95 % (``numpy.quantile``, linear interpolation), IQR
    (q75 - q25), mean absolute deviation ``mean |x - mean x|``, coefficient of variation of
    the MAGNITUDES ``std(|x|) / mean(|x|)``, skewness ``m3 / m2^1.5`` and excess kurtosis
    ``m4 / m2^2 - 3`` (central moments, population form = ``scipy.stats.skew`` /
    ``scipy.stats.kurtosis`` defaults). Deviation from the seed: the signed coefficient of
    variation ``std / |mean|`` is unbounded for LoRA matrices, whose mean is close to 0 (a
    Cauchy-like ratio that swamps a standardised classifier), so it is taken on ``|x|``.
``frequency`` (14)
    on the magnitude spectrum ``F = |numpy.fft.fft2(X)|`` (all rows*cols frequencies): the 10
    largest magnitudes (descending, zero-padded), mean, std (ddof 0) and max of F, and the
    energy concentration ``sum(top-10 F^2) / sum(F^2)``.
``information`` (2)
    Shannon entropy (nats) of a 50-bin equal-width histogram of x over [min x, max x]
    (``numpy.histogram(x, bins=50)``), and that entropy divided by ln 50 (in [0, 1]).
``ensemble`` (67)
    spectral + norms + distribution + frequency + information, concatenated in that order.
``effective_rank`` (1)
    the effective rank alone (used to ask whether the rank structure carries the class).

A zero matrix gets 0 for every ratio and spectral quantity (no spectrum, no distribution
shape); a constant matrix gets skewness, kurtosis and entropy 0.

Per-pair representation ``coupling`` (4 per LoRA pair; A = down ``[r, in]``, B = up ``[out, r]``)
------------------------------------------------------------------------------------------
Alignment: row i of A and row i of ``B^T`` (``[r, out]``) belong to the same rank-1 term
``b_i a_i^T`` of the update, so they are compared entry by entry over the first
``m = min(in, out)`` columns (when in != out the extra columns of the longer one are
dropped). Features: Pearson correlation and cosine similarity of those ``r*m`` aligned values;
Frobenius norm of the product ``B @ A`` (the update without the alpha/r scaling; computed as
``sqrt(sum((A A^T) * (B^T B)))``, never forming the ``out x in`` product); spectral alignment
= Pearson correlation of the r singular values of A and of B. Correlations with a constant
input (or r < 2 for the spectral one) are 0.

Learned representations (seed sections 8-10), per matrix, on the raveled matrix
------------------------------------------------------------------------------
Fitted on the TRAINING adapters of each split only (standardisation too); the validation
adapters only decide early stopping (best validation loss is restored); test adapters are
only encoded. One network per (matrix, split), trained batched (see :func:`learned_features`).

``vae``: encoder in-512-256 (batch norm + ReLU) -> mu, log-variance (64); decoder
64-256-512 (batch norm + ReLU)-in; loss = sum of squared errors + beta * KL (beta 0.1);
the code is mu. ``contrastive``: encoder in-512-512-128 (ReLU, dropout 0.2), projection
128-64-64, decoder 128-512-512-in; loss = mean squared error + InfoNCE (NT-Xent, tau 0.5,
within-batch negatives) between two views made by Gaussian noise (sigma ``view_noise``);
the code is the 128-d latent. ``denoising``: encoder in-512-256-64 (ReLU, dropout 0.2),
decoder 64-256-512-in, input corrupted by Gaussian noise sigma 0.2 (training only), loss =
mean squared error to the clean input; the code is the 64-d latent. Deviation: the seed's
"skip connections" are left out, since a skip across the bottleneck would let the
reconstruction bypass the very code that is extracted. All: Adam lr 1e-3, at most 100
epochs, early stopping patience 15, batch 32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from qhelpers import stats as _stats
from qhelpers.experiments.lora import batched
from qhelpers.util.errors import ConfigError

__all__ = [
    "CONDITION_CAP",
    "FEATURE_NAMES",
    "HANDCRAFTED",
    "LEARNED",
    "AutoencoderConfig",
    "Representation",
    "REPRESENTATIONS",
    "get_representation",
    "flat_features",
    "stats_features",
    "spectral_features",
    "norm_features",
    "distribution_features",
    "frequency_features",
    "information_features",
    "ensemble_features",
    "effective_rank_features",
    "coupling_features",
    "matrix_features",
    "check_matrices",
    "per_matrix_features",
    "per_pair_features",
    "feature_matrix",
    "learned_features",
]

#: Condition number reported for numerically singular matrices (s_k <= s_1 / CONDITION_CAP).
CONDITION_CAP = 1e12
_QUANTILES = (0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95)
_N_BINS = 50

FEATURE_NAMES: dict[str, tuple[str, ...]] = {
    "stats": ("mean", "std", "min", "max", "median", "mean_abs", "frobenius"),
    "spectral": tuple(
        [f"s{i}" for i in range(1, 11)]
        + [f"p{i}" for i in range(1, 11)]
        + ["effective_rank", "condition_number"]
        + [f"gap{i}" for i in range(1, 10)]
        + ["nuclear"]
    ),
    "norms": ("frobenius", "nuclear", "spectral", "l1_max_col", "linf_max_row", "nuclear_over_fro", "spectral_over_fro"),
    "distribution": (
        "q05", "q10", "q25", "q50", "q75", "q90", "q95", "iqr", "mean_abs_dev", "cv_abs", "skewness", "kurtosis",
    ),
    "frequency": tuple([f"fft_top{i}" for i in range(1, 11)] + ["fft_mean", "fft_std", "fft_max", "fft_energy_top10"]),
    "information": ("entropy", "entropy_normalized"),
    "effective_rank": ("effective_rank",),
    "coupling": ("pearson", "cosine", "product_frobenius", "spectral_alignment"),
}
FEATURE_NAMES["ensemble"] = tuple(
    f"{part}.{n}" for part in ("spectral", "norms", "distribution", "frequency", "information") for n in FEATURE_NAMES[part]
)

# --------------------------------------------------------------------------- input checks


def _as_batch(X: Any, what: str = "X") -> np.ndarray:
    """``X`` as a finite float64 array ``[N, rows, cols]``."""
    a = np.asarray(X)
    if a.ndim == 2:
        raise ConfigError(
            f"{what} has shape {a.shape}: expected [n_adapters, rows, cols]; for one matrix pass X[None]"
        )
    if a.ndim != 3 or min(a.shape) < 1:
        raise ConfigError(f"{what} must be a non-empty array [n_adapters, rows, cols], got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number):
        raise ConfigError(f"{what} must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ConfigError(f"{what} holds NaN/inf (first at {tuple(int(i) for i in bad)}); drop or repair that adapter")
    return a


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den == 0."""
    out = np.zeros(np.broadcast(num, den).shape)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _svdvals(a: np.ndarray) -> np.ndarray:
    """Singular values (descending) of every matrix of ``a`` [N, r, c], batched."""
    return torch.linalg.svdvals(torch.from_numpy(np.ascontiguousarray(a))).numpy()


def _pad(a: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros((a.shape[0], width))
    k = min(width, a.shape[1])
    out[:, :k] = a[:, :k]
    return out


def rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair; 0 (not NaN) where a row is constant."""
    return np.nan_to_num(_stats.rowwise_pearson(a, b), nan=0.0)


# --------------------------------------------------------------------------- per matrix


def flat_features(X: Any) -> np.ndarray:
    """The raveled matrices, ``[N, rows*cols]``."""
    a = _as_batch(X)
    return a.reshape(a.shape[0], -1).copy()


def stats_features(X: Any) -> np.ndarray:
    """``[N, 7]``: mean, std (ddof 0), min, max, median, mean |x|, Frobenius norm."""
    v = flat_features(X)
    return np.stack([
        v.mean(1), v.std(1), v.min(1), v.max(1), np.median(v, axis=1), np.abs(v).mean(1), np.sqrt((v * v).sum(1)),
    ], axis=1)


def _spectral_parts(s: np.ndarray) -> dict[str, np.ndarray]:
    total = s.sum(1)
    p = _safe_div(s, total[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    erank = np.where(total > 0, np.exp(-plogp.sum(1)), 0.0)
    s1, sk = s[:, 0], s[:, -1]
    singular = sk <= s1 / CONDITION_CAP
    cond = np.where(total > 0, np.where(singular, CONDITION_CAP, _safe_div(s1, np.where(singular, 1.0, sk))), 0.0)
    top = _pad(s, 10)
    return {
        "top": top, "p": _pad(p, 10), "erank": erank, "cond": cond, "gaps": top[:, :9] - top[:, 1:10], "nuclear": total,
    }


def spectral_features(X: Any) -> np.ndarray:
    """``[N, 32]``: top-10 singular values, top-10 normalised ``s/sum(s)``, effective rank,
    condition number, 9 gaps, nuclear norm (module docstring has the exact definitions)."""
    parts = _spectral_parts(_svdvals(_as_batch(X)))
    return np.concatenate([
        parts["top"], parts["p"], parts["erank"][:, None], parts["cond"][:, None], parts["gaps"], parts["nuclear"][:, None],
    ], axis=1)


def effective_rank_features(X: Any) -> np.ndarray:
    """``[N, 1]``: effective rank ``exp(entropy of s/sum(s))`` (0 for a zero matrix)."""
    return _spectral_parts(_svdvals(_as_batch(X)))["erank"][:, None]


def norm_features(X: Any) -> np.ndarray:
    """``[N, 7]``: Frobenius, nuclear, spectral, L1 (max column sum), Linf (max row sum),
    nuclear/Frobenius, spectral/Frobenius."""
    a = _as_batch(X)
    s = _svdvals(a)
    fro = np.sqrt((a * a).sum(axis=(1, 2)))
    nuc, spec = s.sum(1), s[:, 0]
    l1 = np.abs(a).sum(axis=1).max(axis=1)
    linf = np.abs(a).sum(axis=2).max(axis=1)
    return np.stack([fro, nuc, spec, l1, linf, _safe_div(nuc, fro), _safe_div(spec, fro)], axis=1)


def distribution_features(X: Any) -> np.ndarray:
    """``[N, 12]``: quantiles 5..95 %, IQR, mean absolute deviation, std(|x|)/mean(|x|),
    skewness, excess kurtosis (population moments)."""
    v = flat_features(X)
    q = np.quantile(v, _QUANTILES, axis=1).T
    c = v - v.mean(1, keepdims=True)
    m2, m3, m4 = (c**2).mean(1), (c**3).mean(1), (c**4).mean(1)
    tiny = m2 <= (np.finfo(np.float64).eps * np.abs(v).max(1)) ** 2
    skew = np.where(tiny, 0.0, _safe_div(m3, np.where(tiny, 1.0, m2) ** 1.5))
    kurt = np.where(tiny, 0.0, _safe_div(m4, np.where(tiny, 1.0, m2) ** 2) - 3.0)
    mag = np.abs(v)
    cv = _safe_div(mag.std(1), mag.mean(1))
    return np.concatenate([q, (q[:, 4] - q[:, 2])[:, None], np.abs(c).mean(1)[:, None], cv[:, None],
                           skew[:, None], kurt[:, None]], axis=1)


def frequency_features(X: Any) -> np.ndarray:
    """``[N, 14]``: 10 largest |2-D FFT| magnitudes, mean, std and max of the magnitude
    spectrum, energy share of the 10 largest."""
    a = _as_batch(X)
    mag = np.abs(np.fft.fft2(a, axes=(1, 2))).reshape(a.shape[0], -1)
    srt = -np.sort(-mag, axis=1)
    top = _pad(srt, 10)
    energy = (mag * mag).sum(1)
    conc = _safe_div((top * top).sum(1), energy)
    return np.concatenate([top, mag.mean(1)[:, None], mag.std(1)[:, None], mag.max(1)[:, None], conc[:, None]], axis=1)


def _histogram_counts(v: np.ndarray, bins: int) -> np.ndarray:
    """Per-row counts of ``numpy.histogram(row, bins)`` (equal-width bins over [min, max]),
    vectorised with numpy's own binning rule, so the counts are identical."""
    n, m = v.shape
    lo, hi = v.min(1), v.max(1)
    const = hi == lo
    lo = np.where(const, lo - 0.5, lo)  # numpy widens a zero range to [x - 0.5, x + 0.5]
    hi = np.where(const, hi + 0.5, hi)
    edges = np.linspace(lo, hi, bins + 1, axis=1)  # [n, bins+1]
    norm = bins / (hi - lo)
    idx = ((v - lo[:, None]) * norm[:, None]).astype(np.intp)
    idx[idx == bins] -= 1
    idx = np.clip(idx, 0, bins - 1)
    rows = np.arange(n)[:, None]
    dec = v < edges[rows, idx]
    idx[dec] -= 1
    inc = (v >= edges[rows, idx + 1]) & (idx != bins - 1)
    idx[inc] += 1
    flat = (idx + rows * bins).ravel()
    return np.bincount(flat, minlength=n * bins).reshape(n, bins)


def information_features(X: Any) -> np.ndarray:
    """``[N, 2]``: entropy (nats) of the 50-bin histogram of the values, and entropy / ln 50."""
    v = flat_features(X)
    p = _histogram_counts(v, _N_BINS) / v.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(1)
    return np.stack([h, h / math.log(_N_BINS)], axis=1)


def ensemble_features(X: Any) -> np.ndarray:
    """``[N, 67]``: spectral (32) + norms (7) + distribution (12) + frequency (14) + information (2)."""
    a = _as_batch(X)
    return np.concatenate([spectral_features(a), norm_features(a), distribution_features(a),
                           frequency_features(a), information_features(a)], axis=1)


# --------------------------------------------------------------------------- per pair


def coupling_features(A: Any, B: Any) -> np.ndarray:
    """``[N, 4]`` for LoRA pairs A ``[N, r, in]`` (down) and B ``[N, out, r]`` (up): Pearson
    and cosine of the aligned values, ||B @ A||_F, correlation of the singular values."""
    a = _as_batch(A, "A")
    b = _as_batch(B, "B")
    if a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
        raise ConfigError(
            f"A {a.shape} and B {b.shape} do not form LoRA pairs: expected A [N, r, in] and B [N, out, r] with "
            "the same N and r; pass (lora_A, lora_B) in that order"
        )
    n, r, n_in = a.shape
    bt = np.transpose(b, (0, 2, 1))
    m = min(n_in, bt.shape[2])
    va, vb = a[:, :, :m].reshape(n, -1), bt[:, :, :m].reshape(n, -1)
    pearson = rowwise_pearson(va, vb)
    cosine = np.clip(_safe_div((va * vb).sum(1), np.sqrt((va * va).sum(1) * (vb * vb).sum(1))), -1.0, 1.0)
    gram_a = a @ np.transpose(a, (0, 2, 1))  # A A^T  [N, r, r]
    gram_b = np.transpose(b, (0, 2, 1)) @ b  # B^T B  [N, r, r]
    prod = np.sqrt(np.maximum((gram_a * gram_b).sum(axis=(1, 2)), 0.0))
    align = rowwise_pearson(_svdvals(a), _svdvals(b)) if r >= 2 else np.zeros(n)
    return np.stack([pearson, cosine, prod, align], axis=1)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Representation:
    """One representation: ``kind`` is "matrix" (features of one matrix), "pair" (of one
    LoRA A/B pair) or "learned" (an autoencoder fitted per split); ``dim`` is the number of
    features per matrix or pair (None: rows*cols, for ``flat``)."""

    name: str
    kind: str
    dim: int | None
    description: str
    features: Callable[..., np.ndarray] | None = None


REPRESENTATIONS: dict[str, Representation] = {
    "flat": Representation("flat", "matrix", None, "raveled matrix (rows*cols values)", flat_features),
    "stats": Representation("stats", "matrix", 7, "mean, std, min, max, median, mean |x|, Frobenius", stats_features),
    "spectral": Representation("spectral", "matrix", 32, "singular values, normalised spectrum, effective rank, "
                               "condition number, gaps, nuclear norm", spectral_features),
    "norms": Representation("norms", "matrix", 7, "Frobenius, nuclear, spectral, L1, Linf and two ratios", norm_features),
    "distribution": Representation("distribution", "matrix", 12, "quantiles, IQR, MAD, CV of |x|, skewness, kurtosis",
                                   distribution_features),
    "frequency": Representation("frequency", "matrix", 14, "2-D FFT magnitude: top 10, mean, std, max, energy share",
                                frequency_features),
    "information": Representation("information", "matrix", 2, "entropy of a 50-bin histogram, normalised entropy",
                                  information_features),
    "ensemble": Representation("ensemble", "matrix", 67, "spectral + norms + distribution + frequency + information",
                               ensemble_features),
    "effective_rank": Representation("effective_rank", "matrix", 1, "effective rank (exp entropy of s/sum s)",
                                     effective_rank_features),
    "coupling": Representation("coupling", "pair", 4, "A/B Pearson, cosine, ||B A||_F, singular-value correlation",
                               coupling_features),
    "vae": Representation("vae", "learned", 64, "beta-VAE (512-256-64, beta 0.1) mean code"),
    "contrastive": Representation("contrastive", "learned", 128, "contrastive autoencoder (512-512-128, InfoNCE)"),
    "denoising": Representation("denoising", "learned", 64, "denoising autoencoder (512-256-64, sigma 0.2)"),
}
#: The seed's hand-crafted representations (Phase 3), in the seed's order.
HANDCRAFTED: tuple[str, ...] = ("flat", "stats", "spectral", "norms", "distribution", "frequency", "information", "ensemble")
#: The learned (autoencoder) representations.
LEARNED: tuple[str, ...] = ("vae", "contrastive", "denoising")


def get_representation(name: str) -> Representation:
    """The registry entry of ``name``; unknown names raise ConfigError listing the valid ones."""
    try:
        return REPRESENTATIONS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown representation {name!r}; valid names: {', '.join(REPRESENTATIONS)}"
        ) from None


def matrix_features(name: str, X: Any) -> np.ndarray:
    """Features ``[N, d]`` of one matrix of every adapter under the per-matrix representation ``name``."""
    rep = get_representation(name)
    if rep.kind != "matrix":
        raise ConfigError(
            f"representation {name!r} is {rep.kind}, not per-matrix; use per_pair_features for 'coupling' "
            "and learned_features for the autoencoders"
        )
    return rep.features(X)


def check_matrices(matrices: Mapping[str, Any], names: Iterable[str] | None = None) -> list[str]:
    """The names to use (``names``, default every matrix) after checking that ``matrices`` is a
    non-empty ``{name: [n_adapters, rows, cols]}`` dict holding them, all with the same n_adapters."""
    if not isinstance(matrices, Mapping) or not matrices:
        raise ConfigError("matrices must be a non-empty dict {name: array [n_adapters, rows, cols]} (Zoo.matrices())")
    names = list(matrices) if names is None else list(names)
    missing = [n for n in names if n not in matrices]
    if missing:
        raise ConfigError(f"matrices {missing[:5]} not found; available: {list(matrices)[:8]}...")
    sizes = {np.shape(matrices[n])[0] if np.ndim(matrices[n]) == 3 else None for n in names}
    if len(sizes) != 1 or None in sizes:
        raise ConfigError(
            "every matrix must be an array [n_adapters, rows, cols] with the same n_adapters; "
            f"got first dimensions {sorted(s for s in sizes if s is not None)}"
        )
    return names


def per_matrix_features(name: str, matrices: Mapping[str, Any], names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """``{matrix name: features [N, d]}`` for a per-matrix representation."""
    names = check_matrices(matrices, names)
    return {n: matrix_features(name, matrices[n]) for n in names}


def per_pair_features(matrices: Mapping[str, Any], pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], np.ndarray]:
    """``{(A name, B name): coupling features [N, 4]}`` for each LoRA pair."""
    pairs = [tuple(p) for p in pairs]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ConfigError("pairs must be a non-empty list of (lora_A name, lora_B name) tuples (Zoo.pairs())")
    check_matrices(matrices, [n for p in pairs for n in p])
    return {p: coupling_features(matrices[p[0]], matrices[p[1]]) for p in pairs}


def feature_matrix(
    name: str,
    matrices: Mapping[str, Any],
    pairs: Sequence[tuple[str, str]] | None = None,
    exclude: Iterable[str] = (),
) -> np.ndarray:
    """One hand-crafted (matrix or pair) representation of the whole adapter: the features of
    every matrix (or pair) not in ``exclude``, concatenated in ``matrices`` (or ``pairs``)
    order. A pair is dropped when either of its matrices is excluded."""
    rep = get_representation(name)
    drop = set(exclude)
    if rep.kind == "learned":
        raise ConfigError(f"{name!r} is learned per split: use learned_features(name, matrices, splits)")
    if rep.kind == "pair":
        if pairs is None:
            raise ConfigError("the 'coupling' representation needs pairs=[(A name, B name), ...] (Zoo.pairs())")
        keep = [p for p in pairs if p[0] not in drop and p[1] not in drop]
        if not keep:
            raise ConfigError("every LoRA pair is excluded; exclude fewer matrices")
        return np.concatenate(list(per_pair_features(matrices, keep).values()), axis=1)
    keep = [n for n in check_matrices(matrices) if n not in drop]
    if not keep:
        raise ConfigError("every matrix is excluded; exclude fewer matrices")
    return np.concatenate(list(per_matrix_features(name, matrices, keep).values()), axis=1)


# --------------------------------------------------------------------------- learned


@dataclass(frozen=True)
class AutoencoderConfig:
    """Training of the learned representations (seed sections 8-10).

    ``beta`` (VAE KL weight), ``noise`` (denoising sigma, in standardised units), ``tau``
    (InfoNCE temperature), ``view_noise`` (sigma of the contrastive views), ``dropout``
    (contrastive and denoising encoders); Adam ``lr``; at most ``epochs`` epochs, early
    stopping after ``patience`` epochs without a lower validation loss; ``memory_mb`` bounds
    how many networks train at once (None: 1024 MB on CPU, 8192 MB on CUDA); ``device``
    None = CPU.
    """

    epochs: int = 100
    patience: int = 15
    lr: float = 1e-3
    batch_size: int = 32
    beta: float = 0.1
    noise: float = 0.2
    tau: float = 0.5
    view_noise: float = 0.2
    dropout: float = 0.2
    seed: int = 0
    memory_mb: float | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        batched.check_training_settings(self, {"epochs": 1, "patience": 1, "batch_size": 1})
        if not float(self.tau) > 0:
            raise ConfigError(f"AutoencoderConfig.tau must be > 0, got {self.tau}")
        for name in ("beta", "noise", "view_noise"):
            if float(getattr(self, name)) < 0:
                raise ConfigError(f"AutoencoderConfig.{name} must be >= 0, got {getattr(self, name)}")


_AE_LAYERS: dict[str, dict[str, list[int]]] = {
    # hidden widths of encoder and decoder (input/output width added per matrix), latent size
    "vae": {"enc": [512, 256], "dec": [256, 512], "latent": [64]},
    "contrastive": {"enc": [512, 512], "dec": [512, 512], "latent": [128], "proj": [64, 64]},
    "denoising": {"enc": [512, 256], "dec": [256, 512], "latent": [64]},
}


def _ae_init(kind: str, G: int, d: int, gen: torch.Generator) -> tuple[dict, dict]:
    arch = _AE_LAYERS[kind]
    lat = arch["latent"][0]
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}

    def lin(name, i, o):
        params[name + ".w"], params[name + ".b"] = batched.init_linear(G, i, o, gen)

    def bn(name, h):
        params[name + ".g"] = torch.ones(G, 1, h)
        params[name + ".beta"] = torch.zeros(G, 1, h)
        buffers[name + ".mean"] = torch.zeros(G, 1, h)
        buffers[name + ".var"] = torch.ones(G, 1, h)

    widths = [d] + arch["enc"]
    for i in range(len(arch["enc"])):
        lin(f"enc{i}", widths[i], widths[i + 1])
        if kind == "vae":
            bn(f"enc{i}.bn", widths[i + 1])
    if kind == "vae":
        lin("mu", widths[-1], lat)
        lin("logvar", widths[-1], lat)
    else:
        lin("latent", widths[-1], lat)
    widths = [lat] + arch["dec"]
    for i in range(len(arch["dec"])):
        lin(f"dec{i}", widths[i], widths[i + 1])
        if kind == "vae":
            bn(f"dec{i}.bn", widths[i + 1])
    lin("out", widths[-1], d)
    if kind == "contrastive":
        proj = [lat] + arch["proj"]
        for i in range(len(arch["proj"])):
            lin(f"proj{i}", proj[i], proj[i + 1])
    return params, buffers


def _ae_encode(kind, P, Bf, x, train, noise, cfg: AutoencoderConfig):
    """(code, logvar or None); for the VAE the code is mu."""
    h = x
    n_enc = len(_AE_LAYERS[kind]["enc"])
    for i in range(n_enc):
        h = batched.linear(P, f"enc{i}", h)
        if kind == "vae":
            h = batched.batchnorm(P, Bf, f"enc{i}.bn", h, train)
        h = torch.relu(h)
        if kind != "vae":
            h = batched.dropout(h, cfg.dropout, train, noise)
    if kind == "vae":
        return batched.linear(P, "mu", h), batched.linear(P, "logvar", h)
    return batched.linear(P, "latent", h), None


def _ae_decode(kind, P, Bf, z, train):
    h = z
    for i in range(len(_AE_LAYERS[kind]["dec"])):
        h = batched.linear(P, f"dec{i}", h)
        if kind == "vae":
            h = batched.batchnorm(P, Bf, f"dec{i}.bn", h, train)
        h = torch.relu(h)
    return batched.linear(P, "out", h)


def _info_nce(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """NT-Xent per model: z1, z2 [G, b, k] -> [G] (mean over the 2b anchors)."""
    z = F.normalize(torch.cat([z1, z2], dim=1), dim=-1)
    b = z1.shape[1]
    sim = torch.bmm(z, z.transpose(1, 2)) / tau
    eye = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, -math.inf)
    pos = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    logp = sim - torch.logsumexp(sim, dim=2, keepdim=True)
    return -logp[:, torch.arange(2 * b, device=z.device), pos].mean(1)


def _ae_loss(kind, P, Bf, x, train, noise: batched.Noise, cfg: AutoencoderConfig) -> torch.Tensor:
    """Per-model loss [G] on x [G, b, d] (standardised)."""
    if kind == "vae":
        mu, logvar = _ae_encode(kind, P, Bf, x, train, noise, cfg)
        if train:
            eps = noise.randn(mu.shape[1:], mu.device)
            z = mu + eps * torch.exp(0.5 * logvar)
        else:
            z = mu
        rec = ((_ae_decode(kind, P, Bf, z, train) - x) ** 2).sum(-1).mean(1)
        kl = (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(-1)).mean(1)
        return rec + cfg.beta * kl
    if kind == "denoising":
        xin = x + cfg.noise * noise.randn(x.shape[1:], x.device) if train else x
        z, _ = _ae_encode(kind, P, Bf, xin, train, noise, cfg)
        return ((_ae_decode(kind, P, Bf, z, train) - x) ** 2).mean((1, 2))
    # contrastive: two noisy views; reconstruction from the first view's code
    v1 = x + cfg.view_noise * noise.randn(x.shape[1:], x.device)
    v2 = x + cfg.view_noise * noise.randn(x.shape[1:], x.device)
    z1, _ = _ae_encode(kind, P, Bf, v1, train, noise, cfg)
    z2, _ = _ae_encode(kind, P, Bf, v2, train, noise, cfg)
    rec = ((_ae_decode(kind, P, Bf, z1, train) - x) ** 2).mean((1, 2))

    def proj(z):
        return batched.linear(P, "proj1", torch.relu(batched.linear(P, "proj0", z)))

    return rec + _info_nce(proj(z1), proj(z2), cfg.tau)


def _check_splits(splits: Any, n: int) -> np.ndarray:
    s = np.asarray(splits)
    if s.ndim != 2 or s.shape[1] != n or not np.isin(s, (0, 1, 2)).all():
        raise ConfigError(
            f"splits must be an int array [n_runs, {n}] of 0 (train) / 1 (val) / 2 (test), as made by "
            f"qhelpers.experiments.lora.classify.make_splits(y, config); got shape {s.shape}"
        )
    counts = (s == 0).sum(1)
    if counts.min() < 2 or len(set(counts.tolist())) != 1:
        raise ConfigError(f"every run needs the same number (>= 2) of training rows, got {counts.tolist()}")
    return s.astype(np.int64)


def learned_features(
    name: str,
    matrices: Mapping[str, Any],
    splits: Any,
    config: AutoencoderConfig = AutoencoderConfig(),
    names: Iterable[str] | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """``{matrix name: codes [n_runs, N, latent]}``: for each split (row of ``splits``, see
    :func:`qhelpers.experiments.lora.classify.make_splits`) and each matrix, an autoencoder ``name`` ("vae",
    "contrastive", "denoising") fitted on the raveled matrix of the split's TRAINING adapters
    only (standardised with their mean and std), early-stopped on the validation adapters,
    then used to encode every adapter. Networks with the same input size are trained
    together in batches that fit ``config.memory_mb``."""
    rep = get_representation(name)
    if rep.kind != "learned":
        raise ConfigError(f"{name!r} is not learned; valid learned representations: {', '.join(LEARNED)}")
    if not isinstance(config, AutoencoderConfig):
        raise ConfigError("config must be an AutoencoderConfig")
    names = check_matrices(matrices, names)
    n = int(np.shape(matrices[names[0]])[0])
    s = _check_splits(splits, n)
    R = s.shape[0]
    from qhelpers.models.loading import resolve_device

    device = resolve_device(config.device) if config.device is not None else torch.device("cpu")
    flat = {m: flat_features(matrices[m]).astype(np.float32) for m in names}
    out = {m: np.zeros((R, n, rep.dim), dtype=np.float32) for m in names}
    jobs = [(m, r) for m in names for r in range(R)]
    by_dim: dict[int, list[tuple[str, int]]] = {}
    for job in jobs:
        by_dim.setdefault(flat[job[0]].shape[1], []).append(job)
    train_rows = [np.flatnonzero(s[r] == 0) for r in range(R)]
    val_rows = [np.flatnonzero(s[r] == 1) for r in range(R)]
    chunks = []
    for d, group in by_dim.items():
        probe, _ = _ae_init(name, 1, d, torch.Generator().manual_seed(0))
        n_par = sum(int(v.numel()) for v in probe.values())
        for idx in batched.model_chunks(len(group), n_par, n * d, batched.memory_budget_mb(config.memory_mb, device, 1024.0)):
            chunks.append((d, [group[i] for i in idx]))
    it: Iterable = chunks
    if progress:
        from qhelpers.util.progress import progress_bar

        it = progress_bar(chunks, desc=f"{name} autoencoders", unit="batch")
    for ci, (d, group) in enumerate(it):
        gen = torch.Generator().manual_seed(int(config.seed) * 1_000_003 + ci)
        G = len(group)
        params, buffers = _ae_init(name, G, d, gen)
        params = {k: v.to(device) for k, v in params.items()}
        buffers = {k: v.to(device) for k, v in buffers.items()}
        X = torch.from_numpy(np.stack([flat[m] for m, _ in group])).to(device)
        tr = torch.as_tensor(np.stack([train_rows[r] for _, r in group]), device=device)
        has_val = all(len(val_rows[r]) > 0 for _, r in group)
        va = torch.as_tensor(np.stack([val_rows[r] for _, r in group]), device=device) if has_val else tr
        X = batched.standardize(X, tr)
        data = {"X": X, "train_rows": tr, "val_rows": va, "job": torch.arange(G, device=device)}
        val_gen_seed = int(config.seed) * 7919 + ci

        def train_loss(P, Bf, D, rows, noise):
            x = torch.take_along_dim(D["X"], rows[..., None], dim=1)
            return _ae_loss(name, P, Bf, x, True, noise, config)

        def val_loss(P, Bf, D, G=G, val_gen_seed=val_gen_seed):
            x = torch.take_along_dim(D["X"], D["val_rows"][..., None], dim=1)
            fixed = batched.Noise(torch.Generator().manual_seed(val_gen_seed), G, D["slot"])  # same views every epoch
            return _ae_loss(name, P, Bf, x, False, fixed, config)

        def finish(P, Bf, D, local_ids, epochs, group=group):
            code, _ = _ae_encode(name, P, Bf, D["X"], False, None, config)
            code = code.cpu().numpy()
            for j, gid in enumerate(D["job"].cpu().numpy()):
                m, r = group[int(gid)]
                out[m][r] = code[j]

        spec = batched.FitSpec(train_loss, val_loss, finish, lr=config.lr, max_epochs=config.epochs,
                        patience=config.patience, batch_size=config.batch_size)
        batched.fit_batched(params, buffers, data, spec, gen)
    return out

"""Correlations with bootstrap intervals and Monte Carlo permutation p-values."""
from __future__ import annotations

import math
from itertools import permutations
from typing import Any, Callable, Sequence

import numpy as np
from scipy import stats as _sps

from qhelpers.util.errors import ConfigError
from qhelpers.stats.bootstrap import bootstrap_indices, check_boot, check_level, percentile_interval


def rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    with np.errstate(all="ignore"):
        r = (xc * yc).sum(axis=1) / np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))
    return np.clip(r, -1.0, 1.0)


def check_method(method: str) -> str:
    """``method`` after checking it is ``"pearson"`` or ``"spearman"``."""
    if method not in ("pearson", "spearman"):
        raise ConfigError(f"method must be 'pearson' or 'spearman', got {method!r}")
    return method


def _rank_rows(a: np.ndarray) -> np.ndarray:
    return _sps.rankdata(a, axis=1)


def correlation_record(n: int, method: str = "pearson", level: float = 0.95, reason: str | None = None,
                       **extra: Any) -> dict[str, Any]:
    """The dict :func:`correlation` returns, still undefined (NaN r and CI), with ``reason``;
    correlation-like estimates elsewhere start from it so every one has the same keys."""
    return {
        "r": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_perm": math.nan,
        "perm_exact": False, "p_parametric": math.nan, "n": int(n), "method": method,
        "level": float(level), "boot_valid": 0, "defined": False, "reason": reason, **extra,
    }


def monte_carlo_p(r: float, n: int, n_perm: int, draw: Callable[[int], np.ndarray]) -> float:
    """Two-sided Monte Carlo permutation p-value ``(1 + hits) / (1 + n_perm)``, where a hit is a
    permuted statistic with ``|r_perm| >= |r|``; ``draw(m)`` returns ``m`` permuted statistics
    (called in chunks that keep about two million values in memory)."""
    thr = abs(r) - 1e-12
    hits = done = 0
    chunk = max(1, min(int(n_perm), 2_000_000 // max(int(n), 1)))
    while done < int(n_perm):
        m = min(chunk, int(n_perm) - done)
        hits += int((np.abs(draw(m)) >= thr).sum())
        done += m
    return (1.0 + hits) / (1.0 + int(n_perm))


def correlation(
    x: Sequence[float],
    y: Sequence[float],
    method: str = "pearson",
    n_boot: int = 2000,
    n_perm: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Correlation of paired observations with a bootstrap CI and a permutation p-value.

    Returns a dict: r, ci_low, ci_high (percentile bootstrap over pairs; degenerate resamples
    with a constant variable are skipped, their number is in ``boot_valid``), p_perm
    (two-sided, |r_perm| >= |r|; exact over all n! permutations when n! <= n_perm, else
    Monte Carlo with the +1 correction ``(1 + hits) / (1 + n_perm)``), perm_exact,
    p_parametric (scipy's pearsonr / spearmanr), n, method, level, defined, reason.
    Undefined (NaN r and CI, ``defined=False``) when n < 3, a value is non-finite or a
    variable is constant. Report n: with 7 languages even |r| = 0.75 has a wide interval.
    """
    check_method(method)
    check_boot(n_boot)
    check_level(level)
    if int(n_perm) < 1:
        raise ConfigError(f"n_perm must be >= 1 (default 10000); got {n_perm}")
    xa = np.asarray(x, dtype=np.float64).ravel()
    ya = np.asarray(y, dtype=np.float64).ravel()
    if xa.shape != ya.shape:
        raise ConfigError(f"x and y must have the same length, got {xa.size} and {ya.size}")
    n = int(xa.size)
    out = correlation_record(n, method, level)
    if n < 3:
        out["reason"] = f"too few: a correlation needs n >= 3 pairs, got n={n}"
        return out
    bad = ~(np.isfinite(xa) & np.isfinite(ya))
    if bad.any():
        out["reason"] = f"non-finite: x or y is NaN/inf at positions {np.flatnonzero(bad)[:5].tolist()}"
        return out
    if np.ptp(xa) == 0 or np.ptp(ya) == 0:
        out["reason"] = "constant: x or y has zero variance, so r is undefined"
        return out

    if method == "pearson":
        res = _sps.pearsonr(xa, ya)
        xs, ys = xa, ya
    else:
        res = _sps.spearmanr(xa, ya)
        xs, ys = _sps.rankdata(xa), _sps.rankdata(ya)
    r = float(rowwise_pearson(xs[None, :], ys[None, :])[0])
    out["r"] = r
    out["p_parametric"] = float(res.pvalue)

    rng = np.random.default_rng(int(seed))
    idx = bootstrap_indices(n, int(n_boot), rng)
    xb, yb = xa[idx], ya[idx]
    if method == "spearman":
        xb, yb = _rank_rows(xb), _rank_rows(yb)
    rb = rowwise_pearson(xb, yb)
    out["boot_valid"] = int(np.isfinite(rb).sum())
    lo, hi = percentile_interval(rb, level)
    out["ci_low"], out["ci_high"] = float(lo), float(hi)

    # Permutation test: permute y against fixed x (ranks already taken for spearman).
    thr = abs(r) - 1e-12
    if math.factorial(n) <= int(n_perm):
        perms = np.array(list(permutations(range(n))))
        rp = rowwise_pearson(np.broadcast_to(xs, perms.shape), ys[perms])
        out["p_perm"] = float(np.mean(np.abs(rp) >= thr))
        out["perm_exact"] = True
    else:
        out["p_perm"] = monte_carlo_p(
            r, n, int(n_perm),
            lambda m: rowwise_pearson(np.broadcast_to(xs, (m, n)), rng.permuted(np.broadcast_to(ys, (m, n)), axis=1)),
        )
    if np.isfinite(lo) and np.isfinite(hi):
        out["defined"] = True
    else:
        out["reason"] = "non-finite: every bootstrap resample was degenerate; measure more pairs"
    return out


def kendalls_w(values: np.ndarray) -> np.ndarray:
    """Kendall's coefficient of concordance W of ``m`` raters ranking ``k`` objects.

    ``values`` has shape ``(..., m, k)``: each rater's scores of the objects (ranked within the
    rater, ties get average ranks); leading axes are independent problems (e.g. bootstrap
    replicates). ``W = 12 S / (m^2 (k^3 - k) - m sum_j T_j)`` with ``S`` the sum of squared
    deviations of the objects' rank sums from their mean and ``T_j = sum (t^3 - t)`` over rater
    ``j``'s tie groups (Kendall & Babington Smith 1939; the tie correction of Siegel & Castellan
    1988, eq. 9.16). 1: every rater ranks the objects alike; 0: no agreement. NaN where every
    rater ties every object. Written here because scipy has no W."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim < 2 or a.shape[-2] < 2 or a.shape[-1] < 2:
        raise ConfigError(f"Kendall's W needs at least 2 raters and 2 objects, got shape {a.shape}")
    m, k = a.shape[-2], a.shape[-1]
    ranks = _sps.rankdata(a, axis=-1)
    rank_sums = ranks.sum(axis=-2)
    s = ((rank_sums - rank_sums.mean(axis=-1, keepdims=True)) ** 2).sum(axis=-1)
    # tie groups: for each rater, sum over distinct values of (t^3 - t)
    srt = np.sort(a, axis=-1)
    same = np.concatenate([np.zeros(srt.shape[:-1] + (1,), dtype=bool), srt[..., 1:] == srt[..., :-1]], axis=-1)
    ties = np.zeros(srt.shape[:-1])
    run = np.ones(srt.shape[:-1])
    for j in range(1, k):  # run lengths of equal values, k is small (methods)
        cont = same[..., j]
        ties += np.where(cont, 0.0, run ** 3 - run)
        run = np.where(cont, run + 1, 1.0)
    ties += run ** 3 - run
    denom = m ** 2 * (k ** 3 - k) - m * ties.sum(axis=-1)
    with np.errstate(all="ignore"):
        return np.where(denom > 0, 12.0 * s / denom, np.nan)

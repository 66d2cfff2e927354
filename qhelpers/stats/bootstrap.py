"""Bootstrap primitives: :class:`Estimate`, resample indices and counts (per language with
:func:`language_counts`), percentile intervals, argument checks, and estimates of differences
and ratios from their replicates."""
from __future__ import annotations

import math
import numbers
import warnings
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from qhelpers.util.errors import ConfigError


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a confidence interval.

    ``n`` is the number of resampling units (texts per language; the smallest count when
    languages differ). ``defined=False`` always has a ``reason`` (see the module docstring
    for the tags); ``value`` is then NaN, except for ``"unbounded CI"`` where the observed
    point estimate is kept and only the interval is NaN.
    """

    value: float
    ci_low: float
    ci_high: float
    n: int
    level: float = 0.95
    defined: bool = True
    reason: str | None = None

    def __post_init__(self) -> None:
        for name in ("value", "ci_low", "ci_high", "level"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "n", int(self.n))
        if self.defined:
            if not all(math.isfinite(v) for v in (self.value, self.ci_low, self.ci_high)):
                raise ConfigError(
                    f"a defined Estimate needs a finite value and interval, got value={self.value}, "
                    f"ci=({self.ci_low}, {self.ci_high}); build it with defined=False and a reason"
                )
        elif not self.reason:
            raise ConfigError("an undefined Estimate needs a reason; pass reason='tag: why'")

    @classmethod
    def undefined(cls, reason: str, n: int, level: float = 0.95, value: float = math.nan) -> "Estimate":
        """An undefined estimate: NaN interval, ``reason`` set, ``value`` NaN unless given."""
        return cls(value, math.nan, math.nan, n, level, False, reason)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (NaN stays NaN; ``results.to_jsonable`` maps it to null)."""
        return asdict(self)

    def __str__(self) -> str:
        pct = f"{self.level:.0%}"
        if self.defined:
            return f"{self.value:.4g} [{pct} CI {self.ci_low:.4g}, {self.ci_high:.4g}] (n={self.n})"
        return f"undefined ({self.reason}; value={self.value:.4g}, n={self.n})"


def bootstrap_indices(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n)`` integer array: each row a resample (with replacement) of ``range(n)``."""
    if n < 1 or n_boot < 1:
        raise ConfigError(f"bootstrap needs n >= 1 and n_boot >= 1, got n={n}, n_boot={n_boot}")
    return rng.integers(0, n, size=(n_boot, n))


def bootstrap_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n)`` float matrix: how often each unit appears in each resample.

    ``bootstrap_counts(...) @ values`` gives every replicate's sum at once.
    """
    idx = bootstrap_indices(n, n_boot, rng)
    flat = (idx + (np.arange(n_boot) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def percentile_interval(replicates: np.ndarray, level: float = 0.95, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of bootstrap replicates along ``axis``; non-finite replicates are
    ignored (all non-finite -> NaN)."""
    check_level(level)
    a = np.asarray(replicates, dtype=np.float64)
    a = np.where(np.isfinite(a), a, np.nan)
    q = [50.0 * (1.0 - level), 50.0 * (1.0 + level)]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN, reported by callers
        lo, hi = np.nanpercentile(a, q, axis=axis)
    return lo, hi


def check_level(level: float) -> float:
    """``level`` as a float, after checking it is a confidence level in (0, 1)."""
    if not (0.0 < float(level) < 1.0):
        raise ConfigError(f"level must be in (0, 1), e.g. 0.95; got {level}")
    return float(level)


def check_boot(n_boot: int) -> int:
    """``n_boot`` as an int, after checking it is a whole number of replicates >= 1."""
    whole = isinstance(n_boot, numbers.Real) and not isinstance(n_boot, bool) and float(n_boot).is_integer()
    if not (whole and n_boot >= 1):
        raise ConfigError(f"n_boot must be an int >= 1 (bootstrap replicates, default 2000); got {n_boot!r}")
    return int(n_boot)


def lang_seed(seed: int, lang: str) -> list[int]:
    """The seed of ``lang``'s own generator: ``[seed, crc32(lang)]``, independent of the other
    languages a call involves."""
    return [int(seed), zlib.crc32(lang.encode("utf-8"))]


def lang_rng(seed: int, lang: str) -> np.random.Generator:
    """``np.random.default_rng(lang_seed(seed, lang))``: the generator of one language."""
    return np.random.default_rng(lang_seed(seed, lang))


def language_counts(sizes: Mapping[str, int], n_boot: int, seed: int, parallel: bool) -> dict[str, np.ndarray]:
    """Bootstrap counts (:func:`bootstrap_counts`) over the units (texts) of each language.

    ``parallel`` (every language has the same units in the same order, e.g. UDHR): one matrix
    from ``default_rng(seed)``, shared by every language, so that cross-language comparisons
    stay paired. Otherwise each language gets its own from :func:`lang_rng`. ``sizes`` maps
    each language to its number of units.
    """
    n_boot = check_boot(n_boot)
    if not sizes:
        raise ConfigError("language_counts needs at least one language")
    if parallel:
        n = {int(v) for v in sizes.values()}
        if len(n) != 1:
            raise ConfigError(f"parallel languages must have the same number of units, got {dict(sizes)}")
        shared = bootstrap_counts(n.pop(), n_boot, np.random.default_rng(int(seed)))
        return {lang: shared for lang in sizes}
    return {lang: bootstrap_counts(int(size), n_boot, lang_rng(seed, lang)) for lang, size in sizes.items()}


def ratio_estimate(
    num_p: float,
    num_b: np.ndarray,
    den_p: float,
    den_b: np.ndarray,
    n: int,
    level: float,
    tol: float,
    den_name: str,
    alternative: str,
    scale: float = 1.0,
) -> Estimate:
    """num/den (times ``scale``) with the undefined-ratio rules of the module docstring
    (non-finite and collapse are checked by the caller)."""
    if not (math.isfinite(num_p) and math.isfinite(den_p)):
        return Estimate.undefined("non-finite: numerator or denominator is not finite", n, level)
    if den_p <= tol:
        return Estimate.undefined(
            f"denominator <= 0: {den_name} = {den_p:.4g} is <= {tol:g}, so the ratio has no meaning "
            f"(nothing to compare against); use {alternative}",
            n,
            level,
        )
    value = scale * num_p / den_p
    dlo, dhi = percentile_interval(den_b, level)
    if not (np.isfinite(dlo) and dlo > 0):
        return Estimate.undefined(
            f"unbounded CI: the {level:.0%} CI of {den_name} [{float(dlo):.4g}, {float(dhi):.4g}] contains 0, "
            f"so the ratio has no finite confidence interval (value is the point estimate only); "
            f"use {alternative} or measure more texts",
            n,
            level,
            value=value,
        )
    with np.errstate(all="ignore"):
        reps = scale * num_b / den_b
    lo, hi = percentile_interval(reps, level)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return Estimate.undefined("non-finite: no finite bootstrap replicate", n, level, value=value)
    return Estimate(value, float(lo), float(hi), n, level)


def diff_estimate(p: float, b: np.ndarray, n: int, level: float) -> Estimate:
    if not math.isfinite(p):
        return Estimate.undefined("non-finite: the difference is not finite", n, level)
    lo, hi = percentile_interval(b, level)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return Estimate.undefined("non-finite: no finite bootstrap replicate", n, level)
    return Estimate(p, float(lo), float(hi), n, level)

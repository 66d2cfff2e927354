"""Bootstrap primitives: :class:`Estimate` (with :meth:`Estimate.p_value`), resample indices
and counts (per language with :func:`language_counts`), the three interval methods
(studentized, percentile, BCa), :class:`BootStat` (a statistic with its replicates and its
influence values, from which the studentized interval is computed), and estimates of
differences and ratios."""
from __future__ import annotations

import math
import numbers
import warnings
import zlib
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy.special import ndtr, ndtri

from qhelpers.util.errors import ConfigError

#: Interval methods: "studentized" (bootstrap-t with a delta-method standard error, the
#: default), "percentile" and "bca" (bias-corrected and accelerated, as scipy.stats.bootstrap).
INTERVAL_METHODS: tuple[str, ...] = ("studentized", "percentile", "bca")

#: The interval method every function of :mod:`qhelpers.stats` uses unless told otherwise.
DEFAULT_METHOD = "studentized"

#: Monotone increasing maps an interval may be carried through (reported = f(working scale)),
#: with their inverses (threshold on the reported scale -> working scale).
TRANSFORMS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "identity": (lambda v: v, lambda v: v),
    "exp": (np.exp, np.log),
    "expm1": (np.expm1, np.log1p),
}

# Below this standard error (relative to max(1, |value|)) the statistic does not move under
# resampling (e.g. a constant per-token shift): the interval is the point itself.
_DEGENERATE_RTOL = 1e-12


def check_interval_method(method: str) -> str:
    """``method`` after checking it is one of :data:`INTERVAL_METHODS`."""
    if method not in INTERVAL_METHODS:
        raise ConfigError(
            f"interval method must be one of {list(INTERVAL_METHODS)} (default {DEFAULT_METHOD!r}), got {method!r}"
        )
    return str(method)


@dataclass(frozen=True, eq=False)
class BootDistribution:
    """The bootstrap distribution behind an :class:`Estimate`'s interval, for exact p-values.

    ``kind="studentized"``: ``values`` are the sorted t* = (theta*_b - theta) / se*_b, and
    ``theta``/``se`` the point estimate and its standard error on the working scale.
    ``kind="percentile"``: ``values`` are the sorted finite replicates (working scale).
    ``transform`` maps the working scale to the reported one (a key of :data:`TRANSFORMS`,
    e.g. "exp" for a perplexity ratio whose interval was computed for the difference of
    log-perplexities).
    """

    kind: str
    values: np.ndarray
    theta: float = math.nan
    se: float = math.nan
    transform: str = "identity"

    def __post_init__(self) -> None:
        if self.kind not in ("studentized", "percentile"):
            raise ConfigError(f"BootDistribution kind must be 'studentized' or 'percentile', got {self.kind!r}")
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"transform must be one of {list(TRANSFORMS)}, got {self.transform!r}")


def interpolated_position(sorted_values: np.ndarray, v: float) -> float:
    """The position ``x`` in [0, B-1] where the linear-interpolation quantile function of
    ``sorted_values`` (numpy's default, ``quantile(x / (B-1))``) reaches ``v``:
    ``sup {x : quantile(x / (B-1)) < v}``, so that ``quantile(p) < v`` iff ``p (B-1) < x``."""
    a = np.asarray(sorted_values, dtype=np.float64)
    b = a.size
    k = int(np.searchsorted(a, v, side="left"))  # a[:k] < v <= a[k:]
    if k == 0:
        return 0.0
    if k >= b:
        return float(b - 1)
    lo, hi = a[k - 1], a[k]
    with np.errstate(all="ignore"):
        frac = (v - lo) / (hi - lo)
    if not np.isfinite(frac):  # an infinite neighbour: the quantile is infinite between them
        frac = 1.0 if lo == -math.inf else 0.0
    return float(k - 1 + min(max(frac, 0.0), 1.0))


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a confidence interval.

    ``n`` is the number of resampling units (texts per language; the smallest count when
    languages differ). ``defined=False`` always has a ``reason`` (see the module docstring
    of :mod:`qhelpers.stats` for the tags); ``value`` is then NaN, except for
    ``"unbounded CI"`` where the observed point estimate is kept and only the interval is
    NaN. ``distribution`` (not shown, not compared, not serialized) is the bootstrap
    distribution the interval came from, when there is one; :meth:`p_value` uses it.
    """

    value: float
    ci_low: float
    ci_high: float
    n: int
    level: float = 0.95
    defined: bool = True
    reason: str | None = None
    distribution: BootDistribution | None = field(
        default=None, repr=False, compare=False, metadata={"serialize": False}
    )

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
        """Plain dict of the fields but ``distribution`` (NaN stays NaN; ``results.to_jsonable``
        maps it to null)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("serialize", True)}

    def p_value(self, threshold: float, direction: str = ">") -> float:
        """One-sided p-value of H0 "the true value is NOT beyond ``threshold`` in ``direction``"
        (">": H0 true <= threshold; "<": H0 true >= threshold).

        Consistent with the Estimate's own interval: at the Estimate's level, the interval
        lies wholly (strictly) beyond the threshold iff ``p < (1 - level) / 2``. With a stored
        studentized distribution p is the share of t* beyond the observed t = (value -
        threshold) / se (quantiles interpolated as numpy's); a stored percentile
        distribution gives the share of replicates on the wrong side; otherwise (BCa, or an
        Estimate built by hand) :func:`p_value_from_interval`. 0 means beyond every
        replicate (below the Monte Carlo resolution 1/n_boot). NaN when undefined.
        """
        if direction not in (">", "<"):
            raise ConfigError(f"direction must be '>' or '<', got {direction!r}")
        threshold = float(threshold)
        if not math.isfinite(threshold):
            raise ConfigError(f"threshold must be finite, got {threshold}")
        if not self.defined:
            return math.nan
        d = self.distribution
        if d is None:
            return p_value_from_interval(self.value, self.ci_low, self.ci_high, self.level, threshold, direction)
        with np.errstate(all="ignore"):
            thr = float(TRANSFORMS[d.transform][1](threshold))
        if math.isnan(thr):  # below the transform's domain (e.g. a ratio threshold <= 0)
            thr = -math.inf
        if d.kind == "studentized":
            if not (d.se > 0):  # degenerate interval [theta, theta]
                beyond = d.theta > thr if direction == ">" else d.theta < thr
                return 0.0 if beyond else 1.0
            t_obs = (d.theta - thr) / d.se
            pos = interpolated_position(d.values, t_obs) / max(d.values.size - 1, 1)
            if d.values.size == 1:
                pos = 1.0 if d.values[0] < t_obs else 0.0
            return float(1.0 - pos) if direction == ">" else float(pos)
        # percentile: lower bound q(alpha) > thr iff F(thr) < alpha
        if d.values.size == 1:
            pos = 1.0 if d.values[0] < thr else 0.0
        else:
            pos = interpolated_position(d.values, thr) / (d.values.size - 1)
        return float(pos) if direction == ">" else float(1.0 - pos)

    def __str__(self) -> str:
        pct = f"{self.level:.0%}"
        if self.defined:
            return f"{self.value:.4g} [{pct} CI {self.ci_low:.4g}, {self.ci_high:.4g}] (n={self.n})"
        return f"undefined ({self.reason}; value={self.value:.4g}, n={self.n})"


def p_value_from_interval(
    value: float, ci_low: float, ci_high: float, level: float, threshold: float, direction: str = ">"
) -> float:
    """Normal approximation of the one-sided p-value of H0 "the true value is NOT beyond
    ``threshold`` in ``direction``" from an interval alone.

    The side of the interval facing the threshold gives the standard error: for ">",
    ``se = (value - ci_low) / z`` with ``z = Phi^-1((1 + level) / 2)`` and ``p = Phi(-(value -
    threshold) / se)`` (mirror image for "<"), so ``p < (1 - level) / 2`` iff the interval lies
    strictly beyond the threshold. ``value`` is clipped into the interval first; a side of
    zero width gives p = 0 or 1. NaN when any input is not finite.
    """
    if direction not in (">", "<"):
        raise ConfigError(f"direction must be '>' or '<', got {direction!r}")
    check_level(level)
    vals = [float(v) for v in (value, ci_low, ci_high, threshold)]
    if not all(math.isfinite(v) for v in vals):
        return math.nan
    value, lo, hi, thr = vals
    if lo > hi:
        lo, hi = hi, lo
    c = min(max(value, lo), hi)
    z = float(ndtri(0.5 * (1.0 + level)))
    if direction == ">":
        half, dist = c - lo, c - thr
    else:
        half, dist = hi - c, thr - c
    if half <= 0:
        return 0.0 if dist > 0 else 1.0
    return float(ndtr(-dist / (half / z)))


def bootstrap_indices(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n)`` integer array: each row a resample (with replacement) of ``range(n)``
    (the same draws as scipy.stats.bootstrap's with the same generator)."""
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


def studentized_t(point: float, reps: np.ndarray, se_reps: np.ndarray, se_point: float = 0.0) -> np.ndarray:
    """Sorted t* = (reps - point) / se_reps over the replicates with a finite value.

    A replicate standard error of 0 (or below ``1e-9 se_point``: rounding noise, e.g. a
    resample that repeats one text) gives t = +-inf, or 0 when the replicate equals the point
    (within ``1e-12 max(1, |point|)``)."""
    reps = np.asarray(reps, dtype=np.float64)
    se_reps = np.asarray(se_reps, dtype=np.float64)
    keep = np.isfinite(reps) & ~np.isnan(se_reps)
    if not keep.all():
        reps, se_reps = reps[keep], se_reps[keep]
    diff = reps - point
    with np.errstate(all="ignore"):
        t = diff / se_reps
    zero = ~(se_reps > 1e-9 * se_point)
    if zero.any():
        same = np.abs(diff[zero]) <= _DEGENERATE_RTOL * max(1.0, abs(point))
        t[zero] = np.where(same, 0.0, np.copysign(np.inf, diff[zero]))
    t.sort()
    return t


def sorted_quantiles(sorted_values: np.ndarray, probs: Sequence[float]) -> list[float]:
    """Quantiles of an already sorted array, as ``np.quantile(..., method="linear")`` (without
    its sort); an infinite neighbour gives an infinite quantile."""
    a = sorted_values
    out = []
    for p in probs:
        x = p * (a.size - 1)
        k = min(int(math.floor(x)), a.size - 1)
        f = x - k
        lo = float(a[k])
        if f == 0.0 or k + 1 >= a.size:
            out.append(lo)
            continue
        hi = float(a[k + 1])
        if math.isinf(lo) or math.isinf(hi):
            out.append(lo if math.isinf(lo) else hi)
        else:
            out.append(lo + f * (hi - lo))
    return out


def studentized_interval(
    point: float, se_point: float, reps: np.ndarray, se_reps: np.ndarray, level: float = 0.95
) -> tuple[float, float, np.ndarray]:
    """Bootstrap-t interval ``[point - q_hi se_point, point - q_lo se_point]``, ``q`` the
    ``(1 -+ level) / 2`` quantiles (numpy's linear interpolation) of the t* of
    :func:`studentized_t`; returns ``(low, high, sorted t*)``. Infinite quantiles give an
    infinite bound; ``se_point == 0`` gives ``[point, point]``."""
    check_level(level)
    t = studentized_t(point, reps, se_reps, se_point)
    if not (se_point > 0):
        return float(point), float(point), t
    if t.size == 0:
        return math.nan, math.nan, t
    q_lo, q_hi = sorted_quantiles(t, [0.5 * (1.0 - level), 0.5 * (1.0 + level)])
    lo = point - q_hi * se_point if math.isfinite(q_hi) else -math.inf
    hi = point - q_lo * se_point if math.isfinite(q_lo) else math.inf
    return float(lo), float(hi), t


def bca_interval(point: float, reps: np.ndarray, influence: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """BCa interval (Efron 1987) as scipy.stats.bootstrap(method="BCa") computes it:
    ``z0 = Phi^-1(share of replicates below the point, ties counted half)``, acceleration
    ``a = sum L^3 / (6 (sum L^2)^1.5)`` from the influence values ``L`` of the units (scipy
    uses jackknife values; the two agree exactly for means and to first order otherwise),
    then the adjusted percentiles of the finite replicates (linear interpolation)."""
    check_level(level)
    b = np.asarray(reps, dtype=np.float64)
    b = b[np.isfinite(b)]
    if b.size == 0 or not math.isfinite(point):
        return math.nan, math.nan
    share = (np.count_nonzero(b < point) + np.count_nonzero(b <= point)) / (2.0 * b.size)
    z0 = float(ndtri(share))
    L = np.asarray(influence, dtype=np.float64)
    s2 = float(np.sum(L * L))
    a = float(np.sum(L**3)) / (6.0 * s2**1.5) if s2 > 0 else 0.0
    alpha = 0.5 * (1.0 - level)
    out = []
    for z in (float(ndtri(alpha)), -float(ndtri(alpha))):
        num = z0 + z
        out.append(float(ndtr(z0 + num / (1.0 - a * num))))
    if not all(math.isfinite(p) for p in out):
        return math.nan, math.nan
    lo, hi = np.percentile(b, [100.0 * out[0], 100.0 * out[1]])
    return float(lo), float(hi)


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


# --------------------------------------------------------------------------- BootStat


@dataclass(frozen=True)
class InfluenceGroup:
    """The influence values of a statistic over one unit group, in factored form: at the
    point ``d = c0 @ cols`` and in replicate ``b`` ``d_b = cb[b] @ cols``, where ``cols`` are
    per-unit data columns ``(p, n)`` (e.g. nll and bytes per text) and ``c0`` ``(p,)`` and
    ``cb`` ``(B, p)`` their coefficients; ``counts`` ``(B, n)`` are the group's resample
    counts. The factored form keeps memory at O(B p + p n) however many operations follow."""

    cols: np.ndarray
    c0: np.ndarray
    cb: np.ndarray
    counts: np.ndarray

    def scaled(self, k0: float, kb: np.ndarray | float) -> "InfluenceGroup":
        """Coefficients times ``k0`` at the point and ``kb`` (a number or ``(B,)``) per replicate."""
        kb = np.asarray(kb, dtype=np.float64)
        return InfluenceGroup(self.cols, self.c0 * k0, self.cb * (kb[:, None] if kb.ndim else kb), self.counts)

    def joined(self, other: "InfluenceGroup") -> "InfluenceGroup":
        """The sum of two groups' influence values (same units, same counts)."""
        if self.cols is other.cols:
            return InfluenceGroup(self.cols, self.c0 + other.c0, self.cb + other.cb, self.counts)
        return InfluenceGroup(
            np.concatenate([self.cols, other.cols]),
            np.concatenate([self.c0, other.c0]),
            np.concatenate([self.cb, other.cb], axis=1),
            self.counts,
        )

    def at_point(self) -> np.ndarray:
        """``(n,)`` influence values at the point."""
        return self.c0 @ self.cols

    def deduplicated(self) -> "InfluenceGroup":
        """The same influence values with identical columns merged (e.g. the token counts of
        two configs), so that fewer ``(B, n)`` products are needed."""
        p = self.cols.shape[0]
        if p < 2:
            return self
        first: dict[bytes, int] = {}
        inverse = np.array([first.setdefault(row.tobytes(), len(first)) for row in self.cols])
        if len(first) == p:
            return self
        keep = np.unique(inverse, return_index=True)[1]
        onehot = np.zeros((p, len(first)))
        onehot[np.arange(p), inverse] = 1.0
        return InfluenceGroup(self.cols[keep], self.c0 @ onehot, self.cb @ onehot, self.counts)

    def variances(self) -> tuple[float, np.ndarray]:
        """Delta-method variances: ``n / (n - 1) sum_i d_i^2`` at the point (the unbiased
        small-sample form, as in Student's t) and ``sum_i w_bi d_bi^2`` (the plug-in form of
        the bootstrap world) in every replicate."""
        g = self.deduplicated()
        d0 = g.at_point()
        d = g.cb @ g.cols
        d *= d
        n = d0.size
        return float(d0 @ d0) * (n / (n - 1) if n > 1 else 1.0), np.einsum("bi,bi->b", g.counts, d)


def _joined(a: dict[str, InfluenceGroup], b: dict[str, InfluenceGroup]) -> dict[str, InfluenceGroup]:
    out = dict(a)
    for unit, g in b.items():
        out[unit] = out[unit].joined(g) if unit in out else g
    return out


class BootStat:
    """A statistic ``theta(w)`` of bootstrap weights ``w`` (resample counts per unit), with

    * ``point``: theta at w = 1 (the data), and ``reps``: theta at every resample, ``(B,)``;
    * ``groups``: ``{unit group: InfluenceGroup}``, the influence values ``d_i = d theta /
      d w_i`` (empirical influence / n) at the point and at every resample.

    A unit group is one language when languages are resampled independently, or one shared
    group for a parallel corpus (the influence values of different languages then add per
    text). The delta-method variance is the sum over groups and units of ``w_i d_i^2``, so
    :meth:`se` gives the standard error at the point and inside every replicate, which is
    what the studentized (bootstrap-t) interval needs. Arithmetic (+, -, * by a number,
    :meth:`lincomb`, :meth:`ratio`, :meth:`mapped`, :meth:`apply`, :meth:`mean`) carries the
    influence values along by the chain rule.
    """

    __slots__ = ("point", "reps", "groups")

    def __init__(self, point: float, reps: np.ndarray, groups: dict[str, InfluenceGroup]) -> None:
        self.point = float(point)
        self.reps = np.asarray(reps, dtype=np.float64)
        self.groups = groups

    @classmethod
    def ratio_of_sums(
        cls,
        y: np.ndarray,
        x: np.ndarray,
        counts: np.ndarray,
        unit: str,
        scale: float = 1.0,
        value: Callable[[Any, Any], Any] | None = None,
        sums: tuple[np.ndarray, np.ndarray] | None = None,
        totals: tuple[float, float] | None = None,
    ) -> "BootStat":
        """``scale * sum w y / sum w x`` over one unit group (influence ``scale (y_i - R x_i) /
        sum w x``); ``value(Y, X)`` (default ``scale * Y / X``) computes the point and the
        replicates from the sums, for callers with a canonical formula (e.g.
        :func:`qhelpers.stats.bits_per_byte`). ``sums``: ``(counts @ y, counts @ x)`` and
        ``totals``: ``(sum y, sum x)`` when the caller has them already (so that every module
        gets the same bits)."""
        y = np.asarray(y, dtype=np.float64)
        x = np.asarray(x, dtype=np.float64)
        fn = value if value is not None else (lambda a, b: scale * a / b)
        Y, X = (float(y.sum()), float(x.sum())) if totals is None else (float(totals[0]), float(totals[1]))
        Yb, Xb = sums if sums is not None else (counts @ y, counts @ x)
        with np.errstate(all="ignore"):
            point, reps = fn(Y, X), fn(Yb, Xb)
            r, rb = Y / X, Yb / Xb
            c0 = np.array([scale / X, -scale * r / X])
            cb = np.column_stack([scale / Xb, -scale * rb / Xb])
        return cls(point, reps, {unit: InfluenceGroup(np.vstack([y, x]), c0, cb, counts)})

    # -- arithmetic ------------------------------------------------------------------------

    def lincomb(self, other: "BootStat", a: float, b: float) -> "BootStat":
        """``a * self + b * other``."""
        return BootStat(
            a * self.point + b * other.point,
            a * self.reps + b * other.reps,
            _joined({u: g.scaled(a, a) for u, g in self.groups.items()}, {u: g.scaled(b, b) for u, g in other.groups.items()}),
        )

    def __add__(self, other: "BootStat") -> "BootStat":
        return self.lincomb(other, 1.0, 1.0)

    def __sub__(self, other: "BootStat") -> "BootStat":
        return self.lincomb(other, 1.0, -1.0)

    def __mul__(self, k: float) -> "BootStat":
        k = float(k)
        return BootStat(k * self.point, k * self.reps, {u: g.scaled(k, k) for u, g in self.groups.items()})

    __rmul__ = __mul__

    def __neg__(self) -> "BootStat":
        return self * -1.0

    def ratio(self, den: "BootStat", scale: float = 1.0) -> "BootStat":
        """``scale * self / den``: influence ``scale * (IF_num - (num/den) IF_den) / den``."""
        with np.errstate(all="ignore"):
            r = self.point / den.point
            rb = self.reps / den.reps
            num_g = {u: g.scaled(scale / den.point, scale / den.reps) for u, g in self.groups.items()}
            den_g = {u: g.scaled(-scale * r / den.point, -scale * rb / den.reps) for u, g in den.groups.items()}
        return BootStat(scale * r, scale * rb, _joined(num_g, den_g))

    def mapped(self, point: float, reps: np.ndarray, deriv_point: float, deriv_reps: np.ndarray) -> "BootStat":
        """``g(self)`` given ``g`` at the point and the replicates and ``g'`` there."""
        return BootStat(point, reps, {u: g.scaled(float(deriv_point), deriv_reps) for u, g in self.groups.items()})

    def apply(self, fn: Callable[[Any], Any], deriv: Callable[[Any], Any]) -> "BootStat":
        """``fn(self)`` with derivative ``deriv`` (numpy ufuncs, e.g. ``np.expm1, np.exp``)."""
        with np.errstate(all="ignore"):
            return self.mapped(float(fn(self.point)), fn(self.reps), float(deriv(self.point)), deriv(self.reps))

    @staticmethod
    def mean(stats: Sequence["BootStat"]) -> "BootStat":
        """The mean of ``stats`` (e.g. a metric over the languages of a group); point and
        replicates as numpy's mean over the statistics."""
        if not stats:
            raise ConfigError("BootStat.mean needs at least one statistic")
        k = 1.0 / len(stats)
        groups: dict[str, InfluenceGroup] = {}
        for s in stats:
            groups = _joined(groups, {u: g.scaled(k, k) for u, g in s.groups.items()})
        point = float(np.mean([s.point for s in stats]))
        reps = np.mean(np.vstack([s.reps for s in stats]), axis=0)
        return BootStat(point, reps, groups)

    # -- standard errors -------------------------------------------------------------------

    def se(self) -> tuple[float, np.ndarray]:
        """Delta-method standard error at the point and in every replicate, summed over the
        unit groups (:meth:`InfluenceGroup.variances`)."""
        var_p, var_b = 0.0, np.zeros(self.reps.shape[0])
        for g in self.groups.values():
            vp, vb = g.variances()
            var_p, var_b = var_p + vp, var_b + vb
        return math.sqrt(var_p), np.sqrt(var_b)

    def influence(self) -> np.ndarray:
        """Every unit's influence value at the point, all groups pooled (for BCa's acceleration)."""
        if not self.groups:
            return np.zeros(0)
        return np.concatenate([g.at_point() for g in self.groups.values()])


def _too_few(t: np.ndarray, n: int, level: float) -> str:
    share = float(np.mean(~np.isfinite(t))) if t.size else 1.0
    return (
        f"unbounded CI: the {level:.0%} studentized interval is unbounded: {share:.1%} of the resamples "
        f"repeat a single unit (n = {n}), so their standard error is 0 and t = +-inf; measure more texts "
        "(value is the point estimate only)"
    )


def stat_estimate(
    stat: BootStat, n: int, level: float = 0.95, method: str = DEFAULT_METHOD, transform: str = "identity"
) -> Estimate:
    """An :class:`Estimate` of ``stat`` with a ``method`` interval (module docstring of
    :mod:`qhelpers.stats`), reported as ``TRANSFORMS[transform][0](stat)`` (the interval is
    computed on the scale of ``stat`` and carried through the monotone transform)."""
    check_level(level)
    check_interval_method(method)
    fwd = TRANSFORMS[transform][0]
    if not math.isfinite(stat.point):
        return Estimate.undefined("non-finite: the statistic is not finite", n, level)
    with np.errstate(all="ignore"):
        value = float(fwd(stat.point))
    if not math.isfinite(value):
        return Estimate.undefined("non-finite: the statistic is not finite", n, level)
    if n < 2:
        return Estimate.undefined(
            f"too few: n = {n} text; a bootstrap interval needs at least 2 (value is the point estimate only)",
            n, level, value=value,
        )
    if method == "percentile":
        lo, hi = percentile_interval(stat.reps, level)
        dist = BootDistribution("percentile", np.sort(stat.reps[np.isfinite(stat.reps)]), transform=transform)
    elif method == "bca":
        lo, hi = bca_interval(stat.point, stat.reps, stat.influence(), level)
        dist = None
    else:
        sp, sb = stat.se()
        scale = max(1.0, abs(stat.point))
        if sp <= _DEGENERATE_RTOL * scale:
            lo = hi = stat.point
            dist = BootDistribution("studentized", np.zeros(1), stat.point, 0.0, transform)
        else:
            lo, hi, t = studentized_interval(stat.point, sp, stat.reps, sb, level)
            if t.size and (math.isinf(lo) or math.isinf(hi)):
                return Estimate.undefined(_too_few(t, n, level), n, level, value=value)
            dist = BootDistribution("studentized", t, stat.point, sp, transform)
    with np.errstate(all="ignore"):
        lo, hi = float(fwd(lo)), float(fwd(hi))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return Estimate.undefined("non-finite: no finite bootstrap replicate", n, level, value=value)
    return Estimate(value, lo, hi, n, level, distribution=dist)


def transformed(estimate: Estimate, transform: str) -> Estimate:
    """``estimate`` (on its working scale, with an identity transform) carried through the
    monotone increasing map ``TRANSFORMS[transform]``: value and interval mapped, the stored
    distribution told so that :meth:`Estimate.p_value` maps thresholds back."""
    fwd = TRANSFORMS[transform][0]
    if transform == "identity":
        return estimate
    d = estimate.distribution
    if d is not None and d.transform != "identity":
        raise ConfigError(f"the estimate is already on a transformed scale ({d.transform!r})")
    with np.errstate(all="ignore"):
        value, lo, hi = (float(fwd(v)) for v in (estimate.value, estimate.ci_low, estimate.ci_high))
    if not estimate.defined:
        return Estimate.undefined(estimate.reason or "non-finite: undefined", estimate.n, estimate.level, value=value)
    if not all(math.isfinite(v) for v in (value, lo, hi)):
        return Estimate.undefined("non-finite: the transformed interval is not finite", estimate.n, estimate.level, value=value)
    dist = None if d is None else BootDistribution(d.kind, d.values, d.theta, d.se, transform)
    return Estimate(value, lo, hi, estimate.n, estimate.level, distribution=dist)


def stat_ratio_estimate(
    num: BootStat,
    den: BootStat,
    n: int,
    level: float,
    tol: float,
    den_name: str,
    alternative: str,
    method: str = DEFAULT_METHOD,
    scale: float = 1.0,
) -> Estimate:
    """``scale * num / den`` with the undefined-ratio rules of :mod:`qhelpers.stats`
    (non-finite and collapse are checked by the caller): ``den <= tol`` -> "denominator <=
    0"; the ``method`` interval of ``den`` contains 0 -> "unbounded CI" (value kept)."""
    if not (math.isfinite(num.point) and math.isfinite(den.point)):
        return Estimate.undefined("non-finite: numerator or denominator is not finite", n, level)
    if den.point <= tol:
        return Estimate.undefined(
            f"denominator <= 0: {den_name} = {den.point:.4g} is <= {tol:g}, so the ratio has no meaning "
            f"(nothing to compare against); use {alternative}",
            n,
            level,
        )
    value = scale * num.point / den.point
    d = stat_estimate(den, n, level, method)
    if not (d.defined and d.ci_low > 0):
        ci = f"[{d.ci_low:.4g}, {d.ci_high:.4g}]" if d.defined else "(unbounded)"
        return Estimate.undefined(
            f"unbounded CI: the {level:.0%} CI of {den_name} {ci} contains 0, "
            f"so the ratio has no finite confidence interval (value is the point estimate only); "
            f"use {alternative} or measure more texts",
            n,
            level,
            value=value,
        )
    est = stat_estimate(num.ratio(den, scale), n, level, method)
    if not est.defined and math.isnan(est.value):
        return Estimate.undefined(est.reason or "non-finite: no finite bootstrap replicate", n, level, value=value)
    return est


# --------------------------------------------------------------------------- from replicates only


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
    """num/den (times ``scale``) from replicates alone, with PERCENTILE intervals and the
    undefined-ratio rules of the module docstring (non-finite and collapse are checked by the
    caller). Prefer :func:`stat_ratio_estimate` with :class:`BootStat` arguments (studentized
    intervals, which keep their coverage)."""
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
    dist = BootDistribution("percentile", np.sort(reps[np.isfinite(reps)]))
    return Estimate(value, float(lo), float(hi), n, level, distribution=dist)


def diff_estimate(p: float, b: np.ndarray, n: int, level: float) -> Estimate:
    """A statistic from its replicates alone, with a PERCENTILE interval (for statistics
    without influence values; prefer :func:`stat_estimate` with a :class:`BootStat`)."""
    if not math.isfinite(p):
        return Estimate.undefined("non-finite: the difference is not finite", n, level)
    lo, hi = percentile_interval(b, level)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return Estimate.undefined("non-finite: no finite bootstrap replicate", n, level)
    b = np.asarray(b, dtype=np.float64)
    dist = BootDistribution("percentile", np.sort(b[np.isfinite(b)]))
    return Estimate(p, float(lo), float(hi), n, level, distribution=dist)

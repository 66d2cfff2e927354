"""Verdicts computed from an estimate's interval: SUPPORTED, NOT_SUPPORTED or INCONCLUSIVE, and
the one-sided p-values that multiplicity adjustment (:mod:`qhelpers.stats.multiplicity`) works on.

Rules (in this order)
---------------------
1. An undefined estimate (``defined=False``, or a non-finite interval) is INCONCLUSIVE.
2. Too few units: an estimate whose ``n`` is below :data:`MIN_UNITS` is INCONCLUSIVE with the
   reason ``"too few texts (n = 4 < 10)"``. Percentile intervals from a handful of texts cover
   the truth far less often than their nominal level (a simulation at n = 3-6 covers 68-86 % at a
   nominal 95 %), so they cannot carry a verdict. A correlation dict without ``n`` is not checked.
3. Minimum effect of practical size: the claim "value > threshold" is judged against the
   boundary ``b = threshold + min_effect`` (``threshold - min_effect`` for ``"<"``).
   SUPPORTED iff the whole interval lies strictly beyond ``b`` in the predicted direction;
   NOT_SUPPORTED iff it lies wholly on the other side of ``b`` (or on it): the effect, if there is
   one, is smaller than the practical size the hypothesis claims; INCONCLUSIVE otherwise.
   With ``min_effect = 0`` this is the plain rule "whole CI beyond the threshold".
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from qhelpers.stats.bootstrap import Estimate, p_value_from_interval
from qhelpers.util.errors import ConfigError

__all__ = [
    "SUPPORTED",
    "NOT_SUPPORTED",
    "INCONCLUSIVE",
    "MIN_UNITS",
    "verdict",
    "verdict_with_reason",
    "boundary",
    "p_value",
    "support_p_values",
]

SUPPORTED = "SUPPORTED"


NOT_SUPPORTED = "NOT_SUPPORTED"


INCONCLUSIVE = "INCONCLUSIVE"

MIN_UNITS: int = 10
"""Fewest resampling units (texts; pairs for a correlation) an estimate needs for a decisive
verdict; below it :func:`verdict` says INCONCLUSIVE ("too few texts")."""

VERDICTS: tuple[str, ...] = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE)


def _f(v: Any) -> float:
    return math.nan if v is None else float(v)


def _parts(estimate: Estimate | Mapping[str, Any]) -> dict[str, Any]:
    """value, ci_low, ci_high, defined, n (None when unknown), level, unit word of an estimate."""
    if isinstance(estimate, Estimate):
        return {"value": estimate.value, "lo": estimate.ci_low, "hi": estimate.ci_high, "defined": estimate.defined,
                "n": estimate.n, "level": estimate.level, "unit": "texts", "reason": estimate.reason}
    if isinstance(estimate, Mapping):
        is_corr = "r" in estimate
        n = estimate.get("n")
        return {
            "value": _f(estimate.get("r") if is_corr else estimate.get("value")),
            "lo": _f(estimate.get("ci_low")),
            "hi": _f(estimate.get("ci_high")),
            "defined": bool(estimate.get("defined", True)),
            "n": None if n is None else int(n),
            "level": float(estimate.get("level", 0.95) or 0.95),
            "unit": "pairs" if is_corr else "texts",
            "reason": estimate.get("reason"),
        }
    raise ConfigError(
        f"verdict needs an Estimate or a dict with value/r, ci_low, ci_high; got {type(estimate).__name__}"
    )


def _check(threshold: float, direction: str, min_effect: float) -> tuple[float, float]:
    if direction not in (">", "<"):
        raise ConfigError(f"direction must be '>' or '<', got {direction!r}")
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ConfigError(f"threshold must be finite, got {threshold}")
    min_effect = float(min_effect)
    if not (math.isfinite(min_effect) and min_effect >= 0):
        raise ConfigError(
            f"min_effect must be a finite number >= 0 (the smallest effect of practical size, in the "
            f"estimate's units), got {min_effect}"
        )
    return threshold, min_effect


def boundary(threshold: float, direction: str = ">", min_effect: float = 0.0) -> float:
    """The value the interval must clear for SUPPORTED: ``threshold + min_effect`` for ``">"``,
    ``threshold - min_effect`` for ``"<"``."""
    threshold, min_effect = _check(threshold, direction, min_effect)
    return threshold + min_effect if direction == ">" else threshold - min_effect


def _fold(lo: float, hi: float) -> tuple[float, float]:
    """The interval of ``|value|`` from the interval of ``value``."""
    if lo >= 0:
        return lo, hi
    if hi <= 0:
        return -hi, -lo
    return 0.0, max(-lo, hi)


def verdict_with_reason(
    estimate: Estimate | Mapping[str, Any],
    threshold: float,
    direction: str = ">",
    abs_value: bool = False,
    *,
    min_effect: float = 0.0,
    min_n: int = MIN_UNITS,
) -> tuple[str, str]:
    """``(verdict, reason)``: the verdict of :func:`verdict` and, when it is INCONCLUSIVE for a
    reason other than an interval that straddles the boundary, that reason (``"too few texts
    (n = 4 < 10)"``, ``"undefined: <the estimate's reason>"``); ``""`` otherwise."""
    threshold, min_effect = _check(threshold, direction, min_effect)
    p = _parts(estimate)
    lo, hi = p["lo"], p["hi"]
    if not p["defined"] or not (math.isfinite(lo) and math.isfinite(hi)):
        why = p["reason"] or "the interval is not finite"
        return INCONCLUSIVE, f"undefined: {why}"
    if p["n"] is not None and p["n"] < int(min_n):
        return INCONCLUSIVE, f"too few {p['unit']} (n = {p['n']} < {int(min_n)})"
    if lo > hi:
        lo, hi = hi, lo
    if abs_value:
        lo, hi = _fold(lo, hi)
    b = boundary(threshold, direction, min_effect)
    if direction == ">":
        if lo > b:
            return SUPPORTED, ""
        if hi <= b:
            return NOT_SUPPORTED, ""
    else:
        if hi < b:
            return SUPPORTED, ""
        if lo >= b:
            return NOT_SUPPORTED, ""
    return INCONCLUSIVE, ""


def verdict(
    estimate: Estimate | Mapping[str, Any],
    threshold: float,
    direction: str = ">",
    abs_value: bool = False,
    *,
    min_effect: float = 0.0,
    min_n: int = MIN_UNITS,
) -> str:
    """"SUPPORTED" if the whole CI lies beyond ``threshold`` (+ ``min_effect``) in the predicted
    ``direction`` (strictly), "NOT_SUPPORTED" if the whole CI lies on the other side or on that
    boundary, "INCONCLUSIVE" if it straddles it, the estimate is undefined, or its ``n`` is below
    ``min_n`` (default :data:`MIN_UNITS`; see the module docstring).

    ``direction``: ">" (predicted above) or "<" (predicted below). ``min_effect`` (>= 0, in the
    estimate's units) is the smallest effect of practical size: the boundary is
    ``threshold + min_effect`` for ">" and ``threshold - min_effect`` for "<". ``abs_value=True``
    judges ``|value|`` (e.g. H2's |r| > 0.7): the CI [lo, hi] becomes [lo, hi] if lo >= 0,
    [-hi, -lo] if hi <= 0, else [0, max(-lo, hi)]. Accepts an :class:`Estimate` or the dict of
    :func:`correlation`.
    """
    return verdict_with_reason(estimate, threshold, direction, abs_value, min_effect=min_effect, min_n=min_n)[0]


# --------------------------------------------------------------------------- p-values


def _one_sided(p: Mapping[str, Any], estimate: Any, threshold: float, direction: str) -> float:
    if not p["defined"] or not (math.isfinite(p["lo"]) and math.isfinite(p["hi"])):
        return math.nan
    method = getattr(estimate, "p_value", None)
    if callable(method):  # Estimate.p_value: from its bootstrap distribution when it keeps one
        return float(method(threshold, direction))
    return float(p_value_from_interval(p["value"], p["lo"], p["hi"], p["level"], threshold, direction))


def p_value(
    estimate: Estimate | Mapping[str, Any],
    threshold: float,
    direction: str = ">",
    abs_value: bool = False,
) -> float:
    """One-sided p-value of H0 "the true value is NOT beyond ``threshold`` in ``direction``"
    (small when the interval lies beyond it). Uses :meth:`Estimate.p_value` for an Estimate (from
    its bootstrap distribution when it keeps one), and for a dict (a correlation) the normal
    approximation from its interval, :func:`qhelpers.stats.bootstrap.p_value_from_interval`.
    Either way ``p < (1 - level) / 2`` iff the interval lies beyond the threshold. NaN for an
    undefined estimate.

    ``abs_value=True`` tests ``|value|``: for ``">"`` the smaller of the p-values of
    ``value > threshold`` and ``value < -threshold`` (the folded interval clears ``threshold`` iff
    one side does), for ``"<"`` the larger of those of ``value < threshold`` and
    ``value > -threshold`` (both must hold).
    """
    threshold, _ = _check(threshold, direction, 0.0)
    p = _parts(estimate)
    if not abs_value:
        return _one_sided(p, estimate, threshold, direction)
    flip = "<" if direction == ">" else ">"
    a = _one_sided(p, estimate, threshold, direction)
    b = _one_sided(p, estimate, -threshold, flip)
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return min(a, b) if direction == ">" else max(a, b)


def support_p_values(
    estimate: Estimate | Mapping[str, Any],
    threshold: float,
    direction: str = ">",
    abs_value: bool = False,
    *,
    min_effect: float = 0.0,
) -> tuple[float, float]:
    """``(p_support, p_contra)``: the two one-sided tests behind a three-way verdict at the
    boundary ``b`` (:func:`boundary`). ``p_support`` tests "the value is beyond ``b`` in the
    predicted direction" (SUPPORTED at level L iff ``p_support < (1 - L) / 2``); ``p_contra``
    tests "it is on the other side of ``b``" (NOT_SUPPORTED iff ``p_contra < (1 - L) / 2``).
    :func:`qhelpers.stats.multiplicity.adjust_verdicts` adjusts each within a family."""
    b = boundary(threshold, direction, min_effect)
    flip = "<" if direction == ">" else ">"
    if abs_value and b < 0:  # |value| is never below 0: the other side is then the whole line
        return p_value(estimate, b, direction, abs_value=True), math.nan
    return p_value(estimate, b, direction, abs_value=abs_value), p_value(estimate, b, flip, abs_value=abs_value)

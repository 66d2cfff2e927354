"""Verdicts computed from an estimate's interval: SUPPORTED, NOT_SUPPORTED or INCONCLUSIVE."""
from __future__ import annotations

import math
from typing import Any, Mapping

from qhelpers.util.errors import ConfigError
from qhelpers.stats.bootstrap import Estimate

SUPPORTED = "SUPPORTED"


NOT_SUPPORTED = "NOT_SUPPORTED"


INCONCLUSIVE = "INCONCLUSIVE"


def _ci_of(estimate: Estimate | Mapping[str, Any]) -> tuple[float, float, float, bool]:
    if isinstance(estimate, Estimate):
        return estimate.value, estimate.ci_low, estimate.ci_high, estimate.defined
    if isinstance(estimate, Mapping):
        value = estimate.get("value", estimate.get("r", math.nan))
        lo, hi = estimate.get("ci_low", math.nan), estimate.get("ci_high", math.nan)
        defined = bool(estimate.get("defined", True))
        f = lambda v: math.nan if v is None else float(v)  # noqa: E731
        return f(value), f(lo), f(hi), defined
    raise ConfigError(
        f"verdict needs an Estimate or a dict with value/r, ci_low, ci_high; got {type(estimate).__name__}"
    )


def verdict(
    estimate: Estimate | Mapping[str, Any],
    threshold: float,
    direction: str = ">",
    abs_value: bool = False,
) -> str:
    """"SUPPORTED" if the whole CI lies beyond ``threshold`` in the predicted ``direction``
    (strictly), "NOT_SUPPORTED" if the whole CI lies on the other side or on the threshold,
    "INCONCLUSIVE" if it straddles the threshold or the estimate is undefined.

    ``direction``: ">" (predicted above) or "<" (predicted below). ``abs_value=True`` judges
    ``|value|`` (e.g. H2's |r| > 0.7): the CI [lo, hi] becomes [lo, hi] if lo >= 0,
    [-hi, -lo] if hi <= 0, else [0, max(-lo, hi)]. Accepts an :class:`Estimate` or the dict
    of :func:`correlation`.
    """
    if direction not in (">", "<"):
        raise ConfigError(f"direction must be '>' or '<', got {direction!r}")
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ConfigError(f"threshold must be finite, got {threshold}")
    _, lo, hi, defined = _ci_of(estimate)
    if not defined or not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE
    if lo > hi:
        lo, hi = hi, lo
    if abs_value:
        if lo >= 0:
            pass
        elif hi <= 0:
            lo, hi = -hi, -lo
        else:
            lo, hi = 0.0, max(-lo, hi)
    if direction == ">":
        if lo > threshold:
            return SUPPORTED
        if hi <= threshold:
            return NOT_SUPPORTED
    else:
        if hi < threshold:
            return SUPPORTED
        if lo >= threshold:
            return NOT_SUPPORTED
    return INCONCLUSIVE

"""Multiplicity: Holm's step-down adjustment within a family of hypotheses, and the three-way
verdicts it implies.

Method
------
Holm (1979), "A simple sequentially rejective multiple test procedure", Scand. J. Statist. 6:65-70:
with the family's m p-values sorted, ``p_(1) <= ... <= p_(m)``, the adjusted p-value of the k-th is
``max_{j <= k} min(1, (m - j + 1) p_(j))``. It controls the family-wise error rate (the chance of
any false claim in the family) at the nominal level under any dependence between the tests, which
matters here: the hypotheses of a notebook share texts and models. Benjamini-Hochberg is not
used, since it controls the false discovery rate only. The step-down is computed here with numpy
and equals ``statsmodels.stats.multitest.multipletests(p, method="holm")[1]`` (Seabold & Perktold
2010, statsmodels; tests/test_multiplicity.py checks it): multipletests runs ``gc.collect()`` on
every call (0.2 s each on a loaded machine, more in a kernel holding a model), too slow to call
per family in every notebook and simulation.

Three-way verdicts under adjustment
-----------------------------------
A verdict (:mod:`qhelpers.stats.verdicts`) is two one-sided tests at the boundary
``b = threshold +- min_effect``: ``p_support`` for "beyond b in the predicted direction" and
``p_contra`` for "on the other side of b". Each is Holm-adjusted within the family (separately:
a family's support claims are one set of tests, its contra claims another). With
``alpha = (1 - level) / 2`` (0.025 for 95 % intervals) the adjusted verdict is

* SUPPORTED     iff the raw verdict is SUPPORTED and ``holm(p_support) < alpha``;
* NOT_SUPPORTED iff the raw verdict is NOT_SUPPORTED and ``holm(p_contra) < alpha``;
* INCONCLUSIVE  otherwise.

So an adjusted verdict is never more decisive than the raw one (which already carries the
too-few-texts and premise rules), and a family of one keeps its raw verdict unchanged.
Undefined p-values (NaN) count in the family size (conservative) and are adjusted to NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from qhelpers.stats.verdicts import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, VERDICTS
from qhelpers.util.errors import ConfigError

__all__ = ["METHODS", "FamilyAdjustment", "adjust_p_values", "holm", "adjust_verdicts"]

METHODS: tuple[str, ...] = ("holm",)
"""Adjustment methods offered (family-wise error control)."""


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ConfigError(f"method must be one of {list(METHODS)} (Holm's step-down), got {method!r}")
    return method


def adjust_p_values(p_values: Sequence[float], method: str = "holm") -> np.ndarray:
    """Adjusted p-values of one family (same order). NaN entries count in the family size as
    p = 1 (conservative) and come back as NaN. An empty family gives an empty array."""
    _check_method(method)
    p = np.asarray(list(p_values), dtype=np.float64)
    if p.ndim != 1:
        raise ConfigError(f"p_values must be a flat sequence, got shape {p.shape}")
    if p.size == 0:
        return p.copy()
    finite = np.isfinite(p)
    if np.any(finite & ((p < 0) | (p > 1))):
        raise ConfigError(f"p-values must lie in [0, 1], got {p[finite & ((p < 0) | (p > 1))].tolist()}")
    filled = np.where(finite, p, 1.0)
    m = filled.size
    order = np.argsort(filled, kind="mergesort")  # ties keep their order, as in statsmodels
    stepped = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * filled[order]))
    adjusted = np.empty(m)
    adjusted[order] = stepped
    return np.where(finite, adjusted, np.nan)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values (see the module docstring): ``adjust_p_values(p_values, "holm")``."""
    return adjust_p_values(p_values, "holm")


@dataclass(frozen=True)
class FamilyAdjustment:
    """The adjusted result of one hypothesis in its family."""

    method: str
    family_size: int
    p_raw: float
    p_adjusted: float
    p_contra_raw: float
    p_contra_adjusted: float
    verdict: str

    def to_dict(self) -> dict:
        """The ``adjusted`` entry of a results.json hypothesis (NaN kept; to_jsonable maps it to null)."""
        return {
            "method": self.method,
            "family_size": self.family_size,
            "p_raw": self.p_raw,
            "p_adjusted": self.p_adjusted,
            "p_contra_raw": self.p_contra_raw,
            "p_contra_adjusted": self.p_contra_adjusted,
            "verdict": self.verdict,
        }


def adjust_verdicts(
    raw_verdicts: Sequence[str],
    p_support: Sequence[float],
    p_contra: Sequence[float],
    level: float = 0.95,
    method: str = "holm",
) -> list[FamilyAdjustment]:
    """Adjust the three-way verdicts of ONE family (rule in the module docstring).

    ``raw_verdicts``, ``p_support`` and ``p_contra`` are parallel sequences (one entry per
    hypothesis of the family); ``level`` is the intervals' confidence level."""
    _check_method(method)
    if not (0.0 < float(level) < 1.0):
        raise ConfigError(f"level must be in (0, 1), e.g. 0.95; got {level}")
    m = len(raw_verdicts)
    if not (len(p_support) == len(p_contra) == m):
        raise ConfigError(
            f"raw_verdicts, p_support and p_contra need one entry per hypothesis; got {m}, "
            f"{len(p_support)}, {len(p_contra)}"
        )
    bad = [v for v in raw_verdicts if v not in VERDICTS]
    if bad:
        raise ConfigError(f"raw verdicts must be among {list(VERDICTS)}, got {bad}")
    alpha = 0.5 * (1.0 - float(level))
    adj_s = adjust_p_values(p_support, method)
    adj_c = adjust_p_values(p_contra, method)
    out = []
    for i, raw in enumerate(raw_verdicts):
        if m == 1:
            final = raw  # a family of one is not adjusted
        elif raw == SUPPORTED and math.isfinite(adj_s[i]) and adj_s[i] < alpha:
            final = SUPPORTED
        elif raw == NOT_SUPPORTED and math.isfinite(adj_c[i]) and adj_c[i] < alpha:
            final = NOT_SUPPORTED
        else:
            final = INCONCLUSIVE
        out.append(FamilyAdjustment(method, m, float(p_support[i]), float(adj_s[i]), float(p_contra[i]),
                                    float(adj_c[i]), final))
    return out

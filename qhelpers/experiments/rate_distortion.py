"""Rate-distortion grid of seed 004's T-010 (hypothesis H4.1).

Seed 004 asks whether the low-resource disparity follows a law of bit width and protection,
``disparity = a * 2^(-b * bits) * (1 - c * p)``. This module runs the grid and fits it.

Grid
----
Bit widths (the seed's ``[2, 3, 4, 6, 8]``) times protection percentages (``[0, 10, 20, 30,
50]``). What "protecting p %" means is data, a :class:`ProtectionPolicy` that turns a
percentage into a :class:`~qhelpers.quant.protection.ProtectionSpec`:

``layers``
    whole decoder layers, added in a stated order (:func:`layer_order`: e.g. the index's L0,
    L_last, then by weight variance or criticality) until their share of the quantizable
    weights reaches the percentage (``rule="reach"``, the fewest layers with share >= p) or
    comes nearest to it (``rule="nearest"``);
``magnitude``
    the largest-|w| ``p`` of the elements of every quantized tensor
    (``ProtectionSpec.magnitude_fraction``).

``p`` used everywhere below is the ACTUAL protected share of the quantizable weights
(``QuantPlan.scope_kept_fraction`` from the sweep's ``QuantEngine.overhead``), not the nominal
percentage: whole layers rarely hit a percentage exactly.

Per cell (:func:`grid_measures`): ``disparity`` = mean LR minus mean HR change in bits per
byte with a paired bootstrap CI over texts (as :func:`qhelpers.stats.disparity_difference`),
the seeds' ``ratio`` of mean degradations when defined (:func:`qhelpers.stats.disparity`),
``distortion`` = the mean change in bits per byte over all languages, and
``effective_bits = (1 - p) * bits + p * 16`` (protected weights counted at 16 bits; the
quantizer's scales and a sparse format's indices are not counted). Cells whose disparity is
undefined (collapsed model, non-finite scores: the tags of :mod:`qhelpers.stats.scores`) are kept in
the table with their reason and excluded from the fit.

Fit
---
:func:`fit_grid` fits, by bounded least squares (``scipy.optimize.curve_fit``, initialised
from a profile grid search), the models of :data:`MODELS` to one policy's defined cells:

``seed``   ``a * 2^(-b*bits) * (1 - c*p)`` (seed 004; ``p`` a fraction, so ``c`` per
           percentage point is ``c / 100``);
``exp``    ``a * 2^(-b*bits) * exp(-c*p)`` (multiplicative protection effect);
``free``   ``a_bits * (1 - c*p)``: one free intercept per bit width (no law in bits).

Every model is compared by R^2, AIC, AICc and BIC (Gaussian likelihood with the error
variance as one more parameter) and by leave-one-out (LOO) prediction error over cells.
Parameter CIs and the CI of the LOO difference come from refitting every model on paired
bootstrap replicates of the grid (one resample of texts for all cells, so the replicate grid
keeps the cells' correlation). A fit that stops at a parameter bound (``b`` in [-4, 8], ``c``
in [-10, 10], ``|a|`` <= 100 x max |disparity|) is a FAILED fit, not a censored estimate: the
point fit at a bound makes every estimate of that law undefined (reason ``"fit at bound:
..."``, so the verdict is INCONCLUSIVE), and bootstrap refits at a bound count as failed
refits, left out and reported as a fraction (more than (1 - level) / 2 failed: the interval is
undefined too). A fitted law describes the measured grid of one model, corpus and quantizer;
it is not a lower bound (see :meth:`RDFit.describe`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.optimize import OptimizeWarning, curve_fit

from qhelpers import stats as _stats
from qhelpers.measure.weight_stats import layer_table
from qhelpers.models.archs import decoder_layers, get_arch
from qhelpers.models.loaded import as_module
from qhelpers.quant.engine import Variant
from qhelpers.quant.protection import ProtectionSpec, resolve_plan
from qhelpers.quant.strategies import protocol_settings
from qhelpers.util.errors import ConfigError

__all__ = [
    "SEED_BITS",
    "SEED_PCTS",
    "POLICIES",
    "LAYER_ORDERS",
    "MODELS",
    "PROTECTED_BITS",
    "ProtectionPolicy",
    "RDGrid",
    "GridMeasures",
    "FitResult",
    "RDFit",
    "layer_order",
    "layer_shares",
    "rd_grid",
    "grid_measures",
    "effective_bits",
    "lower_convex_hull",
    "information_criteria",
    "fit_model",
    "fit_grid",
    "plot_fits",
    "plot_distortion_rate",
]

#: The seed's grid (seed 004, T-010).
SEED_BITS: tuple[int, ...] = (2, 3, 4, 6, 8)
SEED_PCTS: tuple[float, ...] = (0, 10, 20, 30, 50)
POLICIES: tuple[str, ...] = ("layers", "magnitude")
LAYER_ORDERS: tuple[str, ...] = (
    "gateway-variance", "gateway-criticality", "gateway-index", "variance", "criticality", "index",
)
RULES: tuple[str, ...] = ("reach", "nearest")
#: Bits a protected (full-precision) weight is counted at in ``effective_bits``.
PROTECTED_BITS = 16.0

# Parameter bounds of the fits (p is a fraction in [0, 1)).
B_BOUNDS = (-4.0, 8.0)
C_BOUNDS = (-10.0, 10.0)
_A_SCALE = 100.0  # |a at the reference bit width| <= 100 * max |disparity|


# ============================================================================ policies


def layer_shares(model: Any, scope: str = "linear") -> dict[int, float]:
    """Per decoder layer, its share of the parameters ``scope`` quantizes (sums to 1 when the
    scope lies inside the decoder layers, as ``"linear"`` does)."""
    module = as_module(model)
    arch = get_arch(module)
    n_layers = len(decoder_layers(module, arch))
    return {i: float(resolve_plan(module, ProtectionSpec(layers=(i,)), scope, arch).scope_kept_fraction)
            for i in range(n_layers)}


def _by_value(values: Mapping[int, float], layers: Iterable[int], what: str) -> list[int]:
    """``layers`` sorted by decreasing value (NaN last, ties: lower index first)."""
    out = list(layers)
    missing = [i for i in out if i not in values]
    if missing:
        raise ConfigError(f"{what} has no value for layers {missing[:5]}; pass one value per decoder layer")

    def key(i: int) -> tuple[int, float, int]:
        v = float(values[i])
        return (1, 0.0, i) if not math.isfinite(v) else (0, -v, i)

    return sorted(out, key=key)


def layer_order(
    loaded: Any,
    order: str | Sequence[int] = "gateway-variance",
    criticality: Mapping[int, float] | pd.Series | None = None,
) -> tuple[int, ...]:
    """The order in which the ``layers`` policy adds whole decoder layers.

    ``order``: ``"gateway-variance"`` (L0, L_last, then the rest by decreasing pooled weight
    variance, seed 002's "variance predicts criticality"), ``"gateway-criticality"`` (L0,
    L_last, then by decreasing ``criticality``, e.g. ``layer_criticality(...).values()``),
    ``"gateway-index"`` (L0, L_last, L1, L2, ...), ``"variance"``, ``"criticality"``,
    ``"index"`` (0, 1, 2, ...), or an explicit sequence of layer indices (negative ones count
    from the end).
    """
    module = as_module(loaded)
    n_layers = len(decoder_layers(module, get_arch(module)))
    if not isinstance(order, str):
        chosen = [int(i) for i in order]
        if not chosen:
            raise ConfigError("an explicit layer order is empty; list the layers to protect first, e.g. [0, -1, 5]")
        out = []
        for i in chosen:
            if not -n_layers <= i < n_layers:
                raise ConfigError(f"layer {i} in the order is out of range for a model with {n_layers} layers "
                                  f"(valid 0..{n_layers - 1} or negative from the end)")
            out.append(i % n_layers)
        if len(set(out)) != len(out):
            raise ConfigError(f"the layer order {chosen} repeats a layer; list each layer once")
        return tuple(out)
    if order not in LAYER_ORDERS:
        raise ConfigError(f"unknown layer order {order!r}; valid: {', '.join(LAYER_ORDERS)} or a list of layer indices")
    last = n_layers - 1
    gateway = [0] if n_layers == 1 else [0, last]
    head = gateway if order.startswith("gateway-") else []
    rest = [i for i in range(n_layers) if i not in head]
    rule = order.split("-")[-1]
    if rule == "index":
        return tuple(head + rest)
    if rule == "variance":
        return tuple(head + _by_value(layer_table(module).set_index("layer")["variance_pooled"].to_dict(), rest, "the weight variance"))
    if criticality is None:
        raise ConfigError(f"layer order {order!r} needs criticality=: pass layer_criticality(...).values() "
                          "(a Series or dict layer -> criticality), or choose 'gateway-variance'")
    values = {int(k): float(v) for k, v in dict(criticality).items()}
    return tuple(head + _by_value(values, rest, "criticality"))


@dataclass(frozen=True)
class ProtectionPolicy:
    """How a protection percentage becomes a :class:`ProtectionSpec`.

    Args:
        kind: ``"layers"`` (whole decoder layers in ``layer_order``) or ``"magnitude"``
            (the largest-|w| elements of every quantized tensor).
        layer_order: layers in the order they are added (``kind="layers"``); see
            :func:`layer_order`.
        rule: ``"reach"``: the fewest leading layers of the order whose share of the
            quantizable weights is >= the percentage; ``"nearest"``: the number of leading
            layers whose share is closest to it (ties: fewer layers).
        order_name: how the order was chosen (for the record).
    """

    kind: str = "layers"
    layer_order: tuple[int, ...] = ()
    rule: str = "reach"
    order_name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise ConfigError(f"unknown protection policy {self.kind!r}; valid: {', '.join(POLICIES)}")
        if self.rule not in RULES:
            raise ConfigError(f"unknown rule {self.rule!r}; valid: {', '.join(RULES)}")
        object.__setattr__(self, "layer_order", tuple(int(i) for i in self.layer_order))
        if self.kind == "layers" and not self.layer_order:
            raise ConfigError("the 'layers' policy needs a layer_order; build one with layer_order(loaded, 'gateway-variance')")

    @property
    def name(self) -> str:
        return self.kind

    def n_layers_for(self, pct: float, shares: Mapping[int, float]) -> int:
        """How many leading layers of the order protect ``pct`` % (``kind="layers"``)."""
        target = _check_pct(pct) / 100.0
        missing = [i for i in self.layer_order if i not in shares]
        if missing:
            raise ConfigError(f"layer_order names layers {missing[:5]} that the model does not have")
        cum = np.concatenate([[0.0], np.cumsum([float(shares[i]) for i in self.layer_order])])
        if self.rule == "reach":
            ok = np.flatnonzero(cum >= target - 1e-12)
            if ok.size == 0:
                raise ConfigError(
                    f"protecting {pct:g} % with whole layers needs more layers than the order lists "
                    f"({len(self.layer_order)} layers reach {cum[-1]:.1%}); give a longer layer_order or a smaller percentage"
                )
            return int(ok[0])
        return int(np.argmin(np.abs(cum - target)))

    def spec(self, pct: float, shares: Mapping[int, float] | None = None) -> ProtectionSpec:
        """The protection of ``pct`` % (``shares``: :func:`layer_shares`, needed by ``layers``)."""
        pct = _check_pct(pct)
        if pct == 0:
            return ProtectionSpec()
        if self.kind == "magnitude":
            return ProtectionSpec(magnitude_fraction=pct / 100.0)
        if shares is None:
            raise ConfigError("the 'layers' policy needs shares=layer_shares(model, scope) to turn a percentage into layers")
        k = self.n_layers_for(pct, shares)
        return ProtectionSpec(layers=tuple(sorted(self.layer_order[:k])))

    def describe(self) -> str:
        if self.kind == "magnitude":
            return "magnitude: the largest-|w| p of the elements of every quantized tensor kept in full precision"
        head = ", ".join(f"L{i}" for i in self.layer_order[:6]) + (", ..." if len(self.layer_order) > 6 else "")
        how = "fewest layers reaching p" if self.rule == "reach" else "layer count nearest to p"
        return f"layers ({self.order_name or 'explicit order'}: {head}; {how})"


def _check_pct(pct: Any) -> float:
    try:
        value = float(pct)
    except (TypeError, ValueError):
        raise ConfigError(f"a protection percentage must be a number in [0, 100), got {pct!r}") from None
    if not 0.0 <= value < 100.0:
        raise ConfigError(f"a protection percentage must be in [0, 100) (e.g. 10 for 10 %), got {pct!r}")
    return value


def _check_bits(bits_list: Sequence[Any]) -> list[int]:
    if isinstance(bits_list, (str, bytes)) or not isinstance(bits_list, Iterable):
        raise ConfigError(f"BITS_LIST must be a list of bit widths, e.g. [2, 3, 4, 6, 8]; got {bits_list!r}")
    out = []
    for b in bits_list:
        if isinstance(b, bool) or not float(b).is_integer() or not 2 <= int(b) <= 8:
            raise ConfigError(f"bit widths must be integers in 2..8 (the INT-b quantizer), got {b!r}")
        out.append(int(b))
    if not out or len(set(out)) != len(out):
        raise ConfigError(f"BITS_LIST must be non-empty without repeats, got {list(bits_list)}")
    return out


# ============================================================================ grid


@dataclass
class RDGrid:
    """The variants of a rate-distortion grid and the cell each (bits, policy, pct) maps to.

    ``cells``: one row per (policy, bits, pct) with ``config`` (the variant run for it; cells
    resolving to the same protection share one variant), ``spec`` (a description) and
    ``protected_layers``. ``p0`` of a cell is pct 0 (nothing protected), shared by policies.
    """

    variants: dict[str, Variant]
    cells: pd.DataFrame
    policies: dict[str, ProtectionPolicy]
    protocol: str


def _cell_name(bits: int, kind: str, pct: float) -> str:
    return f"int{bits}:none" if pct == 0 else f"int{bits}:{kind}{pct:g}"


def rd_grid(
    loaded: Any,
    bits_list: Sequence[int] = SEED_BITS,
    pcts: Sequence[float] = SEED_PCTS,
    policies: ProtectionPolicy | Sequence[ProtectionPolicy] | str | Sequence[str] = "layers",
    *,
    protocol: str = "sound",
    order: str | Sequence[int] = "gateway-variance",
    rule: str = "reach",
    criticality: Mapping[int, float] | None = None,
) -> RDGrid:
    """The variants of the bits x protection grid.

    ``policies``: :class:`ProtectionPolicy` objects or kinds (``"layers"``, ``"magnitude"``);
    a ``"layers"`` kind is built with :func:`layer_order` (``order``, ``criticality``) and
    ``rule``. Quantizer and scope follow ``protocol`` (:func:`qhelpers.quant.strategies.protocol_settings`).
    """
    bits_list = _check_bits(bits_list)
    if isinstance(pcts, (str, bytes)) or not isinstance(pcts, Iterable):
        raise ConfigError(f"PROTECT_PCTS must be a list of percentages, e.g. [0, 10, 20, 30, 50]; got {pcts!r}")
    pct_list = [_check_pct(p) for p in pcts]
    if not pct_list or len(set(pct_list)) != len(pct_list):
        raise ConfigError(f"PROTECT_PCTS must be non-empty without repeats, got {list(pcts)}")
    if isinstance(policies, (str, ProtectionPolicy)):
        policies = [policies]
    built: dict[str, ProtectionPolicy] = {}
    for pol in policies:
        if isinstance(pol, str):
            if pol not in POLICIES:
                raise ConfigError(f"unknown protection policy {pol!r}; valid: {', '.join(POLICIES)}")
            if pol == "layers":
                pol = ProtectionPolicy("layers", layer_order(loaded, order, criticality), rule,
                                       order if isinstance(order, str) else "explicit order")
            else:
                pol = ProtectionPolicy("magnitude")
        if not isinstance(pol, ProtectionPolicy):
            raise ConfigError(f"a policy must be 'layers', 'magnitude' or a ProtectionPolicy, got {pol!r}")
        if pol.kind in built:
            raise ConfigError(f"policy {pol.kind!r} is given twice; run one grid per layer order")
        built[pol.kind] = pol
    if not built:
        raise ConfigError("rd_grid needs at least one policy: 'layers' or 'magnitude'")

    module = as_module(loaded)
    quant0, scope = protocol_settings(protocol, bits_list[0])
    shares = layer_shares(module, scope) if "layers" in built else None
    variants: dict[str, Variant] = {}
    by_key: dict[tuple[int, ProtectionSpec], str] = {}
    rows = []
    for kind, pol in built.items():
        for bits in bits_list:
            quant, _ = protocol_settings(protocol, bits)
            for pct in pct_list:
                spec = pol.spec(pct, shares)
                key = (bits, spec)
                if key not in by_key:
                    name = _cell_name(bits, kind, pct)
                    by_key[key] = name
                    variants[name] = Variant(name, quant, spec, scope)
                rows.append({
                    "policy": kind, "bits": bits, "pct": pct, "config": by_key[key],
                    "protected_layers": list(spec.layers), "spec": spec.describe(),
                })
    cells = pd.DataFrame(rows, columns=["policy", "bits", "pct", "config", "protected_layers", "spec"])
    return RDGrid(variants=variants, cells=cells, policies=built, protocol=protocol)


# ============================================================================ measures


def effective_bits(bits: Any, p: Any, protected_bits: float = PROTECTED_BITS) -> np.ndarray | float:
    """Bits per quantizable weight when a fraction ``p`` stays at ``protected_bits`` (16) and the
    rest is stored in ``bits``: ``(1 - p) * bits + p * protected_bits``. Scales and sparse
    indices are not counted."""
    b = np.asarray(bits, dtype=np.float64)
    q = np.asarray(p, dtype=np.float64)
    if np.any(~np.isfinite(q)) or np.any((q < 0) | (q > 1)):
        raise ConfigError(f"p is a fraction of weights in [0, 1], got {p!r}")
    if np.any(~np.isfinite(b)) or np.any(b <= 0):
        raise ConfigError(f"bits must be positive, got {bits!r}")
    out = (1.0 - q) * b + q * float(protected_bits)
    return float(out) if out.ndim == 0 else out


@dataclass
class GridMeasures:
    """Per-cell measures of a grid sweep and their paired bootstrap replicates.

    ``table``: one row per cell of :attr:`RDGrid.cells` with p (actual protected share of the
    quantizable weights), protected_fraction (of all parameters, the seeds' overhead),
    effective_bits, n, disparity (LR - HR change in bits per byte) with CI, defined, reason,
    lr_change, hr_change, distortion (mean change over ``langs``) with CI, collapsed, ratio
    (the seeds' mean LR / mean HR degradation) with CI and ratio_reason.
    ``disparity_reps`` / ``distortion_reps``: (n_boot x configs) replicate values, one text
    resample per row shared by every config.
    """

    table: pd.DataFrame
    disparity_reps: pd.DataFrame
    distortion_reps: pd.DataFrame
    lr_langs: list[str]
    hr_langs: list[str]
    langs: list[str]
    n_boot: int
    seed: int
    level: float

    def pivot(self, value: str = "disparity", policy: str | None = None) -> pd.DataFrame:
        """``value`` as a (bits x protect %) matrix for one policy (the first by default)."""
        t = _policy_rows(self.table, policy)
        out = t.pivot_table(index="bits", columns="pct", values=value, aggfunc="first", dropna=False)
        out.index.name = "bits"
        out.columns = [f"{c:g}" for c in out.columns]
        out.columns.name = "protect %"
        return out

    def gap(self, policy: str | None = None) -> _stats.Estimate:
        """The disparity of the unprotected cell (smallest ``p``) at the smallest bit width whose
        disparity is defined: the gap a law in bits and protection would shrink, with its CI.
        Undefined (reason) when no such cell is defined."""
        t = _policy_rows(self.table, policy)
        ok = t[t["defined"]]
        if ok.empty:
            n = int(t["n"].min()) if len(t) else 0
            return _stats.Estimate.undefined("too few: no grid cell has a defined disparity", n, self.level)
        row = ok.sort_values(["bits", "p"]).iloc[0]
        return _stats.Estimate(float(row["disparity"]), float(row["disparity_ci_low"]), float(row["disparity_ci_high"]),
                               int(row["n"]), self.level)

    def gap_cell(self, policy: str | None = None) -> tuple[int, float] | None:
        """``(bits, pct)`` of the cell :meth:`gap` reads (None when none is defined)."""
        t = _policy_rows(self.table, policy)
        ok = t[t["defined"]]
        if ok.empty:
            return None
        row = ok.sort_values(["bits", "p"]).iloc[0]
        return int(row["bits"]), float(row["pct"])

    def excluded(self, policy: str | None = None) -> pd.DataFrame:
        """Cells left out of the fit and why."""
        t = _policy_rows(self.table, policy)
        return t.loc[~t["defined"], ["policy", "bits", "pct", "config", "reason"]].reset_index(drop=True)

    def frontier(self, decreasing: bool = True) -> pd.DataFrame:
        """The cells (every policy) on the lower convex hull of distortion against effective
        bits (``decreasing=True``: its non-increasing part, the distortion-rate frontier)."""
        rows = self.table.drop_duplicates("config").reset_index(drop=True)
        hull = lower_convex_hull(rows["effective_bits"], rows["distortion"], decreasing=decreasing)
        cols = ["policy", "bits", "pct", "config", "p", "effective_bits", "distortion", "distortion_ci_low",
                "distortion_ci_high", "disparity", "collapsed"]
        return rows.loc[hull, cols].reset_index(drop=True)


def _policy_rows(table: pd.DataFrame, policy: str | None) -> pd.DataFrame:
    policies = list(dict.fromkeys(table["policy"]))
    if policy is None:
        policy = policies[0]
    if policy not in policies:
        raise ConfigError(f"policy {policy!r} is not in the grid (policies: {policies})")
    return table[table["policy"] == policy]


def grid_measures(
    sweep: Any,
    grid: RDGrid,
    lr_langs: Sequence[str] | None = None,
    hr_langs: Sequence[str] | None = None,
    langs: Sequence[str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    collapse_bpb: float = 8.0,
    vocab_size: int | None = None,
) -> GridMeasures:
    """Disparity, distortion and protection accounting of every cell of ``grid`` from a
    :class:`~qhelpers.measure.sweep.SweepResult` of ``grid.variants`` (see :class:`GridMeasures`).

    ``langs`` (for distortion) defaults to ``lr_langs + hr_langs``. The bootstrap resamples
    texts once for every config (and, on a parallel corpus, every language), so the replicate
    grids keep the cells' correlation; the disparity CI equals
    :func:`qhelpers.stats.disparity_difference`'s with the same ``seed``.
    """
    configs = list(dict.fromkeys(grid.cells["config"]))
    missing = [c for c in configs if c not in set(sweep.scores["config"])]
    if missing:
        raise ConfigError(f"the sweep lacks grid configs {missing[:3]}; run run_sweep(loaded, corpus, grid.variants)")
    scores = sweep.scores
    present = list(dict.fromkeys(scores.loc[scores["config"] == sweep.baseline, "lang"]))
    lr, hr = _stats.resolve_groups(present, lr_langs, hr_langs)
    langs = list(dict.fromkeys(lr + hr if langs is None else [str(x) for x in langs]))
    eng = _stats.PairedScores(scores, sweep.baseline, configs, list(dict.fromkeys(lr + hr + langs)), n_boot, seed, level)
    overhead = sweep.overhead.set_index("config")
    per_config: dict[str, dict[str, Any]] = {}
    disp_reps: dict[str, np.ndarray] = {}
    dist_reps: dict[str, np.ndarray] = {}
    for c in configs:
        n = eng.n_min(lr + hr)
        why = eng.nonfinite_reason([c], lr + hr) or eng.collapse_reason([c], lr + hr, collapse_bpb, vocab_size, None)
        # the disparity and the seeds' ratio exactly as stats.disparity_difference / stats.disparity
        # compute them (same resample, same interval method)
        d_est, d_stat = eng.disparity(c, lr, hr, "delta_bpb", "difference")
        est = _stats.Estimate.undefined(why, n, level) if why else d_est
        lp, hp = eng.group_stat(c, lr, "delta_bpb").point, eng.group_stat(c, hr, "delta_bpb").point
        dist_stat = eng.group_stat(c, langs, "delta_bpb")
        dist = eng.estimate(dist_stat, eng.n_min(langs))
        disp_reps[c] = d_stat.reps if est.defined else np.full(eng.n_boot, np.nan)
        dist_reps[c] = dist_stat.reps if dist.defined else np.full(eng.n_boot, np.nan)
        ratio = _stats.Estimate.undefined(why, n, level) if why else eng.disparity(c, lr, hr, "degradation", "ratio")[0]
        p = float(overhead.loc[c, "scope_kept_fraction"])
        per_config[c] = {
            "p": p,
            "protected_fraction": float(overhead.loc[c, "protected_fraction"]),
            "n": est.n,
            "disparity": est.value, "disparity_ci_low": est.ci_low, "disparity_ci_high": est.ci_high,
            "defined": est.defined, "reason": est.reason or "",
            "lr_change": lp, "hr_change": hp,
            "distortion": dist.value, "distortion_ci_low": dist.ci_low, "distortion_ci_high": dist.ci_high,
            "collapsed": eng.collapse_reason([c], langs, collapse_bpb, vocab_size, None) is not None,
            "ratio": ratio.value, "ratio_ci_low": ratio.ci_low, "ratio_ci_high": ratio.ci_high,
            "ratio_reason": ratio.reason or "",
        }
    table = grid.cells.copy()
    extra = pd.DataFrame([per_config[c] for c in table["config"]], index=table.index)
    table = pd.concat([table, extra], axis=1)
    table.insert(table.columns.get_loc("protected_fraction") + 1, "effective_bits",
                 effective_bits(table["bits"].to_numpy(float), table["p"].to_numpy(float)))
    return GridMeasures(
        table=table,
        disparity_reps=pd.DataFrame(disp_reps),
        distortion_reps=pd.DataFrame(dist_reps),
        lr_langs=lr, hr_langs=hr, langs=langs, n_boot=eng.n_boot, seed=int(seed), level=float(level),
    )


# ============================================================================ hull


def lower_convex_hull(x: Sequence[float], y: Sequence[float], decreasing: bool = False) -> np.ndarray:
    """Indices of the points on the lower convex hull of ``(x, y)``, sorted by ``x``.

    Andrew's monotone chain; collinear points between two hull vertices are left out, at
    equal ``x`` only the lowest point can be on the hull, non-finite points never are.
    ``decreasing=True`` keeps the hull up to its lowest point (the non-increasing part: the
    operational distortion-rate curve, since spending more bits never has to cost quality).
    """
    xa = np.asarray(x, dtype=np.float64).ravel()
    ya = np.asarray(y, dtype=np.float64).ravel()
    if xa.shape != ya.shape:
        raise ConfigError(f"x and y must have the same length, got {xa.size} and {ya.size}")
    idx = [i for i in np.lexsort((ya, xa)) if math.isfinite(xa[i]) and math.isfinite(ya[i])]
    hull: list[int] = []
    for i in idx:
        if hull and xa[hull[-1]] == xa[i]:
            continue  # same x, higher (or equal) y: never below the kept point
        while len(hull) >= 2:
            o, a = hull[-2], hull[-1]
            cross = (xa[a] - xa[o]) * (ya[i] - ya[o]) - (ya[a] - ya[o]) * (xa[i] - xa[o])
            if cross <= 0:  # a is not strictly below the chord o -> i
                hull.pop()
            else:
                break
        hull.append(int(i))
    if decreasing and hull:
        lowest = int(np.argmin([ya[i] for i in hull]))
        hull = hull[: lowest + 1]
    return np.asarray(hull, dtype=int)


# ============================================================================ models


def information_criteria(sse: float, n: int, k: int) -> dict[str, float]:
    """AIC, AICc and BIC of a least-squares fit with ``k`` mean parameters on ``n`` points.

    Gaussian errors with unknown variance (its maximum-likelihood estimate ``SSE / n``, one
    more parameter): ``logL = -n/2 * (ln(2*pi*SSE/n) + 1)``, ``K = k + 1``,
    ``AIC = 2K - 2 logL``, ``AICc = AIC + 2K(K+1)/(n-K-1)`` (NaN when ``n <= K + 1``),
    ``BIC = K ln(n) - 2 logL``. ``SSE = 0`` gives ``-inf`` (a perfect fit).
    """
    if n < 1 or k < 0:
        raise ConfigError(f"information criteria need n >= 1 and k >= 0, got n={n}, k={k}")
    sse = float(sse)
    if sse < 0 or not math.isfinite(sse):
        raise ConfigError(f"SSE must be finite and >= 0, got {sse}")
    big_k = k + 1
    loglik = math.inf if sse == 0 else -0.5 * n * (math.log(2 * math.pi * sse / n) + 1.0)
    aic = 2 * big_k - 2 * loglik
    aicc = aic + 2 * big_k * (big_k + 1) / (n - big_k - 1) if n > big_k + 1 else math.nan
    bic = big_k * math.log(n) - 2 * loglik
    return {"loglik": loglik, "aic": aic, "aicc": aicc, "bic": bic}


class _Model:
    """A disparity law: prediction, parameter names, profile-grid initialisation, bounds.

    Internally bits are centred at ``bref`` (the smallest bit width fitted), so the
    intercept is the disparity at ``bref`` and stays well scaled; reported ``a`` is the
    seed's (at bits = 0).
    """

    name = ""
    formula = ""

    def names(self, levels: np.ndarray) -> list[str]:
        raise NotImplementedError

    def check(self, bits: np.ndarray, p: np.ndarray) -> str | None:
        return None

    def predict(self, theta: np.ndarray, bits: np.ndarray, p: np.ndarray, levels: np.ndarray, bref: float) -> np.ndarray:
        raise NotImplementedError

    def bounds(self, y: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def init(self, bits, p, y, levels, bref) -> np.ndarray:
        raise NotImplementedError

    def report(self, theta: np.ndarray, levels: np.ndarray, bref: float) -> dict[str, float]:
        raise NotImplementedError


def _amax(y: np.ndarray) -> float:
    m = float(np.max(np.abs(y))) if y.size else 0.0
    return _A_SCALE * (m if m > 0 else 1.0)


def _need_two(bits: np.ndarray, p: np.ndarray, want_bits: bool) -> str | None:
    if want_bits and np.unique(bits).size < 2:
        return "too few: the bit-width effect b needs cells at two or more bit widths"
    if np.unique(p).size < 2:
        return "too few: the protection effect c needs cells at two or more protected fractions"
    return None


class _SeedModel(_Model):
    name = "seed"
    formula = "a * 2^(-b*bits) * (1 - c*p)"

    def names(self, levels):
        return ["a", "b", "c"]

    def check(self, bits, p):
        return _need_two(bits, p, True)

    def predict(self, theta, bits, p, levels, bref):
        big_a, b, c = theta
        return big_a * np.exp2(-b * (bits - bref)) * (1.0 - c * p)

    def bounds(self, y, levels):
        m = _amax(y)
        return np.array([-m, B_BOUNDS[0], C_BOUNDS[0]]), np.array([m, B_BOUNDS[1], C_BOUNDS[1]])

    def init(self, bits, p, y, levels, bref):
        # for fixed b the model is linear in (A, A*c): profile over a grid of b
        bs = np.linspace(B_BOUNDS[0], B_BOUNDS[1], 241)
        g = np.exp2(-bs[:, None] * (bits - bref)[None, :])  # (nb, n)
        best = (math.inf, np.array([float(np.mean(y)), 0.0, 0.0]))
        for j in range(bs.size):
            design = np.column_stack([g[j], -g[j] * p])
            coef, *_ = np.linalg.lstsq(design, y, rcond=None)
            sse = float(np.sum((design @ coef - y) ** 2))
            if sse < best[0]:
                big_a = coef[0]
                c = coef[1] / big_a if abs(big_a) > 1e-300 else 0.0
                best = (sse, np.array([big_a, bs[j], c]))
        return best[1]

    def report(self, theta, levels, bref):
        big_a, b, c = theta
        return {"a": float(big_a * 2.0 ** (b * bref)), "b": float(b), "c": float(c)}


class _ExpModel(_SeedModel):
    name = "exp"
    formula = "a * 2^(-b*bits) * exp(-c*p)"

    def predict(self, theta, bits, p, levels, bref):
        big_a, b, c = theta
        return big_a * np.exp2(-b * (bits - bref)) * np.exp(-c * p)

    def init(self, bits, p, y, levels, bref):
        # for fixed (b, c) the model is linear in A: profile over a (b, c) grid
        bs = np.linspace(B_BOUNDS[0], B_BOUNDS[1], 121)
        cs = np.linspace(C_BOUNDS[0], C_BOUNDS[1], 81)
        v = np.exp2(-bs[:, None, None] * (bits - bref)) * np.exp(-cs[None, :, None] * p)  # (nb, nc, n)
        big_a = (v @ y) / np.maximum((v * v).sum(-1), 1e-300)
        sse = ((big_a[..., None] * v - y) ** 2).sum(-1)
        i, j = np.unravel_index(int(np.nanargmin(sse)), sse.shape)
        return np.array([big_a[i, j], bs[i], cs[j]])


class _FreeModel(_Model):
    name = "free"
    formula = "a_bits * (1 - c*p)"

    def names(self, levels):
        return [f"a@{int(b)}" for b in levels] + ["c"]

    def check(self, bits, p):
        return _need_two(bits, p, False)

    def _level_index(self, bits, levels):
        idx = np.searchsorted(levels, bits)
        idx = np.clip(idx, 0, len(levels) - 1)
        ok = levels[idx] == bits
        return idx, ok

    def predict(self, theta, bits, p, levels, bref):
        idx, ok = self._level_index(bits, levels)
        out = theta[:-1][idx] * (1.0 - theta[-1] * p)
        return np.where(ok, out, np.nan)

    def bounds(self, y, levels):
        m = _amax(y)
        k = len(levels)
        return np.array([-m] * k + [C_BOUNDS[0]]), np.array([m] * k + [C_BOUNDS[1]])

    def init(self, bits, p, y, levels, bref):
        # for fixed c the model is linear in the intercepts: profile over a grid of c
        idx, _ = self._level_index(bits, levels)
        best = (math.inf, None)
        for c in np.linspace(C_BOUNDS[0], C_BOUNDS[1], 401):
            u = 1.0 - c * p
            num = np.bincount(idx, weights=u * y, minlength=len(levels))
            den = np.bincount(idx, weights=u * u, minlength=len(levels))
            a = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
            sse = float(np.sum((a[idx] * u - y) ** 2))
            if sse < best[0]:
                best = (sse, np.concatenate([a, [c]]))
        return best[1]

    def report(self, theta, levels, bref):
        return dict(zip(self.names(levels), (float(t) for t in theta)))


#: The disparity laws :func:`fit_grid` can fit.
MODELS: dict[str, _Model] = {m.name: m for m in (_SeedModel(), _ExpModel(), _FreeModel())}


def _get_model(name: str) -> _Model:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    return MODELS[name]


@dataclass
class FitResult:
    """A least-squares fit of one model to the grid (see :func:`fit_model`)."""

    model: str
    formula: str
    params: dict[str, float]
    n: int
    k: int
    sse: float = math.nan
    rmse: float = math.nan
    r2: float = math.nan
    aic: float = math.nan
    aicc: float = math.nan
    bic: float = math.nan
    loo_rmse: float = math.nan
    loo_r2: float = math.nan
    loo_errors: np.ndarray | None = None
    at_bound: tuple[str, ...] = ()
    converged: bool = True
    defined: bool = True
    reason: str = ""
    theta: np.ndarray | None = field(default=None, repr=False)
    levels: np.ndarray | None = field(default=None, repr=False)
    bref: float = 0.0

    def predict(self, bits: Any, p: Any) -> np.ndarray:
        """Fitted disparity at ``bits`` and protected fraction ``p`` (NaN if undefined)."""
        b = np.asarray(bits, dtype=np.float64)
        q = np.asarray(p, dtype=np.float64)
        b, q = np.broadcast_arrays(b, q)
        if not self.defined or self.theta is None:
            return np.full(b.shape, np.nan)
        return MODELS[self.model].predict(self.theta, b.astype(float), q.astype(float), self.levels, self.bref)

    def row(self) -> dict[str, Any]:
        return {
            "model": self.model, "formula": self.formula, "n": self.n, "k": self.k, "sse": self.sse,
            "rmse": self.rmse, "r2": self.r2, "aic": self.aic, "aicc": self.aicc, "bic": self.bic,
            "loo_rmse": self.loo_rmse, "loo_r2": self.loo_r2, "at_bound": ",".join(self.at_bound),
            "converged": self.converged, "defined": self.defined, "reason": self.reason,
        }


def _curve_fit(model: _Model, bits, p, y, levels, bref, p0) -> tuple[np.ndarray, bool]:
    lo, hi = model.bounds(y, levels)
    span = hi - lo
    start = np.clip(np.asarray(p0, dtype=np.float64), lo + 1e-9 * span, hi - 1e-9 * span)

    def f(x, *theta):
        return model.predict(np.asarray(theta), x[0], x[1], levels, bref)

    x = np.vstack([bits, p])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        # Levenberg-Marquardt first (several times faster); its optimum is the bounded one
        # whenever it lies strictly inside the bounds, otherwise the bounded trf solver decides.
        try:
            theta, _ = curve_fit(f, x, y, p0=start, method="lm", maxfev=2000)
            theta = np.asarray(theta, dtype=np.float64)
            if np.all(np.isfinite(theta)) and np.all(theta > lo) and np.all(theta < hi):
                return theta, True
        except (RuntimeError, ValueError):
            pass
        try:
            theta, _ = curve_fit(f, x, y, p0=start, bounds=(lo, hi), method="trf", maxfev=2000)
            return np.asarray(theta, dtype=np.float64), True
        except (RuntimeError, ValueError):
            return start, False


def _at_bound(model: _Model, theta: np.ndarray, y: np.ndarray, levels: np.ndarray) -> dict[str, str]:
    """{parameter: "lower" | "upper"} for the parameters within 1e-6 of the range of a bound."""
    lo, hi = model.bounds(y, levels)
    tol = 1e-6 * (hi - lo)
    out = {}
    for name, t, l, h, e in zip(model.names(levels), theta, lo, hi, tol):
        if t - l <= e:
            out[name] = "lower"
        elif h - t <= e:
            out[name] = "upper"
    return out


def _fit_theta(model: _Model, bits, p, y, levels, bref, p0=None) -> tuple[np.ndarray, bool]:
    if p0 is None:
        p0 = model.init(bits, p, y, levels, bref)
    return _curve_fit(model, bits, p, y, levels, bref, p0)


def _loo_errors(model: _Model, bits, p, y, levels, bref, theta) -> np.ndarray:
    """Held-out prediction error of every cell (NaN where the rest cannot predict it)."""
    n = y.size
    k = len(model.names(levels))
    out = np.full(n, np.nan)
    for i in range(n):
        keep = np.arange(n) != i
        if keep.sum() < k or model.check(bits[keep], p[keep]):
            continue
        if model.name == "free" and not np.any(bits[keep] == bits[i]):
            continue  # its intercept has no other cell
        t, _ = _fit_theta(model, bits[keep], p[keep], y[keep], levels, bref, p0=theta)
        out[i] = y[i] - float(model.predict(t, bits[i:i + 1], p[i:i + 1], levels, bref)[0])
    return out


def fit_model(
    model: str,
    bits: Sequence[float],
    p: Sequence[float],
    y: Sequence[float],
    loo: bool = True,
    p0: np.ndarray | None = None,
) -> FitResult:
    """Fit one model of :data:`MODELS` to cells ``(bits, p, y)`` by bounded least squares.

    ``p`` is the protected fraction (0..1). Initialisation: a profile grid search (the
    models are linear in their intercepts for fixed exponents), then ``curve_fit`` (trf,
    bounds ``b`` in [-4, 8], ``c`` in [-10, 10], ``|a at the smallest bit width|`` <= 100 x
    max |y|); ``p0`` (internal parameters) skips the grid. Needs ``n >= k + 2`` cells and, for
    ``b`` and ``c``, two or more bit widths and protected fractions; otherwise the result is
    undefined with a reason. ``loo``: refit without each cell and record its prediction error.
    """
    m = _get_model(model)
    b = np.asarray(bits, dtype=np.float64).ravel()
    q = np.asarray(p, dtype=np.float64).ravel()
    yy = np.asarray(y, dtype=np.float64).ravel()
    if not (b.size == q.size == yy.size):
        raise ConfigError(f"bits, p and y must have the same length, got {b.size}, {q.size}, {yy.size}")
    if not (np.all(np.isfinite(b)) and np.all(np.isfinite(q)) and np.all(np.isfinite(yy))):
        raise ConfigError("fit_model needs finite bits, p and y; drop undefined cells first (GridMeasures.excluded)")
    levels = np.unique(b)
    bref = float(levels.min()) if levels.size else 0.0
    k = len(m.names(levels))
    n = int(yy.size)
    why = None
    if n < k + 2:
        why = f"too few: {m.name} has {k} parameters and needs at least {k + 2} defined cells, got {n}"
    why = why or m.check(b, q)
    if why:
        return FitResult(m.name, m.formula, {name: math.nan for name in m.names(levels)}, n, k,
                         defined=False, reason=why, levels=levels, bref=bref)
    theta, ok = _fit_theta(m, b, q, yy, levels, bref, p0)
    resid = yy - m.predict(theta, b, q, levels, bref)
    sse = float(np.sum(resid ** 2))
    sst = float(np.sum((yy - yy.mean()) ** 2))
    crit = information_criteria(sse, n, k)
    at_bound = tuple(_at_bound(m, theta, yy, levels))
    res = FitResult(
        m.name, m.formula, m.report(theta, levels, bref), n, k, sse=sse, rmse=math.sqrt(sse / n),
        r2=1.0 - sse / sst if sst > 0 else math.nan, aic=crit["aic"], aicc=crit["aicc"], bic=crit["bic"],
        at_bound=at_bound, converged=ok, theta=theta, levels=levels, bref=bref,
    )
    if loo:
        errors = _loo_errors(m, b, q, yy, levels, bref, theta)
        res.loo_errors = errors
        ok_e = np.isfinite(errors)
        if ok_e.any():
            press = float(np.sum(errors[ok_e] ** 2))
            res.loo_rmse = math.sqrt(press / ok_e.sum())
            sst_ok = float(np.sum((yy[ok_e] - yy[ok_e].mean()) ** 2))
            res.loo_r2 = 1.0 - press / sst_ok if sst_ok > 0 else math.nan
    return res


# ============================================================================ grid fit


@dataclass
class RDFit:
    """Fits of one policy's grid: point fits, bootstrap refits and the cells used.

    ``comparison``: one row per model (n, k, SSE, RMSE, R^2, AIC, AICc, BIC with deltas to
    the best, LOO RMSE, LOO R^2, parameters at a bound). ``params``: one row per (model,
    parameter) with the point value and the percentile CI of the bootstrap refits.
    ``cells``: the cells fitted; ``excluded``: those left out and why.
    """

    policy: str
    fits: dict[str, FitResult]
    comparison: pd.DataFrame
    params: pd.DataFrame
    cells: pd.DataFrame
    excluded: pd.DataFrame
    boot_params: dict[str, pd.DataFrame]
    boot_loo: pd.DataFrame
    n_texts: int
    n_fit_boot: int
    level: float
    #: per model, how many bootstrap refits stopped each parameter at a fitting bound
    boot_at_bound: dict[str, dict[str, int]] = field(default_factory=dict)
    #: bootstrap replicates refitted (those whose cells are all finite)
    boot_tried: int = 0
    #: per model, how many refits failed: the solver failed or a parameter stopped at a bound
    boot_failed: dict[str, int] = field(default_factory=dict)

    def failed_fraction(self, model: str) -> float:
        """Share of the bootstrap refits of ``model`` that failed (solver failure or a parameter
        at a fitting bound); NaN when none was attempted."""
        return self.boot_failed.get(model, 0) / self.boot_tried if self.boot_tried else math.nan

    def bound_reason(self, model: str) -> str | None:
        """``"fit at bound: ..."`` when the point fit of ``model`` stopped at a fitting bound (a
        failed fit: the least-squares optimum lies outside the allowed range, so its parameters
        and intervals mean nothing beyond "at or past the bound"); None otherwise."""
        fit = self.fits.get(model)
        if fit is None or not fit.defined or not fit.at_bound:
            return None
        sides = _at_bound(MODELS[model], fit.theta, self.cells["disparity"].to_numpy(float), fit.levels)
        where = ", ".join(f"{k} = {fit.params[k]:.4g} ({sides.get(k, 'a')} bound)" for k in fit.at_bound)
        return (f"fit at bound: the {model} fit stopped at {where}; a fit at a parameter bound is a failed fit "
                f"(the data fall off faster or slower than the law allows), so its estimates are undefined")

    def _boot_reason(self, model: str, what: str = "bootstrap refits") -> str | None:
        """Why a bootstrap interval of ``model`` is undefined: more than (1 - level) / 2 of its
        refits failed (the interval's end would sit on the censored refits); None otherwise."""
        frac = self.failed_fraction(model)
        if not math.isfinite(frac) or frac <= (1.0 - self.level) / 2:
            return None
        return (f"fit at bound: {self.boot_failed.get(model, 0)} of {self.boot_tried} {what} of {model} failed "
                f"(a parameter at a fitting bound or no convergence; {frac:.0%} > {(1 - self.level) / 2:.1%}), "
                "so the interval would be censored")

    def bound_note(self, model: str, param: str) -> str:
        """A sentence on fitting bounds: whether the point fit stopped at one (a failed fit) and
        what share of the bootstrap refits failed (at a bound or without convergence; they are
        left out of every interval); "" when none did."""
        fit = self.fits.get(model)
        if fit is None or not fit.defined:
            return ""
        n_param = self.boot_at_bound.get(model, {}).get(param, 0)
        failed = self.boot_failed.get(model, 0)
        parts = []
        if param in fit.at_bound:
            parts.append(f"{model} {param} = {fit.params[param]:.4g} is at a fitting bound: a failed fit")
        elif fit.at_bound:
            parts.append(f"the {model} fit stopped at a bound ({', '.join(fit.at_bound)}): a failed fit")
        if failed:
            parts.append(f"{failed} of {self.boot_tried} bootstrap refits failed ({failed / max(self.boot_tried, 1):.0%}; "
                         f"{n_param} with {param} at a bound) and are left out of the interval")
        return "; ".join(parts)

    def estimate(self, model: str, param: str) -> _stats.Estimate:
        """A parameter as an :class:`~qhelpers.stats.Estimate` (point fit, percentile CI of the
        bootstrap refits that did not fail; n = texts). Undefined with ``"fit at bound: ..."``
        when the point fit stopped at a fitting bound, or when more than (1 - level) / 2 of the
        refits failed (:meth:`failed_fraction`)."""
        if model not in self.fits:
            raise ConfigError(f"model {model!r} was not fitted (fitted: {list(self.fits)})")
        fit = self.fits[model]
        if not fit.defined:
            return _stats.Estimate.undefined(f"{fit.reason.split(':', 1)[0]}: {model} fit undefined ({fit.reason})",
                                             self.n_texts, self.level)
        if param not in fit.params:
            raise ConfigError(f"model {model!r} has no parameter {param!r}; parameters: {list(fit.params)}")
        value = fit.params[param]
        why = self.bound_reason(model) or self._boot_reason(model)
        if why:
            return _stats.Estimate.undefined(why, self.n_texts, self.level, value=value)
        reps = self.boot_params[model][param].to_numpy(float) if model in self.boot_params else np.array([])
        reps = reps[np.isfinite(reps)]
        if reps.size < 2:
            return _stats.Estimate.undefined("too few: no bootstrap refit succeeded", self.n_texts, self.level, value=value)
        lo, hi = _stats.percentile_interval(reps, self.level)
        return _stats.Estimate(value, float(lo), float(hi), self.n_texts, self.level)

    def loo_difference(self, alternative: str, model: str = "seed", relative: bool = True) -> _stats.Estimate:
        """LOO RMSE of ``model`` minus that of ``alternative`` over the cells both can predict,
        in percent of the alternative's (``relative=True``) or in bits per byte, with the
        percentile CI of the bootstrap refits. Negative: ``model`` predicts held-out cells better.

        A replicate grid carries the text-resampling noise on top of the measured one, which
        raises both laws' LOO errors and usually pulls their relative difference toward 0; the
        interval can therefore sit beside the point estimate (on the side of "no difference",
        so it is conservative for a claim that one law predicts better)."""
        for name in (model, alternative):
            if name not in self.fits:
                raise ConfigError(f"model {name!r} was not fitted (fitted: {list(self.fits)})")
            if not self.fits[name].defined:
                return _stats.Estimate.undefined(
                    f"{self.fits[name].reason.split(':', 1)[0]}: {name} fit undefined ({self.fits[name].reason})",
                    self.n_texts, self.level)
        ea, eb = self.fits[model].loo_errors, self.fits[alternative].loo_errors
        if ea is None or eb is None:
            return _stats.Estimate.undefined("too few: the fits were made without leave-one-out", self.n_texts, self.level)
        value = _loo_stat(ea, eb, relative)
        for name in (model, alternative):
            why = self.bound_reason(name) or self._boot_reason(name, "bootstrap LOO refits")
            if why:
                return _stats.Estimate.undefined(why, self.n_texts, self.level,
                                                 value=value if math.isfinite(value) else math.nan)
        col_a, col_b = f"{model}_loo", f"{alternative}_loo"
        if not math.isfinite(value):
            return _stats.Estimate.undefined("non-finite: no cell that both models can predict held out "
                                             "(or a zero LOO error)", self.n_texts, self.level)
        if col_a not in self.boot_loo or col_b not in self.boot_loo:
            return _stats.Estimate.undefined("too few: no bootstrap LOO refits", self.n_texts, self.level, value=value)
        reps = np.array([_loo_stat(a, b, relative) for a, b in zip(self.boot_loo[col_a], self.boot_loo[col_b])])
        reps = reps[np.isfinite(reps)]
        if reps.size < 2:
            return _stats.Estimate.undefined("too few: no bootstrap LOO refit succeeded", self.n_texts, self.level,
                                             value=value)
        lo, hi = _stats.percentile_interval(reps, self.level)
        return _stats.Estimate(value, float(lo), float(hi), self.n_texts, self.level)

    def predict(self, model: str, bits: Any, p: Any) -> np.ndarray:
        return self.fits[model].predict(bits, p)

    def describe(self) -> str:
        """What the fit can and cannot show."""
        return (
            f"The fits describe the measured {len(self.cells)}-cell grid of one model, corpus and quantizer "
            f"under the '{self.policy}' policy (cells: mean over texts, n={self.n_texts} texts per language). "
            "A good fit says the law summarises these cells; it is not a lower bound on disparity: a bound "
            "would need the minimum over every protection policy and quantizer, and a grid of two policies "
            "only shows what is achievable (an upper bound on that minimum). Extrapolation beyond the "
            "fitted bit widths and protected fractions is not supported by the data."
        )


def _loo_stat(err_a: np.ndarray, err_b: np.ndarray, relative: bool) -> float:
    if err_a is None or err_b is None:
        return math.nan
    a = np.asarray(err_a, dtype=float)
    b = np.asarray(err_b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any():
        return math.nan
    ra = math.sqrt(float(np.mean(a[ok] ** 2)))
    rb = math.sqrt(float(np.mean(b[ok] ** 2)))
    if relative:
        return 100.0 * (ra - rb) / rb if rb > 0 else math.nan
    return ra - rb


def fit_grid(
    measures: GridMeasures,
    policy: str | None = None,
    models: Sequence[str] = ("seed", "exp", "free"),
    n_fit_boot: int | None = None,
    loo: bool = True,
    progress: bool = False,
) -> RDFit:
    """Fit ``models`` to one policy's defined cells and refit them on bootstrap replicates.

    Cells: the rows of ``measures.table`` for ``policy`` (the first by default), one per
    distinct config (cells sharing a protection count once), x = (bits, actual p), y =
    disparity; undefined cells are excluded (``RDFit.excluded`` says why). Bootstrap: the
    first ``n_fit_boot`` (None: all) paired replicates of the grid; every model is refitted
    on each (warm-started from the point fit) and, with ``loo``, its leave-one-out errors
    recomputed, giving the CIs of :meth:`RDFit.estimate` and :meth:`RDFit.loo_difference`.
    A refit fails when the solver fails or a parameter stops at a fitting bound; failed refits
    are left out of every interval and counted (``comparison.boot_ok``, ``boot_failed``,
    ``boot_failed_frac``; per parameter ``params.boot_at_bound``). A point fit at a bound is a
    failed fit: its estimates are undefined (:meth:`RDFit.bound_reason`), and so is an interval
    when more than (1 - level) / 2 of the refits failed.
    """
    if isinstance(models, str) or not models:
        raise ConfigError(f"models must be a non-empty list such as ['seed', 'exp', 'free'], got {models!r}")
    specs = [_get_model(m) for m in models]
    if len({m.name for m in specs}) != len(specs):
        raise ConfigError(f"models {list(models)} repeat a model; list each once")
    rows = _policy_rows(measures.table, policy)
    policy = str(rows["policy"].iloc[0])
    rows = rows.drop_duplicates("config")
    used = rows[rows["defined"]].reset_index(drop=True)
    excluded = rows.loc[~rows["defined"], ["policy", "bits", "pct", "config", "reason"]].reset_index(drop=True)
    bits = used["bits"].to_numpy(float)
    p = used["p"].to_numpy(float)
    y = used["disparity"].to_numpy(float)
    n_texts = int(rows["n"].min()) if len(rows) else 0
    fits = {m.name: fit_model(m.name, bits, p, y, loo=loo) for m in specs}

    reps = measures.disparity_reps[list(used["config"])].to_numpy(float) if len(used) else np.empty((0, 0))
    total = reps.shape[0]
    n_use = total if n_fit_boot is None else min(int(n_fit_boot), total)
    if n_fit_boot is not None and int(n_fit_boot) < 1:
        raise ConfigError(f"n_fit_boot must be >= 1 or None (every replicate), got {n_fit_boot}")
    boot_params: dict[str, list[dict[str, float]]] = {m.name: [] for m in specs}
    boot_loo: dict[str, list[Any]] = {f"{m.name}_loo": [] for m in specs}
    ok_counts = {m.name: 0 for m in specs}
    boot_bound: dict[str, dict[str, int]] = {m.name: {} for m in specs}
    tried = 0
    defined = [m for m in specs if fits[m.name].defined]
    if defined:
        items: Iterable[int] = range(n_use)
        if progress:
            from qhelpers.util.progress import progress_bar

            items = progress_bar(items, desc="bootstrap refits", total=n_use)
        for r in items:
            yr = reps[r]
            if not np.all(np.isfinite(yr)):
                continue
            tried += 1
            for m in defined:
                fit = fits[m.name]
                theta, ok = _fit_theta(m, bits, p, yr, fit.levels, fit.bref, p0=fit.theta)
                bound = _at_bound(m, theta, yr, fit.levels) if ok else {}
                for name in bound:
                    boot_bound[m.name][name] = boot_bound[m.name].get(name, 0) + 1
                if not ok or bound:  # a refit at a bound is a failed refit, like one that did not converge
                    boot_params[m.name].append({k: math.nan for k in fit.params})
                    boot_loo[f"{m.name}_loo"].append(None)
                    continue
                ok_counts[m.name] += 1
                boot_params[m.name].append(m.report(theta, fit.levels, fit.bref))
                boot_loo[f"{m.name}_loo"].append(
                    _loo_errors(m, bits, p, yr, fit.levels, fit.bref, theta) if loo else None)

    comparison = pd.DataFrame([fits[m.name].row() for m in specs])
    for crit in ("aic", "aicc", "bic"):
        best = comparison[crit].min(skipna=True)
        comparison[f"delta_{crit}"] = comparison[crit] - best
    comparison["boot_ok"] = [ok_counts[m.name] for m in specs]
    failed = {m.name: (tried - ok_counts[m.name]) if fits[m.name].defined else 0 for m in specs}
    comparison["boot_failed"] = [failed[m.name] for m in specs]
    comparison["boot_failed_frac"] = [failed[m.name] / tried if tried and fits[m.name].defined else math.nan for m in specs]
    prow = []
    boot_frames = {name: pd.DataFrame(v) for name, v in boot_params.items() if v}
    out = RDFit(policy, fits, comparison, pd.DataFrame(), used, excluded, boot_frames,
                pd.DataFrame({k: v for k, v in boot_loo.items() if v}) if any(boot_loo.values()) else pd.DataFrame(),
                n_texts, n_use, measures.level, boot_bound, boot_tried=tried, boot_failed=failed)
    for m in specs:
        for name in fits[m.name].params:
            est = out.estimate(m.name, name)
            prow.append({"model": m.name, "param": name, "value": est.value, "ci_low": est.ci_low,
                         "ci_high": est.ci_high, "at_bound": name in fits[m.name].at_bound,
                         "boot_at_bound": boot_bound[m.name].get(name, 0),
                         "defined": est.defined, "reason": est.reason or ""})
    out.params = pd.DataFrame(prow, columns=["model", "param", "value", "ci_low", "ci_high", "at_bound", "boot_at_bound",
                                             "defined", "reason"])
    return out


# ============================================================================ figures


_MODEL_STYLES = {"seed": "-", "exp": "--", "free": ":"}


def plot_fits(fit: RDFit, measures: GridMeasures, ax=None, models: Sequence[str] | None = None,
              title: str | None = None) -> Figure:
    """Disparity against bit width, one colour per protection percentage: measured cells with
    their CI (hollow: excluded from the fit) and the fitted curves of ``models`` (default:
    every fitted one; seed solid, exp dashed, free dotted) at each cell row's actual p."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 5))
    else:
        fig = ax.figure
    rows = _policy_rows(measures.table, fit.policy).drop_duplicates("config")
    pcts = sorted(rows["pct"].unique())
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, max(len(pcts), 1)))
    models = list(fit.fits) if models is None else list(models)
    for color, pct in zip(colors, pcts):
        part = rows[rows["pct"] == pct].sort_values("bits")
        ok = part["defined"].to_numpy(bool)
        x = part["bits"].to_numpy(float)
        yv = part["disparity"].to_numpy(float)
        lo = part["disparity_ci_low"].to_numpy(float)
        hi = part["disparity_ci_high"].to_numpy(float)
        if ok.any():
            ax.errorbar(x[ok], yv[ok], yerr=[yv[ok] - lo[ok], hi[ok] - yv[ok]], fmt="o", color=color, capsize=3,
                        label=f"{pct:g} % protected")
        bad = ~ok & np.isfinite(yv)
        if bad.any():
            ax.scatter(x[bad], yv[bad], facecolors="none", edgecolors=color)
        p_here = float(part["p"].mean())
        fitted = fit.cells["bits"] if len(fit.cells) else rows["bits"]
        grid_bits = np.linspace(float(fitted.min()), float(fitted.max()), 100)  # no extrapolation
        for name in models:
            fr = fit.fits.get(name)
            if fr is None or not fr.defined:
                continue
            if name == "free":
                ax.plot(x, fr.predict(x, part["p"].to_numpy(float)), _MODEL_STYLES.get(name, "-."), color=color, alpha=0.7)
            else:
                ax.plot(grid_bits, fr.predict(grid_bits, p_here), _MODEL_STYLES.get(name, "-."), color=color, alpha=0.8)
    for name in models:
        fr = fit.fits.get(name)
        if fr is not None and fr.defined:
            ax.plot([], [], _MODEL_STYLES.get(name, "-."), color="black", label=f"{name}: {fr.formula} (R²={fr.r2:.3f})")
    if not any(fr.defined for fr in fit.fits.values()):
        ax.text(0.5, 0.5, "no model could be fitted\n(" + next(iter(fit.fits.values())).reason[:80] + ")",
                transform=ax.transAxes, ha="center", va="center", fontsize=8, color="#555555")
    xlabel = "bits per quantized weight"
    if len(fit.excluded):
        listed = ", ".join(f"INT{b}/{q:g}%" for b, q in zip(fit.excluded["bits"], fit.excluded["pct"]))
        xlabel += f"\n{len(fit.excluded)} cell(s) excluded from the fit (undefined disparity): {listed[:110]}"
    ax.axhline(0.0, color="grey", linewidth=0.8)
    finite = rows["disparity"].to_numpy(float)
    finite = finite[np.isfinite(finite)]
    if finite.size and np.max(np.abs(finite)) > 0:
        ax.set_yscale("symlog", linthresh=max(float(np.min(np.abs(finite[finite != 0]))) if np.any(finite != 0) else 1e-3, 1e-4))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("disparity (LR - HR change, bits per byte)")
    ax.set_title(title or f"Disparity over the grid ({fit.policy} policy) and fitted laws")
    if ax.get_legend_handles_labels()[0]:  # a grid with no defined cell has nothing to label
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def plot_distortion_rate(measures: GridMeasures, ax=None, policy: str | None = None, title: str | None = None) -> Figure:
    """Mean change in bits per byte (distortion) against effective bits per weight (rate), one
    colour per bit width (hollow: collapsed in some language), with the lower convex hull
    (grey) and its non-increasing part (red: the operational distortion-rate curve)."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    else:
        fig = ax.figure
    rows = measures.table if policy is None else _policy_rows(measures.table, policy)
    rows = rows.drop_duplicates("config").reset_index(drop=True)
    x = rows["effective_bits"].to_numpy(float)
    yv = rows["distortion"].to_numpy(float)
    levels = sorted(rows["bits"].unique())
    colors = dict(zip(levels, plt.get_cmap("plasma")(np.linspace(0.0, 0.85, max(len(levels), 1)))))
    markers = {"layers": "o", "magnitude": "s"}
    for (bits, pol), part in rows.groupby(["bits", "policy"], sort=True):
        col = colors[bits]
        filled = ~part["collapsed"].to_numpy(bool)
        px, py = part["effective_bits"].to_numpy(float), part["distortion"].to_numpy(float)
        m = markers.get(pol, "^")
        ax.scatter(px[filled], py[filled], color=col, marker=m, s=36, zorder=3, label=f"INT{bits} ({pol})")
        ax.scatter(px[~filled], py[~filled], facecolors="none", edgecolors=col, marker=m, s=36, zorder=3)
    hull = lower_convex_hull(x, yv)
    if hull.size > 1:
        ax.plot(x[hull], yv[hull], color="grey", linewidth=1.0, zorder=2, label="lower convex hull")
    front = lower_convex_hull(x, yv, decreasing=True)
    if front.size > 1:
        ax.plot(x[front], yv[front], color="#d62728", linewidth=1.8, zorder=2, label="distortion-rate frontier")
    if np.any(np.isfinite(yv)) and np.nanmin(yv) > 0:
        ax.set_yscale("log")
    ax.set_xlabel(f"effective bits per quantizable weight ((1-p)·bits + p·{PROTECTED_BITS:g})")
    ax.set_ylabel("distortion: mean change in bits per byte")
    ax.set_title(title or "Distortion-rate")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig

"""Per-layer criticality: how much the low-resource disparity depends on each decoder layer.

The theory notebooks (seed 004, T-001 ... T-010) all ask "does quantity X of a layer predict
how critical that layer is?". This module measures the second half once, the same way for
every notebook:

* ``mode="protect"`` (seed 002's sense, the default): every layer is quantized except layer
  ``i``. ``D(i)`` is the disparity of that configuration and
  ``criticality(i) = D(all quantized) - D(i)``: how much disparity protecting layer ``i``
  alone removes. Larger = more critical.
* ``mode="quantize"``: only layer ``i`` is quantized; ``criticality(i) = D(i)``: how much
  disparity quantizing that layer alone creates (the full-precision baseline has none).

``D`` is the LR-minus-HR difference of the mean change in bits per byte (``measure=
"difference"``, defined even when the HR change is near zero) unless ``measure="ratio"``
(the seeds' ratio of mean degradations). Every value carries a paired bootstrap CI over
texts; the criticality CI comes from :func:`qhelpers.stats.disparity_contrast` (the same
bootstrap replicates for both configurations).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from qhelpers import stats
from qhelpers.measure.scoring import MeasureConfig
from qhelpers.measure.sweep import SweepResult
from qhelpers.measure.sweep_cache import cached_sweep
from qhelpers.models.archs import resolve_layers
from qhelpers.quant.engine import Variant
from qhelpers.quant.protection import ProtectionSpec
from qhelpers.quant.strategies import protocol_settings, quantize_only_variant
from qhelpers.util.errors import ConfigError

__all__ = ["LayerCriticality", "criticality_variants", "layer_criticality", "MODES"]

MODES = ("protect", "quantize")
ALL_QUANTIZED = "all_quantized"


def _layer_config(mode: str, layer: int) -> str:
    return f"protect_L{layer}" if mode == "protect" else f"quantize_L{layer}"


def criticality_variants(
    n_layers: int,
    mode: str = "protect",
    bits: int = 4,
    protocol: str = "sound",
    layers: int | Iterable[int] | None = None,
) -> dict[str, Variant]:
    """The configurations :func:`layer_criticality` runs (baseline excluded).

    ``protect``: ``all_quantized`` plus ``protect_L{i}`` (all layers quantized but ``i``);
    ``quantize``: ``quantize_L{i}`` (only layer ``i`` quantized: every other layer protected, and
    under the ``seed`` protocol the embeddings, final norm and LM head too).
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    quant, scope = protocol_settings(protocol, bits)
    chosen = resolve_layers(layers, n_layers)
    out: dict[str, Variant] = {}
    if mode == "protect":
        out[ALL_QUANTIZED] = Variant(ALL_QUANTIZED, quant, ProtectionSpec(), scope)
    for i in chosen:
        name = _layer_config(mode, i)
        if mode == "protect":
            out[name] = Variant(name, quant, ProtectionSpec(layers=(i,)), scope)
        else:
            out[name] = quantize_only_variant(name, [i], n_layers, protocol, bits)
    return out


def _mean_delta_bpb(scores: pd.DataFrame, baseline: str) -> pd.Series:
    """Per config: the mean over languages of (bits per byte - the baseline's bits per byte)."""
    sums = scores.groupby(["config", "lang"])[["nll", "n_bytes"]].sum()
    bpb = stats.bits_per_byte(sums["nll"], sums["n_bytes"]).unstack("lang")
    return (bpb - bpb.loc[baseline]).mean(axis=1)


@dataclass
class LayerCriticality:
    """Per-layer criticality with CIs (``table``) and the sweep it came from."""

    table: pd.DataFrame
    sweep: SweepResult
    mode: str
    measure: str
    n_layers: int
    from_cache: bool = False

    def values(self, column: str = "criticality") -> pd.Series:
        """``column`` indexed by layer (for correlating with a per-layer quantity)."""
        return self.table.set_index("layer")[column]

    def most_critical(self, k: int = 1) -> list[int]:
        """The ``k`` layers of largest criticality point estimate (ties: lower index first)."""
        finite = self.table[np.isfinite(self.table["criticality"].astype(float))]
        ordered = finite.sort_values(["criticality", "layer"], ascending=[False, True])
        return [int(i) for i in ordered["layer"].head(int(k))]

    def describe(self) -> str:
        """One sentence on what ``criticality`` means here."""
        d = "LR-minus-HR change in bits per byte" if self.measure == "difference" else "ratio of mean LR to mean HR degradation"
        if self.mode == "protect":
            return (f"criticality(i) = D(all quantized) - D(all quantized except layer i), D = {d}; "
                    "larger = protecting layer i removes more disparity")
        return f"criticality(i) = D(only layer i quantized), D = {d}; larger = quantizing layer i creates more disparity"


def layer_criticality(
    loaded: Any,
    corpus: Any,
    *,
    mode: str = "protect",
    bits: int = 4,
    protocol: str = "sound",
    layers: int | Iterable[int] | None = None,
    lr_langs: Sequence[str] | None = None,
    hr_langs: Sequence[str] | None = None,
    measure: str = "difference",
    measure_config: MeasureConfig | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    progress: bool = True,
    sweep: SweepResult | None = None,
    allow_collapsed: bool = False,
    cache: bool | str = True,
) -> LayerCriticality:
    """Measure (or, given ``sweep``, re-analyse) every layer's criticality; see the module docstring.

    Columns of ``table``: layer, depth (layer / (n_layers - 1)), config, protected_fraction,
    disparity and its CI, criticality and its CI, mean_delta_bpb (mean change over all
    languages of that configuration), n, defined, reason. A random-init (tiny) model is
    "collapsed" under the stats collapse rule, so its disparities are undefined unless
    ``allow_collapsed=True``.

    The sweep is cached on disk (:mod:`qhelpers.measure.sweep_cache`; ``cache=False`` turns it off),
    so notebooks asking the same question of the same model and texts share one run;
    ``from_cache`` on the result says whether it was reused.
    """
    if measure not in ("difference", "ratio"):
        raise ConfigError(f"measure must be 'difference' or 'ratio', got {measure!r}")
    n_layers = int(loaded.n_layers)
    variants = criticality_variants(n_layers, mode, bits, protocol, layers)
    hit = False
    if sweep is None:
        sweep, hit = cached_sweep(loaded, corpus, variants, measure_config or MeasureConfig(), cache=cache,
                                  progress=progress)
    missing = [name for name in variants if name not in sweep.variants]
    if missing:
        raise ConfigError(f"the sweep lacks configurations {missing[:3]}; run it with criticality_variants(...)")
    metric = "delta_bpb" if measure == "difference" else "degradation"
    groups: dict[str, Any] = dict(lr_langs=lr_langs, hr_langs=hr_langs, n_boot=n_boot, seed=seed,
                                  metric=metric, measure=measure, baseline=sweep.baseline,
                                  allow_collapsed=allow_collapsed)
    overhead = sweep.overhead.set_index("config")["protected_fraction"]
    langs = sweep.scores.loc[sweep.scores["config"] == sweep.baseline, "lang"].unique()
    mean_change = _mean_delta_bpb(sweep.scores, sweep.baseline)
    rows = []
    for i in resolve_layers(layers, n_layers):
        config = _layer_config(mode, i)
        d = stats.disparity_contrast(sweep.scores, {config: 1.0}, **groups)
        weights = {ALL_QUANTIZED: 1.0, config: -1.0} if mode == "protect" else {config: 1.0}
        c = stats.disparity_contrast(sweep.scores, weights, **groups)
        rows.append({
            "layer": i,
            "depth": i / max(n_layers - 1, 1),
            "config": config,
            "protected_fraction": float(overhead[config]),
            "disparity": d.value, "disparity_ci_low": d.ci_low, "disparity_ci_high": d.ci_high,
            "criticality": c.value, "criticality_ci_low": c.ci_low, "criticality_ci_high": c.ci_high,
            "mean_delta_bpb": float(mean_change.get(config, np.nan)),
            "n": c.n, "n_langs": len(langs), "defined": c.defined, "reason": c.reason or "",
        })
    return LayerCriticality(pd.DataFrame(rows), sweep, mode, measure, n_layers, from_cache=hit)

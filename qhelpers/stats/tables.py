"""Per-language tables, disparities, reductions and contrasts of a per-text scores table,
each with a paired bootstrap interval, studentized by default (definitions and the
interval methods in :mod:`qhelpers.stats`)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from qhelpers.util.errors import ConfigError
from qhelpers.stats.bootstrap import (
    DEFAULT_METHOD, BootDistribution, BootStat, Estimate, check_interval_method, percentile_interval, stat_ratio_estimate,
)
from qhelpers.stats.correlation import kendalls_w
from qhelpers.stats.quantities import histogram_quantile
from qhelpers.stats.scores import PairedScores, check_metric, resolve_groups, validate_scores

#: Per-language change columns of :func:`language_table`, each with ``_ci_low``/``_ci_high``.
CHANGE_COLUMNS: tuple[str, ...] = ("ppl_ratio", "degradation", "delta_nll", "delta_bpb", "delta_bits_per_paragraph")
#: The damage card's columns of :func:`language_table` (when the scores carry them), each with
#: ``_ci_low``/``_ci_high``: KL to the full model in bits per byte, the share of tokens whose
#: top-1 prediction agrees with the full model's, and the 99th percentile of per-token KL (nats).
DAMAGE_CARD_COLUMNS: tuple[str, ...] = ("kl_bpb", "top1_agree", "kl_p99")


def kl_quantile_estimate(scores: pd.DataFrame, eng: PairedScores, c: str, lang: str, q: float = 0.99) -> Estimate:
    """The ``q`` quantile of per-token KL (nats) of config ``c`` in ``lang``, from the per-text
    ``kl_hist`` histograms of a damage-card sweep, with a percentile interval from the
    engine's paired resamples (a quantile is not a smooth function of sums, so it is not
    studentized; its resolution is one histogram bin, see
    :data:`~qhelpers.stats.quantities.KL_HIST_EDGES`)."""
    n = eng.n_texts[lang]
    if "kl_hist" not in scores.columns:
        return Estimate.undefined("no data: the scores have no kl_hist column (run the sweep with damage=True)", n, eng.level)
    hist = np.asarray(scores["kl_hist"].iloc[eng.rows[(lang, c)]].tolist(), dtype=np.float64)
    value = float(histogram_quantile(hist.sum(axis=0), q))
    reps = histogram_quantile(eng.counts[lang] @ hist, q)
    lo, hi = percentile_interval(reps, eng.level)
    if not (math.isfinite(value) and np.isfinite(lo) and np.isfinite(hi)):
        return Estimate.undefined("non-finite: no scored tokens", n, eng.level)
    finite = np.sort(reps[np.isfinite(reps)])
    return Estimate(value, float(lo), float(hi), n, eng.level,
                    distribution=BootDistribution("percentile", finite))


def _within(est: Estimate, low: float, high: float = math.inf) -> Estimate:
    """``est`` with its interval intersected with the parameter's range [low, high]: the true
    value always lies in it, so coverage is unchanged (studentized intervals of few texts can
    reach past a bound)."""
    if not est.defined:
        return est
    return dataclasses.replace(est, ci_low=min(max(est.ci_low, low), high), ci_high=max(min(est.ci_high, high), low))


def damage_estimates(scores: pd.DataFrame, eng: PairedScores, c: str, lang: str) -> dict[str, Estimate]:
    """The damage card of config ``c`` in ``lang``: :data:`DAMAGE_CARD_COLUMNS` as estimates
    (``top1_agree`` is one minus the flip rate, its interval mirrored), each interval within
    the measure's range (KL >= 0, agreement in [0, 1])."""
    flip = eng.metric_estimate(c, lang, "flip_rate")
    agree = (
        Estimate(1.0 - flip.value, 1.0 - flip.ci_high, 1.0 - flip.ci_low, flip.n, flip.level)
        if flip.defined else Estimate.undefined(flip.reason or "undefined", flip.n, flip.level, 1.0 - flip.value)
    )
    return {"kl_bpb": _within(eng.metric_estimate(c, lang, "kl_bpb"), 0.0), "top1_agree": _within(agree, 0.0, 1.0),
            "kl_p99": kl_quantile_estimate(scores, eng, c, lang)}


def _attrs(eng: PairedScores, seed: int) -> dict[str, Any]:
    return dict(
        baseline=eng.baseline, n_boot=eng.n_boot, seed=int(seed), level=float(eng.level),
        parallel=eng.parallel, interval_method=eng.method,
    )


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
    method: str = DEFAULT_METHOD,
) -> pd.DataFrame:
    """One row per (config != baseline, lang).

    Columns: config, lang, n_texts, n_tokens, n_bytes, ppl_fp, ppl_q, bpb_fp, bpb_q, then
    ppl_ratio, degradation, delta_nll, delta_bpb, delta_bits_per_paragraph each followed by
    ``_ci_low``/``_ci_high`` (paired bootstrap over texts; ``method`` "studentized" (default),
    "percentile" or "bca"; ppl_ratio and degradation carry delta_nll's interval through exp
    and expm1), ``collapsed`` (collapse rule of the module docstring) and ``note`` (empty, or
    why a row's values are NaN / to be read with care). ``delta_bits_per_paragraph`` is NaN
    unless every language has the same text ids (a parallel corpus). ``table.attrs`` records
    baseline, n_boot, seed, level, ``parallel`` (whether the same resample was used across
    languages) and ``interval_method``. When the scores carry the damage card (a sweep with
    ``MeasureConfig(damage=True)``), :data:`DAMAGE_CARD_COLUMNS` follow the change columns.
    """
    eng = PairedScores(scores, baseline, configs, langs, n_boot, seed, level, method)
    rows = []
    not_parallel = (
        None if eng.parallel else
        "delta_bits_per_paragraph: NaN, the languages do not share their text ids (not a parallel "
        "corpus), so paragraphs are not the same content; use delta_bpb"
    )
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
            notes = []
            nf = eng.nonfinite_reason([c], [lang])
            for k in CHANGE_COLUMNS:
                if k == "delta_bits_per_paragraph" and not eng.parallel:
                    row[k] = row[f"{k}_ci_low"] = row[f"{k}_ci_high"] = math.nan
                    continue
                est = eng.metric_estimate(c, lang, k) if not nf else Estimate.undefined(nf, eng.n_texts[lang], level)
                row[k], row[f"{k}_ci_low"], row[f"{k}_ci_high"] = est.value, est.ci_low, est.ci_high
                if not nf and not est.defined and est.reason:
                    tag = est.reason.split(":", 1)[0]
                    if not any(x.startswith(tag) for x in notes):
                        notes.append(est.reason)
            if eng.has_damage:
                for k, est in damage_estimates(scores, eng, c, lang).items():
                    row[k], row[f"{k}_ci_low"], row[f"{k}_ci_high"] = est.value, est.ci_low, est.ci_high
            row["collapsed"] = eng.collapsed_flag(c, lang, collapse_bpb, vocab_size, collapse_ppl)
            if nf:
                notes = [nf]
                for k in row:
                    if k not in ("config", "lang", "n_texts", "n_tokens", "n_bytes", "collapsed"):
                        row[k] = math.nan
            elif row["collapsed"]:
                notes.insert(0, eng.collapse_reason([c], [lang], collapse_bpb, vocab_size, collapse_ppl) or "")
            if not_parallel:
                notes.append(not_parallel)
            row["note"] = "; ".join(x for x in notes if x)
            rows.append(row)
    cols = ["config", "lang", "n_texts", "n_tokens", "n_bytes", "ppl_fp", "ppl_q", "bpb_fp", "bpb_q"]
    for k in CHANGE_COLUMNS + (DAMAGE_CARD_COLUMNS if eng.has_damage else ()):
        cols += [k, f"{k}_ci_low", f"{k}_ci_high"]
    cols += ["collapsed", "note"]
    out = pd.DataFrame(rows, columns=cols)
    out.attrs.update(_attrs(eng, seed))
    return out


def baseline_table(
    scores: pd.DataFrame,
    baseline: str = "fp",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    langs: Sequence[str] | None = None,
    method: str = DEFAULT_METHOD,
) -> pd.DataFrame:
    """One row per language of the baseline: n_texts, n_tokens, n_bytes, bytes_per_token,
    nll_per_token, ppl and bpb (each with a bootstrap ``_ci_low``/``_ci_high``, ``method`` as
    in :func:`language_table`; ppl's interval is that of nats per token through exp) and note."""
    eng = PairedScores(scores, baseline, [], langs, n_boot, seed, level, method)
    rows = []
    for lang in eng.langs:
        tot = eng.point[(eng.baseline, lang)]
        ptok, _ = eng.per_token_nll(eng.baseline, lang)
        nf = eng.nonfinite_reason([], [lang])
        ppl = eng.metric_estimate(eng.baseline, lang, "ppl_fp")
        bpb = eng.metric_estimate(eng.baseline, lang, "bpb_fp")
        notes = [nf] if nf else [e.reason for e in (ppl, bpb) if not e.defined and e.reason]
        rows.append(
            {
                "lang": lang,
                "n_texts": eng.n_texts[lang],
                "n_tokens": int(round(tot[1])),
                "n_bytes": int(round(tot[2])),
                "bytes_per_token": tot[2] / tot[1],
                "nll_per_token": ptok,
                "ppl": eng.ppl(eng.baseline, lang)[0],
                "ppl_ci_low": ppl.ci_low,
                "ppl_ci_high": ppl.ci_high,
                "bpb": eng.bpb(eng.baseline, lang)[0],
                "bpb_ci_low": bpb.ci_low,
                "bpb_ci_high": bpb.ci_high,
                "note": "; ".join(dict.fromkeys(notes)),
            }
        )
    out = pd.DataFrame(rows)
    out.attrs.update(_attrs(eng, seed))
    return out


def _group_setup(scores, configs, baseline, lr_langs, hr_langs, n_boot, seed, level,
                 allow_collapsed, collapse_bpb, vocab_size, collapse_ppl, metric, method):
    """The paired engine over the LR and HR languages: ``(engine, lr, hr, n, why)``, where ``n``
    is the smallest number of texts of a language and ``why`` the reason the estimate is
    undefined (None when it is defined). ConfigError when ``metric`` needs a parallel corpus
    and the languages do not share their text ids."""
    df = validate_scores(scores)
    present = list(dict.fromkeys(df.loc[df["config"] == str(baseline), "lang"]))
    lr, hr = resolve_groups(present, lr_langs, hr_langs)
    eng = PairedScores(df, baseline, list(configs), lr + hr, n_boot, seed, level, method)
    if metric == "delta_bits_per_paragraph":
        eng.require_parallel(metric, lr + hr)
    why = eng.undefined_reason(configs, lr + hr, allow_collapsed, collapse_bpb, vocab_size, collapse_ppl)
    return eng, lr, hr, eng.n_min(lr + hr), why


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
    lr, hr = resolve_groups(present, lr_langs, hr_langs)
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
    method: str = DEFAULT_METHOD,
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
    check_metric(metric)
    check_interval_method(method)
    eng, lr, hr, n, why = _group_setup(scores, [config], baseline, lr_langs, hr_langs, n_boot, seed, level,
                                       allow_collapsed, collapse_bpb, vocab_size, collapse_ppl, metric, method)
    if why:
        return Estimate.undefined(why, n, level)
    return eng.disparity(config, lr, hr, metric, "ratio", tol)[0]


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
    method: str = DEFAULT_METHOD,
) -> Estimate:
    """Additive disparity: mean LR ``metric`` minus mean HR ``metric`` with a paired CI.

    Stays defined when the HR change is ~0 (where the ratio is not); undefined only for
    non-finite inputs or a collapsed model.
    """
    check_metric(metric)
    check_interval_method(method)
    eng, lr, hr, n, why = _group_setup(scores, [config], baseline, lr_langs, hr_langs, n_boot, seed, level,
                                       allow_collapsed, collapse_bpb, vocab_size, collapse_ppl, metric, method)
    if why:
        return Estimate.undefined(why, n, level)
    return _config_disparity(eng, config, lr, hr, metric, "difference", n, level)[0]


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
    method: str = DEFAULT_METHOD,
) -> dict[str, Estimate]:
    """The seed protocol's per-language disparity ``metric(lang) / metric(reference)``.

    Returns ``{lang: Estimate}`` for every language except the reference (default: all
    baseline languages). Each ratio follows the undefined rules of the module docstring with
    the reference language's change as denominator.
    """
    check_metric(metric)
    check_interval_method(method)
    df = validate_scores(scores)
    present = list(dict.fromkeys(df.loc[df["config"] == str(baseline), "lang"]))
    if reference not in present:
        raise ConfigError(f"reference language {reference!r} not in the scores (languages: {present})")
    others = [x for x in (present if langs is None else [str(v) for v in langs]) if x != reference]
    if not others:
        raise ConfigError("disparity_vs_reference needs at least one language besides the reference")
    eng = PairedScores(df, baseline, [config], [reference, *others], n_boot, seed, level, method)
    if metric == "delta_bits_per_paragraph":
        eng.require_parallel(metric, [reference, *others])
    den = eng.stat(config, reference, metric)
    out: dict[str, Estimate] = {}
    for lang in others:
        n = eng.n_min([lang, reference])
        why = eng.undefined_reason([config], [lang, reference], allow_collapsed, collapse_bpb, vocab_size, collapse_ppl)
        if why:
            out[lang] = Estimate.undefined(why, n, level)
            continue
        out[lang] = stat_ratio_estimate(
            eng.stat(config, lang, metric), den, n, level, tol,
            den_name=f"{metric} of {reference}",
            alternative="the per-language deltas (language_table)",
            method=method,
        )
    return out


def _config_disparity(eng, c, lr, hr, metric, measure, n, level, tol=1e-9) -> tuple[Estimate, BootStat]:
    """Disparity of one config (:meth:`PairedScores.disparity`): (estimate, statistic)."""
    return eng.disparity(c, lr, hr, metric, measure, tol)


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
    method: str = DEFAULT_METHOD,
) -> Estimate:
    """A linear combination ``sum_c w_c * D(c)`` of disparities, with a paired bootstrap CI.

    Seed 000's synergy test is ``{"first": 1, "last": 1, "all": -1, "gateway": -1}``: the
    additive expectation ``D(first) + D(last) - D(all)`` minus the observed ``D(gateway)``;
    a positive value means protecting both layers beats the sum of their separate effects.
    Undefined (with the reason passed on) when any disparity involved is undefined; with an
    "unbounded CI" the contrast's point estimate is kept as ``value``.
    """
    check_metric(metric)
    check_interval_method(method)
    if measure not in ("ratio", "difference"):
        raise ConfigError(f"measure must be 'ratio' or 'difference', got {measure!r}")
    if not weights:
        raise ConfigError("disparity_contrast needs at least one {config: weight}")
    configs = [str(c) for c in weights]
    eng, lr, hr, n, why = _group_setup(scores, configs, baseline, lr_langs, hr_langs, n_boot, seed, level,
                                       allow_collapsed, collapse_bpb, vocab_size, collapse_ppl, metric, method)
    if why:
        return Estimate.undefined(why, n, level)
    total, undefined = None, None
    for c, w in weights.items():
        est, stat = _config_disparity(eng, str(c), lr, hr, metric, measure, n, level, tol)
        if not est.defined and undefined is None:
            undefined = (c, est)
        total = stat * float(w) if total is None else total.lincomb(stat, 1.0, float(w))
    if undefined is not None:
        c, est = undefined
        tag = est.reason.split(":", 1)[0]
        # an unbounded disparity CI leaves the contrast's point estimate observable
        value = total.point if tag == "unbounded CI" and math.isfinite(total.point) else math.nan
        return Estimate.undefined(f"{tag}: disparity of {c!r} is undefined ({est.reason})", n, level, value=value)
    return eng.estimate(total, n)


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
    method: str = DEFAULT_METHOD,
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
    check_metric(metric)
    check_interval_method(method)
    if measure not in ("ratio", "difference"):
        raise ConfigError(f"measure must be 'ratio' or 'difference', got {measure!r}")
    if str(before) == str(after):
        raise ConfigError(f"before and after are the same config {before!r}; compare two configs")
    eng, lr, hr, n, why = _group_setup(scores, [before, after], baseline, lr_langs, hr_langs, n_boot, seed, level,
                                       allow_collapsed, collapse_bpb, vocab_size, collapse_ppl, metric, method)
    if why:
        return Estimate.undefined(why, n, level)

    eb, sb = _config_disparity(eng, before, lr, hr, metric, measure, n, level, tol)
    ea, sa = _config_disparity(eng, after, lr, hr, metric, measure, n, level, tol)
    pb, pa = sb.point, sa.point
    for name, e in ((before, eb), (after, ea)):
        if not e.defined and not math.isfinite(e.value):
            return Estimate.undefined(f"{e.reason.split(':', 1)[0]}: disparity of {name!r} is undefined ({e.reason})", n, level)
    point = 100.0 * (pb - pa) / pb if pb > tol else math.nan
    for name, e in ((before, eb), (after, ea)):
        if not e.defined:
            return Estimate.undefined(
                f"unbounded CI: disparity of {name!r} has no finite CI ({e.reason})", n, level, value=point
            )
    return stat_ratio_estimate(
        sb - sa, sb, n, level, tol,
        den_name=f"disparity of {before!r}",
        alternative="disparity_difference for each config",
        method=method,
        scale=100.0,
    )


def _chosen_languages(df: pd.DataFrame, baseline: str, langs: Iterable[str] | None) -> list[str]:
    """``langs`` (default: every language of the baseline), each checked to be in the scores."""
    present = list(dict.fromkeys(df.loc[df["config"] == str(baseline), "lang"]))
    chosen = present if langs is None else [str(v) for v in langs]
    missing = [x for x in chosen if x not in present]
    if missing:
        raise ConfigError(f"languages {missing} are not in the scores (languages: {present})")
    return chosen


def config_contrast(
    scores: pd.DataFrame,
    terms: Mapping[tuple[str, str], float],
    baseline: str = "fp",
    metric: str = "delta_bpb",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    collapse_bpb: float = 8.0,
    vocab_size: int | None = None,
    collapse_ppl: float | None = None,
    allow_collapsed: bool = False,
    method: str = DEFAULT_METHOD,
) -> Estimate:
    """A weighted sum ``sum w * metric(config, lang)`` over ``terms`` ``{(config, lang): w}``, paired
    over texts (one resample for every configuration and, on a parallel corpus, every language),
    e.g. the mean over languages of "calibrated on the language minus calibrated on English".
    ``n``: the fewest texts of a language involved. Undefined for non-finite scores or, unless
    ``allow_collapsed``, a collapsed model (the collapse rule of :mod:`qhelpers.stats.scores`)."""
    check_metric(metric)
    check_interval_method(method)
    if not terms:
        raise ConfigError("a contrast needs at least one (config, lang) term")
    df = validate_scores(scores)
    configs = list(dict.fromkeys(str(c) for c, _ in terms))
    langs = _chosen_languages(df, baseline, dict.fromkeys(str(lang) for _, lang in terms))
    eng = PairedScores(df, baseline, configs, langs, n_boot, seed, level, method)
    if metric == "delta_bits_per_paragraph":
        eng.require_parallel(metric, langs)
    n = eng.n_min(langs)
    why = eng.undefined_reason(configs, langs, allow_collapsed, collapse_bpb, vocab_size, collapse_ppl)
    if why:
        return Estimate.undefined(why, n, level)
    total: BootStat | None = None
    for (c, lang), w in terms.items():
        term = eng.stat(str(c), str(lang), metric) * float(w)
        total = term if total is None else total + term
    return eng.estimate(total, n)


def language_differences(
    scores: pd.DataFrame,
    config: str,
    reference: str,
    baseline: str = "fp",
    langs: Iterable[str] | None = None,
    metric: str = "delta_bpb",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    allow_collapsed: bool = False,
    method: str = DEFAULT_METHOD,
) -> dict[str, Estimate]:
    """Per language, ``metric(config) - metric(reference)`` (:func:`config_contrast` of one
    language): how much more (or less) one configuration changes the model than another on the
    same texts, e.g. target-language against English calibration."""
    chosen = _chosen_languages(validate_scores(scores), baseline, langs)
    return {lang: config_contrast(scores, {(config, lang): 1.0, (reference, lang): -1.0}, baseline, metric, n_boot,
                                  seed, level, allow_collapsed=allow_collapsed, method=method)
            for lang in chosen}


def ranking_concordance(
    scores: pd.DataFrame,
    configs: Sequence[str],
    baseline: str = "fp",
    langs: Iterable[str] | None = None,
    metric: str = "delta_bpb",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Estimate:
    """Do the languages rank ``configs`` alike by ``metric``? Kendall's W
    (:func:`~qhelpers.stats.correlation.kendalls_w`) with the languages as raters, and a
    percentile interval from the paired text resamples (every configuration ranked on the
    same resample of each language's texts; W is a rank statistic, not a smooth function of
    sums, so no studentized interval). ``n`` is the smallest number of texts of a language. A
    configuration that collapses a language (bits per byte above 8) is ranked like any other."""
    check_metric(metric)
    configs = [str(c) for c in configs]
    if len(configs) < 2:
        raise ConfigError(f"ranking concordance needs at least 2 configurations, got {configs}")
    df = validate_scores(scores)
    chosen = _chosen_languages(df, baseline, langs)
    if len(chosen) < 2:
        raise ConfigError(f"ranking concordance needs at least 2 languages (raters), got {chosen}")
    eng = PairedScores(df, baseline, configs, chosen, n_boot, seed, level, "percentile")
    n = eng.n_min(chosen)
    # no collapse rule: a configuration that destroys a language still has its place in the ranking (last)
    why = eng.nonfinite_reason(configs, chosen)
    if why:
        return Estimate.undefined(why, n, level)
    point = np.empty((len(chosen), len(configs)))
    reps = np.empty((n_boot, len(chosen), len(configs)))
    for i, lang in enumerate(chosen):
        for j, c in enumerate(configs):
            point[i, j], reps[:, i, j] = eng.quantity(c, lang, metric)
    value = float(kendalls_w(point))
    boot = kendalls_w(reps)
    boot = boot[np.isfinite(boot)]
    if not math.isfinite(value) or boot.size < 0.9 * n_boot:
        return Estimate.undefined("every language ties every configuration: no ranking to compare", n, level)
    lo, hi = percentile_interval(boot, level)
    return Estimate(value, float(lo), float(hi), n, level)

"""Per-language tables, disparities, reductions and contrasts of a per-text scores table,
each with a paired bootstrap interval (definitions in :mod:`qhelpers.stats`)."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from qhelpers.util.errors import ConfigError
from qhelpers.stats.bootstrap import Estimate, diff_estimate, percentile_interval, ratio_estimate
from qhelpers.stats.scores import PairedScores, check_metric, resolve_groups, validate_scores


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
    eng = PairedScores(scores, baseline, configs, langs, n_boot, seed, level)
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
    eng = PairedScores(scores, baseline, [], langs, n_boot, seed, level)
    rows = []
    for lang in eng.langs:
        tot = eng.point[(eng.baseline, lang)]
        ptok, _ = eng.per_token_nll(eng.baseline, lang)
        pbpb, bbpb = eng.bpb(eng.baseline, lang)
        ppl, bppl = eng.ppl(eng.baseline, lang)
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


def _group_setup(scores, configs, baseline, lr_langs, hr_langs, n_boot, seed, level,
                 allow_collapsed, collapse_bpb, vocab_size, collapse_ppl):
    """The paired engine over the LR and HR languages: ``(engine, lr, hr, n, why)``, where ``n``
    is the smallest number of texts of a language and ``why`` the reason the estimate is
    undefined (None when it is defined)."""
    df = validate_scores(scores)
    present = list(dict.fromkeys(df.loc[df["config"] == str(baseline), "lang"]))
    lr, hr = resolve_groups(present, lr_langs, hr_langs)
    eng = PairedScores(df, baseline, list(configs), lr + hr, n_boot, seed, level)
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
    eng, lr, hr, n, why = _group_setup(scores, [config], baseline, lr_langs, hr_langs, n_boot, seed, level,
                                       allow_collapsed, collapse_bpb, vocab_size, collapse_ppl)
    if why:
        return Estimate.undefined(why, n, level)
    num_p, num_b = eng.group_mean(config, lr, metric)
    den_p, den_b = eng.group_mean(config, hr, metric)
    return ratio_estimate(
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
    check_metric(metric)
    eng, lr, hr, n, why = _group_setup(scores, [config], baseline, lr_langs, hr_langs, n_boot, seed, level,
                                       allow_collapsed, collapse_bpb, vocab_size, collapse_ppl)
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
) -> dict[str, Estimate]:
    """The seed protocol's per-language disparity ``metric(lang) / metric(reference)``.

    Returns ``{lang: Estimate}`` for every language except the reference (default: all
    baseline languages). Each ratio follows the undefined rules of the module docstring with
    the reference language's change as denominator.
    """
    check_metric(metric)
    df = validate_scores(scores)
    present = list(dict.fromkeys(df.loc[df["config"] == str(baseline), "lang"]))
    if reference not in present:
        raise ConfigError(f"reference language {reference!r} not in the scores (languages: {present})")
    others = [x for x in (present if langs is None else [str(v) for v in langs]) if x != reference]
    if not others:
        raise ConfigError("disparity_vs_reference needs at least one language besides the reference")
    eng = PairedScores(df, baseline, [config], [reference, *others], n_boot, seed, level)
    den_p, den_b = eng.quantity(config, reference, metric)
    out: dict[str, Estimate] = {}
    for lang in others:
        n = eng.n_min([lang, reference])
        why = eng.undefined_reason([config], [lang, reference], allow_collapsed, collapse_bpb, vocab_size, collapse_ppl)
        if why:
            out[lang] = Estimate.undefined(why, n, level)
            continue
        num_p, num_b = eng.quantity(config, lang, metric)
        out[lang] = ratio_estimate(
            num_p, num_b, den_p, den_b, n, level, tol,
            den_name=f"{metric} of {reference}",
            alternative="the per-language deltas (language_table)",
        )
    return out


def _config_disparity(eng, c, lr, hr, metric, measure, n, level, tol=1e-9) -> tuple[Estimate, float, np.ndarray]:
    """Disparity of one config: (estimate, point value, bootstrap replicates); ``tol`` is the
    ratio's denominator threshold."""
    lp, lb = eng.group_mean(c, lr, metric)
    hp, hb = eng.group_mean(c, hr, metric)
    if measure == "difference":
        return diff_estimate(lp - hp, lb - hb, n, level), lp - hp, lb - hb
    est = ratio_estimate(lp, lb, hp, hb, n, level, tol, f"mean HR {metric} under {c!r}", "measure='difference'")
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
    check_metric(metric)
    if measure not in ("ratio", "difference"):
        raise ConfigError(f"measure must be 'ratio' or 'difference', got {measure!r}")
    if not weights:
        raise ConfigError("disparity_contrast needs at least one {config: weight}")
    configs = [str(c) for c in weights]
    eng, lr, hr, n, why = _group_setup(scores, configs, baseline, lr_langs, hr_langs, n_boot, seed, level,
                                       allow_collapsed, collapse_bpb, vocab_size, collapse_ppl)
    if why:
        return Estimate.undefined(why, n, level)
    point, reps = 0.0, 0.0
    for c, w in weights.items():
        est, p, b = _config_disparity(eng, str(c), lr, hr, metric, measure, n, level, tol)
        if not est.defined:
            return Estimate.undefined(f"{est.reason.split(':', 1)[0]}: disparity of {c!r} is undefined ({est.reason})", n, level)
        point, reps = point + w * p, reps + w * b
    return diff_estimate(point, reps, n, level)


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
    check_metric(metric)
    if measure not in ("ratio", "difference"):
        raise ConfigError(f"measure must be 'ratio' or 'difference', got {measure!r}")
    if str(before) == str(after):
        raise ConfigError(f"before and after are the same config {before!r}; compare two configs")
    eng, lr, hr, n, why = _group_setup(scores, [before, after], baseline, lr_langs, hr_langs, n_boot, seed, level,
                                       allow_collapsed, collapse_bpb, vocab_size, collapse_ppl)
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
    return ratio_estimate(
        pb - pa, bb - ba, pb, bb, n, level, tol,
        den_name=f"disparity of {before!r}",
        alternative="disparity_difference for each config",
        scale=100.0,
    )

"""The per-text scores table and its paired bootstrap: validation, language groups, and
:class:`PairedScores`, which every table, disparity and contrast is computed from."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from qhelpers.util.errors import ConfigError, MeasurementError
from qhelpers.stats.bootstrap import (
    DEFAULT_METHOD,
    BootStat,
    Estimate,
    check_boot,
    check_interval_method,
    check_level,
    language_counts,
    stat_estimate,
    stat_ratio_estimate,
    transformed,
)
from qhelpers.stats.quantities import bits_per_byte, nats_to_bits, perplexity

#: Default high-resource and low-resource language groups of the project.
HR_LANGS: tuple[str, ...] = ("en", "de", "fr", "zh")
LR_LANGS: tuple[str, ...] = ("he", "sw", "ar")

#: Per-language change metrics a disparity can be built from.
METRICS: tuple[str, ...] = (
    "degradation", "delta_nll", "delta_bpb", "ppl_ratio", "delta_bits_per_paragraph", "kl_bpb", "flip_rate",
)

#: The unit group of a parallel corpus's shared resample (see :class:`BootStat`).
SHARED_UNIT = "parallel texts"


_REQUIRED = ("config", "lang", "text_id", "nll", "n_tokens", "n_bytes")
#: The damage card's per-text columns (written by a sweep with ``MeasureConfig(damage=True)``):
#: summed KL to the full model (nats) and the share of tokens whose top-1 prediction agrees.
DAMAGE_COLUMNS: tuple[str, ...] = ("kl_nats", "top1_agree")
#: Damage-card metrics (need :data:`DAMAGE_COLUMNS`): KL to the full model in bits per byte,
#: and the share of tokens whose top-1 prediction flips.
DAMAGE_METRICS: tuple[str, ...] = ("kl_bpb", "flip_rate")


def validate_scores(scores: pd.DataFrame) -> pd.DataFrame:
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
    damage = [c for c in DAMAGE_COLUMNS if c in scores.columns]
    df = scores.loc[:, list(_REQUIRED) + (damage if len(damage) == len(DAMAGE_COLUMNS) else [])].copy()
    for c in ("config", "lang", "text_id"):
        df[c] = df[c].astype(str)
    for c in ("nll", "n_tokens", "n_bytes", *(c for c in DAMAGE_COLUMNS if c in df.columns)):
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


def resolve_groups(
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


class PairedScores:
    """Per-text nll, tokens and bytes per (config, lang) with paired bootstrap counts, and the
    statistics every table, disparity and contrast is computed from.

    Resampling (module docstring of :mod:`qhelpers.stats`): one matrix of resample counts per
    language, shared by the baseline and every config (paired), and shared by every language
    when all have the same text ids (``parallel``). :meth:`stat` and :meth:`group_stat` give
    a :class:`~qhelpers.stats.bootstrap.BootStat` (point, replicates and influence values);
    :meth:`estimate` turns one into an :class:`Estimate` with the ``method`` interval.
    ``quantity`` and ``group_mean`` give (point, replicates) only.
    """

    def __init__(
        self,
        scores: pd.DataFrame,
        baseline: str,
        configs: Sequence[str] | None,
        langs: Sequence[str] | None,
        n_boot: int,
        seed: int,
        level: float,
        method: str = DEFAULT_METHOD,
    ) -> None:
        check_boot(n_boot)
        check_level(level)
        check_interval_method(method)
        df = validate_scores(scores)
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
        self.method = str(method)
        order = [baseline] + self.configs
        self.col = {c: i for i, c in enumerate(order)}

        # One positional index array per (lang, config), rows sorted by text id.
        index = df.groupby(["lang", "config"], sort=False).indices
        text_ids = df["text_id"].to_numpy(dtype=object)
        #: whether the scores carry the damage card (KL to the full model, top-1 agreement)
        self.has_damage = all(c in df.columns for c in DAMAGE_COLUMNS)
        table = df[["nll", "n_tokens", "n_bytes"]].to_numpy(dtype=np.float64)
        if self.has_damage:  # columns 3, 4: summed KL (nats) and the number of flipped top-1 tokens
            flips = (1.0 - df["top1_agree"].to_numpy(dtype=np.float64)) * table[:, 1]
            table = np.column_stack([table, df["kl_nats"].to_numpy(dtype=np.float64), flips])
        rows: dict[tuple[str, str], np.ndarray] = {}
        ids: dict[str, np.ndarray] = {}
        for lang in self.langs:
            pos = index[(lang, baseline)]
            pos = pos[np.argsort(text_ids[pos], kind="stable")]
            rows[(lang, baseline)] = pos
            base_ids = text_ids[pos]
            for c in self.configs:
                other = index.get((lang, c))
                if other is None:
                    raise MeasurementError(
                        f"config {c!r} has no rows for language {lang!r}; measure it or pass langs= without it"
                    )
                other = other[np.argsort(text_ids[other], kind="stable")]
                if not np.array_equal(text_ids[other], base_ids):
                    id_set, o_set = set(base_ids), set(text_ids[other])
                    only_b = sorted(id_set - o_set)[:5]
                    only_q = sorted(o_set - id_set)[:5]
                    raise MeasurementError(
                        f"paired bootstrap needs the same texts in baseline {baseline!r} and {c!r} for "
                        f"{lang!r}: only in baseline {only_b}, only in {c!r} {only_q}; measure the "
                        "missing texts or filter both to the common text_ids"
                    )
                rows[(lang, c)] = other
            ids[lang] = base_ids
        #: positions in the validated scores of each (lang, config)'s texts, sorted by text id
        self.rows = rows
        first = ids[self.langs[0]]
        self.parallel = all(np.array_equal(ids[lang], first) for lang in self.langs)
        self.text_ids = {lang: [str(t) for t in ids[lang]] for lang in self.langs}
        self.n_texts = {lang: len(ids[lang]) for lang in self.langs}

        self.counts = language_counts(self.n_texts, self.n_boot, seed, self.parallel)
        #: the unit group of each language's resample (one shared group on a parallel corpus)
        self.unit = {lang: (SHARED_UNIT if self.parallel else lang) for lang in self.langs}
        self.values: dict[tuple[str, str], np.ndarray] = {}  # (cfg, lang) -> (n, 3), non-finite nll -> 0
        self.point: dict[tuple[str, str], np.ndarray] = {}  # (cfg, lang) -> [nll, tok, byt]
        self.boot: dict[tuple[str, str], np.ndarray] = {}  # (cfg, lang) -> (n_boot, 3)
        self.nonfinite: dict[tuple[str, str], list[str]] = {}
        self.cache: dict[tuple[str, str, str], BootStat] = {}
        self.estimates: dict[tuple[str, str, str, str], Estimate] = {}
        for lang in self.langs:
            counts = self.counts[lang]
            for c in order:
                vals = table[rows[(lang, c)]]
                bad = ~np.isfinite(vals[:, 0])
                if bad.any():
                    self.nonfinite[(c, lang)] = [t for t, b in zip(self.text_ids[lang], bad) if b]
                    vals[bad, 0] = 0.0
                tot = vals.sum(axis=0)
                if tot[1] <= 0 or tot[2] <= 0:
                    raise MeasurementError(
                        f"config {c!r}, language {lang!r}: total n_tokens={tot[1]:g}, n_bytes={tot[2]:g}; "
                        "a language needs scored tokens and bytes (check the measurement's truncation)"
                    )
                self.values[(c, lang)] = vals
                if bad.any():
                    tot[0] = math.nan
                self.point[(c, lang)] = tot
                self.boot[(c, lang)] = counts @ vals
                if bad.any():
                    self.boot[(c, lang)][:, 0] = np.nan

    # -- per-language statistics (BootStat) ----------------------------------------------------

    def _ratio(self, kind: str, c: str, lang: str) -> BootStat:
        """Cached per-(config, lang) ratio of sums: "ptok" (nats per token), "bpb", or "dbpp"
        (mean over texts of the bits added by ``c`` over the baseline)."""
        key = (kind, c, lang)
        if key in self.cache:
            return self.cache[key]
        v, b, p = self.values[(c, lang)], self.boot[(c, lang)], self.point[(c, lang)]
        counts, unit = self.counts[lang], self.unit[lang]
        bad = (c, lang) in self.nonfinite
        if kind == "ptok":
            s = BootStat.ratio_of_sums(v[:, 0], v[:, 1], counts, unit, 1.0, lambda y, x: y / x,
                                       (b[:, 0], b[:, 1]), (p[0], p[1]))
        elif kind == "bpb":
            s = BootStat.ratio_of_sums(v[:, 0], v[:, 2], counts, unit, nats_to_bits(1.0), bits_per_byte,
                                       (b[:, 0], b[:, 2]), (p[0], p[2]))
        elif kind == "dbpp":
            f, fb, fp = self.values[(self.baseline, lang)], self.boot[(self.baseline, lang)], self.point[(self.baseline, lang)]
            bad = bad or (self.baseline, lang) in self.nonfinite
            s = BootStat.ratio_of_sums(
                v[:, 0] - f[:, 0], np.ones(len(v)), counts, unit, nats_to_bits(1.0),
                lambda y, x: nats_to_bits(y) / x, (b[:, 0] - fb[:, 0], np.full(self.n_boot, float(len(v)))),
                (p[0] - fp[0], float(len(v))),
            )
        elif kind == "klbpb":
            s = BootStat.ratio_of_sums(v[:, 3], v[:, 2], counts, unit, nats_to_bits(1.0), bits_per_byte,
                                       (b[:, 3], b[:, 2]), (p[3], p[2]))
        elif kind == "flip":
            s = BootStat.ratio_of_sums(v[:, 4], v[:, 1], counts, unit, 1.0, lambda y, x: y / x,
                                       (b[:, 4], b[:, 1]), (p[4], p[1]))
        else:  # pragma: no cover - internal
            raise ConfigError(f"unknown ratio kind {kind!r}")
        if bad:
            s.point, s.reps = math.nan, np.full(self.n_boot, np.nan)
        self.cache[key] = s
        return s

    def stat(self, c: str, lang: str, name: str) -> BootStat:
        """``name`` of config ``c`` in ``lang`` as a :class:`BootStat`: one of :data:`METRICS`
        (change from the baseline) or ``ppl_fp``, ``ppl_q``, ``bpb_fp``, ``bpb_q``."""
        base = self.baseline
        if name in ("ppl_fp", "ppl_q"):
            s = self._ratio("ptok", base if name == "ppl_fp" else c, lang)
            with np.errstate(all="ignore"):
                p = perplexity(s.point, 1.0) if math.isfinite(s.point) else math.nan
                b = perplexity(s.reps, 1.0)
                return s.mapped(p, b, p, b)
        if name == "bpb_fp":
            return self._ratio("bpb", base, lang)
        if name == "bpb_q":
            return self._ratio("bpb", c, lang)
        if name in ("delta_nll", "degradation", "ppl_ratio"):
            d = self._ratio("ptok", c, lang) - self._ratio("ptok", base, lang)
            if name == "delta_nll":
                return d
            with np.errstate(all="ignore"):
                ep = math.exp(d.point) if math.isfinite(d.point) else math.nan
                eb = np.exp(d.reps)
                if name == "degradation":
                    return d.mapped(math.expm1(d.point) if math.isfinite(d.point) else math.nan, np.expm1(d.reps), ep, eb)
                return d.mapped(ep, eb, ep, eb)
        if name == "delta_bpb":
            return self._ratio("bpb", c, lang) - self._ratio("bpb", base, lang)
        if name == "delta_bits_per_paragraph":
            self.require_parallel(name, [lang])
            return self._ratio("dbpp", c, lang)
        if name in DAMAGE_METRICS:
            self.require_damage(name)
            return self._ratio("klbpb" if name == "kl_bpb" else "flip", c, lang)
        raise ConfigError(f"unknown metric {name!r}; use one of {list(METRICS)}")

    def group_stat(self, c: str, langs: Sequence[str], metric: str) -> BootStat:
        """The mean of ``metric`` over ``langs`` under config ``c`` (a :class:`BootStat`)."""
        if metric == "delta_bits_per_paragraph":
            self.require_parallel(metric, langs)
        return BootStat.mean([self.stat(c, lang, metric) for lang in langs])

    def disparity(
        self, c: str, lr: Sequence[str], hr: Sequence[str], metric: str, measure: str = "ratio", tol: float = 1e-9
    ) -> tuple[Estimate, BootStat]:
        """The disparity of config ``c`` between the ``lr`` and ``hr`` languages: ``measure``
        "ratio" (mean LR ``metric`` / mean HR ``metric``, with the undefined-ratio rules) or
        "difference" (mean LR - mean HR). Returns (estimate, statistic); n is the smallest
        number of texts of a language involved. Non-finite and collapsed scores are the
        caller's to check (:meth:`undefined_reason`)."""
        if measure not in ("ratio", "difference"):
            raise ConfigError(f"measure must be 'ratio' or 'difference', got {measure!r}")
        n = self.n_min([*lr, *hr])
        lp, hp = self.group_stat(c, lr, metric), self.group_stat(c, hr, metric)
        if measure == "difference":
            stat = lp - hp
            return self.estimate(stat, n), stat
        est = stat_ratio_estimate(
            lp, hp, n, self.level, tol, f"mean HR {metric} under {c!r} ({', '.join(hr)})",
            "measure='difference' (disparity_difference)", self.method,
        )
        return est, lp.ratio(hp)

    def estimate(self, stat: BootStat, n: int, transform: str = "identity") -> Estimate:
        """:func:`~qhelpers.stats.bootstrap.stat_estimate` with this engine's level and method."""
        return stat_estimate(stat, n, self.level, self.method, transform)

    def metric_estimate(self, c: str, lang: str, name: str) -> Estimate:
        """The interval of one language's ``name`` (a metric or ppl/bpb of c or the baseline).

        ``ppl_ratio``, ``degradation`` and ``ppl_*`` are monotone maps (exp, expm1) of a
        difference or ratio of nats per token: their interval is that statistic's interval
        carried through the map (so all three agree with ``delta_nll``'s), not one computed
        on the skewed scale."""
        if name in ("ppl_ratio", "degradation"):
            return transformed(self._working_estimate(c, lang, "delta_nll"), "exp" if name == "ppl_ratio" else "expm1")
        if name in ("ppl_fp", "ppl_q"):
            return transformed(self._working_estimate(self.baseline if name == "ppl_fp" else c, lang, "ptok"), "exp")
        return self._working_estimate(c, lang, name)

    def _working_estimate(self, c: str, lang: str, name: str) -> Estimate:
        key = ("estimate", c, lang, name)
        if key not in self.estimates:
            stat = self._ratio("ptok", c, lang) if name == "ptok" else self.stat(c, lang, name)
            self.estimates[key] = self.estimate(stat, self.n_texts[lang])
        return self.estimates[key]

    def require_damage(self, metric: str) -> None:
        """ConfigError unless the scores carry the damage card's columns."""
        if not self.has_damage:
            raise ConfigError(
                f"metric {metric!r} needs the damage card's columns {list(DAMAGE_COLUMNS)} in the scores; "
                "run the sweep with MeasureConfig(damage=True) (the default)"
            )

    def require_parallel(self, metric: str, langs: Sequence[str]) -> None:
        """ConfigError unless ``langs`` share their text ids (``metric`` needs the same content
        in every language)."""
        first = self.text_ids[langs[0]]
        other = [lang for lang in langs if self.text_ids[lang] != first]
        if other:
            raise ConfigError(
                f"metric {metric!r} needs a parallel corpus (the same text ids in every language), but "
                f"{other} do not have the text ids of {langs[0]!r}; use metric='delta_bpb' (bits per byte "
                "are comparable without aligned texts) or restrict the scores to aligned texts"
            )

    # -- (point, replicates) ---------------------------------------------------------------------

    def per_token_nll(self, c: str, lang: str) -> tuple[float, np.ndarray]:
        """Nats per token of config ``c`` in ``lang``: (point, bootstrap replicates)."""
        s = self._ratio("ptok", c, lang)
        return s.point, s.reps

    def bpb(self, c: str, lang: str) -> tuple[float, np.ndarray]:
        """Bits per byte of config ``c`` in ``lang``: (point, bootstrap replicates)."""
        s = self._ratio("bpb", c, lang)
        return s.point, s.reps

    def ppl(self, c: str, lang: str) -> tuple[float, np.ndarray]:
        """Perplexity of config ``c`` in ``lang``: (point, bootstrap replicates)."""
        p, b = self.point[(c, lang)], self.boot[(c, lang)]
        with np.errstate(all="ignore"):
            return perplexity(p[0], p[1]), perplexity(b[:, 0], b[:, 1])

    def quantity(self, c: str, lang: str, name: str) -> tuple[float, np.ndarray]:
        """(point, replicates) of :meth:`stat`."""
        if name in ("ppl_fp", "ppl_q"):
            return self.ppl(self.baseline if name == "ppl_fp" else c, lang)
        s = self.stat(c, lang, name)
        return s.point, s.reps

    def group_mean(self, c: str, langs: Sequence[str], metric: str) -> tuple[float, np.ndarray]:
        """(point, replicates) of :meth:`group_stat`; for intervals that keep their coverage use
        ``estimate(group_stat(...), n)`` instead of a percentile interval of these."""
        s = self.group_stat(c, langs, metric)
        return s.point, s.reps

    # -- undefined cases ---------------------------------------------------------------------------

    def _flagged(self, configs: Sequence[str], langs: Sequence[str], why: Callable[[str, str], str | None]) -> list[str]:
        """``"config/lang why"`` for every (config, lang), the baseline included, that ``why`` flags."""
        parts = []
        for c in dict.fromkeys([self.baseline, *configs]):
            for lang in langs:
                reason = why(c, lang)
                if reason:
                    parts.append(f"{c}/{lang} {reason}")
        return parts

    def _nonfinite_texts(self, c: str, lang: str) -> str | None:
        bad = self.nonfinite.get((c, lang))
        return f"texts {bad[:3]}{'...' if len(bad) > 3 else ''}" if bad else None

    def nonfinite_reason(self, configs: Sequence[str], langs: Sequence[str]) -> str | None:
        """``"non-finite: ..."`` when an nll of the baseline or ``configs`` in ``langs`` is NaN/inf."""
        parts = self._flagged(configs, langs, self._nonfinite_texts)
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
        """``"collapsed: ..."`` when the baseline or a config is collapsed in one of ``langs``
        (the collapse rule of :mod:`qhelpers.stats`)."""
        parts = self._flagged(configs, langs, lambda c, lang: self._collapsed(c, lang, collapse_bpb, vocab_size, collapse_ppl))
        if not parts:
            return None
        return (
            "collapsed: " + "; ".join(parts)
            + " (the model is destroyed, so a ratio of degradations measures nothing; "
            "report per-language ppl/bpb, or pass allow_collapsed=True to compute anyway)"
        )

    def undefined_reason(
        self,
        configs: Sequence[str],
        langs: Sequence[str],
        allow_collapsed: bool = False,
        collapse_bpb: float = 8.0,
        vocab_size: int | None = None,
        collapse_ppl: float | None = None,
    ) -> str | None:
        """Why an estimate over ``configs`` and ``langs`` is undefined: :meth:`nonfinite_reason`,
        else (unless ``allow_collapsed``) :meth:`collapse_reason`; None when it is defined."""
        why = self.nonfinite_reason(configs, langs)
        if why is None and not allow_collapsed:
            why = self.collapse_reason(configs, langs, collapse_bpb, vocab_size, collapse_ppl)
        return why

    def _collapsed(self, c, lang, collapse_bpb, vocab_size, collapse_ppl) -> str | None:
        bpb, _ = self.bpb(c, lang)
        ptok, _ = self.per_token_nll(c, lang)
        if not (math.isfinite(bpb) and math.isfinite(ptok)):
            return None  # reported as non-finite instead
        if bpb > collapse_bpb:
            return f"bpb={bpb:.3g} > {collapse_bpb:g} (worse than a uniform byte model)"
        nll, n_tokens = self.point[(c, lang)][:2]
        ppl = min(perplexity(nll, n_tokens), math.exp(700.0))  # capped: a finite number for the message
        if vocab_size is not None and ppl > float(vocab_size):
            return f"ppl={ppl:.3g} > vocab_size={vocab_size} (worse than uniform over the vocabulary)"
        if collapse_ppl is not None and ppl > float(collapse_ppl):
            return f"ppl={ppl:.3g} > collapse_ppl={collapse_ppl:g}"
        return None

    def collapsed_flag(self, c, lang, collapse_bpb, vocab_size, collapse_ppl) -> bool:
        return self._collapsed(c, lang, collapse_bpb, vocab_size, collapse_ppl) is not None

    def n_min(self, langs: Sequence[str]) -> int:
        return int(min(self.n_texts[lang] for lang in langs))


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    return metric

"""The per-text scores table and its paired bootstrap: validation, language groups, and
:class:`PairedScores`, which every table, disparity and contrast is computed from."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from qhelpers.util.errors import ConfigError, MeasurementError
from qhelpers.stats.bootstrap import check_boot, check_level, language_counts
from qhelpers.stats.quantities import bits_per_byte, perplexity

#: Default high-resource and low-resource language groups of the project.
HR_LANGS: tuple[str, ...] = ("en", "de", "fr", "zh")
LR_LANGS: tuple[str, ...] = ("he", "sw", "ar")

#: Per-language change metrics a disparity can be built from.
METRICS: tuple[str, ...] = ("degradation", "delta_nll", "delta_bpb", "ppl_ratio")


_REQUIRED = ("config", "lang", "text_id", "nll", "n_tokens", "n_bytes")


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
        check_boot(n_boot)
        check_level(level)
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

        counts_of = language_counts({lang: len(ids[lang]) for lang in self.langs}, self.n_boot, seed, self.parallel)
        self.point: dict[tuple[str, str], np.ndarray] = {}  # (cfg, lang) -> [nll, tok, byt]
        self.boot: dict[tuple[str, str], np.ndarray] = {}  # (cfg, lang) -> (n_boot, 3)
        self.nonfinite: dict[tuple[str, str], list[str]] = {}
        for lang in self.langs:
            counts = counts_of[lang]
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

    def per_token_nll(self, c: str, lang: str) -> tuple[float, np.ndarray]:
        """Nats per token of config ``c`` in ``lang``: (point, bootstrap replicates)."""
        p, b = self.point[(c, lang)], self.boot[(c, lang)]
        with np.errstate(all="ignore"):
            return p[0] / p[1], b[:, 0] / b[:, 1]

    def bpb(self, c: str, lang: str) -> tuple[float, np.ndarray]:
        """Bits per byte of config ``c`` in ``lang``: (point, bootstrap replicates)."""
        p, b = self.point[(c, lang)], self.boot[(c, lang)]
        with np.errstate(all="ignore"):
            return bits_per_byte(p[0], p[2]), bits_per_byte(b[:, 0], b[:, 2])

    def ppl(self, c: str, lang: str) -> tuple[float, np.ndarray]:
        """Perplexity of config ``c`` in ``lang``: (point, bootstrap replicates)."""
        p, b = self.point[(c, lang)], self.boot[(c, lang)]
        with np.errstate(all="ignore"):
            return perplexity(p[0], p[1]), perplexity(b[:, 0], b[:, 1])

    def quantity(self, c: str, lang: str, name: str) -> tuple[float, np.ndarray]:
        base = self.baseline
        with np.errstate(all="ignore"):
            if name == "ppl_fp":
                return self.ppl(base, lang)
            if name == "ppl_q":
                return self.ppl(c, lang)
            if name == "bpb_fp":
                return self.bpb(base, lang)
            if name == "bpb_q":
                return self.bpb(c, lang)
            if name in ("delta_nll", "degradation", "ppl_ratio"):
                pq, bq = self.per_token_nll(c, lang)
                pf, bf = self.per_token_nll(base, lang)
                d, db = pq - pf, bq - bf
                if name == "delta_nll":
                    return d, db
                if name == "degradation":
                    return (math.expm1(d) if math.isfinite(d) else math.nan), np.expm1(db)
                return (math.exp(d) if math.isfinite(d) else math.nan), np.exp(db)
            if name == "delta_bpb":
                pq, bq = self.bpb(c, lang)
                pf, bf = self.bpb(base, lang)
                return pq - pf, bq - bf
        raise ConfigError(f"unknown metric {name!r}; use one of {list(METRICS)}")

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

    def group_mean(self, c: str, langs: Sequence[str], metric: str) -> tuple[float, np.ndarray]:
        pts, boots = zip(*(self.quantity(c, lang, metric) for lang in langs))
        return float(np.mean(pts)), np.mean(np.vstack(boots), axis=0)

    def n_min(self, langs: Sequence[str]) -> int:
        return int(min(self.n_texts[lang] for lang in langs))


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    return metric

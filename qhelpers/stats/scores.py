"""The per-text scores table and its paired bootstrap: validation, language groups, and
:class:`PairedScores`, which every table, disparity and contrast is computed from."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from qhelpers.util.errors import ConfigError, MeasurementError
from qhelpers.stats.bootstrap import bootstrap_counts, check_boot, check_level, lang_seed

#: Default high-resource and low-resource language groups of the project.
HR_LANGS: tuple[str, ...] = ("en", "de", "fr", "zh")
LR_LANGS: tuple[str, ...] = ("he", "sw", "ar")

#: Per-language change metrics a disparity can be built from.
METRICS: tuple[str, ...] = ("degradation", "delta_nll", "delta_bpb", "ppl_ratio")


_LN2 = math.log(2.0)
_REQUIRED = ("config", "lang", "text_id", "nll", "n_tokens", "n_bytes")


# --------------------------------------------------------------------------- Estimate


# --------------------------------------------------------------------------- bootstrap


# --------------------------------------------------------------------------- scores engine


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

        shared = bootstrap_counts(len(first), self.n_boot, np.random.default_rng(int(seed))) if self.parallel else None
        self.point: dict[tuple[str, str], np.ndarray] = {}  # (cfg, lang) -> [nll, tok, byt]
        self.boot: dict[tuple[str, str], np.ndarray] = {}  # (cfg, lang) -> (n_boot, 3)
        self.nonfinite: dict[tuple[str, str], list[str]] = {}
        for lang in self.langs:
            counts = shared if shared is not None else bootstrap_counts(
                len(ids[lang]), self.n_boot, np.random.default_rng(lang_seed(seed, lang))
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


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    return metric


# --------------------------------------------------------------------------- tables


# --------------------------------------------------------------------------- disparities


# --------------------------------------------------------------------------- correlation


# --------------------------------------------------------------------------- verdicts




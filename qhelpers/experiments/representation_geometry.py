"""Corpus-level residual-stream representations and the seed-004 activation-space tests.

Capture
-------
:func:`collect_activations` runs every text of a corpus through the model once (sorted by
length, right-padded batches with an attention mask) and keeps, for each decoder layer ``i``,
the output of block ``i`` -- the residual stream after that block, exactly what
:func:`qhelpers.measure.activations.capture_residual` returns (un-normalised, also for the last
layer; ``output_hidden_states[i + 1]`` for ``i < n_layers - 1``). A leading BOS/EOS token that
the tokenizer or qhelpers put in front of the text is run through the model but, with
``skip_bos=True`` (default), left out of every statistic: it is not part of the text and
carries the outsized "attention sink" activations of many models.

* ``pooling="mean"``: per text, the mean over its real tokens -> ``pooled[layer]`` is
  ``[n_texts, hidden]`` (float64), row ``k`` <-> ``index.iloc[k]`` (lang, text_id).
* ``pooling="tokens"``: the same pooled means plus a sample of token rows per text: at most
  ``max_tokens_per_text`` positions (default 32) drawn without replacement by a generator
  seeded with ``(seed, crc32("lang/text_id"))``, so the draw does not depend on batching,
  order or the other texts. The SAME positions are kept at every layer, so every layer has
  the same rows (``tokens[layer]`` float32 ``[n_rows, hidden]``, described by
  ``token_index``).

Massive activations: in SmolLM2 a few early tokens of some texts (the first byte-level tokens
of Hebrew or Chinese, ...) reach residual norms tens of times the median from a few blocks on
(Sun et al., 2024, "Massive activations in large language models"). One such row can hold most
of a layer's variance. :meth:`LayerActivations.massive_tokens` lists the token rows above a
multiple of the median norm and :meth:`LayerActivations.without_massive_tokens` drops them at
every layer, for a robustness check beside the main analysis.

Statistics (each with a bootstrap over TEXTS; when every language has the same text ids in
the same order -- a parallel corpus such as UDHR -- one resample of ids serves all
languages, so cross-language comparisons are paired; otherwise each language is resampled
on its own, seeded by ``seed`` and its code):

* T-003 :func:`language_variance` (H1.3): per layer and language the activation variance
  ``v = (1/d) sum_j Var_tokens(x_j)`` -- the mean over the ``d`` hidden dimensions of the
  variance over the language's token rows (population variance, ddof = 0), i.e. the total
  variance ``tr(Cov)`` divided by ``d``. Per layer, across languages: ``cross_var`` (the
  seed's ``np.var`` of the per-language values, ddof = 0) and ``cross_cv`` (their standard
  deviation over their mean, ddof = 0: scale-free, because the residual norm grows with
  depth and ``cross_var`` grows with it as norm^4). ``variance_all`` is the seed's literal
  ``acts.var()`` (variance of all token x dimension values, ddof = 0), kept for comparison.
* T-007 :func:`dimensionality` and :func:`bottleneck` (H3.1): effective dimension (number
  of principal components for ``threshold`` = 95 % of the variance, as seed 004 computes it
  with sklearn's PCA) and participation ratio ``(sum l)^2 / sum l^2`` of the token rows; the
  layer of lowest dimensionality and its depth with a bootstrap CI.
* T-009 :func:`convergence` (H3.3): cosine similarity of the pooled vectors of parallel texts
  (raw and centred per language), linear CKA and translation retrieval accuracy per layer;
  :func:`peak_depth` for the layer of highest similarity; :func:`group_peak_difference` for
  "do low-resource languages converge less".

Depth of layer ``i`` is ``i / (n_layers - 1)`` (0 = first block, 1 = last), as in
:mod:`qhelpers.measure.criticality`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from qhelpers import stats as _stats
from qhelpers.measure.activations import iter_residual_batches
from qhelpers.models.archs import resolve_layers
from qhelpers.text.corpora import text_rng
from qhelpers.text.encoding import bos_id
from qhelpers.util.errors import ConfigError, MeasurementError
from qhelpers.util.threads import torch_threads

__all__ = [
    "POOLINGS",
    "DEFAULT_MAX_TOKENS_PER_TEXT",
    "LayerActivations",
    "collect_activations",
    "text_bootstrap_counts",
    "language_variance",
    "LanguageVariance",
    "dimensionality",
    "bottleneck",
    "Bottleneck",
    "weighted_spectrum_stats",
    "centered_cosines",
    "retrieval_accuracy",
    "weighted_linear_cka",
    "convergence",
    "Convergence",
    "peak_depth",
    "group_peak_difference",
    "layer_correlation",
]

POOLINGS: tuple[str, ...] = ("mean", "tokens")
#: Token rows kept per text with ``pooling="tokens"`` unless told otherwise.
DEFAULT_MAX_TOKENS_PER_TEXT = 32


# ----------------------------------------------------------------------------- container


@dataclass
class LayerActivations:
    """Per-layer representations of a corpus (see the module docstring).

    ``index``: one row per text, columns ``lang, text_id, n_tokens`` (tokens averaged over),
    ``n_sampled`` (token rows kept, 0 for ``pooling="mean"``) and ``truncated``.
    ``pooled[layer]``: float64 ``[n_texts, hidden]`` in ``index`` order.
    ``tokens[layer]``: float32 ``[n_rows, hidden]`` (``pooling="tokens"`` only) in
    ``token_index`` order (columns ``text_row`` -- the row of ``index`` --, ``lang``,
    ``text_id``, ``position`` -- the token position in the model input).
    """

    index: pd.DataFrame
    pooled: dict[int, np.ndarray]
    n_layers: int
    pooling: str = "mean"
    tokens: dict[int, np.ndarray] | None = None
    token_index: pd.DataFrame | None = None
    max_tokens_per_text: int | None = None
    skip_bos: bool = True
    seed: int = 0
    variant: str | None = None
    model: str | None = None
    dropped_tokens: pd.DataFrame | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.index, pd.DataFrame) or not {"lang", "text_id"} <= set(self.index.columns):
            raise ConfigError("index must be a DataFrame with columns lang and text_id (one row per text)")
        if not self.pooled:
            raise ConfigError("pooled has no layer; give {layer: array [n_texts, hidden]}")
        self.index = self.index.reset_index(drop=True)
        n = len(self.index)
        if self.index.duplicated(["lang", "text_id"]).any():
            raise ConfigError("index repeats a (lang, text_id) pair; each text must appear once")
        for layer, arr in self.pooled.items():
            if not 0 <= int(layer) < int(self.n_layers):
                raise ConfigError(f"layer {layer} is outside 0..{self.n_layers - 1} (n_layers={self.n_layers})")
            if np.ndim(arr) != 2 or np.shape(arr)[0] != n:
                raise ConfigError(
                    f"pooled[{layer}] has shape {np.shape(arr)}; expected [n_texts={n}, hidden]"
                )
        widths = {np.shape(a)[1] for a in self.pooled.values()}
        if len(widths) != 1:
            raise ConfigError(f"pooled layers have different widths {sorted(widths)}")
        if self.tokens is not None:
            if self.token_index is None or "text_row" not in self.token_index.columns:
                raise ConfigError("tokens needs token_index with a text_row column (the row of index)")
            self.token_index = self.token_index.reset_index(drop=True)
            if set(self.tokens) != set(self.pooled):
                raise ConfigError("tokens and pooled must cover the same layers")
            m = len(self.token_index)
            for layer, arr in self.tokens.items():
                if np.ndim(arr) != 2 or np.shape(arr)[0] != m:
                    raise ConfigError(f"tokens[{layer}] has shape {np.shape(arr)}; expected [n_rows={m}, hidden]")
            rows = self.token_index["text_row"].to_numpy()
            if len(rows) and (rows.min() < 0 or rows.max() >= n):
                raise ConfigError("token_index.text_row must index rows of index")

    @classmethod
    def from_arrays(
        cls,
        pooled: Mapping[int, np.ndarray],
        index: pd.DataFrame,
        n_layers: int | None = None,
        tokens: Mapping[int, np.ndarray] | None = None,
        token_index: pd.DataFrame | None = None,
    ) -> "LayerActivations":
        """Wrap arrays (e.g. synthetic ones with a planted answer) in a LayerActivations."""
        n_layers = int(n_layers if n_layers is not None else max(pooled) + 1)
        return cls(
            index=index.copy(),
            pooled={int(k): np.asarray(v, dtype=np.float64) for k, v in pooled.items()},
            n_layers=n_layers,
            pooling="tokens" if tokens is not None else "mean",
            tokens=None if tokens is None else {int(k): np.asarray(v, dtype=np.float32) for k, v in tokens.items()},
            token_index=None if token_index is None else token_index.copy(),
        )

    @property
    def layers(self) -> list[int]:
        """Captured layers, ascending."""
        return sorted(self.pooled)

    @property
    def langs(self) -> list[str]:
        """Languages in corpus order."""
        return list(dict.fromkeys(self.index["lang"]))

    @property
    def hidden(self) -> int:
        return int(np.shape(next(iter(self.pooled.values())))[1])

    def depth(self, layer: int | Iterable[int]) -> float | np.ndarray:
        """Depth ``layer / (n_layers - 1)`` (0 first block, 1 last)."""
        den = max(self.n_layers - 1, 1)
        if np.ndim(layer) == 0:
            return int(layer) / den
        return np.asarray(list(layer), dtype=np.float64) / den

    def text_rows(self, lang: str) -> np.ndarray:
        """Rows of ``index`` (and of ``pooled[layer]``) of one language, in corpus order."""
        rows = np.flatnonzero(self.index["lang"].to_numpy() == lang)
        if rows.size == 0:
            raise ConfigError(f"language {lang!r} is not in the activations; available: {self.langs}")
        return rows

    def text_ids(self, lang: str) -> list[str]:
        return [str(t) for t in self.index["text_id"].to_numpy()[self.text_rows(lang)]]

    def parallel(self, langs: Sequence[str] | None = None) -> bool:
        """True when every language in ``langs`` has the same text ids in the same order."""
        langs = self._langs(langs)
        ref = self.text_ids(langs[0])
        return all(self.text_ids(g) == ref for g in langs[1:])

    def pooled_by_lang(self, layer: int, langs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """``{lang: pooled[layer][rows of lang]}`` (float64)."""
        self._check_layer(layer)
        return {g: np.asarray(self.pooled[layer], dtype=np.float64)[self.text_rows(g)] for g in self._langs(langs)}

    def require_tokens(self, what: str) -> None:
        if self.tokens is None:
            raise ConfigError(
                f"{what} needs token rows; collect them with collect_activations(..., pooling='tokens')"
            )

    def _langs(self, langs: Sequence[str] | None) -> list[str]:
        if langs is None:
            return self.langs
        if isinstance(langs, str):
            langs = [langs]
        langs = list(langs)
        unknown = [g for g in langs if g not in set(self.langs)]
        if unknown:
            raise ConfigError(f"languages {unknown} are not in the activations; available: {self.langs}")
        if not langs:
            raise ConfigError("langs is empty; pass None for every language")
        return langs

    def _check_layer(self, layer: int) -> None:
        if layer not in self.pooled:
            raise ConfigError(f"layer {layer} was not captured; captured layers: {self.layers}")

    def massive_tokens(self, ratio: float = 5.0) -> pd.DataFrame:
        """Token rows whose norm exceeds ``ratio`` times the median token norm of some layer.

        "Massive activations" (Sun et al., 2024): a few tokens -- often the first ones of a text,
        or delimiters -- carry residual norms tens to thousands of times the typical one in
        fixed dimensions. One such row can dominate a variance or a principal-component
        spectrum. Returns ``token_index`` rows of the flagged tokens with ``max_ratio`` (their
        largest norm / median over the layers) and ``layer`` (where it is largest).
        """
        self.require_tokens("massive_tokens")
        if not float(ratio) > 1.0:
            raise ConfigError(f"ratio must be > 1 (a multiple of the median token norm, e.g. 10), got {ratio}")
        worst = np.zeros(len(self.token_index))
        where = np.zeros(len(self.token_index), dtype=np.int64)
        for layer in self.layers:
            norms = np.linalg.norm(np.asarray(self.tokens[layer], dtype=np.float64), axis=1)
            med = float(np.median(norms)) if norms.size else 0.0
            r = norms / med if med > 0 else np.zeros_like(norms)
            better = r > worst
            worst = np.where(better, r, worst)
            where = np.where(better, layer, where)
        flagged = np.flatnonzero(worst > float(ratio))
        out = self.token_index.iloc[flagged].copy()
        out["max_ratio"] = worst[flagged]
        out["layer"] = where[flagged]
        return out

    def without_massive_tokens(self, ratio: float = 5.0) -> "LayerActivations":
        """A copy without the token rows of :meth:`massive_tokens` (removed at EVERY layer, so all
        layers keep the same rows; pooled means are unchanged). ``dropped_tokens`` lists them."""
        flagged = self.massive_tokens(ratio)
        keep = np.setdiff1d(np.arange(len(self.token_index)), flagged.index.to_numpy())
        return LayerActivations(
            index=self.index.copy(), pooled=self.pooled, n_layers=self.n_layers, pooling=self.pooling,
            tokens={k: v[keep] for k, v in self.tokens.items()},
            token_index=self.token_index.iloc[keep].reset_index(drop=True),
            max_tokens_per_text=self.max_tokens_per_text, skip_bos=self.skip_bos, seed=self.seed,
            variant=self.variant, model=self.model, dropped_tokens=flagged.reset_index(drop=True),
        )

    def summary(self) -> pd.DataFrame:
        """Per language: texts, mean tokens per text, token rows kept, texts truncated."""
        g = self.index.groupby("lang", sort=False)
        out = pd.DataFrame({
            "n_texts": g.size(),
            "mean_tokens": g["n_tokens"].mean() if "n_tokens" in self.index else np.nan,
            "token_rows": (self.token_index.groupby("lang")["text_row"].size().reindex(g.size().index).fillna(0).astype(int)
                           if self.token_index is not None else 0),
            "truncated": g["truncated"].sum() if "truncated" in self.index else 0,
        })
        return out.reset_index()


# ----------------------------------------------------------------------------- capture


def collect_activations(
    loaded: Any,
    corpus: Any,
    layers: int | Iterable[int] | None = None,
    pooling: str = "mean",
    *,
    max_length: int | None = 512,
    batch_size: int = 16,
    max_tokens_per_text: int | None = DEFAULT_MAX_TOKENS_PER_TEXT,
    seed: int = 0,
    skip_bos: bool = True,
    prepend_bos: bool | None = None,
    progress: bool = True,
    variant: Any = None,
    engine: Any = None,
) -> LayerActivations:
    """Residual-stream representations of every text of ``corpus`` (see the module docstring).

    ``loaded``: a :class:`~qhelpers.models.loading.LoadedModel` (model + tokenizer). ``corpus``: a
    :class:`~qhelpers.text.corpora.Corpus` or an iterable of ``(lang, text_id, text)``. Texts are
    tokenized as the scorer does (:func:`qhelpers.measure.scoring.encode_text`) and cut at
    ``max_length`` tokens (``None``: the model's context). ``batch_size`` texts of similar
    length share a right-padded batch. ``max_tokens_per_text=None`` keeps every token row.
    ``variant`` (a :class:`~qhelpers.quant.engine.Variant`) is applied for the capture through
    ``engine`` (a :class:`~qhelpers.quant.engine.QuantEngine`; one is made when omitted) and
    restored afterwards.
    """
    from qhelpers.measure.scoring import context_length
    from qhelpers.models.archs import decoder_layers
    from qhelpers.models.loaded import as_module
    from qhelpers.text.encoding import encode_corpus

    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1 (texts per forward pass), got {batch_size!r}")
    if max_tokens_per_text is not None and (isinstance(max_tokens_per_text, bool) or int(max_tokens_per_text) < 1):
        raise ConfigError(f"max_tokens_per_text must be >= 1 or None (every token), got {max_tokens_per_text!r}")
    if max_length is not None and int(max_length) < 2:
        raise ConfigError(f"max_length must be >= 2 tokens or None (the model's context), got {max_length}")
    model = as_module(loaded)
    tokenizer = getattr(loaded, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("collect_activations needs a tokenizer: pass the LoadedModel from load_model(...)")

    n_layers = len(decoder_layers(model))
    wanted = resolve_layers(layers, n_layers)
    limit = context_length(model)
    max_len = limit if max_length is None else min(int(max_length), limit)
    texts = encode_corpus(tokenizer, corpus, max_len, prepend_bos)
    bos = bos_id(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (bos if bos is not None else 0)
    cap = None if max_tokens_per_text is None else int(max_tokens_per_text)

    firsts: list[int] = []
    sampled: list[np.ndarray] = []  # token positions kept per text (pooling="tokens")
    for t in texts:
        first = t.first if skip_bos else 0
        positions = np.arange(first, len(t.ids))
        if pooling != "tokens":
            positions = positions[:0]
        elif cap is not None and positions.size > cap:
            positions = np.sort(text_rng(seed, t.lang, t.text_id).choice(positions, size=cap, replace=False))
        firsts.append(first)
        sampled.append(positions)

    pooled_rows: dict[int, list[np.ndarray | None]] = {layer: [None] * len(texts) for layer in wanted}
    token_rows: dict[int, list[np.ndarray | None]] = {layer: [None] * len(texts) for layer in wanted}

    def run() -> None:
        # batch_tokens=None: batches are bounded by batch_size texts only
        for batch, _, _, acts in iter_residual_batches(model, [t.ids for t in texts], wanted, int(pad_id),
                                                       batch_tokens=None, max_batch=int(batch_size),
                                                       progress=progress):
            for layer, h in acts.items():
                for row, i in enumerate(batch):
                    real = h[row, firsts[i]: len(texts[i].ids)].to(torch.float64)
                    pooled_rows[layer][i] = real.mean(dim=0).numpy()
                    if pooling == "tokens":
                        token_rows[layer][i] = h[row, torch.as_tensor(sampled[i], dtype=torch.long)].numpy().astype(np.float32)
            del acts

    if variant is not None:
        from qhelpers.quant.engine import QuantEngine

        engine = engine if engine is not None else QuantEngine(loaded)
        with engine.applied(variant):
            run()
    else:
        run()

    index = pd.DataFrame({
        "lang": [t.lang for t in texts],
        "text_id": [t.text_id for t in texts],
        "n_tokens": [len(t.ids) - first for t, first in zip(texts, firsts)],
        "n_sampled": [int(p.size) for p in sampled],
        "truncated": [bool(t.truncated) for t in texts],
    })
    pooled = {layer: np.stack(pooled_rows[layer]) for layer in wanted}
    tokens = token_index = None
    if pooling == "tokens":
        tokens = {layer: np.concatenate(token_rows[layer], axis=0) for layer in wanted}
        token_index = pd.DataFrame({
            "text_row": np.concatenate([np.full(p.size, k) for k, p in enumerate(sampled)]).astype(np.int64),
            "lang": np.concatenate([[t.lang] * p.size for t, p in zip(texts, sampled)]).astype(object),
            "text_id": np.concatenate([[t.text_id] * p.size for t, p in zip(texts, sampled)]).astype(object),
            "position": np.concatenate(sampled).astype(np.int64),
        })
    name = getattr(variant, "name", None) if variant is not None else None
    return LayerActivations(
        index=index, pooled=pooled, n_layers=n_layers, pooling=pooling, tokens=tokens,
        token_index=token_index, max_tokens_per_text=None if pooling == "mean" else max_tokens_per_text,
        skip_bos=skip_bos, seed=int(seed), variant=name, model=getattr(loaded, "spec", None),
    )


# ----------------------------------------------------------------------------- bootstrap helpers


def text_bootstrap_counts(
    acts: LayerActivations, langs: Sequence[str] | None = None, n_boot: int = 2000, seed: int = 0
) -> tuple[dict[str, np.ndarray], bool]:
    """Bootstrap resample counts over texts: ``({lang: (n_boot, n_texts_lang)}, paired)``.

    When every language has the same text ids in the same order (a parallel corpus) one
    matrix is shared by all languages and ``paired`` is True; otherwise each language gets its
    own (:func:`qhelpers.stats.language_counts`).
    """
    langs = acts._langs(langs)
    paired = acts.parallel(langs)
    return _stats.language_counts({g: len(acts.text_rows(g)) for g in langs}, n_boot, seed, paired), paired


def _with_point(counts: np.ndarray) -> np.ndarray:
    """Prepend the all-ones row (the observed sample) to bootstrap counts: row 0 = point."""
    return np.vstack([np.ones((1, counts.shape[1])), counts])


def _estimate(values: np.ndarray, n: int, level: float, what: str) -> _stats.Estimate:
    """Estimate from ``values`` = [point, replicate_1, ...] (percentile interval)."""
    point = float(values[0])
    if not math.isfinite(point):
        return _stats.Estimate.undefined(f"non-finite: {what} is not finite on the observed sample", n, level)
    lo, hi = _stats.percentile_interval(np.asarray(values[1:], dtype=np.float64), level)
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return _stats.Estimate.undefined(f"non-finite: no finite bootstrap replicate of {what}", n, level, value=point)
    return _stats.Estimate(point, lo, hi, n, level)


def _ci_columns(row: dict, name: str, values: np.ndarray, level: float) -> None:
    row[name] = float(values[0])
    lo, hi = _stats.percentile_interval(np.asarray(values[1:], dtype=np.float64), level)
    row[f"{name}_ci_low"], row[f"{name}_ci_high"] = float(lo), float(hi)


def _indicator(text_rows: np.ndarray, n_texts: int):
    """Sparse ``[n_texts, n_rows]`` 0/1 matrix: which token row belongs to which text."""
    from scipy import sparse

    n = len(text_rows)
    return sparse.csr_matrix((np.ones(n), (np.asarray(text_rows, dtype=np.int64), np.arange(n))), shape=(n_texts, n))


def _token_selection(acts: LayerActivations, langs: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token rows of the texts of ``langs``: (row indices into tokens, text position of each
    row among the selected texts, selected text rows of index in language-major order)."""
    text_rows = np.concatenate([acts.text_rows(g) for g in langs])
    where = -np.ones(len(acts.index), dtype=np.int64)
    where[text_rows] = np.arange(text_rows.size)
    tr = acts.token_index["text_row"].to_numpy()
    rows = np.flatnonzero(where[tr] >= 0)
    return rows, where[tr[rows]], text_rows


# ----------------------------------------------------------------------------- T-003


@dataclass
class LanguageVariance:
    """Result of :func:`language_variance`: ``per_language`` and ``cross`` tables."""

    per_language: pd.DataFrame
    cross: pd.DataFrame
    n_boot: int
    paired: bool
    level: float
    definition: str = (
        "variance = mean over hidden dimensions of the variance over the language's token rows "
        "(ddof=0) = trace(covariance)/hidden; cross_var = variance over languages of those values "
        "(ddof=0, the seed's np.var); cross_cv = their standard deviation / their mean (ddof=0)"
    )

    def values(self, column: str = "cross_cv") -> pd.Series:
        """``column`` of the cross table indexed by layer."""
        return self.cross.set_index("layer")[column]


def language_variance(
    acts: LayerActivations,
    langs: Sequence[str] | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> LanguageVariance:
    """Seed 004 T-003: per-layer, per-language activation variance and its spread across languages.

    Needs token rows (``pooling="tokens"``). Definitions in the module docstring and in
    ``LanguageVariance.definition``. Intervals: percentile bootstrap over texts (paired across
    languages on a parallel corpus), the cross-language statistics recomputed in every
    replicate. ``per_language`` columns: layer, depth, lang, variance (+ CI), variance_all
    (the seed's ``acts.var()``, ddof=0), n_texts, n_rows, norm_ratio (largest / median token
    norm: large values flag "massive activations" that dominate the variance). ``cross``:
    layer, depth, cross_var (+ CI), cross_cv (+ CI), mean_variance, n_langs, n_texts, paired.
    """
    acts.require_tokens("language_variance")
    langs = acts._langs(langs)
    if len(langs) < 2:
        raise ConfigError(f"a cross-language variance needs at least 2 languages, got {langs}")
    level = _stats.check_level(level)
    counts, paired = text_bootstrap_counts(acts, langs, n_boot, seed)
    rows, text_pos, text_rows = _token_selection(acts, langs)
    n_sel = text_rows.size
    ind = _indicator(text_pos, n_sel)
    n_t = np.asarray(ind.sum(axis=1)).ravel()
    offsets = np.cumsum([0] + [len(acts.text_rows(g)) for g in langs])
    per_rows: list[dict] = []
    cross_rows: list[dict] = []
    for layer in acts.layers:
        X = np.asarray(acts.tokens[layer][rows], dtype=np.float64)
        d = X.shape[1]
        mu = X.mean(axis=0)
        Xc = X - mu
        s = ind @ Xc
        q = ind @ (Xc * Xc).sum(axis=1)
        raw_sum = ind @ X.sum(axis=1)
        raw_sq = ind @ (X * X).sum(axis=1)
        norms = np.linalg.norm(X, axis=1)
        V = []
        for k, g in enumerate(langs):
            sl = slice(offsets[k], offsets[k + 1])
            C = _with_point(counts[g])
            N = C @ n_t[sl]
            S = C @ s[sl]
            Q = C @ q[sl]
            v = (Q / N - ((S / N[:, None]) ** 2).sum(axis=1)) / d
            V.append(v)
            nd = n_t[sl].sum() * d
            var_all = raw_sq[sl].sum() / nd - (raw_sum[sl].sum() / nd) ** 2
            g_norms = norms[np.isin(text_pos, np.arange(offsets[k], offsets[k + 1]))]
            row = {"layer": layer, "depth": acts.depth(layer), "lang": g}
            _ci_columns(row, "variance", v, level)
            row.update({
                "variance_all": float(var_all), "n_texts": int(offsets[k + 1] - offsets[k]),
                "n_rows": int(n_t[sl].sum()), "norm_ratio": float(g_norms.max() / np.median(g_norms)),
            })
            per_rows.append(row)
        V = np.stack(V, axis=1)
        with np.errstate(all="ignore"):
            cross_var = V.var(axis=1)
            cross_cv = V.std(axis=1) / V.mean(axis=1)
        row = {"layer": layer, "depth": acts.depth(layer)}
        _ci_columns(row, "cross_var", cross_var, level)
        _ci_columns(row, "cross_cv", cross_cv, level)
        row.update({"mean_variance": float(V[0].mean()), "n_langs": len(langs),
                    "n_texts": int(min(offsets[k + 1] - offsets[k] for k in range(len(langs)))), "paired": paired})
        cross_rows.append(row)
    return LanguageVariance(pd.DataFrame(per_rows), pd.DataFrame(cross_rows), int(n_boot), paired, level)


# ----------------------------------------------------------------------------- T-007


def _one_thread_on_cpu(device: torch.device):
    """The symmetric eigensolver runs single-threaded on the CPU (see :mod:`qhelpers.util.threads`)."""
    return torch_threads(1 if device.type == "cpu" else None)


def _spectrum(X: np.ndarray) -> np.ndarray:
    """Eigenvalues (descending, >= 0) of ``Xc^T Xc`` for column-centred ``X`` (fp64): the PCA
    variances up to the common factor 1/(n-1), from the smaller of the two Gram matrices."""
    Xc = torch.as_tensor(np.asarray(X, dtype=np.float64))
    Xc = Xc - Xc.mean(dim=0, keepdim=True)
    gram = Xc @ Xc.T if Xc.shape[0] <= Xc.shape[1] else Xc.T @ Xc
    with _one_thread_on_cpu(gram.device):
        lam = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0.0)
    return lam.numpy()


def _eff_dim_from_eigs(lam: np.ndarray, threshold: float) -> np.ndarray:
    """Effective dimension (components for ``threshold`` of the variance) along the last axis,
    with the same rule as :func:`qhelpers.measure.activations.effective_dimension`."""
    lam = np.sort(np.asarray(lam, dtype=np.float64), axis=-1)[..., ::-1]
    total = lam.sum(axis=-1, keepdims=True)
    with np.errstate(all="ignore"):
        cum = np.cumsum(lam, axis=-1) / total
    k = (cum < threshold - 1e-12).sum(axis=-1) + 1
    k = np.minimum(k, lam.shape[-1]).astype(np.float64)
    return np.where(total[..., 0] > 0, k, np.nan)


def _pr_from_eigs(lam: np.ndarray) -> np.ndarray:
    lam = np.asarray(lam, dtype=np.float64)
    with np.errstate(all="ignore"):
        return lam.sum(axis=-1) ** 2 / (lam * lam).sum(axis=-1)


def _check_threshold(threshold: float) -> float:
    if not 0.0 < float(threshold) <= 1.0:
        raise ConfigError(f"threshold must be in (0, 1], e.g. 0.95; got {threshold}")
    return float(threshold)


def dimensionality(
    acts: LayerActivations,
    langs: Sequence[str] | None = None,
    *,
    threshold: float = 0.95,
    per_language: bool = True,
    rows_per_language: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Effective dimension and participation ratio of the token rows, per layer.

    ``scope="all"``: every token row of ``langs`` pooled. With ``per_language``, one row per
    language too, each on the SAME number of token rows ``rows_per_language`` (default: the
    smallest language's row count), drawn without replacement with ``default_rng([seed,
    crc32(lang)])`` -- the same rows at every layer -- so languages are comparable with each
    other (not with ``"all"``, which has more rows). ``rank_limit = min(n_rows - 1, hidden)``
    bounds the effective dimension: when it is below ``hidden`` the number of rows, not the
    model, may be what limits it. Columns: layer, depth, scope, n_rows, hidden, rank_limit,
    eff_dim, participation_ratio, norm_ratio (largest / median token norm).
    """
    acts.require_tokens("dimensionality")
    langs = acts._langs(langs)
    threshold = _check_threshold(threshold)
    rows, text_pos, _ = _token_selection(acts, langs)
    lang_of_row = acts.token_index["lang"].to_numpy()
    scopes: list[tuple[str, np.ndarray]] = [("all", rows)]
    if per_language:
        by_lang = {g: np.flatnonzero(lang_of_row == g) for g in langs}
        smallest = min(v.size for v in by_lang.values())
        m = smallest if rows_per_language is None else int(rows_per_language)
        if m < 2 or m > smallest:
            raise ConfigError(
                f"rows_per_language={rows_per_language} must be between 2 and the smallest language's "
                f"token rows ({smallest}); collect more texts or lower it"
            )
        for g in langs:
            pick = np.sort(_stats.lang_rng(seed, g).choice(by_lang[g], m, replace=False))
            scopes.append((g, pick))
    out = []
    for layer in acts.layers:
        T = acts.tokens[layer]
        for scope, idx in scopes:
            X = np.asarray(T[idx], dtype=np.float64)
            lam = _spectrum(X)
            norms = np.linalg.norm(X, axis=1)
            out.append({
                "layer": layer, "depth": acts.depth(layer), "scope": scope, "n_rows": int(X.shape[0]),
                "hidden": int(X.shape[1]), "rank_limit": int(min(X.shape[0] - 1, X.shape[1])),
                "eff_dim": float(_eff_dim_from_eigs(lam, threshold)),
                "participation_ratio": float(_pr_from_eigs(lam)),
                "norm_ratio": float(norms.max() / np.median(norms)),
            })
    return pd.DataFrame(out)


def weighted_spectrum_stats(
    X: np.ndarray,
    text_of_row: np.ndarray,
    counts: np.ndarray,
    *,
    measure: str = "participation_ratio",
    threshold: float = 0.95,
    chunk: int = 32,
    device: str | torch.device | None = None,
    max_bytes: float = 5e8,
) -> np.ndarray:
    """``measure`` of the covariance of token rows re-weighted by text resample counts.

    ``X``: ``[n_rows, d]``; ``text_of_row``: the text (0 .. n_texts - 1) of each row;
    ``counts``: ``[n_rep, n_texts]`` (how often each text is drawn). Replicate ``b`` is the
    data set in which every row of text ``t`` appears ``counts[b, t]`` times, so the result
    equals the measure on those duplicated rows (tested). ``participation_ratio`` uses
    ``PR = tr(C)^2 / ||C||_F^2`` computed from per-text sums without any eigendecomposition;
    ``eff_dim`` needs every replicate's spectrum (one ``eigvalsh`` of a ``d x d`` matrix per
    replicate, done in chunks of ``chunk``, on ``device``: default CUDA when available), which
    is the slow part on a CPU. The per-text second moments are kept when they fit in
    ``max_bytes``, else recomputed per chunk.
    """
    if measure not in ("participation_ratio", "eff_dim"):
        raise ConfigError(f"measure must be 'participation_ratio' or 'eff_dim', got {measure!r}")
    X = np.asarray(X, dtype=np.float64)
    counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    t_of = np.asarray(text_of_row, dtype=np.int64)
    n_texts = counts.shape[1]
    if X.ndim != 2 or t_of.shape != (X.shape[0],) or (t_of.size and (t_of.min() < 0 or t_of.max() >= n_texts)):
        raise ConfigError("X must be [n_rows, d] and text_of_row one text index (0 .. n_texts-1) per row")
    Xc = X - X.mean(axis=0)  # a fixed shift: every replicate re-centres exactly
    ind = _indicator(t_of, n_texts)
    n_t = np.asarray(ind.sum(axis=1)).ravel()
    s = ind @ Xc  # [T, d]
    N = counts @ n_t
    if np.any(N <= 0):
        raise MeasurementError("a replicate has no token row (every drawn text is empty)")
    m = (counts @ s) / N[:, None]  # [B, d]
    if measure == "participation_ratio":
        q = ind @ (Xc * Xc).sum(axis=1)
        tr = counts @ q / N - (m * m).sum(axis=1)
        # ||M||^2 = c^T F c with F[s, t] = sum over rows i in s, j in t of (x_i . x_j)^2
        F = np.zeros((n_texts, n_texts))
        step = 2048
        for a in range(0, Xc.shape[0], step):
            G = Xc[a:a + step] @ Xc.T
            F += ind[:, a:a + step] @ (ind @ (G * G).T).T
        M2 = np.einsum("bs,st,bt->b", counts, F, counts)
        Z = Xc @ m.T  # [n_rows, B]
        mMm = ((ind @ (Z * Z)).T * counts).sum(axis=1)
        fro2 = M2 / N**2 - 2.0 * mMm / N + (m * m).sum(axis=1) ** 2
        with np.errstate(all="ignore"):
            return np.where(fro2 > 0, tr**2 / fro2, np.nan)
    threshold = _check_threshold(threshold)
    d = X.shape[1]
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    Xt = torch.as_tensor(Xc, device=dev)
    groups = [torch.as_tensor(np.flatnonzero(t_of == t), device=dev) for t in range(n_texts)]

    def second_moments(texts: range) -> torch.Tensor:  # [len(texts), d*d]: sum of x x^T over each text's rows
        return torch.stack([(Xt[groups[t]].T @ Xt[groups[t]]).reshape(-1) for t in texts])

    keep_all = n_texts * d * d * 8 <= max_bytes
    S_all = second_moments(range(n_texts)) if keep_all else None
    text_chunk = max(1, int(max_bytes // (d * d * 8)))
    ct = torch.as_tensor(counts, device=dev)
    mt = torch.as_tensor(m, device=dev)
    Nt = torch.as_tensor(N, device=dev)
    out = np.empty(counts.shape[0])
    for b0 in range(0, counts.shape[0], int(chunk)):
        b1 = min(b0 + int(chunk), counts.shape[0])
        if keep_all:
            Mb = ct[b0:b1] @ S_all
        else:
            Mb = torch.zeros((b1 - b0, d * d), dtype=torch.float64, device=dev)
            for t0 in range(0, n_texts, text_chunk):
                t1 = min(t0 + text_chunk, n_texts)
                Mb += ct[b0:b1, t0:t1] @ second_moments(range(t0, t1))
        C = Mb.reshape(-1, d, d) / Nt[b0:b1, None, None] - mt[b0:b1, :, None] * mt[b0:b1, None, :]
        with _one_thread_on_cpu(C.device):
            lam = torch.linalg.eigvalsh(C).clamp_min(0.0).cpu().numpy()
        out[b0:b1] = _eff_dim_from_eigs(lam, threshold)
    return out


def _extreme_depths(values: np.ndarray, layers: np.ndarray, n_layers: int, mode: str) -> tuple[np.ndarray, list[int]]:
    """Per row of ``values`` ([n_rep, n_layers_searched]), the depth of the extreme layer
    (ties: the mean depth of the tied layers); and the tied layers of row 0."""
    v = np.asarray(values, dtype=np.float64)
    v = np.where(np.isfinite(v), v, np.inf if mode == "min" else -np.inf)
    best = v.min(axis=1, keepdims=True) if mode == "min" else v.max(axis=1, keepdims=True)
    tol = 1e-12 * np.maximum(np.abs(best), 1.0)
    hit = np.abs(v - best) <= tol
    depth = np.asarray(layers, dtype=np.float64) / max(n_layers - 1, 1)
    depths = (hit * depth).sum(axis=1) / hit.sum(axis=1)
    ok = np.isfinite(best[:, 0])
    depths = np.where(ok, depths, np.nan)
    return depths, [int(layers[i]) for i in np.flatnonzero(hit[0])]


def peak_depth(
    values: np.ndarray,
    layers: Sequence[int],
    n_layers: int,
    *,
    mode: str = "max",
    target: float = 0.75,
    n: int | None = None,
    level: float = 0.95,
) -> dict[str, Any]:
    """Depth of the layer where a per-layer curve peaks (``mode="max"``) or dips (``"min"``).

    ``values``: ``[1 + n_boot, len(layers)]``, row 0 the observed curve and the other rows
    bootstrap replicates of it. Ties (values equal to within 1e-12 relative) count as the
    mean depth of the tied layers. Returns ``{"depth": Estimate, "distance": Estimate,
    "layers": [extreme layer(s) of the observed curve], "replicates": depths}`` where
    ``distance = |depth - target|`` (per replicate), for a hypothesis such as "the peak lies
    within 0.10 of 75 % depth".
    """
    if mode not in ("max", "min"):
        raise ConfigError(f"mode must be 'max' or 'min', got {mode!r}")
    level = _stats.check_level(level)
    v = np.asarray(values, dtype=np.float64)
    layers = np.asarray(list(layers), dtype=np.int64)
    if v.ndim != 2 or v.shape[1] != layers.size or v.shape[0] < 2:
        raise ConfigError(
            f"values must be [1 + n_boot, n_layers={layers.size}] (observed row first), got shape {v.shape}"
        )
    depths, tied = _extreme_depths(v, layers, n_layers, mode)
    n = int(n if n is not None else v.shape[0] - 1)
    return {
        "depth": _estimate(depths, n, level, f"the {mode} depth"),
        "distance": _estimate(np.abs(depths - float(target)), n, level, f"the distance of the {mode} depth from {target}"),
        "layers": tied,
        "replicates": depths[1:],
    }


@dataclass
class Bottleneck:
    """Result of :func:`bottleneck`."""

    table: pd.DataFrame
    measure: str
    layers: list[int]
    depth: _stats.Estimate
    distance: _stats.Estimate
    target: float
    replicates: np.ndarray
    n_texts: int
    n_rows: int
    hidden: int
    paired: bool

    def sentence(self) -> str:
        """The observed minimum in words."""
        where = ", ".join(f"L{i}" for i in self.layers)
        return (f"{self.measure} is lowest at {where} (depth {self.depth.value:.3f}, 95% CI "
                f"{self.depth.ci_low:.3f} to {self.depth.ci_high:.3f}; {self.n_rows} token rows of "
                f"{self.n_texts} texts, hidden {self.hidden})")


def bottleneck(
    acts: LayerActivations,
    langs: Sequence[str] | None = None,
    *,
    measure: str = "participation_ratio",
    threshold: float = 0.95,
    search_layers: Iterable[int] | None = None,
    target: float = 0.75,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Bottleneck:
    """Seed 004 T-007: the layer of lowest dimensionality of the token rows and its depth.

    ``measure``: ``"participation_ratio"`` (continuous; fast exact bootstrap) or ``"eff_dim"``
    (components for ``threshold`` of the variance, the seed's number; an integer, so ties
    are common and count as the mean depth of the tied layers; its bootstrap needs one
    ``d x d`` eigendecomposition per replicate and layer). Every token row of the texts of
    ``langs`` is used (pooled over languages); the bootstrap resamples texts (paired across
    languages on a parallel corpus) and re-weights their rows. ``search_layers``: where to
    look for the minimum (default: every captured layer but block 0, whose output is the
    token embedding plus one block). ``table`` (every captured layer): layer, depth, value
    and its CI, boot_median, searched.

    A resample repeats some texts, and repeated rows LOWER any dimensionality measure, so the
    replicates of a layer's value sit below the observed value (compare ``boot_median`` with
    ``value``) and its percentile interval may not contain it. Read the per-layer intervals as
    replicate spread, not as a confidence interval for the value; what is compared across
    replicates is where the minimum lies, which every layer's downward shift affects alike only
    to the extent that the shift is similar across layers.
    """
    acts.require_tokens("bottleneck")
    langs = acts._langs(langs)
    level = _stats.check_level(level)
    if search_layers is None:
        searched = [i for i in acts.layers if i != 0] or acts.layers
    else:
        searched = resolve_layers(list(search_layers), acts.n_layers)
        missing = [i for i in searched if i not in acts.pooled]
        if missing:
            raise ConfigError(f"search_layers {missing} were not captured; captured: {acts.layers}")
    counts, paired = text_bootstrap_counts(acts, langs, n_boot, seed)
    C = np.hstack([_with_point(counts[g]) for g in langs])
    rows, text_pos, text_rows = _token_selection(acts, langs)
    curves = {}
    for layer in acts.layers:
        X = acts.tokens[layer][rows]
        curves[layer] = weighted_spectrum_stats(X, text_pos, C, measure=measure, threshold=threshold)
    table_rows = []
    for layer in acts.layers:
        row = {"layer": layer, "depth": acts.depth(layer)}
        _ci_columns(row, "value", curves[layer], level)
        row["boot_median"] = float(np.nanmedian(curves[layer][1:]))
        row["searched"] = layer in searched
        table_rows.append(row)
    V = np.stack([curves[i] for i in searched], axis=1)
    n_texts = int(min(len(acts.text_rows(g)) for g in langs))
    peak = peak_depth(V, searched, acts.n_layers, mode="min", target=target, n=n_texts, level=level)
    return Bottleneck(
        pd.DataFrame(table_rows), measure, peak["layers"], peak["depth"], peak["distance"], float(target),
        peak["replicates"], n_texts, int(rows.size), acts.hidden, paired,
    )


# ----------------------------------------------------------------------------- T-009


def _check_parallel(acts: LayerActivations, langs: Sequence[str]) -> None:
    if not acts.parallel(langs):
        raise ConfigError(
            "cross-lingual similarity needs parallel texts: every language must have the same text ids in "
            "the same order (load_corpus('udhr', ...) is parallel; select the same texts in every language)"
        )


def _weights(counts: np.ndarray) -> np.ndarray:
    return counts / counts.sum(axis=1, keepdims=True)


def centered_cosines(A: np.ndarray, B: np.ndarray, counts: np.ndarray | None = None, center: bool = True) -> np.ndarray:
    """Mean cosine similarity of parallel rows ``A[t]``, ``B[t]`` (``[n_texts, d]`` each).

    ``center=True`` subtracts each side's mean vector first (``A - mean(A)``, ``B - mean(B)``:
    per language), which removes what all texts of a language share -- above all the large
    common direction of the residual stream that makes raw cosines of ANY two texts high.
    ``counts`` (``[n_rep, n_texts]``, default one row of ones) re-weights texts as a
    bootstrap resample does: the means are the weighted means and the result is the
    weighted mean cosine, equal to the statistic on the duplicated rows (tested). Returns
    ``[n_rep]``. A zero vector has cosine 0.
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A.shape != B.shape or A.ndim != 2:
        raise ConfigError(f"A and B must be [n_texts, d] of the same shape, got {A.shape} and {B.shape}")
    c = np.ones((1, A.shape[0])) if counts is None else np.atleast_2d(np.asarray(counts, dtype=np.float64))
    if c.shape[1] != A.shape[0]:
        raise ConfigError(f"counts must be [n_rep, n_texts={A.shape[0]}], got {c.shape}")
    if not center:
        cos = (A * B).sum(axis=1) / np.maximum(np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1), 1e-300)
        return c @ cos / c.sum(axis=1)
    A = A - A.mean(axis=0)  # fixed shifts keep the arithmetic well conditioned; re-centred below
    B = B - B.mean(axis=0)
    w = _weights(c)
    Gab, Gaa, Gbb = A @ B.T, A @ A.T, B @ B.T
    num = (np.diag(Gab)[None, :] - w @ Gab.T - w @ Gab
           + np.einsum("bs,st,bt->b", w, Gab, w)[:, None])
    na = np.diag(Gaa)[None, :] - 2.0 * (w @ Gaa) + np.einsum("bs,st,bt->b", w, Gaa, w)[:, None]
    nb = np.diag(Gbb)[None, :] - 2.0 * (w @ Gbb) + np.einsum("bs,st,bt->b", w, Gbb, w)[:, None]
    den = np.sqrt(np.clip(na, 0.0, None) * np.clip(nb, 0.0, None))
    cos = np.where(den > 1e-300, num / np.where(den > 1e-300, den, 1.0), 0.0)
    return (w * cos).sum(axis=1)


def _nonparallel_cosine(A: np.ndarray, B: np.ndarray, center: bool) -> float:
    """Mean cosine over the non-parallel pairs ``A[t]``, ``B[s]``, ``s != t`` (a reference level)."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if center:
        A, B = A - A.mean(axis=0), B - B.mean(axis=0)
    An = A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-300)
    Bn = B / np.maximum(np.linalg.norm(B, axis=1, keepdims=True), 1e-300)
    M = An @ Bn.T
    n = M.shape[0]
    return float((M.sum() - np.trace(M)) / (n * (n - 1))) if n > 1 else math.nan


def weighted_linear_cka(A: np.ndarray, B: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Linear CKA of ``A`` and ``B`` (``[n_texts, d]``, rows = the same texts), per resample.

    With ``counts`` (``[n_rep, n_texts]``) each replicate equals
    :func:`qhelpers.measure.activations.linear_cka` on the rows duplicated ``counts`` times (tested),
    computed from ``n_texts x n_texts`` Gram matrices. Returns ``[n_rep]`` (NaN where a side
    has zero variance).
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[0]:
        raise ConfigError(f"A and B must be [n_texts, d] with the same n_texts, got {A.shape} and {B.shape}")
    c = np.ones((1, A.shape[0])) if counts is None else np.atleast_2d(np.asarray(counts, dtype=np.float64))
    A = A - A.mean(axis=0)
    B = B - B.mean(axis=0)
    w = _weights(c)
    out = []
    for K in (A @ A.T, B @ B.T):
        kw = w @ K  # [n_rep, T]
        wkw = (kw * w).sum(axis=1)
        out.append(K[None] - kw[:, :, None] - kw[:, None, :] + wkw[:, None, None])
    Kt, Lt = out
    cross = np.einsum("bs,bst,bst,bt->b", c, Kt, Lt, c)
    kk = np.einsum("bs,bst,bst,bt->b", c, Kt, Kt, c)
    ll = np.einsum("bs,bst,bst,bt->b", c, Lt, Lt, c)
    with np.errstate(all="ignore"):
        den = np.sqrt(kk * ll)
        return np.where(den > 0, cross / den, np.nan)


def retrieval_accuracy(queries: np.ndarray, candidates: np.ndarray, center: bool = True) -> np.ndarray:
    """Per query text ``t``: 1.0 if ``candidates[t]`` (its translation) is the nearest of all
    candidates by cosine similarity, else 0.0 (ties count as a miss unless the translation
    is the first of the tied candidates). ``center`` subtracts each side's mean vector first.
    The accuracy is the mean; chance is ``1 / n_texts``."""
    Q = np.asarray(queries, dtype=np.float64)
    K = np.asarray(candidates, dtype=np.float64)
    if Q.shape != K.shape or Q.ndim != 2:
        raise ConfigError(f"queries and candidates must be [n_texts, d] of the same shape, got {Q.shape} and {K.shape}")
    if center:
        Q, K = Q - Q.mean(axis=0), K - K.mean(axis=0)
    Qn = Q / np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), 1e-300)
    Kn = K / np.maximum(np.linalg.norm(K, axis=1, keepdims=True), 1e-300)
    sims = Qn @ Kn.T
    return (sims.argmax(axis=1) == np.arange(Q.shape[0])).astype(np.float64)


@dataclass
class Convergence:
    """Result of :func:`convergence`: tables and the bootstrap replicates behind them.

    ``curve``: per layer, the mean over all language pairs of raw and centred cosine (with
    CIs) and of the non-parallel reference levels. ``reference``: per layer and language
    (vs ``ref``): raw and centred cosine, linear CKA, retrieval accuracy (all with CIs) and
    chance. ``pairs``: per layer and pair, raw and centred cosine. ``replicates``: arrays
    ``[1 + n_boot, n_layers]`` (``"curve_centered"``, ``"curve_raw"``) and
    ``[1 + n_boot, n_layers]`` per language (``"ref_centered:<lang>"``, ...), row 0 observed.
    """

    curve: pd.DataFrame
    reference: pd.DataFrame
    pairs: pd.DataFrame
    replicates: dict[str, np.ndarray]
    layers: list[int]
    n_layers: int
    ref: str
    langs: list[str]
    n_texts: int
    level: float

    def peak(self, which: str = "curve_centered", target: float = 0.75, search_layers: Iterable[int] | None = None) -> dict[str, Any]:
        """:func:`peak_depth` of a replicate curve (default: the all-pairs centred cosine)."""
        if which not in self.replicates:
            raise ConfigError(f"unknown curve {which!r}; available: {sorted(self.replicates)}")
        cols = list(range(len(self.layers)))
        layers = self.layers
        if search_layers is not None:
            wanted = set(resolve_layers(list(search_layers), self.n_layers))
            cols = [k for k, i in enumerate(self.layers) if i in wanted]
            layers = [self.layers[k] for k in cols]
            if not cols:
                raise ConfigError(f"none of search_layers was captured; captured: {self.layers}")
        return peak_depth(self.replicates[which][:, cols], layers, self.n_layers, mode="max", target=target,
                          n=self.n_texts, level=self.level)

    def language_peaks(self, measure: str = "centered") -> pd.DataFrame:
        """Per language (vs the reference): peak similarity and its layer/depth, with CIs."""
        rows = []
        for g in self.langs:
            if g == self.ref:
                continue
            R = self.replicates[f"ref_{measure}:{g}"]
            peak = R.max(axis=1)
            p = peak_depth(R, self.layers, self.n_layers, mode="max", n=self.n_texts, level=self.level)
            e = _estimate(peak, self.n_texts, self.level, "the peak similarity")
            rows.append({"lang": g, "peak_similarity": e.value, "peak_similarity_ci_low": e.ci_low,
                         "peak_similarity_ci_high": e.ci_high, "peak_layers": p["layers"],
                         "peak_depth": p["depth"].value, "peak_depth_ci_low": p["depth"].ci_low,
                         "peak_depth_ci_high": p["depth"].ci_high})
        return pd.DataFrame(rows)


def convergence(
    acts: LayerActivations,
    langs: Sequence[str] | None = None,
    *,
    ref: str = "en",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    cka: bool = True,
) -> Convergence:
    """Seed 004 T-009: cross-lingual similarity of the mean-pooled vectors of parallel texts.

    Per layer: cosine of each parallel pair (same text id) averaged over texts, raw and centred
    per language (:func:`centered_cosines`), for every pair of languages and against ``ref``;
    linear CKA against ``ref`` (:func:`weighted_linear_cka`); retrieval accuracy of ``ref``
    queries among each language's texts (centred, :func:`retrieval_accuracy`; chance
    ``1 / n_texts``). The mean cosine over NON-parallel pairs is given as the level any two
    texts reach. Bootstrap: one resample of text ids for every language (paired); language
    means, cosines and CKA are recomputed in each replicate.
    """
    langs = acts._langs(langs)
    level = _stats.check_level(level)
    if ref not in langs:
        raise ConfigError(f"reference language {ref!r} must be one of langs {langs}")
    if len(langs) < 2:
        raise ConfigError(f"cross-lingual similarity needs at least 2 languages, got {langs}")
    _check_parallel(acts, langs)
    counts, _ = text_bootstrap_counts(acts, langs, n_boot, seed)
    C = _with_point(counts[ref])
    T = len(acts.text_rows(ref))
    if T < 3:
        raise ConfigError(f"need at least 3 parallel texts per language for centred similarities, got {T}")
    pairs = list(combinations(langs, 2))
    others = [g for g in langs if g != ref]
    reps: dict[str, list[np.ndarray]] = {"curve_centered": [], "curve_raw": []}
    for g in others:
        for k in ("centered", "raw", "cka", "retrieval"):
            reps[f"ref_{k}:{g}"] = []
    pair_rows, ref_rows, curve_rows = [], [], []
    for layer in acts.layers:
        P = acts.pooled_by_lang(layer, langs)
        cen_sum = np.zeros(C.shape[0])
        raw_sum = np.zeros(C.shape[0])
        np_cen, np_raw = [], []
        for a, b in pairs:
            cen = centered_cosines(P[a], P[b], C, center=True)
            raw = centered_cosines(P[a], P[b], C, center=False)
            cen_sum += cen
            raw_sum += raw
            npc, npr = _nonparallel_cosine(P[a], P[b], True), _nonparallel_cosine(P[a], P[b], False)
            np_cen.append(npc)
            np_raw.append(npr)
            row = {"layer": layer, "depth": acts.depth(layer), "lang_a": a, "lang_b": b}
            _ci_columns(row, "raw_cos", raw, level)
            _ci_columns(row, "centered_cos", cen, level)
            row.update({"raw_cos_nonparallel": npr, "centered_cos_nonparallel": npc})
            pair_rows.append(row)
            if ref in (a, b):
                g = b if a == ref else a
                reps[f"ref_centered:{g}"].append(cen)
                reps[f"ref_raw:{g}"].append(raw)
        cen_mean, raw_mean = cen_sum / len(pairs), raw_sum / len(pairs)
        reps["curve_centered"].append(cen_mean)
        reps["curve_raw"].append(raw_mean)
        row = {"layer": layer, "depth": acts.depth(layer)}
        _ci_columns(row, "raw_cos", raw_mean, level)
        _ci_columns(row, "centered_cos", cen_mean, level)
        row.update({"raw_cos_nonparallel": float(np.mean(np_raw)), "centered_cos_nonparallel": float(np.mean(np_cen)),
                    "n_pairs": len(pairs), "n_texts": T})
        curve_rows.append(row)
        for g in others:
            row = {"layer": layer, "depth": acts.depth(layer), "lang": g}
            _ci_columns(row, "raw_cos", reps[f"ref_raw:{g}"][-1], level)
            _ci_columns(row, "centered_cos", reps[f"ref_centered:{g}"][-1], level)
            ck = weighted_linear_cka(P[ref], P[g], C) if cka else np.full(C.shape[0], np.nan)
            reps[f"ref_cka:{g}"].append(ck)
            _ci_columns(row, "cka", ck, level)
            hits = retrieval_accuracy(P[ref], P[g], center=True)
            acc = C @ hits / C.sum(axis=1)
            reps[f"ref_retrieval:{g}"].append(acc)
            _ci_columns(row, "retrieval", acc, level)
            row.update({"chance": 1.0 / T, "n_texts": T})
            ref_rows.append(row)
    replicates = {k: np.stack(v, axis=1) for k, v in reps.items()}
    return Convergence(pd.DataFrame(curve_rows), pd.DataFrame(ref_rows), pd.DataFrame(pair_rows), replicates,
                       acts.layers, acts.n_layers, ref, langs, T, level)


def group_peak_difference(
    conv: Convergence,
    lr_langs: Sequence[str],
    hr_langs: Sequence[str],
    measure: str = "centered",
) -> _stats.Estimate:
    """Mean over ``lr_langs`` minus mean over ``hr_langs`` of each language's PEAK similarity
    to the reference language (max over layers of its curve vs ``conv.ref``), with the paired
    bootstrap (the same text resample for every language; the peak re-taken in every
    replicate). Negative: low-resource languages converge less. The reference language is
    left out of both groups (its similarity to itself is 1).
    """
    lr = [g for g in lr_langs if g != conv.ref]
    hr = [g for g in hr_langs if g != conv.ref]
    for name, group in (("lr_langs", lr), ("hr_langs", hr)):
        if not group:
            raise ConfigError(f"{name} has no language besides the reference {conv.ref!r}; give at least one")
        missing = [g for g in group if f"ref_{measure}:{g}" not in conv.replicates]
        if missing:
            raise ConfigError(f"{name} {missing} are not in the convergence result (languages: {conv.langs}) "
                              f"or measure {measure!r} is unknown (centered, raw, cka, retrieval)")
    peak = {g: conv.replicates[f"ref_{measure}:{g}"].max(axis=1) for g in lr + hr}
    diff = np.mean([peak[g] for g in lr], axis=0) - np.mean([peak[g] for g in hr], axis=0)
    return _estimate(diff, conv.n_texts, conv.level, "the LR-minus-HR peak similarity")


# ----------------------------------------------------------------------------- shared


def layer_correlation(
    x: pd.Series | Mapping[int, float],
    y: Any,
    *,
    method: str = "spearman",
    column: str = "criticality",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """:func:`qhelpers.stats.correlation` of two per-layer quantities over their common layers.

    ``x`` and ``y``: Series indexed by layer (or dicts), or ``y`` a
    :class:`~qhelpers.measure.criticality.LayerCriticality` (its ``column``). The bootstrap resamples
    LAYERS; it does not carry the uncertainty of each layer's value. A NaN on any common layer
    (e.g. criticality of a collapsed model) makes the correlation undefined (INCONCLUSIVE).
    """
    xs = pd.Series(x, dtype=np.float64) if not isinstance(x, pd.Series) else x.astype(np.float64)
    from qhelpers.measure.criticality import LayerCriticality

    if isinstance(y, LayerCriticality):
        ys = y.values(column).astype(np.float64)
    else:
        ys = pd.Series(y, dtype=np.float64) if not isinstance(y, pd.Series) else y.astype(np.float64)
    common = sorted(set(int(i) for i in xs.index) & set(int(i) for i in ys.index))
    if not common:
        raise ConfigError("x and y share no layer; pass per-layer values indexed by layer number")
    xs.index = [int(i) for i in xs.index]
    ys.index = [int(i) for i in ys.index]
    out = _stats.correlation(xs.loc[common].to_numpy(), ys.loc[common].to_numpy(), method=method,
                             n_boot=n_boot, seed=seed, level=level)
    out["layers"] = common
    return out

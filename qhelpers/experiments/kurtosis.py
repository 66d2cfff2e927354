"""EXP-003: does activation-weighted weight kurtosis predict which languages quantization hurts?

Seed 003 defines, for a language (here also for each text) ``lambda``::

    kappa_eff(lambda) = sum_l a_l(lambda) * kappa_l,    a_l = m_l / sum_k m_k

where ``kappa_l`` is the excess kurtosis of decoder layer ``l``'s weights
(:func:`qhelpers.measure.weight_stats.layer_table`) and ``m_l`` the mean absolute value of layer
``l``'s output (the residual stream after block ``l``) over the text's real tokens. Since
the ``a_l`` sum to 1, ``kappa_eff`` is a weighted average of the layer kurtoses: languages
differ only through how their activation magnitude is spread over the layers.

This module holds what the notebook needs beyond the rest of the package:

* :func:`outlier_layers`: seed 003's outlier rule (``kappa > mean + 2 sd``, population sd).
* :func:`layer_activation_magnitudes`: ``m_l`` per (language, text, layer), batched and
  masked (padding and the BOS token excluded), through
  :func:`qhelpers.measure.activations.iter_residual_batches` and
  :func:`qhelpers.measure.activations.mean_abs_activation`.
* :func:`activation_weights` and :func:`effective_kurtosis`: ``a_l`` and ``kappa_eff`` per
  text or per language (a language's ``m_l`` is the mean over all real tokens of its texts).
* :func:`text_changes`: per-text degradation, change in NLL per token and in bits per byte;
  :func:`language_means`: their per-language means beside the bytes per token.
* :func:`choose_nf4_path`, :func:`bnb_source`, :func:`score_bnb` and :func:`run_nf4`: NF4
  scores, either from bitsandbytes itself (the model loaded a second time through
  :func:`qhelpers.quant.bnb.load_bnb_model`) or from the bit-exact simulation
  (:class:`qhelpers.quant.engine.QuantEngine` with ``QuantConfig(method="nf4")``), as one per-text
  scores table.
* :func:`correlation_table`: Pearson and Spearman correlations of ``kappa_eff`` with the
  degradation, across languages and across texts, each with a bootstrap CI and a
  permutation p-value (:func:`qhelpers.stats.correlation`), and within languages
  (:func:`within_correlation`: centred per language, stratified bootstrap and permutation),
  which removes what differs between languages as a whole (tokenization above all).
* :func:`collapse_reason`: why a model's scores are not interpretable (collapsed).
* :func:`config_difference` and :func:`mean_change_table`: the paired-bootstrap mean change
  over languages of each configuration and the difference between two (e.g. absmax minus
  kurtosis-heuristic clipping); :func:`weight_error_table`: the weight error each
  configuration causes, overall and on the outlying weights that clipping cuts.
* :func:`plot_layer_kurtosis`, :func:`plot_activation_profile` and :func:`plot_keff_scatter`.

The bootstrap of :func:`config_difference`, :func:`mean_change_table` and
:func:`collapse_reason` is the paired engine :class:`qhelpers.stats.PairedScores`, so intervals
use the same text resample as ``stats.language_table`` with the same seed.

Caveats the notebook states: the clipping formula of seed 003 is a heuristic from the
precursor's code, not Banner et al. (2019); the embedded GGUF models were already quantized
once; with six languages a correlation across languages has n = 6.
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata as _rankdata

from qhelpers import stats as _stats
from qhelpers.measure.activations import iter_residual_batches, mean_abs_activation
from qhelpers.models.loaded import as_module
from qhelpers.util.errors import ConfigError, MeasurementError

__all__ = [
    "outlier_layers",
    "layer_activation_magnitudes",
    "activation_weights",
    "effective_kurtosis",
    "text_changes",
    "language_means",
    "NF4_PATHS",
    "NF4Run",
    "choose_nf4_path",
    "bnb_source",
    "score_bnb",
    "run_nf4",
    "collapse_reason",
    "within_correlation",
    "correlation_table",
    "correlation_row",
    "config_difference",
    "mean_change_table",
    "weight_error_table",
    "plot_layer_kurtosis",
    "plot_activation_profile",
    "plot_keff_scatter",
]

#: Accepted values of ``nf4_path``.
NF4_PATHS: tuple[str, ...] = ("auto", "simulated", "bitsandbytes")


# --------------------------------------------------------------------------- layer kurtosis


def outlier_layers(values: pd.Series | Mapping[int, float], n_sd: float = 2.0) -> dict[str, Any]:
    """Seed 003's outlier layers: ``kappa_l > mean + n_sd * sd`` (population sd, ``np.std``).

    ``values`` maps layer -> kurtosis (a Series indexed by layer, or a dict). NaN values are
    left out of the mean and sd and are never outliers. Returns a dict with ``mean``, ``sd``,
    ``max``, ``threshold``, ``n_sd`` and ``layers`` (the outlier layers, ascending).
    """
    s = pd.Series(values, dtype=np.float64) if not isinstance(values, pd.Series) else values.astype(np.float64)
    finite = s[np.isfinite(s.to_numpy())]
    if finite.empty:
        raise MeasurementError("no finite layer kurtosis to find outliers in")
    mean = float(finite.mean())
    sd = float(np.std(finite.to_numpy()))  # ddof=0, as seed 003's np.std
    threshold = mean + float(n_sd) * sd
    layers = sorted(int(i) for i, v in finite.items() if v > threshold)
    return {"mean": mean, "sd": sd, "max": float(finite.max()), "threshold": threshold, "n_sd": float(n_sd), "layers": layers}


# --------------------------------------------------------------------------- activations


def layer_activation_magnitudes(
    loaded: Any,
    corpus: Any,
    max_length: int | None = 512,
    batch_tokens: int | None = None,
    *,
    max_batch: int = 64,
    prepend_bos: bool | None = None,
    skip_bos: bool = True,
    layers: Iterable[int] | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Mean absolute residual-stream output of every decoder layer, per text.

    Each text is tokenized as :class:`qhelpers.measure.scoring.Scorer` does
    (:func:`qhelpers.measure.scoring.encode_text` with ``prepend_bos``) and cut at ``max_length``
    tokens, never more than the model's context (:func:`qhelpers.measure.scoring.context_length`;
    ``None``: the context). Texts are sorted by length and batched under ``batch_tokens``
    padded tokens (default 2048 on CPU, 16384 on CUDA; at most ``max_batch`` texts) with
    right padding and an attention mask, so padding changes nothing (tested). For each text
    and layer, ``mean_abs`` is :func:`qhelpers.measure.activations.mean_abs_activation` of the
    block output over the text's real tokens; with ``skip_bos`` (default) a leading BOS/EOS
    token, which is not part of the text and often carries outsized activations, is run
    through the model but left out of the mean.

    ``loaded``: a :class:`~qhelpers.models.loading.LoadedModel` (or anything with ``.model`` and
    ``.tokenizer``). ``corpus``: a :class:`~qhelpers.text.corpora.Corpus` or an iterable of
    ``(lang, text_id, text)``.

    Returns a DataFrame with columns ``lang, text_id, layer, mean_abs, n_tokens, truncated``
    (``n_tokens``: tokens averaged over; ``truncated``: the text was longer than
    ``max_length``), one row per (text, layer), texts in corpus order.
    """
    from qhelpers.measure.scoring import context_length
    from qhelpers.text.encoding import default_batch_tokens, encode_corpus

    model = as_module(loaded)
    tokenizer = getattr(loaded, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("layer_activation_magnitudes needs a tokenizer: pass a LoadedModel")
    if max_length is not None and max_length < 1:
        raise ConfigError(f"max_length must be >= 1 or None, got {max_length}")
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
    limit = context_length(model)
    max_length = limit if max_length is None else min(int(max_length), limit)
    device = next(model.parameters()).device
    budget = batch_tokens or default_batch_tokens(device)
    if budget < 1:
        raise ConfigError(f"batch_tokens must be >= 1, got {batch_tokens}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    texts = encode_corpus(tokenizer, corpus, max_length, prepend_bos)
    firsts = [t.first if skip_bos else 0 for t in texts]

    results: dict[int, dict[int, float]] = {}
    for batch, _, mask, acts in iter_residual_batches(model, [t.ids for t in texts],
                                                      None if layers is None else list(layers), pad_id,
                                                      batch_tokens=budget, max_batch=max_batch, progress=progress):
        avg_mask = mask.clone()
        for row, i in enumerate(batch):
            avg_mask[row, : firsts[i]] = 0
        for row, i in enumerate(batch):
            n = len(texts[i].ids)
            results[i] = {
                layer: mean_abs_activation(h[row : row + 1, :n], avg_mask[row : row + 1, :n])
                for layer, h in acts.items()
            }
        del acts

    rows = []
    for i, t in enumerate(texts):
        for layer, value in results[i].items():
            rows.append(
                {
                    "lang": t.lang,
                    "text_id": t.text_id,
                    "layer": int(layer),
                    "mean_abs": float(value),
                    "n_tokens": len(t.ids) - firsts[i],
                    "truncated": bool(t.truncated),
                }
            )
    return pd.DataFrame(rows, columns=["lang", "text_id", "layer", "mean_abs", "n_tokens", "truncated"])


def _check_magnitudes(magnitudes: pd.DataFrame) -> None:
    if not isinstance(magnitudes, pd.DataFrame):
        raise ConfigError(f"magnitudes must be a DataFrame, got {type(magnitudes).__name__}")
    missing = [c for c in ("lang", "text_id", "layer", "mean_abs") if c not in magnitudes.columns]
    if missing:
        raise ConfigError(
            f"magnitudes lacks columns {missing}; pass the table of layer_activation_magnitudes"
        )
    if magnitudes.empty:
        raise MeasurementError("magnitudes is empty")
    values = magnitudes["mean_abs"].to_numpy(dtype=np.float64)
    if np.any(values < 0):
        raise MeasurementError("mean_abs must be >= 0 (a mean absolute activation)")


def activation_weights(magnitudes: pd.DataFrame, by: str = "text") -> pd.DataFrame:
    """Seed 003's normalised activation weights ``a_l = m_l / sum_k m_k``.

    ``by="text"``: one profile per (lang, text_id). ``by="lang"``: one per language, with
    ``m_l`` the mean over all real tokens of the language's texts (the per-text means
    weighted by ``n_tokens``; unweighted when the column is absent). Returns columns
    ``lang, [text_id,] layer, mean_abs, weight``. A profile whose magnitudes are all 0 gets
    NaN weights.
    """
    _check_magnitudes(magnitudes)
    if by not in ("text", "lang"):
        raise ConfigError(f"by must be 'text' or 'lang', got {by!r}")
    df = magnitudes.copy()
    df["lang"] = df["lang"].astype(str)
    df["text_id"] = df["text_id"].astype(str)
    if by == "lang":
        w = df["n_tokens"].astype(np.float64) if "n_tokens" in df.columns else pd.Series(1.0, index=df.index)
        df = df.assign(_num=df["mean_abs"] * w, _den=w)
        g = df.groupby(["lang", "layer"], sort=False)[["_num", "_den"]].sum().reset_index()
        g["mean_abs"] = g["_num"] / g["_den"]
        df = g[["lang", "layer", "mean_abs"]]
        keys = ["lang"]
    else:
        dup = df.duplicated(["lang", "text_id", "layer"])
        if dup.any():
            raise MeasurementError("magnitudes has repeated (lang, text_id, layer) rows")
        df = df[["lang", "text_id", "layer", "mean_abs"]]
        keys = ["lang", "text_id"]
    total = df.groupby(keys, sort=False)["mean_abs"].transform("sum")
    with np.errstate(all="ignore"):
        df = df.assign(weight=np.where(total > 0, df["mean_abs"] / total.where(total > 0, 1.0), np.nan))
    return df.reset_index(drop=True)


def effective_kurtosis(
    layer_kurtosis: pd.Series | Mapping[int, float],
    magnitudes: pd.DataFrame,
    by: str = "text",
) -> pd.DataFrame:
    """``kappa_eff = sum_l a_l * kappa_l`` per text (``by="text"``) or language (``"lang"``).

    ``layer_kurtosis`` maps layer -> excess kurtosis (e.g.
    ``layer_table(model).set_index("layer")["kurtosis"]``); every layer of ``magnitudes``
    must be in it (a ConfigError names the missing ones). ``a_l`` are the
    :func:`activation_weights`. A NaN kurtosis (a layer of constant tensors) or an all-zero
    activation profile gives a NaN ``kappa_eff``, which the correlations then report as
    undefined.

    Returns columns ``lang, text_id, k_eff, n_layers`` (``by="text"``) or
    ``lang, k_eff, n_layers, n_texts`` (``by="lang"``).
    """
    kappa = pd.Series(layer_kurtosis, dtype=np.float64) if not isinstance(layer_kurtosis, pd.Series) else layer_kurtosis.astype(np.float64)
    kappa.index = [int(i) for i in kappa.index]
    weights = activation_weights(magnitudes, by=by)
    layers = sorted(set(int(x) for x in weights["layer"]))
    missing = [l for l in layers if l not in kappa.index]
    if missing:
        raise ConfigError(f"layer_kurtosis has no value for layers {missing} of the magnitudes table")
    weights = weights.assign(kappa=weights["layer"].map(lambda l: kappa[int(l)]))
    weights["term"] = weights["weight"] * weights["kappa"]
    keys = ["lang", "text_id"] if by == "text" else ["lang"]
    out = (
        weights.groupby(keys, sort=False)
        .agg(k_eff=("term", lambda s: float(s.sum()) if s.notna().all() else np.nan), n_layers=("layer", "size"))
        .reset_index()
    )
    if by == "lang":
        counts = magnitudes.assign(lang=magnitudes["lang"].astype(str)).groupby("lang", sort=False)["text_id"].nunique()
        out["n_texts"] = out["lang"].map(counts).astype(int)
    return out


# --------------------------------------------------------------------------- per-text changes


def text_changes(scores: pd.DataFrame, config: str, baseline: str = "fp") -> pd.DataFrame:
    """Per-text change from ``baseline`` to ``config`` in a per-text scores table.

    Columns: ``lang, text_id, n_tokens, n_bytes, nll_fp, nll_q, ppl_fp, ppl_q,
    degradation, delta_nll, delta_bpb`` with (per text, as in :mod:`qhelpers.stats.scores` per
    language) ``delta_nll = (nll_q - nll_fp) / n_tokens`` nats per token,
    ``degradation = expm1(delta_nll) = (ppl_q - ppl_fp) / ppl_fp`` (seed 003's D, not
    clipped at 0) and ``delta_bpb = (nll_q - nll_fp) / ln 2 / n_bytes``.
    """
    need = ["config", "lang", "text_id", "nll", "n_tokens", "n_bytes"]
    missing = [c for c in need if c not in scores.columns]
    if missing:
        raise ConfigError(f"scores lacks columns {missing}; pass a per-text scores table")
    df = scores.assign(config=scores["config"].astype(str), lang=scores["lang"].astype(str),
                       text_id=scores["text_id"].astype(str))
    base = df[df["config"] == str(baseline)]
    quant = df[df["config"] == str(config)]
    if base.empty or quant.empty:
        raise ConfigError(
            f"scores need rows for baseline {baseline!r} and config {config!r}; configs present: "
            f"{sorted(df['config'].unique())}"
        )
    merged = base.merge(quant, on=["lang", "text_id"], suffixes=("_fp", "_q"), validate="one_to_one")
    if len(merged) != len(base) or len(merged) != len(quant):
        raise MeasurementError(
            f"baseline {baseline!r} and {config!r} were measured on different texts "
            f"({len(base)} vs {len(quant)} rows, {len(merged)} in common)"
        )
    if not (np.array_equal(merged["n_tokens_fp"], merged["n_tokens_q"]) and np.array_equal(merged["n_bytes_fp"], merged["n_bytes_q"])):
        raise MeasurementError(f"baseline and {config!r} disagree on token or byte counts; score them with one Scorer")
    n_tok = merged["n_tokens_fp"].astype(np.float64)
    n_byt = merged["n_bytes_fp"].astype(np.float64)
    diff = merged["nll_q"] - merged["nll_fp"]
    out = pd.DataFrame(
        {
            "lang": merged["lang"],
            "text_id": merged["text_id"],
            "n_tokens": merged["n_tokens_fp"].astype(int),
            "n_bytes": merged["n_bytes_fp"].astype(int),
            "nll_fp": merged["nll_fp"],
            "nll_q": merged["nll_q"],
            "ppl_fp": _stats.perplexity(merged["nll_fp"], n_tok),
            "ppl_q": _stats.perplexity(merged["nll_q"], n_tok),
        }
    )
    out["delta_nll"] = diff / n_tok
    out["degradation"] = np.expm1(out["delta_nll"])
    out["delta_bpb"] = _stats.bits_per_byte(diff, n_byt)
    return out


def language_means(per_text: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Per language: the plain mean over its texts of each of ``columns``, the number of
    texts, and ``bytes_per_token`` (total UTF-8 bytes / total scored tokens; needs
    ``n_bytes`` and ``n_tokens``). Languages in input order."""
    missing = [c for c in list(columns) + ["lang", "n_bytes", "n_tokens"] if c not in per_text.columns]
    if missing:
        raise ConfigError(f"per_text lacks columns {missing}")
    g = per_text.groupby("lang", sort=False)
    out = g[list(columns)].mean()
    out.insert(0, "n_texts", g.size())
    out["bytes_per_token"] = g["n_bytes"].sum() / g["n_tokens"].sum()
    return out.reset_index()


# --------------------------------------------------------------------------- NF4: real or simulated


def choose_nf4_path(nf4_path: str = "auto", device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> tuple[str, str]:
    """Resolve ``nf4_path`` to ``("bitsandbytes" | "simulated", reason)``.

    ``"auto"``: bitsandbytes when :func:`qhelpers.quant.bnb.bnb_available` says its 4-bit kernels
    run on ``device`` and it computes in the model's ``dtype`` (not float64), else the simulation.
    ``"bitsandbytes"``: raises :class:`~qhelpers.util.errors.ConfigError` with the reason when it
    cannot run.
    ``"simulated"``: always the simulation.
    """
    if nf4_path not in NF4_PATHS:
        raise ConfigError(f"nf4_path must be one of {list(NF4_PATHS)}, got {nf4_path!r}")
    simulated = (
        "simulated NF4 (qhelpers.quant.quantizers, bit-exact with bitsandbytes' CPU quantizer; "
        "forward in the model's dtype)"
    )
    if nf4_path == "simulated":
        return "simulated", f"{simulated}: requested"
    from qhelpers.quant.bnb import bnb_available, bnb_dtype_problem

    dev = None if device is None else str(torch.device(device))
    problem = bnb_dtype_problem(dtype)
    ok, why = (False, problem) if problem else bnb_available(dev)
    if ok:
        return "bitsandbytes", f"real bitsandbytes NF4 ({why})"
    if nf4_path == "bitsandbytes":
        raise ConfigError(f"NF4_PATH='bitsandbytes' but bitsandbytes cannot run here: {why}; use 'auto' or 'simulated'")
    return "simulated", f"{simulated}, because bitsandbytes cannot run here: {why}"


def bnb_source(loaded: Any, workdir: str | Path | None = None) -> tuple[str, str]:
    """A folder (or hub id) that :func:`qhelpers.quant.bnb.load_bnb_model` can load ``loaded`` from.

    Embedded models: their converted cache folder (``metadata["cache_dir"]``); local
    folders: ``metadata["path"]``; hub models: the hub id; ``tiny:`` models (and anything
    else): the in-memory model and tokenizer saved with ``save_pretrained`` into
    ``workdir`` (required then). Returns ``(source, how)``.
    """
    meta = getattr(loaded, "metadata", {}) or {}
    source = meta.get("source")
    if source == "embedded" and meta.get("cache_dir") and Path(meta["cache_dir"]).is_dir():
        return str(meta["cache_dir"]), "the embedded model's converted cache folder"
    if source == "local" and meta.get("path") and Path(meta["path"]).is_dir():
        return str(meta["path"]), "the local model folder"
    if source == "hub":
        return str(loaded.spec), "the hub id"
    if workdir is None:
        raise ConfigError(f"model {getattr(loaded, 'spec', '?')!r} has no folder on disk; pass workdir= to save it there")
    folder = Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(folder, safe_serialization=True)
    loaded.tokenizer.save_pretrained(folder)
    return str(folder), "the in-memory model saved with save_pretrained"


def score_bnb(
    loaded: Any,
    corpus: Any,
    measure: Any = None,
    mode: str = "nf4",
    config: str | None = None,
    *,
    workdir: str | Path | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Load ``loaded`` a second time through bitsandbytes and score ``corpus`` with it.

    The bitsandbytes model computes in ``loaded.dtype`` (fp32 on CPU) on ``loaded.device``
    and keeps transformers' defaults in full precision (``lm_head``, tied weights); the
    texts are tokenized, windowed and batched by :func:`qhelpers.measure.scoring.corpus_scorer`
    with the same :class:`~qhelpers.measure.scoring.MeasureConfig` as the simulated path, so the two
    per-text tables are directly comparable. Returns ``(scores, info)``: one row per text
    (``config`` = ``config`` or ``mode``) and a dict with ``source``, ``quantized_modules``
    (names of the bitsandbytes layers), ``kept_modules`` and ``seconds``.
    """
    import bitsandbytes as bnb

    from qhelpers.measure.scoring import MeasureConfig, corpus_scorer
    from qhelpers.quant.bnb import load_bnb_model

    measure = measure or MeasureConfig()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qhelpers_bnb_") as tmp:
        source, how = bnb_source(loaded, workdir if workdir is not None else Path(tmp) / "model")
        device = str(loaded.device)
        model = load_bnb_model(source, mode, compute_dtype=loaded.dtype, device=device)
        try:
            scores = corpus_scorer(model, corpus, measure, tokenizer=loaded.tokenizer).score(config=config or mode)
            quantized = sorted(n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)))
            kept = list(model.config.quantization_config.llm_int8_skip_modules or [])
        finally:
            del model
    info = {"source": source, "source_how": how, "quantized_modules": quantized, "kept_modules": kept,
            "seconds": time.perf_counter() - start}
    return scores, info


@dataclass
class NF4Run:
    """Per-text scores of the baseline and NF4, and how NF4 was obtained."""

    scores: pd.DataFrame
    path: str
    reason: str
    config: str = "nf4"
    baseline: str = "fp"
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """Which path ran and why, plus the cross-check when one was made."""
        lines = [f"NF4 path: {self.path} -- {self.reason}"]
        if self.info.get("source"):
            lines.append(f"  loaded from {self.info['source']} ({self.info.get('source_how', '')})")
        if "n_quantized_modules" in self.info:
            lines.append(
                f"  {self.info['n_quantized_modules']} linear modules in 4 bit; kept in full precision: "
                f"{self.info.get('kept_modules')}"
            )
        if self.info.get("scope_note"):
            lines.append(f"  note: {self.info['scope_note']}")
        cc = self.info.get("cross_check")
        if cc:
            lines.append(
                f"  cross-check against the simulation: max relative per-text NLL difference "
                f"{cc['max_rel_diff']:.3g} over {cc['n_texts']} texts"
            )
        lines.append(f"  {self.seconds:.1f} s")
        return "\n".join(lines)


def run_nf4(
    loaded: Any,
    corpus: Any,
    measure: Any = None,
    nf4_path: str = "auto",
    *,
    baseline_scores: pd.DataFrame | None = None,
    engine: Any = None,
    scorer: Any = None,
    config: str = "nf4",
    baseline: str = "fp",
    cross_check: bool = False,
    workdir: str | Path | None = None,
) -> NF4Run:
    """NF4 per-text scores on the path chosen by :func:`choose_nf4_path`.

    * simulated: ``Variant(config, QuantConfig(method="nf4"), scope="linear")`` applied by a
      :class:`~qhelpers.quant.engine.QuantEngine` while a :class:`~qhelpers.measure.scoring.Scorer` scores
      the corpus (what :func:`qhelpers.measure.sweep.run_sweep` does for one variant);
    * bitsandbytes: :func:`score_bnb` (the model loaded a second time, 4-bit linear layers).

    ``baseline_scores``: per-text scores that already hold the ``baseline`` rows of the same
    texts (e.g. ``sweep.scores``), so the baseline is not scored again; otherwise it is
    scored here. ``cross_check`` (bitsandbytes path only) also runs the simulation and
    records the largest relative per-text NLL difference in ``info["cross_check"]``.
    ``info["scope_note"]`` is set when bitsandbytes quantized a different set of modules
    than the simulation's ``scope="linear"`` plan.

    Returns an :class:`NF4Run` whose ``scores`` has the baseline rows and the ``config``
    rows (columns ``config, lang, text_id, nll, n_tokens, n_bytes``).
    """
    from qhelpers.measure.scoring import MeasureConfig, corpus_scorer
    from qhelpers.quant.engine import QuantEngine, Variant
    from qhelpers.quant.quantizers import QuantConfig

    measure = measure or MeasureConfig()
    start = time.perf_counter()
    path, reason = choose_nf4_path(nf4_path, getattr(loaded, "device", None), getattr(loaded, "dtype", None))
    variant = Variant(config, QuantConfig(method="nf4"), scope="linear")
    scorer = scorer or corpus_scorer(loaded, corpus, measure)
    cols = ["config", "lang", "text_id", "nll", "n_tokens", "n_bytes"]

    if baseline_scores is not None:
        base = baseline_scores[baseline_scores["config"].astype(str) == str(baseline)]
        if base.empty:
            raise ConfigError(f"baseline_scores has no rows for baseline {baseline!r}")
        base = base[cols].reset_index(drop=True)
    else:
        base = scorer.score(config=baseline)[cols]

    engine = engine or QuantEngine(loaded)

    def simulated() -> pd.DataFrame:
        with engine.applied(variant):
            return scorer.score(config=config)[cols]

    info: dict[str, Any] = {}
    if path == "simulated":
        quant = simulated()
        info["n_quantized_tensors"] = len(engine.plan(variant).tensors)
    else:
        quant, binfo = score_bnb(loaded, corpus, measure, "nf4", config, workdir=workdir)
        quant = quant[cols]
        info.update({k: v for k, v in binfo.items() if k not in ("quantized_modules",)})
        info["n_quantized_modules"] = len(binfo["quantized_modules"])
        planned = sorted(n.rsplit(".", 1)[0] for n in engine.plan(variant).tensors)
        if planned != binfo["quantized_modules"]:
            only_b = sorted(set(binfo["quantized_modules"]) - set(planned))[:5]
            only_s = sorted(set(planned) - set(binfo["quantized_modules"]))[:5]
            info["scope_note"] = (
                f"bitsandbytes quantized different modules than the simulation's scope='linear' plan "
                f"(only bitsandbytes: {only_b}; only simulated: {only_s})"
            )
        if cross_check:
            sim = simulated()
            merged = quant.merge(sim, on=["lang", "text_id"], suffixes=("_bnb", "_sim"))
            with np.errstate(all="ignore"):
                rel = (merged["nll_bnb"] - merged["nll_sim"]).abs() / merged["nll_sim"].abs()
            info["cross_check"] = {"max_rel_diff": float(rel.max()), "n_texts": int(len(merged))}
    for key in ("lang", "text_id"):
        base[key] = base[key].astype(str)
        quant[key] = quant[key].astype(str)
    ids_b = set(zip(base["lang"], base["text_id"]))
    ids_q = set(zip(quant["lang"], quant["text_id"]))
    if ids_b != ids_q:
        raise MeasurementError(
            f"baseline_scores and the NF4 run cover different texts ({len(ids_b)} vs {len(ids_q)}); "
            "score both on the same corpus"
        )
    scores = pd.concat([base, quant], ignore_index=True)
    return NF4Run(scores, path, reason, config, baseline, time.perf_counter() - start, info)


# --------------------------------------------------------------------------- correlations


def collapse_reason(
    scores: pd.DataFrame,
    configs: Sequence[str],
    baseline: str = "fp",
    collapse_bpb: float = 8.0,
    vocab_size: int | None = None,
    collapse_ppl: float | None = None,
) -> str | None:
    """Why the scores are not interpretable (``"collapsed: ..."`` or ``"non-finite: ..."``,
    the tags of :mod:`qhelpers.stats.scores`), for the baseline or any of ``configs`` in any
    language; None when they are fine. A randomly initialised model is usually "collapsed"
    (worse than a uniform byte model in some language), so its correlations measure noise."""
    eng = _stats.PairedScores(scores, baseline, [str(c) for c in configs], None, 1, 0, 0.95)
    return eng.undefined_reason(eng.configs, eng.langs, False, collapse_bpb, vocab_size, collapse_ppl)


def within_correlation(
    x: Sequence[float],
    y: Sequence[float],
    groups: Sequence[Any],
    method: str = "pearson",
    n_boot: int = 2000,
    n_perm: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Correlation of ``x`` and ``y`` WITHIN groups (e.g. texts within languages).

    Both variables are centred on their group means, which removes every difference between
    groups (for texts: the language's tokenization, script and overall fit), and the
    centred values are correlated (Pearson; Spearman: Pearson on the ranks of the centred
    values). Inference respects the groups: the bootstrap resamples within each group
    (and centres again), the permutation test permutes ``y`` within each group (Monte Carlo,
    ``p = (1 + hits) / (1 + n_perm)``, two-sided on ``|r|``). Returns the dict of
    :func:`qhelpers.stats.correlation` (``r, ci_low, ci_high, p_perm, perm_exact,
    p_parametric`` (NaN here), ``n, method, level, boot_valid, defined, reason``) plus
    ``n_groups``. Groups with a single member carry no within-group information and are
    dropped.
    """
    _stats.check_method(method)
    xa = np.asarray(x, dtype=np.float64).ravel()
    ya = np.asarray(y, dtype=np.float64).ravel()
    ga = np.asarray(groups, dtype=object).ravel()
    if not (xa.shape == ya.shape == ga.shape):
        raise ConfigError(f"x, y and groups must have the same length, got {xa.size}, {ya.size}, {ga.size}")
    codes, uniq = pd.factorize(pd.Series(ga).astype(str))
    sizes = np.bincount(codes, minlength=len(uniq))
    keep = sizes[codes] >= 2
    xa, ya, codes = xa[keep], ya[keep], codes[keep]
    codes, _ = pd.factorize(codes)
    n, k = int(xa.size), int(codes.max() + 1) if codes.size else 0
    out = _stats.correlation_record(n, method, level, n_groups=k)
    if n - k < 2:
        out["reason"] = f"too few: {n} pairs in {k} groups leave {n - k} within-group degrees of freedom (need >= 2)"
        return out
    bad = ~(np.isfinite(xa) & np.isfinite(ya))
    if bad.any():
        out["reason"] = f"non-finite: x or y is NaN/inf at positions {np.flatnonzero(bad)[:5].tolist()}"
        return out

    def centre(v: np.ndarray, c: np.ndarray) -> np.ndarray:
        """Subtract group means along the last axis (c: group code per column)."""
        m = v.shape[-1]
        onehot = np.zeros((m, k))
        onehot[np.arange(m), c] = 1.0
        means = (v @ onehot) / onehot.sum(axis=0)
        return v - means @ onehot.T

    def rows_r(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        if method == "spearman":
            xs, ys = _rankdata(xs, axis=-1), _rankdata(ys, axis=-1)
        return _stats.rowwise_pearson(xs, ys)

    xc, yc = centre(xa[None, :], codes), centre(ya[None, :], codes)
    if np.ptp(xc) == 0 or np.ptp(yc) == 0:
        out["reason"] = "constant: x or y does not vary within groups, so r is undefined"
        return out
    r = float(rows_r(xc, yc)[0])
    out["r"] = r
    rng = np.random.default_rng(int(seed))
    members = [np.flatnonzero(codes == g) for g in range(k)]
    # stratified bootstrap: resample within each group, centre again
    idx = np.concatenate([m[_stats.bootstrap_indices(m.size, int(n_boot), rng)] for m in members], axis=1)
    cb = np.concatenate([np.full(m.size, g) for g, m in enumerate(members)])
    with np.errstate(all="ignore"):
        rb = rows_r(centre(xa[idx], cb), centre(ya[idx], cb))
    out["boot_valid"] = int(np.isfinite(rb).sum())
    lo, hi = _stats.percentile_interval(rb, level)
    out["ci_low"], out["ci_high"] = float(lo), float(hi)
    def permuted_r(mm: int) -> np.ndarray:
        """``mm`` correlations with ``y`` permuted within each group."""
        yp = np.broadcast_to(yc, (mm, n)).copy()
        for m in members:
            yp[:, m] = rng.permuted(yp[:, m], axis=1)
        return rows_r(np.broadcast_to(xc, (mm, n)), yp)

    out["p_perm"] = _stats.monte_carlo_p(r, n, int(n_perm), permuted_r)
    if np.isfinite(lo) and np.isfinite(hi):
        out["defined"] = True
    else:
        out["reason"] = "non-finite: every bootstrap resample was degenerate; measure more texts"
    return out


def correlation_table(
    pairs: Mapping[str, pd.DataFrame | tuple[pd.DataFrame, str]],
    x: str = "k_eff",
    ys: Sequence[str] = ("degradation", "delta_bpb"),
    methods: Sequence[str] = ("pearson", "spearman"),
    n_boot: int = 2000,
    n_perm: int = 10000,
    seed: int = 0,
    level: float = 0.95,
    undefined_reason: str | None = None,
) -> pd.DataFrame:
    """Correlations of ``x`` with each of ``ys`` in each frame of ``pairs``.

    ``pairs`` maps a unit name (e.g. ``"languages"``, ``"texts"``) to a frame with one row
    per unit and columns ``x`` and ``ys``, or to ``(frame, group_column)`` for a
    :func:`within_correlation` (e.g. ``(per_text, "lang")``: texts within languages).
    One row per (unit, y, method) with every field of
    :func:`qhelpers.stats.correlation` (``r, ci_low, ci_high, p_perm, perm_exact,
    p_parametric, n, method, level, boot_valid, defined, reason``); get one as the dict
    :meth:`qhelpers.report.results.Hypothesis.evaluate` takes with :func:`correlation_row`.
    ``undefined_reason`` (e.g. from :func:`collapse_reason`) marks every row undefined with
    that reason while keeping the computed numbers for display.
    """
    rows = []
    for unit, item in pairs.items():
        frame, group = item if isinstance(item, tuple) else (item, None)
        for y in ys:
            for c in (x, y) + ((group,) if group else ()):
                if c not in frame.columns:
                    raise ConfigError(f"frame {unit!r} lacks column {c!r}")
            for method in methods:
                xv, yv = frame[x].to_numpy(dtype=np.float64), frame[y].to_numpy(dtype=np.float64)
                kw = dict(method=method, n_boot=n_boot, n_perm=n_perm, seed=seed, level=level)
                if group:
                    res = within_correlation(xv, yv, frame[group].to_numpy(), **kw)
                else:
                    res = _stats.correlation(xv, yv, **kw)
                    res["n_groups"] = math.nan
                if undefined_reason:
                    res["defined"] = False
                    res["reason"] = undefined_reason if not res.get("reason") else f"{undefined_reason}; {res['reason']}"
                rows.append({"unit": unit, "x": x, "y": y, **res})
    return pd.DataFrame(rows)


def correlation_row(table: pd.DataFrame, unit: str, y: str, method: str = "pearson") -> dict[str, Any]:
    """The one row of a :func:`correlation_table` for (unit, y, method) as a plain dict."""
    hit = table[(table["unit"] == unit) & (table["y"] == y) & (table["method"] == method)]
    if len(hit) != 1:
        raise ConfigError(f"correlation table has {len(hit)} rows for unit={unit!r}, y={y!r}, method={method!r}")
    row = hit.iloc[0].to_dict()
    for k, v in row.items():
        if isinstance(v, np.generic):
            row[k] = v.item()
    return row


def config_difference(
    scores: pd.DataFrame,
    config_a: str,
    config_b: str,
    metric: str = "delta_bpb",
    langs: Sequence[str] | None = None,
    baseline: str = "fp",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    collapse_bpb: float = 8.0,
    vocab_size: int | None = None,
    collapse_ppl: float | None = None,
    allow_collapsed: bool = False,
    method: str = _stats.DEFAULT_METHOD,
) -> _stats.Estimate:
    """Mean over ``langs`` of ``metric(config_a) - metric(config_b)``, paired bootstrap CI
    (``method``: the interval method of :mod:`qhelpers.stats`, studentized by default).

    ``metric`` is a per-language change of :func:`qhelpers.stats.language_table`
    (``"delta_bpb"`` by default; per language the token- or byte-weighted aggregate over its
    texts). Positive means ``config_a`` degrades more than ``config_b`` (so
    ``config_difference(s, "int4-absmax", "int4-kurtosis_heuristic") > 0`` means the
    heuristic beats absmax). The interval resamples texts once for both configs and the
    baseline, and, on a parallel corpus, once for every language (the same resample as
    ``language_table`` with the same ``seed``). Undefined (``stats.Estimate`` with a
    reason) for non-finite scores or, unless ``allow_collapsed``, a collapsed model
    (:mod:`qhelpers.stats.scores` collapse rule).
    """
    if str(config_a) == str(config_b):
        raise ConfigError(f"config_a and config_b are the same config {config_a!r}")
    df = _stats.validate_scores(scores)
    chosen = list(dict.fromkeys(df.loc[df["config"] == str(baseline), "lang"])) if langs is None else [str(x) for x in langs]
    w = 1.0 / len(chosen)
    terms = {**{(str(config_a), lang): w for lang in chosen}, **{(str(config_b), lang): -w for lang in chosen}}
    return _stats.config_contrast(df, terms, baseline, metric, n_boot, seed, level, collapse_bpb, vocab_size,
                                  collapse_ppl, allow_collapsed, method)


def mean_change_table(
    scores: pd.DataFrame,
    configs: Sequence[str] | None = None,
    metric: str = "delta_bpb",
    reference: str | None = None,
    langs: Sequence[str] | None = None,
    baseline: str = "fp",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """One row per quantized config: the mean over languages of ``metric`` with a paired
    bootstrap CI (``mean``, ``mean_ci_low``, ``mean_ci_high``) and, when ``reference`` is
    given, ``gain = mean(reference) - mean(config)`` (positive: the config degrades less
    than the reference) with its CI from :func:`config_difference`, plus ``defined`` and
    ``reason`` of the gain. Columns ``collapsed``/``note`` flag configs whose mean is
    not interpretable (collapse rule of :mod:`qhelpers.stats.scores`).
    """
    eng = _stats.PairedScores(scores, baseline, configs, langs, n_boot, seed, level)
    rows = []
    for c in eng.configs:
        est = eng.estimate(eng.group_stat(c, eng.langs, metric), eng.n_min(eng.langs))
        note = eng.undefined_reason([c], eng.langs) or ""
        row = {"config": c, "mean": est.value, "mean_ci_low": est.ci_low, "mean_ci_high": est.ci_high,
               "n": est.n, "collapsed": note.startswith("collapsed"), "note": note}
        if reference is not None:
            if c == str(reference):
                gain = _stats.Estimate(0.0, 0.0, 0.0, est.n, level)
            else:
                gain = config_difference(scores, str(reference), c, metric, langs, baseline, n_boot, seed, level)
            row.update(gain=gain.value, gain_ci_low=gain.ci_low, gain_ci_high=gain.ci_high,
                       defined=gain.defined, reason=gain.reason or "")
        rows.append(row)
    return pd.DataFrame(rows)


def weight_error_table(
    loaded: Any,
    variants: Mapping[str, Any],
    layers: Iterable[int] | None = None,
    outlier_sigma: float = 3.0,
) -> pd.DataFrame:
    """How much each variant changes the weights it quantizes (what clipping trades).

    For every variant (a :class:`~qhelpers.quant.engine.Variant` with a quantization config), over
    the tensors its plan quantizes (restricted to decoder ``layers`` when given), in fp64:

    * ``rel_mse``: sum of squared errors / sum of squared weights (pooled over tensors);
    * ``outlier_rel_mse``: the same over the weights farther than ``outlier_sigma``
      standard deviations from their tensor's mean (what clipping cuts);
    * ``outlier_frac``: the fraction of such weights; ``max_abs_err``: the largest error.

    Returns one row per variant: ``config, n_tensors, n_weights`` and the columns above.
    """
    from qhelpers.models.archs import get_arch
    from qhelpers.quant.engine import QuantEngine
    from qhelpers.quant.quantizers import fake_quantize

    engine = QuantEngine(loaded)
    prefix = get_arch(engine.model).layers
    wanted = None if layers is None else {int(i) for i in layers}
    params = dict(engine.model.named_parameters())
    rows = []
    for name, variant in variants.items():
        if variant.quant is None:
            continue
        plan = engine.plan(variant)
        sq_err = sq_ref = o_err = o_ref = 0.0
        n_w = n_out = n_t = 0
        max_err = 0.0
        for pname, tplan in plan.tensors.items():
            if wanted is not None:
                rest = pname[len(prefix) + 1 :] if pname.startswith(prefix + ".") else ""
                head = rest.split(".", 1)[0]
                if not head.isdigit() or int(head) not in wanted:
                    continue
            w = params[pname].detach()
            deq = fake_quantize(w, variant.quant, out_dim=tplan.out_dim, exclude=tplan.exclude_mask(w))
            keep = tplan.exclude_mask(w)
            if keep is not None:
                deq = torch.where(keep, w, deq)
            w64, e = w.double(), deq.double() - w.double()
            far = (w64 - w64.mean()).abs() > outlier_sigma * w64.std(unbiased=False)
            sq_err += float((e * e).sum())
            sq_ref += float((w64 * w64).sum())
            o_err += float((e[far] ** 2).sum())
            o_ref += float((w64[far] ** 2).sum())
            n_out += int(far.sum())
            n_w += w.numel()
            n_t += 1
            max_err = max(max_err, float(e.abs().max()))
        rows.append({
            "config": name, "n_tensors": n_t, "n_weights": n_w,
            "rel_mse": sq_err / sq_ref if sq_ref > 0 else math.nan,
            "outlier_rel_mse": o_err / o_ref if o_ref > 0 else math.nan,
            "outlier_frac": n_out / n_w if n_w else math.nan,
            "max_abs_err": max_err,
        })
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- plots


def plot_layer_kurtosis(
    table: pd.DataFrame,
    value: str = "kurtosis",
    outliers: Mapping[str, Any] | None = None,
    ax=None,
    title: str | None = None,
):
    """Bar chart of the per-layer kurtosis (``table``: ``layer`` and ``value`` columns) with
    seed 003's outlier threshold as a dashed line and the outlier layers in red."""
    from qhelpers.report.plots import new_axes

    fig, ax = new_axes(ax, figsize=(9, 4))
    outliers = outliers or outlier_layers(table.set_index("layer")[value])
    layers = table["layer"].to_numpy()
    vals = table[value].to_numpy(dtype=np.float64)
    colors = ["#d62728" if int(l) in set(outliers["layers"]) else "#1f77b4" for l in layers]
    ax.bar(layers, np.nan_to_num(vals), color=colors)
    ax.axhline(outliers["threshold"], color="#d62728", linestyle="--", linewidth=1,
               label=f"outlier threshold mean + {outliers['n_sd']:g} sd = {outliers['threshold']:.2f}")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"excess kurtosis ({value})")
    ax.set_title(title or "Per-layer weight kurtosis")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_activation_profile(weights: pd.DataFrame, ax=None, title: str | None = None):
    """One line per language: the normalised activation weight ``a_l`` by layer (the
    ``by="lang"`` table of :func:`activation_weights`)."""
    from qhelpers.report.plots import new_axes, resource_group

    fig, ax = new_axes(ax, figsize=(9, 4))
    for lang, part in weights.groupby("lang", sort=False):
        style = "-" if resource_group(str(lang)) == "HR" else "--"
        ax.plot(part["layer"], part["weight"], style, marker=".", label=str(lang))
    ax.set_xlabel("layer")
    ax.set_ylabel("a_l (share of mean |activation|)")
    ax.set_title(title or "Activation weights per language (dashed: low-resource)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def plot_keff_scatter(
    frame: pd.DataFrame,
    x: str = "k_eff",
    y: str = "degradation",
    ax=None,
    title: str | None = None,
    label_points: bool = False,
):
    """``y`` against ``x``, one colour per language, with a least-squares line; points are
    labelled with their language when ``label_points`` (use it for the per-language frame)."""
    from qhelpers.report.plots import new_axes

    fig, ax = new_axes(ax, figsize=(6, 4.5))
    for lang, part in frame.groupby("lang", sort=False):
        ax.scatter(part[x], part[y], s=60 if label_points else 25, label=str(lang), alpha=0.85)
        if label_points:
            for xi, yi in zip(part[x], part[y]):
                ax.annotate(str(lang), (xi, yi), xytext=(4, 4), textcoords="offset points", fontsize=9)
    xv, yv = frame[x].to_numpy(dtype=np.float64), frame[y].to_numpy(dtype=np.float64)
    ok = np.isfinite(xv) & np.isfinite(yv)
    if ok.sum() >= 2 and np.ptp(xv[ok]) > 0:
        slope, icept = np.polyfit(xv[ok], yv[ok], 1)
        grid = np.linspace(xv[ok].min(), xv[ok].max(), 50)
        ax.plot(grid, slope * grid + icept, "k--", alpha=0.5)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if title:
        ax.set_title(title)
    if not label_points:
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig

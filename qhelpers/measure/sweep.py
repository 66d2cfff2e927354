"""Run many variants over one corpus on one loaded model.

The model is loaded once, texts are tokenized and batched once, each variant is applied,
scored and restored; quantized tensors are shared across variants through the engine's
cache. The result is one tidy per-text table that :mod:`qhelpers.stats.scores` summarises.

With ``prefix_cache`` (the default), variants run in an order that makes the most of
:mod:`qhelpers.quant.prefix_cache` (baseline first, then those quantizing the most layers) and reuse the
hidden states of the layers they share with earlier ones; results come back in the caller's
order either way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pandas as pd
import torch

from qhelpers.measure.scoring import MeasureConfig, Scorer, corpus_scorer
from qhelpers.models.loaded import as_module
from qhelpers.quant.engine import QuantEngine, Variant
from qhelpers.quant.prefix_cache import PrefixCache, prefix_signatures, run_order
from qhelpers.util.errors import ConfigError
from qhelpers.util.progress import progress_bar

BASELINE = "fp"


@dataclass
class SweepResult:
    """Per-text scores of every variant, plus what each variant protected and how long it took."""

    scores: pd.DataFrame
    variants: dict[str, Variant]
    overhead: pd.DataFrame
    seconds: dict[str, float] = field(default_factory=dict)
    baseline: str = BASELINE
    #: Order the variants actually ran in (prefix caching may reorder them).
    run_order: list[str] = field(default_factory=list)
    #: Prefix cache counters of the sweep: layers run / skipped, hits, captured, peak bytes ...
    prefix_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def configs(self) -> list[str]:
        """Variant names in the caller's order, baseline first."""
        return list(self.variants)

    def language_table(self, **kwargs: Any) -> pd.DataFrame:
        """Per (variant, language) perplexity, bits per byte and deltas with paired bootstrap CIs."""
        from qhelpers.stats.tables import language_table

        table = language_table(self.scores, baseline=self.baseline, **kwargs)
        return table.merge(self.overhead[["config", "protected_fraction"]], on="config", how="left")

    def baseline_table(self, **kwargs: Any) -> pd.DataFrame:
        from qhelpers.stats.tables import baseline_table

        return baseline_table(self.scores, baseline=self.baseline, **kwargs)

    def disparity(self, config: str, **kwargs: Any):
        """Disparity of one variant against the baseline (see :func:`qhelpers.stats.disparity`)."""
        from qhelpers.stats.tables import disparity

        return disparity(self.scores, config, baseline=self.baseline, **kwargs)

    def disparity_table(self, measure: str = "ratio", **kwargs: Any) -> pd.DataFrame:
        """One row per non-baseline variant: its disparity (``measure="ratio"``: mean LR change /
        mean HR change, the seeds'; ``"difference"``: mean LR minus mean HR) with CI, the
        protected fraction, and the reason when undefined."""
        from qhelpers.stats.tables import disparity, disparity_difference

        if measure not in ("ratio", "difference"):
            raise ConfigError(f"measure must be 'ratio' or 'difference', got {measure!r}")
        compute = disparity if measure == "ratio" else disparity_difference
        rows = []
        for name in self.configs:
            if name == self.baseline:
                continue
            estimate = compute(self.scores, name, baseline=self.baseline, **kwargs)
            rows.append(
                {
                    "config": name,
                    "disparity": estimate.value,
                    "disparity_ci_low": estimate.ci_low,
                    "disparity_ci_high": estimate.ci_high,
                    "n": estimate.n,
                    "defined": estimate.defined,
                    "reason": estimate.reason or "",
                }
            )
        return pd.DataFrame(rows).merge(self.overhead[["config", "protected_fraction"]], on="config", how="left")


def as_variants(variants: Sequence[Variant] | Mapping[str, Any]) -> dict[str, Variant]:
    """Normalise a list of variants or a {name: Variant} mapping into an ordered dict."""
    if isinstance(variants, Mapping):
        out = {}
        for name, variant in variants.items():
            if not isinstance(variant, Variant):
                raise ConfigError(f"variant {name!r} must be a Variant, got {type(variant).__name__}")
            out[name] = variant if variant.name == name else Variant(name, variant.quant, variant.protect, variant.scope)
        return out
    out = {}
    for variant in variants:
        if variant.name in out:
            raise ConfigError(f"two variants are named {variant.name!r}; names must be unique")
        out[variant.name] = variant
    return out


#: Share of the free memory (at the sweep's start) for a resident engine's dequantized tensors: the
#: scorer's batches may take half of it (``CUDA_ACTIVATION_FRACTION``), the prefix cache a quarter.
ENGINE_MEMORY_FRACTION = 0.25


def default_engine(loaded: Any, compiled: bool = False) -> QuantEngine:
    """``run_sweep``'s own engine. Resident (dequantized weights swapped in) when twice the model's
    parameters fit in the free GPU memory, or, for a compiled scorer on the CPU, in the available RAM
    (a streaming engine's hooks sit inside every quantized layer, which then runs eagerly); streaming
    otherwise. A resident engine keeps the dequantized tensors it swapped in for the next variants
    (``QuantEngine(dense_fraction=...)``) in :data:`ENGINE_MEMORY_FRACTION` of that memory, less the
    copy a variant swaps in, up to one more copy of the parameters."""
    model = as_module(loaded)
    param = next(model.parameters(), None)
    if param is None:
        return QuantEngine(loaded)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if param.device.type == "cuda":
        free = torch.cuda.mem_get_info(param.device)[0]
    elif compiled:
        import psutil

        free = psutil.virtual_memory().available
    else:
        return QuantEngine(loaded)
    if free <= 2 * size:
        return QuantEngine(loaded)
    return QuantEngine(loaded, resident=True,
                       dense_fraction=min(1.0, max(0.0, ENGINE_MEMORY_FRACTION * free - size) / size))


def run_sweep(
    loaded: Any,
    corpus: Any,
    variants: Sequence[Variant] | Mapping[str, Variant],
    measure: MeasureConfig = MeasureConfig(),
    engine: QuantEngine | None = None,
    scorer: Scorer | None = None,
    progress: bool = True,
    baseline: str = BASELINE,
    prefix_cache: bool | int | PrefixCache = True,
) -> SweepResult:
    """Score ``corpus`` under the full-precision baseline and every variant.

    Args:
        loaded: a :class:`~qhelpers.models.loading.LoadedModel`.
        corpus: a :class:`~qhelpers.text.corpora.Corpus` (ignored when ``scorer`` is given).
        variants: the configurations; a baseline named ``baseline`` is added if absent.
        engine, scorer: reuse across sweeps of the same model (cache, tokenization). Without
            an engine, one is made: streaming (dequantizes each module's weights at every
            batch, least memory) on CPU; resident (dequantized once, kept across variants as memory
            allows) on CUDA when the free GPU memory exceeds twice the model's parameters, and on the
            CPU for a compiled scorer (``MeasureConfig(compile=True)``) when the available RAM does
            (:func:`default_engine`).
        prefix_cache: reuse the hidden states of layers that a variant computes exactly as an
            earlier one did (:mod:`qhelpers.quant.prefix_cache`). True: the scorer's cache with its default
            budget; an int: that budget in bytes; a :class:`~qhelpers.quant.prefix_cache.PrefixCache`: use
            it; False: off. Variants then run in a cache-friendly order (``run_order``);
            scores, ``overhead`` and ``seconds`` stay in the caller's order. Results equal
            those without the cache (the same arithmetic on the same batches).
    """
    ordered = as_variants(variants)
    if baseline not in ordered:
        ordered = {baseline: Variant(baseline), **ordered}
    elif not ordered[baseline].is_baseline:
        raise ConfigError(f"the variant named {baseline!r} must be the full-precision baseline (quant=None)")
    else:
        ordered = {baseline: ordered[baseline], **{k: v for k, v in ordered.items() if k != baseline}}
    scorer = scorer or corpus_scorer(loaded, corpus, measure)
    engine = engine or default_engine(loaded, scorer.compiled is not None)
    names = list(ordered)

    cache = None
    signatures: dict[str, Any] = {}
    order = names
    if prefix_cache is not False and prefix_cache is not None:
        if isinstance(prefix_cache, PrefixCache):
            scorer.prefix_cache = prefix_cache
            cache = prefix_cache
        elif prefix_cache is True:
            cache = scorer.enable_prefix_cache()
        elif isinstance(prefix_cache, int):
            cache = scorer.enable_prefix_cache(prefix_cache)
        else:
            raise ConfigError(f"prefix_cache must be True, False, a byte budget or a PrefixCache, got {prefix_cache!r}")
        signatures = dict(zip(ordered, prefix_signatures(engine, list(ordered.values()))))
        sigs = [signatures[name] for name in names]
        order = [names[i] for i in run_order(sigs, baseline=0)]
        cache.plan([signatures[name] for name in order])
        before = dict(cache.stats)

    frames: dict[str, pd.DataFrame] = {}
    overhead: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    items: Any = order
    if progress:
        items = progress_bar(items, desc="variants", total=len(order))
    try:
        for name in items:
            variant = ordered[name]
            start = time.perf_counter()
            damage = None
            if measure.damage:
                damage = "reference" if name == baseline else "compare"
            with engine.applied(variant):
                frames[name] = scorer.score(config=name, prefix=signatures.get(name), damage=damage)
            seconds[name] = time.perf_counter() - start
            overhead[name] = {"config": name, **engine.overhead(variant)}
    finally:
        stats: dict[str, Any] = {}
        if cache is not None:
            keys = ("layers_run", "layers_skipped", "hits", "captured", "evicted", "skipped", *cache.stats)
            stats = {k: cache.stats.get(k, 0) - before.get(k, 0) for k in dict.fromkeys(keys)}
            stats["peak_bytes"] = cache.peak_bytes
            stats["budget_bytes"] = cache.budget_bytes
            stats["disabled"] = cache.disabled
            cache.end_plan()
    scores = pd.concat([frames[name] for name in names], ignore_index=True)
    return SweepResult(
        scores=scores,
        variants=ordered,
        overhead=pd.DataFrame([overhead[name] for name in names]),
        seconds={name: seconds[name] for name in names},
        baseline=baseline,
        run_order=order,
        prefix_stats=stats,
    )

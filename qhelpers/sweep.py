"""Run many variants over one corpus on one loaded model.

The model is loaded once, texts are tokenized and batched once, each variant is applied,
scored and restored; quantized tensors are shared across variants through the engine's
cache. The result is one tidy per-text table that :mod:`qhelpers.stats` summarises.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pandas as pd

from .engine import QuantEngine, Variant
from .errors import ConfigError
from .measure import MeasureConfig, Scorer, corpus_scorer, progress_bar

BASELINE = "fp"


@dataclass
class SweepResult:
    """Per-text scores of every variant, plus what each variant protected and how long it took."""

    scores: pd.DataFrame
    variants: dict[str, Variant]
    overhead: pd.DataFrame
    seconds: dict[str, float] = field(default_factory=dict)
    baseline: str = BASELINE

    @property
    def configs(self) -> list[str]:
        """Variant names in run order, baseline first."""
        return list(self.variants)

    def language_table(self, **kwargs: Any) -> pd.DataFrame:
        """Per (variant, language) perplexity, bits per byte and deltas with paired bootstrap CIs."""
        from .stats import language_table

        table = language_table(self.scores, baseline=self.baseline, **kwargs)
        return table.merge(self.overhead[["config", "protected_fraction"]], on="config", how="left")

    def baseline_table(self, **kwargs: Any) -> pd.DataFrame:
        from .stats import baseline_table

        return baseline_table(self.scores, baseline=self.baseline, **kwargs)

    def disparity(self, config: str, **kwargs: Any):
        """Disparity of one variant against the baseline (see :func:`qhelpers.stats.disparity`)."""
        from .stats import disparity

        return disparity(self.scores, config, baseline=self.baseline, **kwargs)

    def disparity_table(self, measure: str = "ratio", **kwargs: Any) -> pd.DataFrame:
        """One row per non-baseline variant: its disparity (``measure="ratio"``: mean LR change /
        mean HR change, the seeds'; ``"difference"``: mean LR minus mean HR) with CI, the
        protected fraction, and the reason when undefined."""
        from .stats import disparity, disparity_difference

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


def run_sweep(
    loaded: Any,
    corpus: Any,
    variants: Sequence[Variant] | Mapping[str, Variant],
    measure: MeasureConfig = MeasureConfig(),
    engine: QuantEngine | None = None,
    scorer: Scorer | None = None,
    progress: bool = True,
    baseline: str = BASELINE,
) -> SweepResult:
    """Score ``corpus`` under the full-precision baseline and every variant.

    Args:
        loaded: a :class:`~qhelpers.models.LoadedModel`.
        corpus: a :class:`~qhelpers.corpora.Corpus` (ignored when ``scorer`` is given).
        variants: the configurations; a baseline named ``baseline`` is added if absent.
        engine, scorer: reuse across sweeps of the same model (cache, tokenization).
    """
    ordered = as_variants(variants)
    if baseline not in ordered:
        ordered = {baseline: Variant(baseline), **ordered}
    elif not ordered[baseline].is_baseline:
        raise ConfigError(f"the variant named {baseline!r} must be the full-precision baseline (quant=None)")
    else:
        ordered = {baseline: ordered[baseline], **{k: v for k, v in ordered.items() if k != baseline}}
    engine = engine or QuantEngine(loaded)
    scorer = scorer or corpus_scorer(loaded, corpus, measure)
    frames, overhead, seconds = [], [], {}
    items = list(ordered.items())
    if progress:
        items = progress_bar(items, desc="variants", total=len(items))
    for name, variant in items:
        start = time.perf_counter()
        with engine.applied(variant):
            frames.append(scorer.score(config=name))
        seconds[name] = time.perf_counter() - start
        overhead.append({"config": name, **engine.overhead(variant)})
    scores = pd.concat(frames, ignore_index=True)
    return SweepResult(scores=scores, variants=ordered, overhead=pd.DataFrame(overhead), seconds=seconds, baseline=baseline)

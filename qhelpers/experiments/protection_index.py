"""Study-level computations for the replication of seed 002 (the experiment index).

:func:`plan_strategies` turns the notebook's parameters into the variants to run (the built-in
set or the user's ``STRATEGIES``); :class:`IndexStudy` wraps the resulting
:class:`~qhelpers.measure.sweep.SweepResult` and answers the index's questions with
:mod:`qhelpers.stats.scores` (every number with a paired bootstrap interval over texts).

Disparity, by protocol (``D`` below; lower means low-resource languages lose less):

``sound``
    mean over LR languages of the change in bits per byte minus the mean over HR languages
    (parity 0; stays defined when the HR change is ~0). Per language: ``delta_bpb(lang) -
    delta_bpb(en)``.
``seed``
    the seeds' "average LR disparity": mean over LR languages of ``degradation(lang) /
    degradation(en)`` with ``degradation = (ppl_q - ppl_fp) / ppl_fp`` (parity 1). Per
    language: ``degradation(lang) / degradation(en)``.

Equal-overhead controls (:meth:`IndexStudy.control_comparison`): a control (random or
magnitude element protection, random layer pairs) is compared with the structural protection
(L0 + L_last) at the same number of full-precision parameters (checked, 1 % tolerance), on
each group separately: the extra change in bits per byte of the LR and of the HR languages
under the control. "The control fails" (:meth:`IndexStudy.control_fails`) means the LR
languages lose more under it; ``D(control) - D(structure)`` is not used for that, since a
control that spares the HR languages more raises ``D`` even when both groups lose less.

Every estimate's ``value`` is the plain arithmetic of the protocol on the language aggregates
(for the seeds' single-sentence corpus, exactly the seeds' numbers), also when the estimate is
undefined: ``defined=False`` with a reason when the model collapsed (:mod:`qhelpers.stats.scores`
collapse rule), when a denominator is ~0, or with ``"too few"`` when a language has a single
text (no interval exists). Verdicts only ever use defined intervals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from qhelpers import stats
from qhelpers.measure.sweep import SweepResult
from qhelpers.measure.weight_stats import layer_table
from qhelpers.models.loaded import as_module
from qhelpers.quant import strategies
from qhelpers.quant.engine import QuantEngine, Variant
from qhelpers.report.plots import pareto_frontier
from qhelpers.stats.bootstrap import Estimate
from qhelpers.text.corpora import Corpus, load_corpus
from qhelpers.util.errors import ConfigError

__all__ = [
    "PRIMARY",
    "MIN_EFFECTS",
    "CONTENT_METRIC",
    "INDEX_PARETO",
    "StudyPlan",
    "IndexStudy",
    "load_study_corpus",
    "plan_strategies",
    "short_reason",
]

#: The disparity each protocol reports: stats measure, per-language metric, parity point, label.
PRIMARY: dict[str, dict[str, Any]] = {
    "sound": {"measure": "difference", "metric": "delta_bpb", "parity": 0.0,
              "label": "mean LR - mean HR change in bits per byte"},
    "seed": {"measure": "ratio", "metric": "degradation", "parity": 1.0,
             "label": "mean LR degradation / degradation of the reference (en)"},
}

#: The smallest difference of practical size, per disparity metric: a hypothesis's ``min_effect``
#: (SUPPORTED needs its interval to clear the threshold by this much). Bits per byte: 0.01, half a
#: percent of a ~2 bits-per-byte baseline and about a tenth of what INT4 costs SmolLM2. Bits per
#: parallel paragraph: 1.5, the same 0.01 bits per byte on a median UDHR paragraph (~150 bytes).
#: The seeds' ratio of degradations (parity 1): 0.1, a tenth of parity. Correlations: 0.1.
MIN_EFFECTS: dict[str, float] = {
    "delta_bpb": 0.01,
    "delta_bits_per_paragraph": 1.5,
    "degradation": 0.1,
    "correlation": 0.1,
}

#: The content-matched metric (issue 11): Delta bits for the same paragraph in every language.
CONTENT_METRIC = "delta_bits_per_paragraph"

#: Seed 002's Pareto table (GPT-2 small, seed protocol, one sentence per language).
INDEX_PARETO = pd.DataFrame(
    [
        ("none", 0.0, 206.9),
        ("layer0_ln_only", 0.002, 41.6),
        ("layer0_attn", 1.90, 35.0),
        ("layer0", 5.70, 3.6),
        ("L0+L11", 11.39, 15.1),
        ("L0+L11+ln_f+biases", 11.46, 3.4),
        ("L0+L11+all_ln", 11.42, 2.6),
        ("even_layers", 34.1, 0.5),
    ],
    columns=["index_strategy", "index_overhead_pct", "index_avg_lr_disparity"],
)

_TOO_FEW = "too few: {n} text per language gives no confidence interval (value is the point estimate only)"


def load_study_corpus(name: str, langs: Sequence[str], n_texts: int | None = None, seed: int = 0) -> tuple[Corpus, str]:
    """The corpus narrowed to the requested languages it has, and a note naming any it lacks
    (the seeds' corpora hold only en, he and ar)."""
    full = load_corpus(name)
    kept = [lang for lang in langs if lang in full.langs]
    if not kept:
        raise ConfigError(f"corpus {name!r} has none of the languages {list(langs)}; it has {list(full.langs)}")
    dropped = [lang for lang in langs if lang not in full.langs]
    note = f"corpus {name!r} has no texts in {dropped}; the study uses {kept}" if dropped else ""
    return load_corpus(name, langs=kept, n_texts=n_texts, seed=seed), note


def _has_biases(model: Any) -> bool:
    model = as_module(model)
    return any(name.endswith("bias") for name, _ in model.named_parameters())


@dataclass
class StudyPlan:
    """The strategies of one study: variants, their groups and the model facts behind them."""

    variants: dict[str, Variant]
    groups: dict[str, str]
    protocol: str
    bits: int
    n_layers: int
    custom: bool = False
    sweep_layers: tuple[int, ...] = ()
    layer_sweep: tuple[str, ...] = ()
    precision_bits: tuple[int, ...] = ()
    gateway_kept_fraction: float | None = None
    variance: pd.DataFrame | None = None
    top_variance: tuple[int, ...] = ()
    notes: list[str] = field(default_factory=list)

    @property
    def last(self) -> int:
        return self.n_layers - 1

    @property
    def gateway(self) -> str:
        """Name of the L0 + last layer strategy."""
        return f"L0+L{self.last}"

    @property
    def wide_prefix(self) -> str:
        """Name prefix of the strategies that quantize norms and embeddings too."""
        wide = strategies.wide_scope(self.protocol)
        return "" if wide == strategies.protocol_settings(self.protocol)[1] else f"{wide}:"

    def table(self, engine: QuantEngine) -> pd.DataFrame:
        """One row per strategy: group, scope, quantizer, what it protects, protected fraction."""
        rows = []
        for name, variant in self.variants.items():
            overhead = engine.overhead(variant)
            rows.append({
                "strategy": name,
                "group": self.groups.get(name, ""),
                "scope": variant.scope,
                "quant": variant.quant.label if variant.quant is not None else "fp",
                "protects": variant.protect.describe(),
                "protected_fraction": overhead["protected_fraction"],
            })
        return pd.DataFrame(rows)


def plan_strategies(
    loaded: Any,
    engine: QuantEngine | None = None,
    protocol: str = "sound",
    bits: int = 4,
    custom: Mapping[str, Any] | None = None,
    layer_sweep: Sequence[str] = ("layer",),
    max_sweep_layers: int | None = None,
    precision_bits: Sequence[int] = (2, 3, 4, 6, 8),
    random_draws: int = 2,
    detail: str = "quick",
    seed: int = 0,
) -> StudyPlan:
    """The variants of the study.

    ``custom`` (the notebook's ``STRATEGIES``) replaces the built-in set when given (see
    :func:`qhelpers.quant.strategies.custom_variants`). Otherwise the built-in set replicating the
    index: :func:`~qhelpers.quant.strategies.index_variants` over :func:`~qhelpers.quant.strategies.sweep_layers`,
    random and magnitude element protection and ``random_draws`` random layer pairs at the
    overhead of ``L0+L{last}`` (:func:`~qhelpers.quant.strategies.equal_overhead_variants`, the
    fraction being that strategy's ``scope_kept_fraction``), the two layers of highest pooled
    weight variance (``top2_variance``) and the precision axis.
    """
    n_layers = int(loaded.n_layers)
    if custom is not None:
        variants = strategies.custom_variants(custom, protocol, bits)
        return StudyPlan(
            variants, {name: "custom" for name in variants}, protocol, bits, n_layers, custom=True,
            notes=["STRATEGIES replaces the built-in set: sections that need built-in strategies are skipped"],
        )
    engine = engine or QuantEngine(loaded)
    layers = strategies.sweep_layers(n_layers, max_sweep_layers)
    grouped = strategies.index_variants(
        n_layers, protocol, bits, has_biases=_has_biases(loaded), layer_sweep=tuple(layer_sweep),
        layers=layers, detail=detail,
    )
    variants: dict[str, Variant] = {}
    groups: dict[str, str] = {}
    for group, members in grouped.items():
        for name, variant in members.items():
            variants[name] = variant
            groups[name] = group
    last = n_layers - 1
    gateway = f"L0+L{last}"
    fraction = engine.plan(variants[gateway]).scope_kept_fraction
    exclude = (0, last) if n_layers > 4 else ()
    controls = strategies.equal_overhead_variants(
        fraction, n_layers, protocol, bits, k=min(2, n_layers), draws=random_draws, seed=seed, exclude=exclude
    )
    variance = layer_table(loaded.model)
    top = strategies.top_layers_by(dict(zip(variance["layer"], variance["variance_pooled"])), min(2, n_layers))
    controls["top2_variance"] = strategies.layer_set_variant("top2_variance", top, protocol, bits)
    for name, variant in controls.items():
        variants[name], groups[name] = variant, "equal-overhead controls"
    for name, variant in strategies.precision_variants(n_layers, precision_bits, protocol, skip_bits=bits).items():
        variants[name], groups[name] = variant, "precision"
    notes = []
    if len(layers) < n_layers:
        notes.append(f"per-layer sweeps visit {len(layers)} of {n_layers} layers: {list(layers)}")
    if not _has_biases(loaded):
        notes.append(f"{loaded.model_type} has no biases: the bias strategies are not run")
    return StudyPlan(
        variants, groups, protocol, bits, n_layers, sweep_layers=layers, layer_sweep=tuple(layer_sweep),
        precision_bits=tuple(int(b) for b in precision_bits), gateway_kept_fraction=fraction,
        variance=variance, top_variance=top, notes=notes,
    )


def short_reason(reason: str | None, keep: int = 2) -> str:
    """A stats reason with its list of (config/lang ...) items cut to ``keep`` and a count
    (collapse reasons list every pair and can run to pages)."""
    if not reason or ": " not in reason:
        return reason or ""
    tag, body = reason.split(": ", 1)
    tail = ""
    if " (" in body and body.endswith(")"):
        cut = body.rfind(" (the model")
        if cut > 0:
            body, tail = body[:cut], body[cut:]
    parts = body.split("; ")
    if len(parts) > keep + 1:
        body = "; ".join(parts[:keep]) + f"; and {len(parts) - keep} more"
    return f"{tag}: {body}{tail}"


class IndexStudy:
    """The index's questions answered on one sweep.

    Args:
        sweep: the result of :func:`qhelpers.measure.sweep.run_sweep` over the plan's variants.
        plan: the :class:`StudyPlan` (None: every variant counts as "custom").
        protocol: "sound" or "seed" (chooses the disparity, see the module docstring).
        lr_langs, hr_langs: language groups (only those present are used).
        reference: the per-language reference (the seeds': "en").
        vocab_size: passed to the stats collapse rule (ppl > vocab_size means collapsed).
    """

    def __init__(
        self,
        sweep: SweepResult,
        plan: StudyPlan | None = None,
        protocol: str = "sound",
        lr_langs: Sequence[str] = stats.LR_LANGS,
        hr_langs: Sequence[str] = stats.HR_LANGS,
        reference: str = "en",
        n_boot: int = 2000,
        seed: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        if protocol not in PRIMARY:
            raise ConfigError(f"unknown protocol {protocol!r}; valid: {', '.join(PRIMARY)}")
        self.sweep, self.plan, self.protocol = sweep, plan, protocol
        present = list(dict.fromkeys(sweep.scores.loc[sweep.scores["config"] == sweep.baseline, "lang"]))
        self.lr_langs = [lang for lang in lr_langs if lang in present]
        self.hr_langs = [lang for lang in hr_langs if lang in present]
        if reference not in present:
            if protocol == "seed":
                raise ConfigError(f"PROTOCOL 'seed' measures disparity against {reference!r}; include it in LANGS")
            reference = self.hr_langs[0] if self.hr_langs else present[0]
        self.reference = reference
        if not self.lr_langs:
            raise ConfigError(f"none of the LR languages {list(lr_langs)} was measured (languages: {present})")
        if protocol == "sound" and not self.hr_langs:
            raise ConfigError(f"none of the HR languages {list(hr_langs)} was measured (languages: {present})")
        self.langs = present
        self.n_boot, self.seed, self.vocab_size = int(n_boot), int(seed), vocab_size
        self.primary = PRIMARY[protocol]
        self.languages = sweep.language_table(n_boot=n_boot, seed=seed, vocab_size=vocab_size)
        self._point = self.languages.set_index(["config", "lang"])
        self._cache: dict[tuple, Estimate] = {}

    # ------------------------------------------------------------------ basics
    @property
    def parity(self) -> float:
        return float(self.primary["parity"])

    @property
    def parallel(self) -> bool:
        """Whether every language has the same text ids (a parallel corpus such as UDHR)."""
        base = self.sweep.scores[self.sweep.scores["config"] == self.sweep.baseline]
        ids = {lang: frozenset(part["text_id"].astype(str)) for lang, part in base.groupby("lang")}
        return len(set(ids.values())) == 1

    def primary_metric(self) -> str:
        """The metric of the primary hypothesis: under ``sound``, the content-matched
        :data:`CONTENT_METRIC` when the statistics layer offers it and the corpus is parallel,
        else the protocol's own metric (``delta_bpb``; ``degradation`` under ``seed``)."""
        if self.protocol == "sound" and CONTENT_METRIC in stats.METRICS and self.parallel:
            return CONTENT_METRIC
        return str(self.primary["metric"])

    def min_effect(self, metric: str | None = None) -> float:
        """:data:`MIN_EFFECTS` of ``metric`` (default: the protocol's)."""
        metric = metric or str(self.primary["metric"])
        if metric not in MIN_EFFECTS:
            raise ConfigError(f"no minimum effect is set for metric {metric!r}; known: {list(MIN_EFFECTS)}")
        return MIN_EFFECTS[metric]

    @property
    def configs(self) -> list[str]:
        return [c for c in self.sweep.configs if c != self.sweep.baseline]

    def group(self, config: str) -> str:
        return self.plan.groups.get(config, "custom") if self.plan is not None else "custom"

    def missing(self, *names: str) -> str | None:
        """None when every named strategy ran, else a note saying which did not."""
        absent = [n for n in names if n not in self.sweep.variants]
        if not absent:
            return None
        return f"skipped: strategies {absent} were not run" + (
            " (STRATEGIES replaced the built-in set)" if self.plan is None or self.plan.custom else ""
        )

    def _groups(self, measure: str) -> tuple[list[str], list[str]]:
        if measure == "ratio" and self.protocol == "seed":
            return self.lr_langs, [self.reference]
        return self.lr_langs, self.hr_langs

    def _n(self, langs: Sequence[str]) -> int:
        counts = self.sweep.scores[self.sweep.scores["config"] == self.sweep.baseline].groupby("lang")["text_id"].nunique()
        return int(min(counts[lang] for lang in langs))

    def _raw(self, config: str, measure: str, metric: str, lr: Sequence[str], hr: Sequence[str]) -> float:
        values = self._point[metric]
        num = float(np.mean([values[(config, lang)] for lang in lr]))
        den = float(np.mean([values[(config, lang)] for lang in hr]))
        if measure == "difference":
            return num - den
        return num / den if den != 0 and math.isfinite(den) else math.nan

    @staticmethod
    def _finish(estimate: Estimate, raw: float, n: int) -> Estimate:
        raw = raw if math.isfinite(raw) else math.nan
        if n < 2 and not (estimate.reason or "").startswith(("collapsed", "non-finite")):
            return Estimate.undefined(_TOO_FEW.format(n=n), n, estimate.level, value=raw)
        if not estimate.defined:
            return Estimate.undefined(short_reason(estimate.reason), n, estimate.level, value=raw)
        return estimate

    def _kwargs(self) -> dict[str, Any]:
        return dict(baseline=self.sweep.baseline, n_boot=self.n_boot, seed=self.seed, vocab_size=self.vocab_size)

    def _scores(self, configs: Sequence[str]) -> pd.DataFrame:
        """The per-text scores of the baseline and ``configs`` only (stats validates what it is given)."""
        keep = {self.sweep.baseline, *configs}
        return self.sweep.scores[self.sweep.scores["config"].isin(keep)]

    # ------------------------------------------------------------------ disparities
    def disparity(self, config: str, measure: str | None = None, metric: str | None = None) -> Estimate:
        """``D(config)``: the protocol's disparity (or the given ``measure``/``metric``)."""
        measure = measure or self.primary["measure"]
        metric = metric or self.primary["metric"]
        key = ("D", config, measure, metric)
        if key not in self._cache:
            lr, hr = self._groups(measure)
            compute = stats.disparity if measure == "ratio" else stats.disparity_difference
            est = compute(self._scores([config]), config, lr_langs=lr, hr_langs=hr, metric=metric, **self._kwargs())
            self._cache[key] = self._finish(est, self._raw(config, measure, metric, lr, hr), self._n(lr + hr))
        return self._cache[key]

    def contrast(self, weights: Mapping[str, float], measure: str | None = None, metric: str | None = None) -> Estimate:
        """``sum_c w_c * D(c)`` with a paired bootstrap CI (:func:`qhelpers.stats.disparity_contrast`)."""
        measure = measure or self.primary["measure"]
        metric = metric or self.primary["metric"]
        lr, hr = self._groups(measure)
        est = stats.disparity_contrast(
            self._scores(list(weights)), dict(weights), lr_langs=lr, hr_langs=hr, metric=metric, measure=measure, **self._kwargs()
        )
        raw = sum(w * self.disparity(c, measure, metric).value for c, w in weights.items())
        return self._finish(est, raw, self._n(lr + hr))

    # ------------------------------------------------------------------ group damage, equal overhead
    def group_langs(self, group: str) -> list[str]:
        """The languages of ``group``: "LR", "HR" or "all"."""
        if group == "LR":
            return list(self.lr_langs)
        if group == "HR":
            if not self.hr_langs:
                raise ConfigError("no HR language was measured; add one to LANGS and HR_LANGS")
            return list(self.hr_langs)
        if group == "all":
            return list(self.langs)
        raise ConfigError(f"group must be 'LR', 'HR' or 'all', got {group!r}")

    def group_contrast(self, weights: Mapping[str, float], group: str = "LR", metric: str = "delta_bpb") -> Estimate:
        """``sum_c w_c * mean_{lang in group} metric(c, lang)`` with a paired bootstrap CI over
        texts (one resample for every config and language; texts of a parallel corpus are
        resampled together across languages).

        With ``{"control": 1, "structure": -1}`` and the default metric this is how much more
        the group loses (bits per byte) under the control than under the structure; positive:
        the control leaves more damage. Undefined (reason passed on) when a config involved
        collapses the model or has non-finite scores, or with one text per language.
        """
        if not weights:
            raise ConfigError("group_contrast needs at least one {config: weight}")
        stats.check_metric(metric)
        missing = self.missing(*weights)
        if missing:
            raise ConfigError(f"group_contrast: {missing}")
        langs = self.group_langs(group)
        configs = [str(c) for c in weights]
        eng = stats.PairedScores(self._scores(configs), self.sweep.baseline, configs, langs, self.n_boot, self.seed, 0.95)
        n = eng.n_min(langs)
        why = eng.undefined_reason(configs, langs, vocab_size=self.vocab_size)
        raw = sum(w * float(np.mean([self._point[metric][(str(c), lang)] for lang in langs])) for c, w in weights.items())
        if why:
            return Estimate.undefined(short_reason(why), n, value=raw if math.isfinite(raw) else math.nan)
        total = None
        for c, w in weights.items():
            stat = eng.group_stat(str(c), langs, metric) * float(w)
            total = stat if total is None else total + stat
        return self._finish(eng.estimate(total, n), raw, n)

    def kept_params(self, config: str) -> int:
        """Parameters of the quantized scope that ``config`` leaves in full precision (its
        overhead in parameters: the same count means equal overhead)."""
        row = self.sweep.overhead.set_index("config").loc[config]
        if "scope_params" in row and "quantized_params" in row and pd.notna(row["scope_params"]):
            return int(row["scope_params"]) - int(row["quantized_params"])
        raise ConfigError(f"the sweep's overhead table has no scope_params/quantized_params for {config!r}; "
                          "run the strategies with measure.sweep.run_sweep")

    def overhead_mismatch(self, configs: Sequence[str], reference: str, rtol: float = 0.01) -> str | None:
        """None when every config keeps the same number of full-precision parameters as
        ``reference`` (within ``rtol``, relative), else a reason naming the counts."""
        ref = self.kept_params(reference)
        bad = {c: self.kept_params(c) for c in configs if abs(self.kept_params(c) - ref) > rtol * max(ref, 1)}
        if not bad:
            return None
        shown = ", ".join(f"{c} {k:,}" for c, k in bad.items())
        return (f"unequal overhead: {reference} keeps {ref:,} parameters in full precision, {shown} "
                f"(differ by more than {rtol:.0%}); compare strategies at the same overhead")

    def control_comparison(self, control: Mapping[str, float] | str, structure: str | None = None,
                           metric: str = "delta_bpb", rtol: float = 0.01) -> dict[str, Any]:
        """A control (e.g. magnitude element protection) against the structural protection
        (default L0 + L_last) at equal overhead, on both groups.

        ``control``: a strategy name, or weights averaging several (random layer draws,
        weights summing to 1). Returns ``{"LR": Estimate, "HR": Estimate, "kept": {...},
        "reason": str | None}``: per group the mean change under the control minus under the
        structure (positive: the control leaves the group more damage). Both estimates are
        undefined with ``reason`` when the overheads differ by more than ``rtol``.
        """
        structure = structure or (self.plan.gateway if self.plan is not None else None)
        if structure is None:
            raise ConfigError("control_comparison needs the structural strategy; pass structure='L0+L<last>'")
        weights = {control: 1.0} if isinstance(control, str) else {str(c): float(w) for c, w in control.items()}
        if abs(sum(weights.values()) - 1.0) > 1e-9:
            raise ConfigError(f"control weights must sum to 1 (an average of strategies), got {weights}")
        contrast = {**weights, structure: -1.0}
        reason = self.overhead_mismatch(list(weights), structure, rtol)
        kept = {c: self.kept_params(c) for c in [*weights, structure]}
        out: dict[str, Any] = {"kept": kept, "reason": reason}
        for group in ("LR", "HR"):
            est = self.group_contrast(contrast, group, metric)
            out[group] = Estimate.undefined(reason, est.n, value=est.value) if reason else est
        return out

    def control_fails(self, control: Mapping[str, float] | str, structure: str | None = None,
                      metric: str = "delta_bpb", group: str = "LR", rtol: float = 0.01) -> Estimate:
        """The index's "control X at equal overhead fails" (exp055/056) as an estimate: how much
        more the ``group`` languages (default LR, whose protection the index is about) lose under
        the control than under the structural protection, at the same number of full-precision
        parameters. Positive: the control fails (it leaves more damage); negative: the control
        protects the group better. Unlike ``D(control) - D(structure)``, it cannot call a control
        a failure that leaves both groups less damage (a lower HR loss raises ``D``).
        Undefined when the overheads differ (see :meth:`control_comparison`)."""
        return self.control_comparison(control, structure, metric, rtol)[group]

    def control_table(self, controls: Mapping[str, Mapping[str, float] | str], structure: str | None = None,
                      metric: str = "delta_bpb") -> pd.DataFrame:
        """One row per (control, group): full-precision parameters of control and structure,
        and the group's extra change under the control with its interval."""
        rows = []
        structure = structure or (self.plan.gateway if self.plan is not None else None)
        for name, control in controls.items():
            comp = self.control_comparison(control, structure, metric)
            weights = [control] if isinstance(control, str) else list(control)
            for group in ("LR", "HR"):
                est = comp[group]
                rows.append({"control": name, "group": group,
                             "kept_control": float(np.mean([comp["kept"][c] for c in weights])),
                             "kept_structure": comp["kept"][structure],
                             f"extra_{metric}": est.value, "ci_low": est.ci_low, "ci_high": est.ci_high,
                             "defined": est.defined, "reason": est.reason or ""})
        return pd.DataFrame(rows)

    def per_language(self, config: str) -> dict[str, Estimate]:
        """Per-language disparity against the reference: ``degradation(lang) / degradation(en)``
        (seed) or ``delta_bpb(lang) - delta_bpb(en)`` (sound); the reference itself gets 1 or 0."""
        ref = self.reference
        others = [lang for lang in self.langs if lang != ref]
        n_ref = self._n([ref])
        out: dict[str, Estimate] = {}
        if self.protocol == "seed":
            ests = stats.disparity_vs_reference(self._scores([config]), config, reference=ref, langs=others,
                                                metric="degradation", **self._kwargs()) if others else {}
            for lang in others:
                raw = self._raw(config, "ratio", "degradation", [lang], [ref])
                out[lang] = self._finish(ests[lang], raw, self._n([lang, ref]))
            deg_ref = float(self._point["degradation"][(config, ref)])
            out[ref] = Estimate.undefined("reference language", n_ref, value=1.0 if deg_ref != 0 else math.nan)
        else:
            for lang in others:
                est = stats.disparity_difference(self._scores([config]), config, lr_langs=[lang], hr_langs=[ref],
                                                 metric="delta_bpb", **self._kwargs())
                out[lang] = self._finish(est, self._raw(config, "difference", "delta_bpb", [lang], [ref]),
                                         self._n([lang, ref]))
            out[ref] = Estimate.undefined("reference language", n_ref, value=0.0)
        return {lang: out[lang] for lang in self.langs}

    def premise_note(self, config: str = "none") -> str:
        """A caution when ``D(config)`` lies wholly below parity: the LR languages already lose
        less than the reference, so a lower ``D`` is not "fairer" and the index's "lower is
        better" comparisons must be read with the group means (empty string otherwise)."""
        if config not in self.sweep.variants:
            return ""
        d = self.disparity(config)
        if d.defined and d.ci_high < self.parity:
            return (f"premise fails: D({config}) = {d.value:.3g} is below parity ({self.parity:g}), LR languages lose less "
                    "than HR ones, so a lower D means they lose even less, not that quantization is fairer")
        return ""

    def disparity_table(self, configs: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per strategy: group, protected fraction, ``D`` with CI, whether it is defined
        and why not, and the mean LR / HR change in bits per byte."""
        overhead = self.sweep.overhead.set_index("config")["protected_fraction"]
        rows = []
        for c in configs if configs is not None else self.configs:
            est = self.disparity(c)
            dbpb = self._point["delta_bpb"]
            rows.append({
                "config": c, "group": self.group(c), "protected_fraction": float(overhead[c]),
                "disparity": est.value, "disparity_ci_low": est.ci_low, "disparity_ci_high": est.ci_high,
                "defined": est.defined, "reason": est.reason or "",
                "lr_delta_bpb": float(np.mean([dbpb[(c, lang)] for lang in self.lr_langs])),
                "hr_delta_bpb": float(np.mean([dbpb[(c, lang)] for lang in self.hr_langs])) if self.hr_langs else math.nan,
            })
        return pd.DataFrame(rows)

    def collapsed(self) -> pd.DataFrame:
        """The (strategy, language) pairs the stats collapse rule flags, with their ppl and bpb."""
        cols = ["config", "lang", "ppl_fp", "ppl_q", "bpb_fp", "bpb_q", "note"]
        return self.languages.loc[self.languages["collapsed"], cols].reset_index(drop=True)

    def strategy_metrics(self) -> dict[str, dict[str, Any]]:
        """``{name: {protected_fraction, group, scope, quant, protects, per_language, disparity}}``
        for every strategy run: the ``metrics["strategies"]`` of results.json.

        ``per_language[lang]``: ppl_fp, ppl_q, bpb_fp, bpb_q, degradation, delta_bpb (with
        ``_ci_low``/``_ci_high`` when the language has several texts), collapsed, and the
        per-language ``disparity`` against the reference with its ci and ``disparity_defined``
        / ``disparity_reason``. ``disparity``: value, ci_low, ci_high, n, defined, reason.
        """
        overhead = self.sweep.overhead.set_index("config")
        out: dict[str, dict[str, Any]] = {}
        for c in self.configs:
            variant = self.sweep.variants[c]
            langs: dict[str, Any] = {}
            per_lang = self.per_language(c)
            for lang in self.langs:
                row = self._point.loc[(c, lang)]
                several = int(row["n_texts"]) >= 2
                entry: dict[str, Any] = {k: float(row[k]) for k in ("ppl_fp", "ppl_q", "bpb_fp", "bpb_q")}
                for k in ("degradation", "delta_bpb"):
                    entry[k] = float(row[k])
                    if several:
                        entry[f"{k}_ci_low"], entry[f"{k}_ci_high"] = float(row[f"{k}_ci_low"]), float(row[f"{k}_ci_high"])
                entry["collapsed"] = bool(row["collapsed"])
                est = per_lang[lang]
                entry["disparity"] = est.value
                if several:
                    entry["disparity_ci_low"], entry["disparity_ci_high"] = est.ci_low, est.ci_high
                entry["disparity_defined"] = est.defined
                entry["disparity_reason"] = est.reason or ""
                langs[lang] = entry
            d = self.disparity(c)
            out[c] = {
                "group": self.group(c),
                "scope": variant.scope,
                "quant": variant.quant.label if variant.quant is not None else "fp",
                "protects": variant.protect.describe(),
                "protected_fraction": float(overhead.loc[c, "protected_fraction"]),
                "per_language": langs,
                "disparity": {"value": d.value, "ci_low": d.ci_low, "ci_high": d.ci_high, "n": d.n,
                              "defined": d.defined, "reason": d.reason or ""},
            }
        return out

    def definition(self) -> dict[str, Any]:
        """What ``disparity`` means in :meth:`strategy_metrics` (for results.json)."""
        per_lang = ("degradation(lang) / degradation(ref)" if self.protocol == "seed"
                    else "delta_bpb(lang) - delta_bpb(ref)")
        return {"protocol": self.protocol, "strategy": self.primary["label"], "per_language": per_lang,
                "reference": self.reference, "parity": self.parity, "lr_langs": self.lr_langs,
                "hr_langs": self.hr_langs if self.protocol == "sound" else [self.reference]}

    # ------------------------------------------------------------------ layers
    def _layer_configs(self, kind: str) -> dict[int, str]:
        suffix = {"layer": "", "mlp": ".mlp", "attn": ".attn"}[kind]
        layers = self.plan.sweep_layers if self.plan is not None else ()
        return {i: f"L{i}{suffix}" for i in layers if f"L{i}{suffix}" in self.sweep.variants}

    def layer_matrix(self, kind: str = "layer", value: str = "delta_bpb") -> pd.DataFrame:
        """Layers x languages: the change (default delta bpb) when only that layer's ``kind``
        (layer, mlp or attn) stays in full precision."""
        configs = self._layer_configs(kind)
        matrix = pd.DataFrame(
            [[float(self._point[value][(c, lang)]) for lang in self.langs] for c in configs.values()],
            index=pd.Index(list(configs), name="protected layer"), columns=pd.Index(self.langs, name="language"),
        )
        return matrix

    def layer_disparities(self, kind: str = "layer") -> pd.DataFrame:
        """Per swept layer: ``D`` when that layer's ``kind`` is protected, and the layer's pooled
        weight variance (empty when no such sweep ran)."""
        configs = self._layer_configs(kind)
        if not configs:
            return pd.DataFrame()
        table = self.disparity_table(list(configs.values()))
        table.insert(0, "layer", list(configs))
        if self.plan is not None and self.plan.variance is not None:
            variance = self.plan.variance.set_index("layer")["variance_pooled"]
            table["variance_pooled"] = [float(variance[i]) for i in table["layer"]]
        return table

    def best_layer(self, kind: str = "layer", exclude: Sequence[int] = (0,)) -> str | None:
        """The swept strategy of lowest ``D`` point estimate among layers not in ``exclude``."""
        table = self.layer_disparities(kind)
        if table.empty:
            return None
        table = table[~table["layer"].isin(list(exclude)) & np.isfinite(table["disparity"].astype(float))]
        return None if table.empty else str(table.sort_values(["disparity", "layer"]).iloc[0]["config"])

    def collapse_note(self) -> str:
        """One sentence on whether the stats collapse rule flags any strategy."""
        flagged = self.collapsed()
        if flagged.empty:
            return "No strategy collapses the model (collapse rule: bits per byte > 8, or perplexity > the vocabulary size)."
        configs = list(dict.fromkeys(flagged["config"]))
        worst = flagged.sort_values("ppl_q", ascending=False).iloc[0]
        fp = self.languages.drop_duplicates("lang")
        limit = self.vocab_size if self.vocab_size is not None else math.inf
        base_flag = bool(((fp["bpb_fp"] > 8.0) | (fp["ppl_fp"] > limit)).any())
        base = (" The full-precision baseline itself is flagged (e.g. a random-init model), so no disparity is defined."
                if base_flag else "")
        return (
            f"The model collapses under {len(configs)} of "
            f"{len(self.configs)} strategies ({len(flagged)} strategy/language pairs; worst: {worst['config']}/"
            f"{worst['lang']} ppl {worst['ppl_q']:.3g}, bits per byte {worst['bpb_q']:.3g}).{base} Their "
            "disparities are undefined (a ratio of two destroyed models measures nothing) and every verdict "
            "that needs them is INCONCLUSIVE; the values shown are the protocol's arithmetic only."
        )

    def variance_correlation(self, kind: str = "layer", n_perm: int = 10000) -> dict[str, Any]:
        """Pearson r between per-layer pooled weight variance and ``D`` when that layer is
        protected (seed 002 exp057: r = -0.798), bootstrap CI over layers, permutation p.
        Undefined when a layer's ``D`` has no meaning (collapse, non-finite, zero denominator)."""
        table = self.layer_disparities(kind)
        if table.empty or "variance_pooled" not in table:
            return stats.correlation_record(0, reason="too few: no per-layer sweep with weight statistics was run")
        bad = table[~table["defined"] & ~table["reason"].str.startswith(("too few", "unbounded CI"))]
        if len(bad):
            row = bad.iloc[0]
            return stats.correlation_record(len(table), reason=f"{row['reason'].split(':', 1)[0]}: D({row['config']}) is undefined ({row['reason']})")
        return stats.correlation(table["variance_pooled"], table["disparity"], n_boot=self.n_boot, n_perm=n_perm, seed=self.seed)

    # ------------------------------------------------------------------ precision, Pareto
    def precision_table(self) -> pd.DataFrame:
        """Per bit width: ``D`` with everything quantized and with L0 + last protected, and the
        mean change in bits per byte over all languages."""
        if self.plan is None or not self.plan.precision_bits:
            return pd.DataFrame()
        gate = self.plan.gateway
        rows = []
        for b in sorted(set(self.plan.precision_bits) | {self.plan.bits}):
            for what, base in (("none", "none"), (gate, gate)):
                name = base if b == self.plan.bits else f"int{b}:{base}"
                if name not in self.sweep.variants:
                    continue
                est = self.disparity(name)
                rows.append({"bits": b, "protected": what, "config": name, "disparity": est.value,
                             "disparity_ci_low": est.ci_low, "disparity_ci_high": est.ci_high,
                             "defined": est.defined, "reason": est.reason or "",
                             "mean_delta_bpb": float(np.mean([self._point["delta_bpb"][(name, lang)] for lang in self.langs]))})
        return pd.DataFrame(rows)

    def pareto_points(self) -> pd.DataFrame:
        """Protected fraction (x) and ``D`` (y) of every strategy at the study's bit width
        whose ``D`` is finite; ``on_frontier`` marks the Pareto-optimal ones (minimising both)."""
        table = self.disparity_table()
        table = table[~table["config"].str.match(r"^int\d+:")].copy()
        pts = table.rename(columns={"config": "label", "protected_fraction": "x", "disparity": "y"})
        pts = pts[np.isfinite(pts["y"].astype(float))].reset_index(drop=True)
        front = pareto_frontier(pts, "x", "y")
        pts["on_frontier"] = pts.index.isin(front.index)
        return pts

    def index_comparison(self) -> pd.DataFrame:
        """Seed 002's Pareto table beside this study's numbers for the matching strategies."""
        if self.plan is None or self.plan.custom:
            return pd.DataFrame()
        gate, wide = self.plan.gateway, self.plan.wide_prefix
        has_bias = "all:biases" in self.sweep.variants
        ours = {
            "none": "none",
            "layer0_ln_only": f"{wide}L0.norm",
            "layer0_attn": "L0.attn",
            "layer0": "L0",
            "L0+L11": gate,
            "L0+L11+ln_f+biases": f"all:{gate}+final_norm+biases" if has_bias else f"{wide}{gate}+final_norm",
            "L0+L11+all_ln": f"{wide}{gate}+all_norms",
            "even_layers": "even_layers",
        }
        points = self.pareto_points().set_index("label")
        overhead = self.sweep.overhead.set_index("config")["protected_fraction"]
        rows = []
        for _, idx in INDEX_PARETO.iterrows():
            name = ours[idx["index_strategy"]]
            row = {**idx.to_dict(), "strategy": name}
            if name in self.sweep.variants:
                est = self.disparity(name)
                row.update(protected_pct=100.0 * float(overhead[name]), disparity=est.value,
                           disparity_ci_low=est.ci_low, disparity_ci_high=est.ci_high, defined=est.defined,
                           on_frontier=bool(points.loc[name, "on_frontier"]) if name in points.index else False,
                           note=est.reason or "")
            else:
                row.update(protected_pct=math.nan, disparity=math.nan, disparity_ci_low=math.nan,
                           disparity_ci_high=math.nan, defined=False, on_frontier=False,
                           note="not run (the full detail level adds it)")
            rows.append(row)
        out = pd.DataFrame(rows)
        out["index_rank"] = out["index_avg_lr_disparity"].rank(method="min")
        out["rank"] = out["disparity"].rank(method="min")
        return out

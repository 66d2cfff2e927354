"""Statistics for quantization-degradation studies: per-language tables, disparities,
their reductions, correlations and verdicts, all with paired bootstrap intervals.

Input: the per-text scores table written by the measurement module, one row per
(config, lang, text_id) with ``nll`` (summed negative log-likelihood over the scored tokens,
nats), ``n_tokens`` (scored tokens) and ``n_bytes`` (UTF-8 bytes of the text).

Definitions (per language, token-weighted aggregates over its texts)
--------------------------------------------------------------------
* ``ppl = exp(sum nll / sum n_tokens)``; ``bpb = sum nll / ln 2 / sum n_bytes``
  (:func:`perplexity`, :func:`bits_per_byte`: every module computes them with these).
* ``delta_nll = nll_q/tok_q - nll_fp/tok_fp`` (nats per token); ``ppl_ratio = exp(delta_nll)``.
* ``degradation = (ppl_q - ppl_fp) / ppl_fp = expm1(delta_nll)``: the seed documents'
  definition, but on the language aggregate and NOT clipped at 0 (the precursor clipped
  per-text degradations at 0, which biases every mean upwards).
* ``delta_bpb = bpb_q - bpb_fp``: comparable across languages, unlike per-token measures
  (research notes, section 3). Prefer it for cross-language claims.
* ``disparity = mean_LR(metric) / mean_HR(metric)`` (seed 000); ``disparity_difference`` is
  ``mean_LR - mean_HR``; ``disparity_vs_reference`` is ``metric(lang) / metric(en)`` (the
  precursor's per-language protocol).

Bootstrap
---------
Percentile intervals from a PAIRED bootstrap over texts: one resample of text ids is used
for the baseline and every quantized config, so config-to-config differences are paired.
When every language involved has the same set of text ids (a parallel corpus such as UDHR),
the same resample is used for all languages too, so cross-language comparisons stay paired;
otherwise each language is resampled independently with its own generator, seeded from
``seed`` and the language code (so its resample does not depend on which other languages a
call involves). Resampling is vectorised: a ``(n_boot, n_texts)`` matrix of resample counts
times the per-text values gives every replicate's sums at once.

Undefined estimates (decision, applied by every ratio here)
-----------------------------------------------------------
An :class:`Estimate` never carries a silent ``inf`` or ``0``. ``defined=False`` always comes
with a ``reason`` that starts with a tag:

* ``"non-finite: ..."``   an ``nll`` involved is NaN or inf. value and CI are NaN.
* ``"collapsed: ..."``    the model is destroyed for some language involved (below). value
  and CI are NaN: a ratio of two huge degradations measures nothing (research notes, section
  2: the seed protocol sends SmolLM2 to PPL ~1e9 in every language).
* ``"denominator <= 0: ..."`` the point estimate of the denominator is <= ``tol`` (default
  1e-9, absolute): the HR languages did not degrade, the ratio's sign and size are
  meaningless. value and CI are NaN. ``disparity_difference`` stays defined.
* ``"unbounded CI: ..."`` the denominator's point estimate is positive but its bootstrap CI
  (same level) contains 0. A ratio whose denominator is not distinguishable from 0 has no
  finite confidence interval (Fieller's theorem: the confidence set is then unbounded), and
  percentile intervals of such ratios are dominated by replicates with a denominator near
  0. Here the point estimate IS reported as ``value`` (it is what was observed), the CI is
  ``(nan, nan)`` and ``defined=False``, so :func:`verdict` says ``INCONCLUSIVE``.
* ``"too few: ..."``      fewer observations than the statistic needs (correlation n < 3).
* ``"constant: ..."``     a correlation input has zero variance.

Collapse rule: a language counts as collapsed under a config when its aggregate bits per
byte exceed ``collapse_bpb`` (default 8.0: worse than a uniform distribution over the 256
byte values, a rule that needs no vocabulary size), or, when given, ``ppl > vocab_size``
(worse than uniform over the vocabulary) or ``ppl > collapse_ppl``. The 8-bpb rule is loose
on text with many bytes per token: PPL 1e9 at 4.4 bytes per token is only 6.8 bpb, so pass
``vocab_size`` when you know it. The baseline is checked too.
"""
# The public API of the statistics layer; the code lives in the submodules.
from qhelpers.stats.bootstrap import (  # noqa: F401
    Estimate,
    bootstrap_indices,
    bootstrap_counts,
    percentile_interval,
    check_level,
    check_boot,
    lang_seed,
    lang_rng,
    language_counts,
    ratio_estimate,
    diff_estimate,
)
from qhelpers.stats.quantities import (  # noqa: F401
    nats_to_bits,
    bits_per_byte,
    perplexity,
)
from qhelpers.stats.scores import (  # noqa: F401
    HR_LANGS,
    LR_LANGS,
    METRICS,
    validate_scores,
    resolve_groups,
    PairedScores,
    check_metric,
)
from qhelpers.stats.tables import (  # noqa: F401
    language_table,
    baseline_table,
    group_means,
    disparity,
    disparity_difference,
    disparity_vs_reference,
    disparity_contrast,
    reduction,
)
from qhelpers.stats.correlation import (  # noqa: F401
    rowwise_pearson,
    check_method,
    correlation_record,
    monte_carlo_p,
    correlation,
)
from qhelpers.stats.verdicts import (  # noqa: F401
    SUPPORTED,
    NOT_SUPPORTED,
    INCONCLUSIVE,
    verdict,
)

__all__ = [
    "Estimate",
    "bootstrap_indices",
    "bootstrap_counts",
    "percentile_interval",
    "check_level",
    "check_boot",
    "lang_seed",
    "lang_rng",
    "language_counts",
    "ratio_estimate",
    "diff_estimate",
    "nats_to_bits",
    "bits_per_byte",
    "perplexity",
    "HR_LANGS",
    "LR_LANGS",
    "METRICS",
    "validate_scores",
    "resolve_groups",
    "PairedScores",
    "check_metric",
    "language_table",
    "baseline_table",
    "group_means",
    "disparity",
    "disparity_difference",
    "disparity_vs_reference",
    "disparity_contrast",
    "reduction",
    "rowwise_pearson",
    "check_method",
    "correlation_record",
    "monte_carlo_p",
    "correlation",
    "SUPPORTED",
    "NOT_SUPPORTED",
    "INCONCLUSIVE",
    "verdict",
]

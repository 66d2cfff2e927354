# ---
# jupyter:
#   colab:
#     provenance: []
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
#   language_info:
#     name: python
#   qhelpers:
#     expected_s:
#       full: 26
#       quick: 159
#     purpose: 'T-010 rate-distortion (seed 004 H4.1): does disparity follow a * 2^(-b*bits)
#       * (1 - c*p) over bit width and protection?'
#     source: notebooks/src/t010_rate_distortion.py
# ---

# %% [markdown]
# # T-010: rate-distortion — how does the low-resource disparity depend on bit width and protection?
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qhelpers/qhelpers/blob/main/notebooks/t010_rate_distortion.ipynb)
#
# **Question.** Quantizing a model's weights to fewer bits saves memory; keeping a share `p` of them in
# full precision costs some of it back. How does the extra damage to low-resource languages (Hebrew,
# Swahili) relative to high-resource ones (English, German) change along both axes, and does a simple
# law describe it?
#
# **Hypothesis H4.1 (seed 004, Gap 4, "Rate-Distortion Bound").** *"There exists a fundamental trade-off:
# disparity ≥ f(bits, language_entropy, layer_protection)"*; experiment T-010 proposes the form
# *disparity = a · 2^(-b·bits) · (1 - c·protect_pct)*. Tested here as three claims: (i) `b > 0` (the
# disparity shrinks as bits grow); (ii) `c > 0` (protection reduces it); (iii) the seed's law predicts
# held-out grid cells at least as well as an alternative law (leave-one-out error no more than
# `LOO_MARGIN_PCT` % larger).
#
# **Method.** The seed's grid: bit widths `BITS_LIST` × protection percentages `PROTECT_PCTS`, one sweep
# (model loaded once; each configuration applied and removed by hooks). What "protect p %" means is data
# (`ratedistortion.ProtectionPolicy`): `POLICY = "layers"` keeps whole decoder layers in full precision,
# added in a stated order (`LAYER_ORDER`, default the index's L0, L_last, then by decreasing weight
# variance) until they hold at least p % of the quantizable weights; `"magnitude"` keeps the largest-|w|
# p % of every quantized tensor. Everywhere below `p` is the *actual* protected share of the quantizable
# weights reported by the quantization engine, not the nominal percentage (whole layers rarely hit it).
# Per cell: the disparity `D` = mean LR minus mean HR change in bits per byte, with a paired bootstrap 95 %
# interval over texts (parity 0; bits per byte are comparable across languages, per-token perplexity is
# not); the seeds' ratio of mean degradations where it is defined; the distortion = mean change in bits
# per byte over all languages; and the rate `effective_bits = (1 - p)·bits + p·16`. Cells whose
# disparity is undefined (e.g. a collapsed model at INT2) are shown with the reason and left out of the
# fit. Three laws are fitted by bounded least squares (`p` as a fraction, so the seed's `c` per
# percentage point is `c / 100`): the seed's, `a·2^(-b·bits)·exp(-c·p)`, and `a_bits·(1 - c·p)` with a
# free intercept per bit width; they are compared by R², AIC/AICc/BIC and leave-one-out (LOO) prediction
# error; parameter intervals and the interval of the LOO difference come from refitting on `N_FIT_BOOT`
# paired bootstrap replicates of the whole grid (texts resampled once for all cells).
#
# **Fits at a bound are failed fits.** The fits are bounded (`b` in [-4, 8], `c` in [-10, 10]). A fit
# that stops at a bound has not found the law's optimum, which lies outside the allowed range (e.g. a
# disparity that vanishes between two bit widths needs `b` → ∞); its parameters and their "intervals"
# (refits at the same bound give [8, 8]) then mean nothing. So a point fit at a bound makes every
# estimate of that law undefined ("fit at bound: ..."), and its verdicts INCONCLUSIVE; a bootstrap refit
# at a bound counts as a failed refit, left out of the interval and reported (`boot_failed`,
# `boot_failed_frac`); more than 2.5 % of refits failing makes the interval undefined too.
#
# **How the verdicts are decided.** One primary hypothesis, declared before the data: `H4.1-i`, the
# seed's trade-off in bits (`b > 0`). The premise `H4.1-gap`: there is a gap to shrink, i.e. with nothing
# protected at the smallest bit width that gives a defined cell, the LR and HR languages lose different
# amounts (`|D|` above 0.01 bits per byte). The law carries the gap's sign in `a`, so `b > 0` and `c > 0`
# mean the gap closes towards parity whichever group loses more; without a gap they are not identified,
# and `H4.1-i` and `H4.1-ii` are then INCONCLUSIVE ("premise not met"). Minimum effects of practical
# size: `b` 0.1 per bit (the gap shrinks by a third or more from INT2 to INT8), `c` 0.2 (protecting half
# of the weights closes at least a tenth of the gap), and the LOO margin `LOO_MARGIN_PCT` itself for
# (iii). Families: "protection effect" (ii) and "law vs alternatives" (iii, Holm-adjusted together).
# Fewer than 10 texts per language give no verdict ("too few texts").
#
# Caveat: the embedded SmolLM2 is a dequantized GGUF (Q4_1), so "full precision" is already a 4-bit
# model and INT6/INT8 re-quantization shows little damage by construction.

# %%
# Colab only: install qhelpers (elsewhere it is installed by scripts/install.sh)
import subprocess
import sys

if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "qhelpers @ git+https://github.com/qhelpers/qhelpers@v0.1.0"], check=True)

# %% tags=["parameters"]
# Notebook parameters: papermill and run_all.py -p override them; results.json records their values
MODEL = "embedded:smollm2-135m"   # hub id, local folder, embedded:<name> or tiny:<arch>
CORPUS = "udhr"                   # 50 parallel paragraphs per language
LANGS = ["en", "de", "he", "sw"]
HR_LANGS = ["en", "de"]
LR_LANGS = ["he", "sw"]
N_TEXTS = 4                       # texts per language (None: all)
PROTOCOL = "sound"                # "sound" (per-channel INT-b, linear weights) or "seed" (per-tensor, every weight)
BITS_LIST = [2, 3, 4, 6, 8]       # the seed's bit widths
PROTECT_PCTS = [0, 10, 20, 30, 50]  # the seed's protection percentages
POLICY = "layers"                 # "layers" (whole decoder layers) or "magnitude" (largest weights of every tensor)
LAYER_ORDER = "gateway-variance"  # see ratedistortion.LAYER_ORDERS, or a list of layer indices
RULE = "reach"                    # "reach" (fewest layers holding at least p) or "nearest"
BITS = 4                          # bit width of the criticality sweep (only for a *criticality LAYER_ORDER)
MODELS = ["seed", "exp", "free"]  # laws to fit (the first must be "seed")
LOO_MARGIN_PCT = 10               # H4.1-iii: the seed law's LOO RMSE may exceed the alternative's by this %
N_FIT_BOOT = 200                  # bootstrap replicates refitted (LOO refits make each one costly)
MAX_LENGTH = 512                  # tokens per forward window
DEVICE = None                     # None: cuda if available, else cpu
DTYPE = None                      # None: fp32 on CPU, bf16 on CUDA (fp16 on a T4); "fp32" everywhere for reference numbers
SEED = 0
N_BOOT = 2000
OUTPUT_DIR = "results/t010_rate_distortion"

# %%
import matplotlib.pyplot as plt
import pandas as pd

from qhelpers.experiments import rate_distortion as rd
from qhelpers.measure.criticality import layer_criticality
from qhelpers.measure.scoring import MeasureConfig
from qhelpers.measure.sweep import run_sweep
from qhelpers.models.loading import load_model
from qhelpers.report import plots
from qhelpers.report.damage import damage_card
from qhelpers.report.record import current_parameters
from qhelpers.report.results import (
    Hypothesis,
    adjust_families,
    print_verdicts,
    seed_everything,
    write_results,
)
from qhelpers.text.corpora import load_corpus

seed_everything(SEED)
pd.set_option("display.precision", 4)
pd.set_option("display.width", 160)

# %% [markdown]
# ## Model and texts

# %%
loaded = load_model(MODEL, device=DEVICE, dtype=DTYPE)
corpus = load_corpus(CORPUS, langs=LANGS, n_texts=N_TEXTS, seed=SEED)
print(loaded.describe())
print({lang: corpus.n_texts(lang) for lang in corpus.langs}, "texts per language")

# %% [markdown]
# ## The grid
# Each row is one cell; `config` is the configuration run for it (cells that resolve to the same
# protection share one run, e.g. every policy's 0 %). With whole layers, the protected layers are listed.

# %%
# NBVAL_IGNORE_OUTPUT
criticality = (layer_criticality(loaded, corpus, bits=BITS, lr_langs=LR_LANGS, hr_langs=HR_LANGS, n_boot=N_BOOT, seed=SEED,
                                 measure_config=MeasureConfig(max_length=MAX_LENGTH)).values()
               if isinstance(LAYER_ORDER, str) and LAYER_ORDER.endswith("criticality") else None)

# %%
grid = rd.rd_grid(loaded, BITS_LIST, PROTECT_PCTS, POLICY, protocol=PROTOCOL, order=LAYER_ORDER, rule=RULE,
                  criticality=criticality)
policy = grid.policies[POLICY]
print(policy.describe())
print(len(grid.variants), "configurations + the full-precision baseline")
grid.cells[["bits", "pct", "config", "protected_layers"]]

# %%
# NBVAL_IGNORE_OUTPUT
sweep = run_sweep(loaded, corpus, grid.variants, MeasureConfig(max_length=MAX_LENGTH))

# %% [markdown]
# ## Grid tables
# Baseline first. Then per cell: `p` (actual protected share of the quantizable weights),
# `effective_bits`, the disparity `D` (LR − HR change in bits per byte) with its 95 % interval, the
# seeds' ratio (mean LR degradation / mean HR degradation; empty where undefined, reason in
# `ratio_reason`), and the distortion (mean change in bits per byte over all languages).

# %%
sweep.baseline_table(n_boot=N_BOOT, seed=SEED)[["lang", "n_texts", "ppl", "bpb"]].round(4)

# %%
measures = rd.grid_measures(sweep, grid, lr_langs=LR_LANGS, hr_langs=HR_LANGS, langs=LANGS, n_boot=N_BOOT, seed=SEED)
measures.table[["bits", "pct", "p", "effective_bits", "disparity", "disparity_ci_low", "disparity_ci_high",
                "ratio", "ratio_ci_low", "ratio_ci_high", "distortion", "distortion_ci_low", "distortion_ci_high"]].round(4)

# %% [markdown]
# The damage card of the unprotected cell at each bit width: per language, the change in bits per byte, KL to
# the full model (bits per byte), top-1 agreement and the 99th-percentile per-token KL, with intervals.

# %%
unprotected = list(dict.fromkeys(grid.cells.loc[grid.cells["pct"] == 0, "config"]))
damage_card(sweep.language_table(n_boot=N_BOOT, seed=SEED, configs=unprotected))

# %% [markdown]
# Cells excluded from the fit, with the reason (an empty table: every cell is defined).

# %%
pd.DataFrame({"reason": measures.excluded(POLICY).set_index(["bits", "pct"])["reason"].str.slice(0, 150)})

# %%
fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
plots.layer_heatmap(measures.pivot("disparity", POLICY), ax=axes[0], center=0.0, fmt=".3f",
                    title="Disparity D (LR - HR change, bits per byte); nan = excluded",
                    cbar_label="bits per byte")
plots.layer_heatmap(measures.pivot("distortion", POLICY), ax=axes[1], fmt=".3f",
                    title="Distortion (mean change over languages, bits per byte)", cbar_label="bits per byte")
fig.tight_layout()
figures = [plots.save_figure(fig, OUTPUT_DIR, "t010_grid_heatmaps")]

# %% [markdown]
# ## Fitting the laws
# `comparison`: one row per law (R² on the fitted cells; `loo_rmse` / `loo_r2` from predicting each cell
# with the law refitted without it; information criteria with their differences to the best law;
# `at_bound` names parameters at which the point fit stopped at a fitting bound: a failed fit;
# `boot_failed` / `boot_failed_frac`: bootstrap refits that failed, at a bound or without converging).
# `params`: each parameter with its bootstrap 95 % interval, or the reason it has none.

# %%
# NBVAL_IGNORE_OUTPUT
fit = rd.fit_grid(measures, policy=POLICY, models=MODELS, n_fit_boot=N_FIT_BOOT, progress=True)

# %%
fit.comparison[["model", "formula", "n", "k", "r2", "rmse", "loo_rmse", "loo_r2", "aic", "aicc", "bic",
                "delta_aicc", "delta_bic", "at_bound", "boot_ok", "boot_failed", "boot_failed_frac", "reason"]].round(4)

# %%
fit.params.round(4)

# %%
fig, ax = plt.subplots(figsize=(9, 5.5))
rd.plot_fits(fit, measures, ax=ax)
figures.append(plots.save_figure(fig, OUTPUT_DIR, "t010_fitted_laws"))

# %% [markdown]
# ## Distortion-rate
# Every configuration as (effective bits per quantizable weight, mean change in bits per byte). The
# lower convex hull (grey) and its non-increasing part (red) are the best trade-offs this grid
# achieved; hollow markers are configurations where some language collapsed. Protected weights are
# counted at 16 bits; quantizer scales (and, for the magnitude policy, the positions of the kept
# weights) are not counted, which flatters the protected configurations.

# %%
fig, ax = plt.subplots(figsize=(8, 5))
rd.plot_distortion_rate(measures, ax=ax)
figures.append(plots.save_figure(fig, OUTPUT_DIR, "t010_distortion_rate"))
measures.frontier().round(4)

# %% [markdown]
# ## Hypotheses
# `H4.1-gap` (the premise) reads the disparity of the unprotected cell at the smallest bit width with a
# defined disparity. (i) and (ii) are judged on the bootstrap interval of the seed law's `b` and `c`
# (undefined when the fit stopped at a bound: a failed fit, so INCONCLUSIVE). A negative `a` means the
# low-resource languages lose *less* than the high-resource ones; `b > 0` then still says the gap closes
# as bits grow, and `c > 0` that protection closes it. (iii) compares held-out prediction error:
# `100 · (LOO RMSE(seed) / LOO RMSE(alternative) − 1)` over the cells both laws can predict, with the
# interval of the same quantity over the bootstrap refits; it is SUPPORTED when the whole interval lies
# below `LOO_MARGIN_PCT`, and undefined when either law's fit failed at a bound.

# %%
a_seed = fit.estimate("seed", "a")
gap_cell = measures.gap_cell(POLICY)
premise = Hypothesis.evaluate(
    "H4.1-gap", "there is a gap to shrink: with nothing protected, LR and HR languages lose different amounts",
    measures.gap(POLICY), 0.0, ">", abs_value=True, family="premise", min_effect=0.01,
    quantity=f"|D| at INT{gap_cell[0]}, nothing protected (bits per byte)" if gap_cell else "|D|")
hypotheses = [
    premise,
    Hypothesis.evaluate("H4.1-i", "disparity shrinks as bits grow: b > 0 in a*2^(-b*bits)*(1-c*p)",
                        fit.estimate("seed", "b"), 0.0, ">", quantity="b (per bit)", primary=True, min_effect=0.1,
                        premise=premise, notes=f"a = {a_seed}. {fit.bound_note('seed', 'b')}".strip(". ")),
    Hypothesis.evaluate("H4.1-ii", "protecting more weights reduces disparity: c > 0 in a*2^(-b*bits)*(1-c*p)",
                        fit.estimate("seed", "c"), 0.0, ">", quantity="c (per unit p; per % point c/100)",
                        family="protection effect", min_effect=0.2, premise=premise,
                        notes=f"a = {a_seed}. {fit.bound_note('seed', 'c')}".strip(". ")),
] + [
    Hypothesis.evaluate(f"H4.1-iii-{alt}",
                        f"the seed's law predicts held-out cells at least as well as {rd.MODELS[alt].formula}",
                        fit.loo_difference(alt), LOO_MARGIN_PCT, "<",
                        quantity="100*(LOO RMSE seed / LOO RMSE alternative - 1)", family="law vs alternatives",
                        notes=f"absolute difference {fit.loo_difference(alt, relative=False)} bits per byte")
    for alt in MODELS if alt != "seed"
]
hypotheses = adjust_families(hypotheses)
for h in hypotheses:
    print(h.sentence())

# %% [markdown]
# ## What the fit can and cannot show
# The seed frames H4.1 as a *bound* (`disparity ≥ f(...)`). A least-squares fit cannot establish a
# bound: it summarises the cells that were measured, for one model, one corpus sample, one quantizer and
# one protection policy. The grid shows what *is achievable* at each rate (each cell is an upper bound
# on the smallest disparity possible there); a lower bound would need the minimum over every policy and
# quantizer. A high R² is easy when a few low-bit cells dominate the variance, so read it beside the LOO
# error, the residual pattern in the fitted-laws figure and the parameters stopped at a bound; `free`
# (one intercept per bit width) shows how much of the fit the `2^(-b·bits)` form itself explains.
# Nothing here supports extrapolating outside the fitted bit widths and protected shares. The verdicts
# below are computed from the intervals above and hold only for this configuration: a law whose fit
# stopped at a bound is reported as a failed fit (INCONCLUSIVE), not as "b is at least 8".

# %%
print(fit.describe())

# %% [markdown]
# ## Record

# %%
# NBVAL_IGNORE_OUTPUT
metrics = {
    "n_layers": loaded.n_layers,
    "n_texts_per_language": {lang: corpus.n_texts(lang) for lang in corpus.langs},
    "policy": policy.describe(),
    "layer_order": list(policy.layer_order),
    "grid": measures.table,
    "excluded": measures.excluded(POLICY),
    "comparison": fit.comparison,
    "params": fit.params,
    "frontier": measures.frontier(),
    "n_fit_boot": fit.n_fit_boot,
    "boot_failed_frac": {m: fit.failed_fraction(m) for m in fit.fits},
    "gap_cell": gap_cell,
    "fit_scope": fit.describe(),
    "seconds": sweep.seconds,
    "prefix_stats": sweep.prefix_stats,
}
parameters = current_parameters(globals(), DEVICE=str(loaded.device), DTYPE=loaded.metadata["dtype"])
path = write_results(OUTPUT_DIR, "t010_rate_distortion", parameters, metrics, hypotheses, figures, loaded.metadata)
print("wrote", path)

# %%
verdict_table = print_verdicts(hypotheses)

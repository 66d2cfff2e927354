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
#       full: 44
#       quick: 26
#     purpose: 'T-006 error cancellation: are the output errors of quantizing L0 and
#       L_last negatively correlated? (seed 004 H2.3)'
#     source: notebooks/src/t006_error_correlation.py
# ---

# %% [markdown]
# # T-006: error cancellation — do the quantization errors of L0 and L_last cancel?
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qhelpers/qhelpers/blob/main/notebooks/t006_error_correlation.ipynb)
#
# **Question.** Seed 000 found that protecting layer 0 and the last layer together helps far more than
# either alone. One proposed explanation is that the errors the two layers cause partly cancel when
# both are quantized, so protecting only one of them unmasks the other's error.
#
# **Hypothesis H2.3 (seed 004, error cancellation theory).** *"Errors at L0 and L11 may partially cancel
# when both are quantized together, but protecting only L11 amplifies L0 errors."* Prediction: *"Error
# covariance between L0 and L11 is negative."* Here L11 is the model's last layer, L_last.
#
# **Method.** Quantize only L0, only L_last, and both (everything else in full precision, FP). The
# errors are `e0 = out(L0 quantized) - out(FP)`, `eL = out(L_last quantized) - out(FP)` and
# `eb = out(both) - out(FP)`, measured on the same tokens at two places: the residual stream after the
# last block (`hidden`, the raw block output before the final norm; BOS and padding left out) and the
# next-token log-probabilities over the vocabulary (`logprobs`, at the positions that predict the
# text's tokens). Quantizing L_last alone leaves every activation before L_last bit-identical to FP
# (checked below), so `eL` is zero there and a correlation with it is only defined at or after L_last:
# that is why both measurement sites are at the output. Per text we compute the seed's statistic, the
# Pearson correlation `r` of `e0` and `eL` over all their elements; `r_scaled`, the same after dividing
# each token's errors by the norm of the FP vector at that token (raw errors are dominated by the few
# tokens with massive activations, such as the first token of a Hebrew text in SmolLM2); and the
# additivity of the errors:
# `||eb||^2` against `||e0||^2 + ||eL||^2 + 2<e0, eL>` and the interaction `eb - (e0 + eL)`. Each is
# averaged over texts with a paired bootstrap interval (the same resample for every language of the
# parallel corpus), per language and pooled. The same correlation for every pair of layers at 0, 25 %,
# 50 %, 75 % and 100 % depth generalises the question beyond the gateway pair.
#
# `PROTOCOL = "sound"` (default) quantizes the linear weights per output channel; `"seed"` is the
# seeds' per-tensor symmetric INT-b on every weight inside the quantized layers.
#
# **How the verdicts are decided.** `H2.3`, the seed's statistic at the last hidden state, is the
# **primary hypothesis**, declared before the data. The same question asked with other measures
# (`H2.3-scaled`, `H2.3-logprobs`) forms the family "other error measures", and the cancellation test
# (`H2.3-cancel`) its own family; Holm's method adjusts within each family. **Minimum effects** of
# practical size: a correlation must lie below -0.1 (a smaller one leaves the errors practically
# orthogonal), and the joint error energy must be at least 5 % below that of two independent errors
# (`energy_ratio` < 0.95). No premise is needed: none of these claims is about the LR-HR gap. Fewer than
# 10 texts per language give no verdict ("too few texts").

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
LANGS = ["en", "de", "he", "sw"]  # seed 000's languages
HR_LANGS = ["en", "de"]
LR_LANGS = ["he", "sw"]
N_TEXTS = 5                       # texts per language (None: all)
PROTOCOL = "sound"                # "sound" (per-channel, linear weights) or "seed" (per-tensor)
BITS = 4
MAX_LENGTH = 96                   # tokens per text, BOS included (longer texts are cut)
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]  # fractions of depth for the correlation matrix
PAIR = [0, -1]                    # the two layers of H2.3 (negative: from the end)
DEVICE = None                     # None: cuda if available, else cpu
DTYPE = None                      # None: fp32 on CPU, bf16 on CUDA (fp16 on a T4); "fp32" everywhere for reference numbers
SEED = 0
N_BOOT = 2000
OUTPUT_DIR = "results/t006_error_correlation"

# %%
import matplotlib.pyplot as plt
import pandas as pd

from qhelpers.experiments import error_propagation
from qhelpers.models.loading import load_model
from qhelpers.report import plots
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
pd.set_option("display.max_rows", 200)

# %% [markdown]
# ## Model, texts and configurations
# The model is loaded once; each configuration is applied to it and restored.

# %%
loaded = load_model(MODEL, device=DEVICE, dtype=DTYPE)
corpus = load_corpus(CORPUS, langs=LANGS, n_texts=N_TEXTS, seed=SEED)
LAYERS = error_propagation.depth_layers(loaded.n_layers, DEPTHS)
print(loaded.describe())
print("baseline:", loaded.metadata["baseline"])
print({lang: corpus.n_texts(lang) for lang in corpus.langs}, "texts per language")
variants = error_propagation.error_variants(loaded.n_layers, LAYERS, PAIR, protocol=PROTOCOL, bits=BITS)
for name, variant in variants.items():
    print(f"{name:16s} protected layers {list(variant.protect.layers)}")

# %%
# NBVAL_IGNORE_OUTPUT
errors = error_propagation.error_interaction(loaded, corpus, layers=LAYERS, pair=PAIR, protocol=PROTOCOL, bits=BITS,
                                       max_length=MAX_LENGTH, progress=True)
A, B = errors.pair
print(f"pair L{A} + L{B}; matrix layers {errors.layers}; {len(errors.additivity) // 2} texts in {errors.seconds:.1f} s")

# %% [markdown]
# ## Quantizing L_last alone does not touch the layers before it
# The largest difference from FP of the residual stream after each earlier block when only L_last is
# quantized (over every token of every text), relative to the FP activations' largest magnitude. It is
# 0 (bit-identical) where the CPU's kernels are deterministic; the check allows float rounding
# (`error_propagation.rounding_tolerance`), far below the ~1e-2 a quantization error reaching an earlier
# layer leaves. So `eL` is zero before L_last and its correlation with any other error is undefined there.

# %%
print("layers before L_last equal FP up to float rounding:", errors.before_last_matches())

# %%
# NBVAL_IGNORE_OUTPUT
print("largest |difference| over all layers before L_last:", float(errors.before_last["max_abs_diff"].max()),
      "relative:", float(errors.before_last["rel_diff"].max()))

# %% [markdown]
# ## How large each error is
# Mean over tokens (positions) of the relative error `||e_t|| / ||out(FP)_t||` of every configuration at
# both sites (pooled over languages).

# %%
groups = dict(lr_langs=LR_LANGS, hr_langs=HR_LANGS, n_boot=N_BOOT, seed=SEED)
size = error_propagation.text_means(errors.rel_error, "rel_error", by=["site", "config"], **groups)
size[size["lang"] == "all"][["site", "config", "rel_error", "rel_error_ci_low", "rel_error_ci_high", "n"]]

# %% [markdown]
# ## H2.3: the correlation of the L0 and L_last errors, and their additivity
# `r`: the Pearson correlation of `e0` and `eL` (the seed's `corrcoef`); `r_scaled`: the same on errors
# scaled per token; `cross_share` =
# `2<e0, eL> / (||e0||^2 + ||eL||^2)` (negative when the errors point in opposite directions);
# `energy_ratio` = `||eb||^2 / (||e0||^2 + ||eL||^2)` (below 1: the joint error is smaller than two
# independent errors, i.e. they cancel); `interaction_share` = `||eb - (e0 + eL)|| / ||eb||` (0: the
# joint error is exactly the sum of the separate ones). Rows per language, pooled (`all`), per group and
# LR minus HR.

# %%
summary = pd.concat([errors.summary("hidden", **groups), errors.summary("logprobs", **groups)], ignore_index=True)
summary[["site", "quantity", "lang", "value", "value_ci_low", "value_ci_high", "n", "reason"]]

# %% [markdown]
# ## Hypotheses
# Every verdict is computed from the bootstrap interval: SUPPORTED when the whole 95 % interval lies
# beyond the threshold by the minimum effect in the predicted direction, NOT_SUPPORTED when it lies
# wholly short of that, else INCONCLUSIVE; then Holm-adjusted within each family. H2.3 is judged at both sites with the seed's statistic and, at the hidden state, with the
# per-token scaled errors; the cancellation test asks whether the joint output error is smaller than two
# independent errors would be.

# %%
est = dict(n_boot=N_BOOT, seed=SEED)
hypotheses = [
    Hypothesis.evaluate("H2.3", "the errors of quantizing L0 and L_last are negatively correlated at the last hidden state",
                        errors.estimate("r", "hidden", **est), 0.0, "<", quantity="mean per-text r(e0, eL)",
                        primary=True, min_effect=0.1),
    Hypothesis.evaluate("H2.3-scaled", "the per-token scaled errors of quantizing L0 and L_last are negatively correlated at the last hidden state",
                        errors.estimate("r_scaled", "hidden", **est), 0.0, "<", quantity="mean per-text r of scaled e0, eL",
                        family="other error measures", min_effect=0.1),
    Hypothesis.evaluate("H2.3-logprobs", "the errors of quantizing L0 and L_last are negatively correlated in the output log-probabilities",
                        errors.estimate("r", "logprobs", **est), 0.0, "<", quantity="mean per-text r(e0, eL)",
                        family="other error measures", min_effect=0.1),
    Hypothesis.evaluate("H2.3-cancel", "quantizing L0 and L_last together gives a smaller output error than two independent errors (partial cancellation)",
                        errors.estimate("energy_ratio", "logprobs", **est), 1.0, "<", quantity="||eb||^2 / (||e0||^2 + ||eL||^2)",
                        family="cancellation", min_effect=0.05),
]
hypotheses = adjust_families(hypotheses)
for h in hypotheses:
    print(h.sentence())

# %% [markdown]
# ## Beyond the gateway pair: error correlations between layers at different depths
# Mean per-text `r` and `r_scaled` of the single-layer errors at the last hidden state, for every pair of
# the layers at 0, 25 %, 50 %, 75 % and 100 % depth, pooled over languages, with intervals.

# %%
matrix_table = errors.matrix_table("hidden", "r", **groups).merge(
    errors.matrix_table("hidden", "r_scaled", **groups), on=["layer_a", "layer_b", "lang", "n"], suffixes=("", "_scaled"))
matrix_table[matrix_table["lang"] == "all"][["layer_a", "layer_b", "r", "r_ci_low", "r_ci_high",
                                             "r_scaled", "r_scaled_ci_low", "r_scaled_ci_high", "n"]]

# %% [markdown]
# ## Figures
# Top: the correlation matrices (pooled; the trivial diagonal is left blank), raw and per-token scaled
# errors. Bottom left: the per-language correlation of `e0` and `eL` at both sites. Bottom right: the
# additivity at the output, pooled and per group.

# %%
fig, axes = plt.subplots(2, 2, figsize=(16, 11))
plots.layer_heatmap(errors.matrix("hidden"), ax=axes[0, 0], center=0.0, fmt=".3f", title="Error correlation r at the last hidden state",
                    cbar_label="mean per-text r")
plots.layer_heatmap(errors.matrix("hidden", column="r_scaled"), ax=axes[0, 1], center=0.0, fmt=".3f",
                    title="The same, errors scaled per token", cbar_label="mean per-text r_scaled")
summary["label"] = summary["site"] + " " + summary["quantity"] + ": " + summary["lang"]
r_rows = summary[summary["quantity"].isin(["r", "r_scaled"]) & ~summary["lang"].isin(["LR", "HR", "LR-HR"])]
plots.estimate_bars(r_rows, "value", label="label", ax=axes[1, 0], reference=0.0,
                    title=f"r(e0, eL), L{A} and L{B} quantized alone", xlabel="mean per-text Pearson r")
out_rows = summary[(summary["site"] == "logprobs") & summary["lang"].isin(["all", "LR", "HR"])
                   & ~summary["quantity"].isin(["r", "r_scaled"])]
plots.estimate_bars(out_rows, "value", label="label", ax=axes[1, 1], reference=1.0,
                    title="Additivity of the output errors (log-probabilities)", xlabel="value (energy_ratio: 1 = independent errors)")
fig.tight_layout()
figures = [plots.save_figure(fig, OUTPUT_DIR, "t006_error_correlation")]

# %% [markdown]
# ## Verdict and record
# The sentences above are generated from the intervals (and adjusted within their families; the table
# shows the raw verdict beside the adjusted one). H2.3 stands or falls with its own interval; the other
# measures say whether the answer depends on where and how the errors are measured (a correlation
# dominated by a few massive-activation tokens can differ from the per-token scaled one).
# `results.json` in `OUTPUT_DIR` holds every parameter, the environment, the per-language tables and the
# hypotheses with their raw and adjusted verdicts.

# %%
# NBVAL_IGNORE_OUTPUT
metrics = {
    "n_layers": loaded.n_layers,
    "pair": [A, B],
    "matrix_layers": errors.layers,
    "n_texts_per_language": {lang: corpus.n_texts(lang) for lang in corpus.langs},
    "max_abs_diff_before_last": float(errors.before_last["max_abs_diff"].max()),
    "relative_error": size,
    "additivity": summary,
    "correlation_matrix": matrix_table,
    "seconds": errors.seconds,
}
parameters = current_parameters(globals(), DEVICE=str(loaded.device), DTYPE=loaded.metadata["dtype"])
path = write_results(OUTPUT_DIR, "t006_error_correlation", parameters, metrics, hypotheses, figures, loaded.metadata)
print("wrote", path)

# %%
verdict_table = print_verdicts(hypotheses)

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
#       full: 8
#       quick: 78
#     purpose: 'EXP-005 layer ablation: do the gateway layers (L0 + L_final) carry the
#       low-resource disparity? (H5)'
#     source: notebooks/src/exp005_layer_ablation.py
# ---

# %% [markdown]
# # EXP-005: layer ablation — are the gateway layers critical for low-resource languages?
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qhelpers/qhelpers/blob/main/notebooks/exp005_layer_ablation.ipynb)
#
# **Question.** When a model's weights are quantized to INT4, which decoder layers must stay in full
# precision so that low-resource languages (Hebrew, Swahili) do not lose more than high-resource ones
# (English, German)?
#
# **Hypothesis H5 (seed 000), the primary hypothesis of this notebook.** Layers 0 and the final layer
# are disproportionately important for low-resource languages: *protecting L0 + L_final reduces the
# disparity by more than 30 %*. Null: all layers are equally important. The disparity is measured on
# content-matched text: `D` = mean over LR languages minus mean over HR languages of the change in
# **bits per parallel paragraph** (the same UDHR paragraph in every language, so no language is charged
# for its script's bytes or its tokenizer's token count). The seed's own ratio of degradations and the
# bits-per-byte difference are kept as the secondary family "H5 variants".
#
# **Premise.** "Reducing the disparity" presupposes one: that low-resource languages lose *more* than
# high-resource ones when every layer is quantized. Each H5 variant therefore declares the matching
# premise (`P-D`: D > 0 in bits per paragraph; `P-D-bpb`: D > 0 in bits per byte; `P-ratio`: the seed's
# ratio > 1), evaluated as a hypothesis of its own (family "premises"). When a premise is not SUPPORTED
# the hypotheses that rest on it are INCONCLUSIVE with the reason "premise not met (...)": a "30 %
# reduction" of a negative disparity, or of a ratio below 1, moves *away* from parity.
#
# **Effect sizes and multiplicity.** Thirty percent is the seed's own practical size for H5. A disparity
# counts as present only beyond `MIN_EFFECT_BITS` bits per paragraph (2 bits: 0.01 bits per byte on a
# mean English UDHR paragraph of about 165 bytes, rounded up) or `MIN_EFFECT_BPB` = 0.01 bits per byte
# (a change smaller than that is below what a reader of a bits-per-byte table would call a difference).
# The synergy and first-half-vs-second-half contrasts (family "layer contrasts") need the same 0.01 bits
# per byte. Verdicts are Holm-adjusted within each family (`adjust_families`); a verdict needs at
# least 10 texts per language (fewer give "too few texts").
#
# **Method.** Eight configurations (full precision, all quantized, first / last / first+last / middle /
# first half / second half protected). Per text we record the summed negative log-likelihood, tokens
# and UTF-8 bytes; per language perplexity and bits per byte; per configuration the seed's disparity
# (mean low-resource degradation / mean high-resource degradation) and, because a ratio explodes when
# the high-resource degradation is near zero, the additive disparity in bits per byte. Every figure
# carries a paired bootstrap 95 % interval over texts, and every verdict is computed from that interval.
#
# `PROTOCOL = "seed"` reproduces seed 000 exactly (per-tensor symmetric INT-b on every weight inside the
# decoder layers, embeddings and final norm untouched); `"sound"` (default) quantizes the linear weights
# per output channel.

# %%
# Colab only: install qhelpers (elsewhere it is installed by scripts/install.sh)
import subprocess
import sys

if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "qhelpers @ git+https://github.com/qhelpers/qhelpers@v0.1.0"], check=True)

# %% tags=["parameters"]
# Notebook parameters: papermill and run_all.py -p override them; results.json records their values
MODEL = "embedded:smollm2-135m"   # hub id, local folder, embedded:<name> or tiny:<arch>
CORPUS = "udhr"                   # "udhr" (50 parallel paragraphs) or "seed-exp005" (the seed's 3 texts)
LANGS = ["en", "de", "he", "sw"]  # seed 000's languages
HR_LANGS = ["en", "de"]
LR_LANGS = ["he", "sw"]
N_TEXTS = 10                      # texts per language (None: all); verdicts need >= 10
PROTOCOL = "sound"                # "sound" or "seed"
BITS = 4
MAX_LENGTH = 512                  # tokens per forward window
DEVICE = None                     # None: cuda if available, else cpu
DTYPE = None                      # None: fp32 on CPU, bf16 on CUDA (fp16 on a T4); "fp32" everywhere for reference numbers
SEED = 0
N_BOOT = 2000
MIN_EFFECT_BITS = 2.0             # practical size of a disparity in bits per parallel paragraph
MIN_EFFECT_BPB = 0.01             # practical size of a disparity in bits per byte
MIN_EFFECT_FLIPS = 0.01           # practical size of a disparity in the share of flipped top-1 predictions
OUTPUT_DIR = "results/exp005_layer_ablation"

# %%
import matplotlib.pyplot as plt
import pandas as pd

from qhelpers import stats
from qhelpers.measure.scoring import MeasureConfig
from qhelpers.measure.sweep import run_sweep
from qhelpers.models.loading import load_model
from qhelpers.quant import strategies
from qhelpers.report import plots
from qhelpers.report.damage import damage_card, damage_card_records
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
# The model is loaded once; every configuration is applied to it and restored.

# %%
loaded = load_model(MODEL, device=DEVICE, dtype=DTYPE)
corpus = load_corpus(CORPUS, langs=LANGS, n_texts=N_TEXTS, seed=SEED)
print(loaded.describe())
print("baseline:", loaded.metadata["baseline"])
print({lang: corpus.n_texts(lang) for lang in corpus.langs}, "texts per language")

# %% [markdown]
# ## The eight configurations

# %%
variants = strategies.exp005_variants(loaded.n_layers, protocol=PROTOCOL, bits=BITS)
for name, variant in variants.items():
    print(f"{name:24s} protected layers {list(variant.protect.layers)}")

# %%
# NBVAL_IGNORE_OUTPUT
sweep = run_sweep(loaded, corpus, variants, MeasureConfig(max_length=MAX_LENGTH))

# %% [markdown]
# ## Per-language results
# Full-precision baseline first, then degradation (the seed's relative perplexity increase) and the change
# in bits per byte for every configuration and language.

# %%
sweep.baseline_table(n_boot=N_BOOT, seed=SEED)[["lang", "n_texts", "ppl", "bpb"]].round(4)

# %%
table = sweep.language_table(n_boot=N_BOOT, seed=SEED)
table[["config", "lang", "degradation", "degradation_ci_low", "degradation_ci_high", "delta_bpb", "delta_bpb_ci_low", "delta_bpb_ci_high"]].round(4)

# %% [markdown]
# ## Damage card
# How far each configuration moved the model's predictions from the full model's, per language: the change
# in bits per byte, the KL divergence from the full model's next-token distribution (full vocabulary, in
# bits per byte of text), the share of tokens whose top-1 prediction is unchanged, and the 99th percentile
# of per-token KL (nats). Equal perplexity can hide many changed predictions; KL and top-1 agreement show
# them. Intervals: paired bootstrap over texts (studentized; percentile for the p99, read from per-text
# histograms to within 6 %).

# %%
damage_card(table)

# %% [markdown]
# ## Disparity per configuration
# `disparity` is the seed's ratio (mean LR degradation / mean HR degradation); `_bpb_diff` is mean LR minus
# mean HR change in bits per byte and `_par_diff` the same in bits per parallel paragraph (the primary
# metric); the differences stay defined when the high-resource change is near zero.

# %%
groups = dict(lr_langs=LR_LANGS, hr_langs=HR_LANGS, n_boot=N_BOOT, seed=SEED)
ratio = sweep.disparity_table(metric="degradation", **groups)
difference = sweep.disparity_table(measure="difference", metric="delta_bpb", **groups)
difference_par = sweep.disparity_table(measure="difference", metric="delta_bits_per_paragraph", **groups)
difference_kl = sweep.disparity_table(measure="difference", metric="kl_bpb", **groups)
difference_flips = sweep.disparity_table(measure="difference", metric="flip_rate", **groups)
disparities = (ratio.merge(difference, on=["config", "protected_fraction", "n"], suffixes=("", "_bpb_diff"))
               .merge(difference_par[["config", "disparity", "disparity_ci_low", "disparity_ci_high"]]
                      .add_suffix("_par_diff").rename(columns={"config_par_diff": "config"}), on="config"))
disparities[["config", "protected_fraction", "disparity", "disparity_ci_low", "disparity_ci_high", "disparity_bpb_diff",
             "disparity_ci_low_bpb_diff", "disparity_ci_high_bpb_diff", "disparity_par_diff", "disparity_ci_low_par_diff",
             "disparity_ci_high_par_diff", "reason"]].round(4)

# %% [markdown]
# The same LR-minus-HR differences on the damage card's measures: KL to the full model (bits per byte) and
# the share of flipped top-1 predictions.

# %%
(difference_kl[["config", "disparity", "disparity_ci_low", "disparity_ci_high"]]
 .merge(difference_flips[["config", "disparity", "disparity_ci_low", "disparity_ci_high"]], on="config",
        suffixes=("_kl_bpb", "_flip_rate"))
 .round(4))

# %% [markdown]
# ## Premises: do low-resource languages lose more at all?
# With every layer quantized, the disparity must be positive (beyond its practical size) before any
# protection can "reduce" it. Each premise is evaluated from its interval like every hypothesis.

# %%
d_par = stats.disparity_difference(sweep.scores, "all_quantized", metric="delta_bits_per_paragraph", **groups)
d_bpb = stats.disparity_difference(sweep.scores, "all_quantized", metric="delta_bpb", **groups)
d_ratio = stats.disparity(sweep.scores, "all_quantized", metric="degradation", **groups)
premise_par = Hypothesis.evaluate(
    "P-D", "with every layer quantized, LR languages lose more bits per parallel paragraph than HR languages",
    d_par, 0.0, ">", family="premises", min_effect=MIN_EFFECT_BITS, quantity="D (bits per paragraph)")
premise_bpb = Hypothesis.evaluate(
    "P-D-bpb", "with every layer quantized, LR languages lose more bits per byte than HR languages",
    d_bpb, 0.0, ">", family="premises", min_effect=MIN_EFFECT_BPB, quantity="D (bits per byte)")
premise_ratio = Hypothesis.evaluate(
    "P-ratio", "with every layer quantized, LR languages degrade more than HR languages (seed's ratio > 1)",
    d_ratio, 1.0, ">", family="premises", quantity="disparity ratio")
d_kl = stats.disparity_difference(sweep.scores, "all_quantized", metric="kl_bpb", **groups)
d_flips = stats.disparity_difference(sweep.scores, "all_quantized", metric="flip_rate", **groups)
damage_kl = Hypothesis.evaluate(
    "D-kl", "with every layer quantized, LR languages diverge more from the full model (KL bits per byte)",
    d_kl, 0.0, ">", family="damage card", min_effect=MIN_EFFECT_BPB, quantity="D (KL bits per byte)")
damage_flips = Hypothesis.evaluate(
    "D-flips", "with every layer quantized, LR languages see more flipped top-1 predictions",
    d_flips, 0.0, ">", family="damage card", min_effect=MIN_EFFECT_FLIPS, quantity="D (flip rate)")
for h in (premise_par, premise_bpb, premise_ratio, damage_kl, damage_flips):
    print(h.sentence())

# %% [markdown]
# ## H5 and the synergy analysis
# H5 is judged on the reduction of disparity from *all quantized* to *gateway protected*, with a paired
# bootstrap interval: primary in bits per parallel paragraph, the seed's ratio and bits per byte as
# variants. The synergy contrast is seed 000's: expected additive effect `D(first) + D(last) - D(all)`
# minus the observed `D(gateway)`; positive means the two layers help more together than their separate
# effects add up to. The verdicts printed are adjusted within their families (Holm).

# %%
h5_par = stats.reduction(sweep.scores, "all_quantized", "gateway_protected", metric="delta_bits_per_paragraph",
                         measure="difference", **groups)
h5_ratio = stats.reduction(sweep.scores, "all_quantized", "gateway_protected", metric="degradation", **groups)
h5_bpb = stats.reduction(sweep.scores, "all_quantized", "gateway_protected", metric="delta_bpb", measure="difference", **groups)
synergy = stats.disparity_contrast(
    sweep.scores, {"first_protected": 1, "last_protected": 1, "all_quantized": -1, "gateway_protected": -1},
    metric="delta_bpb", measure="difference", **groups,
)
halves = stats.disparity_contrast(
    sweep.scores, {"second_half_protected": 1, "first_half_protected": -1}, metric="delta_bpb", measure="difference", **groups,
)
hypotheses = adjust_families([
    Hypothesis.evaluate("H5", "protecting L0 + L_final reduces the LR-minus-HR excess in bits per parallel paragraph by more than 30 %",
                        h5_par, 30.0, ">", quantity="reduction %", primary=True, premise=premise_par),
    Hypothesis.evaluate("H5-ratio", "protecting L0 + L_final reduces the disparity ratio (degradation; seed 000's test) by more than 30 %",
                        h5_ratio, 30.0, ">", quantity="reduction %", family="H5 variants", premise=premise_ratio),
    Hypothesis.evaluate("H5-bpb", "protecting L0 + L_final reduces the LR-minus-HR bits-per-byte excess by more than 30 %",
                        h5_bpb, 30.0, ">", quantity="reduction %", family="H5 variants", premise=premise_bpb),
    Hypothesis.evaluate("H5-synergy", "L0 and L_final protection act synergistically (bits-per-byte disparity)",
                        synergy, 0.0, ">", quantity="synergy", family="layer contrasts", min_effect=MIN_EFFECT_BPB,
                        premise=premise_bpb),
    Hypothesis.evaluate("H5-early", "protecting the first half removes more disparity than protecting the second half",
                        halves, 0.0, ">", quantity="D(second half protected) - D(first half protected)",
                        family="layer contrasts", min_effect=MIN_EFFECT_BPB, premise=premise_bpb),
    premise_par, premise_bpb, premise_ratio, damage_kl, damage_flips,
])
for h in hypotheses:
    print(h.sentence())

# %% [markdown]
# ## Figures (seed 000's four panels)

# %%
fig, axes = plt.subplots(2, 2, figsize=(15, 10))
mean_change = stats.group_means(table, "delta_bpb", LR_LANGS, HR_LANGS)
plots.estimate_bars(difference, "disparity", ax=axes[0, 0], reference=0.0, highlight=["gateway_protected"],
                    title="LR - HR change in bits per byte", xlabel="disparity (bits per byte)")
plots.estimate_bars(ratio, "disparity", ax=axes[0, 1], reference=1.0, highlight=["gateway_protected"],
                    title="Disparity ratio (seed definition)", xlabel="mean LR degradation / mean HR degradation")
plots.language_points(table, "delta_bpb", ax=axes[1, 0], title="Per-language change in bits per byte")
plots.hr_lr_scatter(mean_change, ax=axes[1, 1], title="HR vs LR change (above the diagonal: LR hurt more)",
                    xlabel="HR change (bits per byte)", ylabel="LR change (bits per byte)")
fig.tight_layout()
figures = [plots.save_figure(fig, OUTPUT_DIR, "exp005_results")]

# %% [markdown]
# ## Verdict and record
# The sentences above and the table below are generated from the intervals: the primary hypothesis H5
# first, then the families with their raw and Holm-adjusted verdicts, each with n (texts per language).
# Read H5 through its premise: when `P-D` is not SUPPORTED (low-resource languages do not lose more on this
# model and these texts), H5 is INCONCLUSIVE whatever its interval, because there is no excess to reduce.
# `results.json` in `OUTPUT_DIR` holds every parameter, the environment (package versions, device, git
# commit), the metrics and the hypotheses.

# %%
# NBVAL_IGNORE_OUTPUT
metrics = {
    "n_layers": loaded.n_layers,
    "n_texts_per_language": {lang: corpus.n_texts(lang) for lang in corpus.langs},
    "baseline": sweep.baseline_table(n_boot=N_BOOT, seed=SEED),
    "per_language": table,
    "damage_card": damage_card_records(table),
    "disparity_kl_difference": difference_kl,
    "disparity_flip_difference": difference_flips,
    "disparity_ratio": ratio,
    "disparity_bpb_difference": difference,
    "disparity_par_difference": difference_par,
    "premise_disparity_par": d_par.to_dict(),
    "premise_disparity_bpb": d_bpb.to_dict(),
    "premise_disparity_ratio": d_ratio.to_dict(),
    "h5_reduction_par": h5_par.to_dict(),
    "h5_reduction_ratio": h5_ratio.to_dict(),
    "h5_reduction_bpb": h5_bpb.to_dict(),
    "synergy_bpb": synergy.to_dict(),
    "seconds": sweep.seconds,
}
parameters = current_parameters(globals(), DEVICE=str(loaded.device), DTYPE=loaded.metadata["dtype"])
path = write_results(OUTPUT_DIR, "exp005_layer_ablation", parameters, metrics, hypotheses, figures, loaded.metadata)
print("wrote", path)

# %%
verdict_table = print_verdicts(hypotheses)

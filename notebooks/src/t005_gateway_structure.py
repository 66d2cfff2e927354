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
#       full: 36
#       quick: 29
#     purpose: 'T-005 (seed 004, H2.2): do the first and last decoder layers have a
#       weight structure (SVD spectrum) unlike the middle layers''?'
#     source: notebooks/src/t005_gateway_structure.py
# ---

# %% [markdown]
# # T-005: gateway structure — are L0 and L_last built differently?
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qhelpers/qhelpers/blob/main/notebooks/t005_gateway_structure.ipynb)
#
# **Question.** Protecting the first and last decoder layers together was the seed's most effective small
# intervention. Are these "gateway" layers special already in their weights, before any text is run?
#
# **Hypothesis H2.2 (seed 004, "Input-Output Gateway Theory").** *L0 and L11 are "gateways" - L0 encodes
# input into the model's representation space, L11 decodes back to output space.* Prediction: *L0 and L11
# have unique weight structure compared to middle layers.* Tested here as
#
# * **H2.2**: L0 and L_last are jointly the most distinct layers beyond what chance allows (see Method);
# * **H2.2-crit**: layers with a more distinct weight structure are more critical (Spearman r > 0 between
#   distinctiveness and `layer_criticality`).
#
# **Method.**
# 1. Every weight matrix of every decoder layer (q, k, v, o and the MLP matrices, from the architecture
#    registry; a fused q/k/v projection split into its parts) gets the seed's SVD statistics
#    (`qhelpers.measure.weight_stats.tensor_stats`): count rank `#{s > 0.01 s_max}` (the seed's "effective rank"),
#    entropy effective rank, stable rank `||W||_F² / s_max²`, log10 condition number (capped at
#    1/float32-epsilon) and log10 top singular value.
# 2. Each (matrix, statistic) column is put on a robust scale (1.4826 MAD over layers, the standard deviation
#    when the MAD is 0; constant columns dropped). A layer's z-score in a column is its distance from the
#    median of the OTHER layers; its **distinctiveness** is the root mean square of its z-scores.
# 3. If layers were exchangeable, the gateway pair would be a random pair of layers. The exact permutation
#    p-value is the share of all `C(n, 2)` pairs whose smaller distinctiveness is at least the gateways'.
#    H2.2 is judged on `T = min(d[L0], d[L_last]) - Q`, where `Q` is the level-`ALPHA` critical value of the
#    same statistic over the other pairs: `T > 0` exactly when `p <= ALPHA`. The 95 % interval of `T` comes from
#    a bootstrap over the (matrix, statistic) columns, i.e. it asks whether the conclusion survives a
#    different choice of descriptors. With few layers (6 or fewer at `ALPHA` = 0.05) no outcome can reach
#    the level and H2.2 is undefined (INCONCLUSIVE).
#
# **How the verdicts are decided.** H2.2 is the **primary hypothesis** (the seed's), declared before the
# data. H2.2-crit (family "criticality") rests on a **premise**: criticality is the disparity that
# protecting a layer removes, which means "fairer" only if, with every layer quantized, LR languages lose
# more than HR ones; that premise (`LR-lose-more`, `D(all quantized) > 0`) is tested first, and when it is
# not SUPPORTED H2.2-crit is INCONCLUSIVE ("premise not met"). **Minimum effects** of practical size:
# `T` must clear the chance critical value by 0.25 robust standard deviations (a smaller margin moves
# with the choice of descriptors), a correlation must exceed 0.1, and the premise's gap 0.01 bits per
# byte (half a percent of a ~2 bits-per-byte baseline). SUPPORTED needs the 95 % interval beyond
# threshold + minimum effect; NOT_SUPPORTED, wholly short of it. Fewer than 10 units (feature columns
# for H2.2, layers for H2.2-crit, texts for the premise) give no verdict.
#
# **Caveats.** The embedded model's weights are a dequantized GGUF (Q4_1), so small singular values carry
# that earlier quantization too. The feature columns are not independent (ranks of one matrix move
# together), so the bootstrap interval is a sensitivity range, not a sampling interval. On a random-init
# tiny model (ci profile) criticality is undefined and H2.2-crit INCONCLUSIVE.

# %%
# Colab only: install qhelpers (elsewhere it is installed by scripts/install.sh)
import subprocess
import sys

if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "qhelpers @ git+https://github.com/qhelpers/qhelpers@v0.1.0"], check=True)

# %% tags=["parameters"]
# Notebook parameters: papermill and run_all.py -p override them; results.json records their values
MODEL = "embedded:smollm2-135m"   # hub id, local folder, embedded:<name> or tiny:<arch>
CORPUS = "udhr"                   # "udhr": 50 parallel paragraphs per language
LANGS = ["en", "de", "fr", "zh", "ar", "he", "sw"]
HR_LANGS = ["en", "de", "fr", "zh"]
LR_LANGS = ["ar", "he", "sw"]
N_TEXTS = 4                       # texts per language for the criticality sweep (None: all 50)
PROTOCOL = "sound"                # protocol of the criticality sweep
BITS = 4
COMPONENTS = "linear"             # registry components or groups: "linear", "attn", "mlp", ...
FEATURES = ["count_rank", "effective_rank", "stable_rank", "log10_condition", "log10_s_max"]
ALPHA = 0.05                      # level of the gateway permutation test
MAX_LENGTH = 256                  # tokens per forward window of the criticality sweep
DEVICE = None                     # None: cuda if available, else cpu
DTYPE = None                      # None: fp32 on CPU, bf16 on CUDA (fp16 on a T4); "fp32" everywhere for reference numbers
SEED = 0
N_BOOT = 2000
OUTPUT_DIR = "results/t005_gateway_structure"

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from qhelpers import stats
from qhelpers.experiments import weight_structure
from qhelpers.measure.criticality import layer_criticality
from qhelpers.measure.scoring import MeasureConfig
from qhelpers.models.loading import load_model
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
pd.set_option("display.max_columns", 20)

# %% [markdown]
# ## Model and texts

# %%
loaded = load_model(MODEL, device=DEVICE, dtype=DTYPE)
corpus = load_corpus(CORPUS, langs=LANGS, n_texts=N_TEXTS, seed=SEED)
print(loaded.describe())
print("baseline:", loaded.metadata["baseline"])

# %% [markdown]
# ## SVD profile of every weight matrix

# %%
# NBVAL_IGNORE_OUTPUT
profile = weight_structure.svd_profile(loaded, components=COMPONENTS)
print(len(profile), "matrices:", ", ".join(f"{c} {s}" for c, s in profile.drop_duplicates("component")[["component", "shape"]].values))

# %%
profile.pivot(index="layer", columns="component", values="effective_rank")

# %%
profile.pivot(index="layer", columns="component", values="count_rank")

# %% [markdown]
# ## Distinctiveness of each layer
# `rank` 1 = most distinct. `gateway_excess` = mean distinctiveness of the gateways minus the median of the
# middle layers; `gateway_margin` = the smaller gateway value minus the largest middle value (> 0 when the
# gateways are the two most distinct layers); both with intervals over the feature columns, descriptive only.

# %%
dist = weight_structure.layer_distinctiveness(profile, FEATURES, n_boot=N_BOOT, seed=SEED, alpha=ALPHA)
print("gateways:", dist.gateways, "| two most distinct layers:", dist.top(2))
print("dropped constant columns:", dist.dropped_columns)
print(f"exact permutation p = {dist.p_perm:.4g} over {dist.n_pairs} layer pairs")
print("gateway excess:", dist.gateway_excess)
print("gateway margin:", dist.gateway_margin)
print(f"T (beyond chance at alpha {ALPHA:g}):", dist.gateway_vs_chance)
dist.table

# %% [markdown]
# ## Criticality per layer

# %%
# NBVAL_IGNORE_OUTPUT
crit = layer_criticality(loaded, corpus, bits=BITS, protocol=PROTOCOL, lr_langs=LR_LANGS, hr_langs=HR_LANGS,
                         n_boot=N_BOOT, seed=SEED, measure_config=MeasureConfig(max_length=MAX_LENGTH))
print(crit.describe())
print("sweep reused from the on-disk cache:", crit.from_cache)


# %% [markdown]
# ### Damage card of the criticality sweep
# With every layer quantized: per language the change in bits per byte, the KL from the full model's
# next-token distribution (bits per byte), the share of unchanged top-1 predictions and the 99th
# percentile of per-token KL (nats), with paired bootstrap 95 % intervals over texts.

# %%
crit_card = crit.sweep.language_table(n_boot=N_BOOT, seed=SEED)
damage_card(crit_card, config="all_quantized")

# %%
merged = dist.table.merge(crit.table[["layer", "criticality", "criticality_ci_low", "criticality_ci_high"]], on="layer")
crit_corr = stats.correlation(merged["distinctiveness"], merged["criticality"], method="spearman", n_boot=N_BOOT, seed=SEED)
merged

# %% [markdown]
# ## Hypotheses
# `LR-lose-more` (the premise of H2.2-crit) is the LR-minus-HR change in bits per byte with every layer
# quantized, from the criticality sweep.

# %%
premise = Hypothesis.evaluate(
    "LR-lose-more", "with every layer quantized, LR languages lose more bits per byte than HR languages",
    stats.disparity_difference(crit.sweep.scores, "all_quantized", baseline=crit.sweep.baseline, lr_langs=LR_LANGS,
                               hr_langs=HR_LANGS, metric="delta_bpb", n_boot=N_BOOT, seed=SEED),
    0.0, ">", quantity="D(all quantized), bits per byte", family="premise", min_effect=0.01)
hypotheses = [
    Hypothesis.evaluate("H2.2", "L0 and L_last are jointly the most distinct layers, beyond chance (SVD structure)",
                        dist.gateway_vs_chance, 0.0, ">", quantity=f"T (alpha {ALPHA:g})", primary=True, min_effect=0.25,
                        notes=f"exact permutation p = {dist.p_perm:.4g} over {dist.n_pairs} pairs; "
                              f"gateway ranks {dist.table.set_index('layer').loc[list(dist.gateways), 'rank'].tolist()}"),
    premise,
    Hypothesis.evaluate("H2.2-crit", "layers with a more distinct weight structure are more critical",
                        crit_corr, 0.0, ">", family="criticality", min_effect=0.1, premise=premise),
]
hypotheses = adjust_families(hypotheses)
for h in hypotheses:
    print(h.sentence())

# %% [markdown]
# ## Figures
# Left: robust z-scores per layer and (matrix, statistic) column, colour clipped at ±5, gateway layers in red.
# Right: distinctiveness per layer (interval over feature columns), and distinctiveness vs criticality.

# %%
fig = plt.figure(figsize=(16, 11))
grid = fig.add_gridspec(2, 2, width_ratios=[1.6, 1])
ax_heat = fig.add_subplot(grid[:, 0])
plots.layer_heatmap(dist.z.clip(-5, 5), ax=ax_heat, annotate=False, center=0.0, cbar_label="robust z (clipped at ±5)",
                    title="SVD profile: z-score vs the other layers")
ax_heat.set_xticklabels(dist.z.columns, rotation=90, fontsize=7)
ax_heat.set_xlabel("matrix:statistic")
for label in ax_heat.get_yticklabels():
    label.set_color("#d62728" if int(label.get_text()) in dist.gateways else "black")
ax_bar = fig.add_subplot(grid[0, 1])
plots.estimate_bars(dist.table.assign(layer=dist.table["layer"].astype(str)), "distinctiveness", label="layer", ax=ax_bar,
                    highlight=[str(g) for g in dist.gateways], title="Distinctiveness (red: gateways)",
                    xlabel="RMS robust z-score")
ax_sc = fig.add_subplot(grid[1, 1])
plots.layer_scatter(merged, "distinctiveness", "criticality", ax=ax_sc, highlight=dist.gateways, reference=0.0,
                    title="H2.2-crit: distinctiveness vs criticality (red: gateways)",
                    ylabel="criticality (bits per byte, 95 % CI)")
fig.tight_layout()
figures = [plots.save_figure(fig, OUTPUT_DIR, "t005_gateway_structure")]

# %%
fig, axes = plt.subplots(1, len(FEATURES), figsize=(4 * len(FEATURES), 3.8))
for ax, feature in zip(np.atleast_1d(axes), FEATURES):
    profile.pivot(index="layer", columns="component", values=feature).plot(ax=ax, marker=".", legend=feature == FEATURES[0])
    for g in dist.gateways:
        ax.axvline(g, color="#d62728", alpha=0.3, linewidth=6)
    ax.set_title(feature)
fig.tight_layout()
figures.append(plots.save_figure(fig, OUTPUT_DIR, "t005_svd_profiles"))

# %% [markdown]
# ## Verdict and record
# The verdict table below is computed from the intervals above. H2.2 is SUPPORTED only if the gateway pair is
# beyond the permutation critical value for every resampling of the descriptors in the 95 % interval,
# NOT_SUPPORTED if it stays short of the minimum effect throughout (the gateways are not clearly more
# distinct than a random pair of layers would be), and INCONCLUSIVE otherwise. H2.2-crit is INCONCLUSIVE
# whenever `LR-lose-more` is not SUPPORTED: when LR languages lose less than HR ones, the disparity a layer
# "removes" is a gap that favours them. The ranks in the notes show where each gateway stands on its own (a
# single layer ranked r of n has a one-layer permutation p-value of r / n): one gateway can be the most
# distinct layer while the pair as a whole is not beyond chance, and a run of neighbouring layers that share
# a structure (e.g. the last few blocks) can all rank high together, which says "depth regime" rather than
# "gateway". The bar chart and heat map above show which of these the model at hand displays.

# %%
# NBVAL_IGNORE_OUTPUT
metrics = {
    "damage_card": damage_card_records(crit_card, configs=["all_quantized"]),
    "n_layers": loaded.n_layers,
    "n_texts_per_language": {lang: corpus.n_texts(lang) for lang in corpus.langs},
    "svd_profile": profile,
    "distinctiveness": dist.to_dict(),
    "criticality": crit.table,
    "criticality_from_cache": crit.from_cache,
    "distinctiveness_vs_criticality": crit_corr,
}
parameters = current_parameters(globals(), DEVICE=str(loaded.device), DTYPE=loaded.metadata["dtype"])
path = write_results(OUTPUT_DIR, "t005_gateway_structure", parameters, metrics, hypotheses, figures, loaded.metadata)
print("wrote", path)

# %%
verdict_table = print_verdicts(hypotheses)

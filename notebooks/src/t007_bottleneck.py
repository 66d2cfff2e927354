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
#       full: 243
#       quick: 67
#     purpose: 'T-007 (seed 004, H3.1): is the residual stream''s effective dimensionality
#       lowest at ~75 % depth (an information bottleneck)?'
#     source: notebooks/src/t007_bottleneck.py
# ---

# %% [markdown]
# # T-007: is there an information bottleneck at ~75 % depth?
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qhelpers/qhelpers/blob/main/notebooks/t007_bottleneck.ipynb)
#
# **Question.** In seed 004, protecting layer 9 of 12 (75 % depth) together with the first and last layers
# gave the lowest disparity. Is that layer special because representations are compressed there before
# the final layers expand them towards the output?
#
# **Hypothesis H3.1 (seed 004, "Information Bottleneck Hypothesis").** *L9 is an "information bottleneck"
# where representations compress before the final layers expand toward output.* Prediction:
# *activation dimensionality (effective rank) is lowest at ~75 % depth*. Null: the minimum lies elsewhere.
#
# **Method.**
# 1. Residual stream after every decoder block; a seeded sample of at most `MAX_TOKENS_PER_TEXT` token rows
#    per text (BOS left out), the SAME token positions at every layer, so every layer has the same rows.
# 2. Per layer, on the token rows pooled over languages: the seed's effective dimension (number of principal
#    components explaining `THRESHOLD` = 95 % of the variance) and the participation ratio
#    `(sum l)^2 / sum l^2` of the covariance eigenvalues (continuous, so free of ties). Per language too, each
#    on the same number of rows (the smallest language's), so languages can be compared with each other.
# 3. The layer of lowest dimensionality. Depth is `layer / (n_layers - 1)`; L9 of 12 is at 0.82 by this rule
#    and at 0.75 by the seed's `9 / 12`, and both lie in the window `TARGET_DEPTH +- TOLERANCE` = 0.65-0.85.
#    Block 0 is left out of the search by default (`SEARCH_FROM_LAYER = 1`): its output is the token
#    embedding plus one block, so a low dimensionality there says more about the embedding table than
#    about a bottleneck between processing stages. The minimum including block 0 is printed as well.
# 4. Bootstrap over texts (paired across languages) of the minimum's depth; H3.1 is judged on
#    `|depth - TARGET_DEPTH|`: SUPPORTED if its whole 95 % interval is below `TOLERANCE`. Ties of the
#    integer effective dimension count as the mean depth of the tied layers.
# 5. Does a low dimensionality go with a critical layer? Spearman correlation over layers between the
#    effective dimension and the criticality of `qhelpers.measure.criticality.layer_criticality`.
# 6. Robustness: H3.1-robust repeats H3.1 without the token rows whose norm exceeds `MASSIVE_RATIO` times the
#    median token norm at any layer ("massive activations", Sun et al., 2024), which can hold most of a
#    layer's variance on their own.
#
# **How the verdicts are decided.** The **primary hypothesis** is H3.1 on the participation ratio, decided
# only when the analysis with every token row and the one without massive-activation tokens agree
# (`agreeing`): a few tokens with huge norms can hold most of a layer's variance, so a minimum that moves
# when they are dropped is not a property of the representation. Both analyses and the seed's own
# statistic (the 95 % effective dimension, an integer with ties) form the family "depth of the minimum".
# The criticality correlations form the family "criticality" and rest on a **premise**: criticality is the
# disparity protecting a layer removes, which is "fairer" only if, with every layer quantized, LR
# languages lose more than HR ones (`LR-lose-more`); when it is not SUPPORTED they are INCONCLUSIVE.
# **Minimum effects**: the depth window `TOLERANCE` is itself the practical size (no extra margin); a
# correlation must exceed 0.1 in size; the premise's gap 0.01 bits per byte. Holm's method adjusts within
# each family. Fewer than 10 units (texts; layers for a correlation) give no verdict.
#
# **Caveats.** The effective dimension cannot exceed `min(n_rows - 1, hidden)`: with few rows the number of
# rows, not the model, may cap it (the `rank_limit` column). A few tokens with "massive activations" (norms
# hundreds of times the median, see `norm_ratio`) can hold most of the variance of a layer, and then the 95 %
# dimension is small because of them alone. The effective-dimension bootstrap needs one eigendecomposition
# per replicate and layer, so it uses `N_BOOT_SPECTRUM` replicates (fewer than `N_BOOT` on a CPU). The
# embedded model's baseline is a dequantized GGUF (already quantized once); on a random-init tiny model (ci
# profile) the criticality is undefined and the correlation verdict INCONCLUSIVE.

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
N_TEXTS = 4                       # texts per language (None: all 50)
BITS = 4                          # bit width of the criticality sweep
MAX_LENGTH = 256                  # tokens per text (longer texts are cut)
MAX_TOKENS_PER_TEXT = 32          # token rows sampled per text (None: all)
BATCH_SIZE = 16                   # texts per forward pass of the activation capture
THRESHOLD = 0.95                  # variance fraction of the effective dimension (seed: 0.95)
TARGET_DEPTH = 0.75               # hypothesised depth of the bottleneck
TOLERANCE = 0.10                  # half-width of the depth window
SEARCH_FROM_LAYER = 1             # first layer searched for the minimum (0: include block 0)
N_BOOT_SPECTRUM = 50              # bootstrap replicates of the effective dimension (slow on CPU)
MASSIVE_RATIO = 5.0               # a token row is "massive" above this multiple of the median token norm
DEVICE = None                     # None: cuda if available, else cpu
DTYPE = None                      # None: fp32 on CPU, bf16 on CUDA (fp16 on a T4); "fp32" everywhere for reference numbers
SEED = 0
N_BOOT = 1000
OUTPUT_DIR = "results/t007_bottleneck"

# %%
import matplotlib.pyplot as plt
import pandas as pd

from qhelpers import stats
from qhelpers.experiments.representation_geometry import (
    bottleneck,
    collect_activations,
    dimensionality,
    layer_correlation,
)
from qhelpers.measure.criticality import layer_criticality
from qhelpers.measure.scoring import MeasureConfig
from qhelpers.models.loading import load_model
from qhelpers.report import plots
from qhelpers.report.damage import damage_card, damage_card_records
from qhelpers.report.record import current_parameters
from qhelpers.report.results import (
    Hypothesis,
    adjust_families,
    agreeing,
    print_verdicts,
    seed_everything,
    write_results,
)
from qhelpers.text.corpora import load_corpus

seed_everything(SEED)
pd.set_option("display.precision", 4)
pd.set_option("display.width", 160)

# %% [markdown]
# ## Model, texts and activations

# %%
loaded = load_model(MODEL, device=DEVICE, dtype=DTYPE)
corpus = load_corpus(CORPUS, langs=LANGS, n_texts=N_TEXTS, seed=SEED)
print(loaded.describe())
print("baseline:", loaded.metadata["baseline"])

# %%
# NBVAL_IGNORE_OUTPUT
acts = collect_activations(loaded, corpus, pooling="tokens", max_length=MAX_LENGTH, batch_size=BATCH_SIZE,
                           max_tokens_per_text=MAX_TOKENS_PER_TEXT, seed=SEED)

# %%
print(f"{loaded.n_layers} layers, hidden size {acts.hidden}, at most {MAX_TOKENS_PER_TEXT} token rows per text")
acts.summary()

# %% [markdown]
# ## Dimensionality per layer
# `all`: every token row, pooled over languages. One row per language below, each on the same number of
# rows; `rank_limit` is the largest effective dimension those rows allow.

# %%
dims = dimensionality(acts, threshold=THRESHOLD, seed=SEED)
dims[dims["scope"] == "all"][["layer", "depth", "n_rows", "rank_limit", "eff_dim", "participation_ratio", "norm_ratio"]]

# %%
per_lang = dims[dims["scope"] != "all"]
print("rows per language:", int(per_lang["n_rows"].iloc[0]), " rank limit:", int(per_lang["rank_limit"].iloc[0]))
per_lang.pivot(index="layer", columns="scope", values="eff_dim")[LANGS]

# %% [markdown]
# ## Where is the minimum?
# Participation ratio with `N_BOOT` replicates, the seed's effective dimension with `N_BOOT_SPECTRUM`.

# %%
# NBVAL_IGNORE_OUTPUT
search = range(SEARCH_FROM_LAYER, loaded.n_layers)
pr = bottleneck(acts, measure="participation_ratio", search_layers=search, target=TARGET_DEPTH, n_boot=N_BOOT, seed=SEED)
ed = bottleneck(acts, measure="eff_dim", threshold=THRESHOLD, search_layers=search, target=TARGET_DEPTH,
                n_boot=N_BOOT_SPECTRUM, seed=SEED)
clean = acts.without_massive_tokens(MASSIVE_RATIO)
pr_clean = bottleneck(clean, measure="participation_ratio", search_layers=search, target=TARGET_DEPTH, n_boot=N_BOOT,
                      seed=SEED)

# %%
print(f"{len(clean.dropped_tokens)} of {len(acts.token_index)} token rows exceed {MASSIVE_RATIO:g} x the median token norm")
for label, result in (("all rows", pr), ("all rows", ed), ("massive tokens dropped", pr_clean)):
    print(f"[{label}] {result.sentence()}")
    print(f"  distance from {TARGET_DEPTH}: {result.distance}")
all_layers = dims[dims["scope"] == "all"]
print("including block 0, eff_dim is lowest at layers",
      all_layers.loc[all_layers["eff_dim"] == all_layers["eff_dim"].min(), "layer"].tolist(),
      "and participation_ratio at layer", int(all_layers.loc[all_layers["participation_ratio"].idxmin(), "layer"]))

# %% [markdown]
# ## Layer criticality

# %%
# NBVAL_IGNORE_OUTPUT
crit = layer_criticality(loaded, corpus, bits=BITS, lr_langs=LR_LANGS, hr_langs=HR_LANGS, n_boot=N_BOOT, seed=SEED,
                         measure_config=MeasureConfig(max_length=MAX_LENGTH))


# %% [markdown]
# ### Damage card of the criticality sweep
# With every layer quantized: per language the change in bits per byte, the KL from the full model's
# next-token distribution (bits per byte), the share of unchanged top-1 predictions and the 99th
# percentile of per-token KL (nats), with paired bootstrap 95 % intervals over texts.

# %%
crit_card = crit.sweep.language_table(n_boot=N_BOOT, seed=SEED)
damage_card(crit_card, config="all_quantized")

# %%
print(crit.describe())
crit.table[["layer", "depth", "criticality", "criticality_ci_low", "criticality_ci_high", "n", "reason"]]

# %% [markdown]
# ## Hypotheses
# H3.1 on each dimensionality measure: the distance of the minimum's depth from `TARGET_DEPTH` must lie below
# `TOLERANCE` over its whole 95 % interval. The primary H3.1 keeps that verdict only when the analyses with
# and without massive-activation tokens agree; otherwise it is INCONCLUSIVE and its notes show both.
# H3.1-criticality: if the bottleneck is why a layer is critical, lower dimensionality should go with higher
# criticality (negative Spearman r over layers; the bootstrap resamples layers and does not carry each
# layer's own uncertainty), judged only when the premise `LR-lose-more` holds. The `-robust` versions drop
# the massive-activation tokens first; where a verdict changes, those few tokens decide it.

# %%
r_crit = layer_correlation(all_layers.set_index("layer")["eff_dim"], crit, method="spearman", n_boot=N_BOOT, seed=SEED)
dims_clean = dimensionality(clean, threshold=THRESHOLD, per_language=False)
r_crit_clean = layer_correlation(dims_clean.set_index("layer")["eff_dim"], crit, method="spearman", n_boot=N_BOOT, seed=SEED)
window = f"[{TARGET_DEPTH - TOLERANCE:g}, {TARGET_DEPTH + TOLERANCE:g}]"
family = "depth of the minimum"
pr_all = Hypothesis.evaluate(
    "H3.1-all-tokens", f"the participation ratio of the residual stream (every token row) is lowest at a depth in {window}",
    pr.distance, TOLERANCE, "<", quantity=f"|depth of minimum - {TARGET_DEPTH:g}|", family=family,
    notes=f"minimum at layers {pr.layers}; depth {pr.depth}")
pr_robust = Hypothesis.evaluate(
    "H3.1-robust", f"without massive-activation tokens, the participation ratio is lowest at a depth in {window}",
    pr_clean.distance, TOLERANCE, "<", quantity=f"|depth of minimum - {TARGET_DEPTH:g}|", family=family,
    notes=f"minimum at layers {pr_clean.layers}; depth {pr_clean.depth}; "
          f"{len(clean.dropped_tokens)} token rows above {MASSIVE_RATIO:g} x the median norm dropped")
premise = Hypothesis.evaluate(
    "LR-lose-more", "with every layer quantized, LR languages lose more bits per byte than HR languages",
    stats.disparity_difference(crit.sweep.scores, "all_quantized", baseline=crit.sweep.baseline, lr_langs=LR_LANGS,
                               hr_langs=HR_LANGS, metric="delta_bpb", n_boot=N_BOOT, seed=SEED),
    0.0, ">", quantity="D(all quantized), bits per byte", family="premise", min_effect=0.01)
hypotheses = [
    agreeing(pr_all, pr_robust, id="H3.1", primary=True,
             statement=f"the participation ratio of the residual stream is lowest at a depth in {window}, with and without massive-activation tokens"),
    pr_all,
    pr_robust,
    Hypothesis.evaluate("H3.1-effdim", f"the effective dimension ({THRESHOLD:.0%} variance) is lowest at a depth in {window}",
                        ed.distance, TOLERANCE, "<", quantity=f"|depth of minimum - {TARGET_DEPTH:g}|", family=family,
                        notes=f"minimum at layers {ed.layers}; depth {ed.depth}; {N_BOOT_SPECTRUM} bootstrap replicates"),
    premise,
    Hypothesis.evaluate("H3.1-criticality", "layers of lower effective dimension are more critical",
                        r_crit, 0.0, "<", quantity="Spearman r(eff_dim, criticality)", family="criticality",
                        min_effect=0.1, premise=premise),
    Hypothesis.evaluate("H3.1-criticality-robust", "without massive-activation tokens, layers of lower effective dimension are more critical",
                        r_crit_clean, 0.0, "<", quantity="Spearman r(eff_dim without massive tokens, criticality)",
                        family="criticality", min_effect=0.1, premise=premise),
]
hypotheses = adjust_families(hypotheses)
for h in hypotheses:
    print(h.sentence())

# %% [markdown]
# ## Figures
# The red line and band mark the depth of the minimum and its 95 % bootstrap interval over texts; the grey
# band is the hypothesised window. Per-layer dimensionality is drawn without bands: a bootstrap resample
# repeats texts, and repeated rows lower every dimensionality measure, so the replicates of a layer sit
# below its observed value (compare `boot_median` with `value` in the tables of `pr.table` / `ed.table`).
# Criticality bands are paired bootstrap intervals over texts.

# %%
pr.table[["layer", "depth", "value", "boot_median", "value_ci_low", "value_ci_high", "searched"]]

# %%
fig, axes = plt.subplots(2, 2, figsize=(15, 10))
win = (TARGET_DEPTH - TOLERANCE, TARGET_DEPTH + TOLERANCE)
plots.layer_profile(ed.table, "value", ax=axes[0, 0], window=win, band_alpha=0,
                   span=(ed.depth.value, ed.depth.ci_low, ed.depth.ci_high), span_label="minimum (95% CI)",
                   title=f"Effective dimension ({THRESHOLD:.0%} variance), all languages", ylabel="components")
plots.layer_profile(pr.table, "value", ax=axes[0, 1], window=win, band_alpha=0,
                   span=(pr.depth.value, pr.depth.ci_low, pr.depth.ci_high), span_label="minimum (95% CI)",
                   title="Participation ratio, all languages (dotted: massive tokens dropped)", ylabel="participation ratio")
axes[0, 1].plot(pr_clean.table["depth"], pr_clean.table["value"], ":", color="black")
plots.layer_profile(per_lang, "participation_ratio", hue="scope", hue_order=LANGS, ax=axes[1, 0], window=win,
                   title="Participation ratio per language (equal rows; dashed: low-resource)", ylabel="participation ratio")
plots.layer_profile(crit.table, "criticality", ax=axes[1, 1], window=win, reference=0.0,
                   title="Layer criticality (protect one layer)", ylabel="criticality (bits per byte)")
fig.tight_layout()
figures = [plots.save_figure(fig, OUTPUT_DIR, "t007_bottleneck")]

# %% [markdown]
# ## Verdict and record
# The sentences above and the table below are generated from the intervals (Holm-adjusted within each
# family; the table shows the raw verdict beside the adjusted one); read them with the caveats at the top,
# in particular the massive-activation tokens (`norm_ratio`) and the rank limit. `results.json` in
# `OUTPUT_DIR` holds every parameter, the environment, the metrics and the hypotheses.

# %%
# NBVAL_IGNORE_OUTPUT
metrics = {
    "damage_card": damage_card_records(crit_card, configs=["all_quantized"]),
    "n_layers": loaded.n_layers,
    "hidden": acts.hidden,
    "texts": acts.summary(),
    "token_rows": pr.n_rows,
    "dimensionality": dims,
    "participation_ratio": pr.table,
    "participation_ratio_min_layers": pr.layers,
    "participation_ratio_min_depth": pr.depth.to_dict(),
    "participation_ratio_distance": pr.distance.to_dict(),
    "eff_dim": ed.table,
    "eff_dim_min_layers": ed.layers,
    "eff_dim_min_depth": ed.depth.to_dict(),
    "eff_dim_distance": ed.distance.to_dict(),
    "massive_tokens_dropped": clean.dropped_tokens,
    "participation_ratio_without_massive": pr_clean.table,
    "participation_ratio_without_massive_min_layers": pr_clean.layers,
    "participation_ratio_without_massive_min_depth": pr_clean.depth.to_dict(),
    "participation_ratio_without_massive_distance": pr_clean.distance.to_dict(),
    "criticality": crit.table,
    "criticality_definition": crit.describe(),
    "spearman_eff_dim_criticality": r_crit,
    "dimensionality_without_massive": dims_clean,
    "spearman_eff_dim_without_massive_criticality": r_crit_clean,
}
parameters = current_parameters(globals(), DEVICE=str(loaded.device), DTYPE=loaded.metadata["dtype"])
path = write_results(OUTPUT_DIR, "t007_bottleneck", parameters, metrics, hypotheses, figures, loaded.metadata)
print("wrote", path)

# %%
verdict_table = print_verdicts(hypotheses)

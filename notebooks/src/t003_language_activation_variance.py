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
#       full: 41
#       quick: 18
#     purpose: 'T-003 (seed 004, H1.3): do the layers that are critical for low-resource
#       languages show more cross-language activation variance?'
#     source: notebooks/src/t003_language_activation_variance.py
# ---

# %% [markdown]
# # T-003: language activation variance — are critical layers the ones languages use differently?
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qhelpers/qhelpers/blob/main/notebooks/t003_language_activation_variance.ipynb)
#
# **Question.** Seed 004 found that layers whose weights have high variance are the ones that must stay in
# full precision. One explanation (H1.3) is that different languages activate those layers differently, so
# quantizing them disrupts language-specific pathways. Do the layers that matter most for the low-resource
# disparity show more activation variance *across languages*?
#
# **Hypothesis H1.3 (seed 004, "Language Distribution Hypothesis"), the primary hypothesis of this
# notebook.** *High-variance layers are activated differently by different languages; quantization
# disrupts language-specific pathways.* Prediction: *activation variance differs more across languages in
# critical layers*. Null: the cross-language spread of activation variance is unrelated to a layer's
# criticality.
#
# **Decided only when two analyses agree.** A handful of "massive-activation" token rows can decide the
# correlation on their own (on SmolLM2 the seed's statistic went from r = 0.53 to r = -0.40 when 11 such
# rows were dropped). H1.3 is therefore computed twice, with every token row (`H1.3-all`) and without the
# massive-activation rows (`H1.3-robust`), and gets a verdict only when both analyses give the same one;
# otherwise it is INCONCLUSIVE with the reason "the two analyses disagree" (`agreeing` in
# `qhelpers.report.results`). The seed's own statistic (`cross_var`) is treated the same way as the
# secondary `H1.3-seed`.
#
# **Premise.** Criticality is "how much disparity protecting a layer removes", with the disparity
# `D` = mean LR minus mean HR change in bits per byte with every layer quantized. If low-resource
# languages do not lose more (`D` not above 0), "removing disparity" has no meaning and the sign of every
# criticality flips. `P-D` (D > 0 by at least 0.01 bits per byte, family "premises") is evaluated first;
# when it is not SUPPORTED the H1.3 verdicts are INCONCLUSIVE with the reason "premise not met (...)".
#
# **Effect size and multiplicity.** A correlation counts only beyond r = `MIN_EFFECT_R` = 0.1 (below it
# the criticality shares less than 1 % of its rank variance with the spread across languages, which
# explains nothing a reader could use). Each family is Holm-adjusted; n is the number of layers and a
# verdict needs at least 10.
#
# **Method.**
# 1. Residual stream after every decoder block (the block outputs; `qhelpers.experiments.representation_geometry`), a seeded
#    sample of at most `MAX_TOKENS_PER_TEXT` token rows per text, the BOS token left out.
# 2. Per layer and language, the activation variance `v(l, g)` = the mean over hidden dimensions of the
#    variance over the language's token rows (ddof = 0), i.e. trace(covariance) / hidden. The seed's literal
#    `acts.var()` (all token x dimension values) is shown beside it.
# 3. Per layer, across languages: `cross_var` = the variance of `v(l, g)` over languages (the seed's
#    `np.var`), and `cross_cv` = their standard deviation divided by their mean. The residual norm grows
#    with depth, so `cross_var` grows with it (as norm^4) whatever the languages do; `cross_cv` is
#    scale-free and is the main statistic. Each has a 95 % bootstrap interval over texts (paired across
#    languages: UDHR paragraphs are parallel).
# 4. Criticality of every layer (`qhelpers.measure.criticality.layer_criticality`, protect mode: how much the
#    LR-minus-HR change in bits per byte shrinks when only that layer stays in full precision, at INT`BITS`).
# 5. H1.3: Spearman correlation over layers between criticality and the cross-language statistic, with a
#    bootstrap interval over layers and a permutation p-value.
# 6. Robustness: a few tokens with "massive activations" (Sun et al., 2024; norms tens of times the median
#    token norm) can dominate a language's variance, so that the cross-language statistic measures whether
#    such a token happened to be sampled. Every correlation is repeated without the token rows whose norm
#    exceeds `MASSIVE_RATIO` times the median token norm at any layer (the same rows dropped at every
#    layer), and the verdict is given only when both agree.
#
# **Caveats.** The correlation's bootstrap resamples layers and does not carry each layer's own
# uncertainty; adjacent layers are not independent. The embedded model's baseline is a dequantized GGUF
# (already quantized once). On a random-init tiny model (the ci profile) the criticality is undefined
# (collapsed model), so the verdicts are INCONCLUSIVE by construction.

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
MAX_TOKENS_PER_TEXT = 32          # token rows sampled per text for the variances (None: all)
BATCH_SIZE = 16                   # texts per forward pass of the activation capture
MASSIVE_RATIO = 5.0               # a token row is "massive" above this multiple of the median token norm
DEVICE = None                     # None: cuda if available, else cpu
DTYPE = None                      # None: fp32 on CPU, bf16 on CUDA (fp16 on a T4); "fp32" everywhere for reference numbers
SEED = 0
N_BOOT = 1000
MIN_EFFECT_R = 0.1                # practical size of a correlation over layers
MIN_EFFECT_BPB = 0.01             # practical size of the premise's disparity (bits per byte)
OUTPUT_DIR = "results/t003_language_activation_variance"

# %%
import matplotlib.pyplot as plt
import pandas as pd

from qhelpers import stats
from qhelpers.experiments.representation_geometry import (
    collect_activations,
    language_variance,
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
# ## Activation variance per layer and language
# `variance` (with its bootstrap interval) is the main per-language number; `variance_all` is the seed's
# `acts.var()`. `norm_ratio` is the largest token norm over the median one: values in the tens or hundreds
# mean a few tokens with "massive activations" dominate the variance of that layer and language.

# %%
lv = language_variance(acts, n_boot=N_BOOT, seed=SEED)
print(lv.definition)
lv.per_language.pivot(index="layer", columns="lang", values="variance")[LANGS]

# %%
lv.per_language.pivot(index="layer", columns="lang", values="norm_ratio")[LANGS].round(1)

# %% [markdown]
# ## Spread across languages
# `cross_var` follows the seed; `cross_cv` removes the growth of the residual norm with depth.

# %%
lv.cross[["layer", "depth", "cross_var", "cross_var_ci_low", "cross_var_ci_high", "cross_cv", "cross_cv_ci_low",
          "cross_cv_ci_high", "mean_variance", "n_texts"]]

# %% [markdown]
# ## Without massive-activation tokens
# The token rows dropped (if any) and the cross-language statistics recomputed without them.

# %%
clean = acts.without_massive_tokens(MASSIVE_RATIO)
print(f"{len(clean.dropped_tokens)} of {len(acts.token_index)} token rows exceed {MASSIVE_RATIO:g} x the median token norm")
clean.dropped_tokens

# %%
lv_clean = language_variance(clean, n_boot=N_BOOT, seed=SEED)
lv_clean.cross[["layer", "depth", "cross_var", "cross_cv", "cross_cv_ci_low", "cross_cv_ci_high", "mean_variance"]]

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
# ## Premise: do low-resource languages lose more at all?
# `D` with every layer quantized (the configuration every criticality is measured against), with its
# paired bootstrap interval over texts.

# %%
d_all = stats.disparity_difference(crit.sweep.scores, "all_quantized", baseline=crit.sweep.baseline, lr_langs=LR_LANGS,
                                   hr_langs=HR_LANGS, metric="delta_bpb", n_boot=N_BOOT, seed=SEED)
premise = Hypothesis.evaluate("P-D", "with every layer quantized, LR languages lose more bits per byte than HR languages",
                              d_all, 0.0, ">", family="premises", min_effect=MIN_EFFECT_BPB, quantity="D (bits per byte)")
print(premise.sentence())

# %% [markdown]
# ## H1.3: do critical layers show more cross-language variance?
# Spearman correlations over layers (n = number of layers). The prediction is a positive correlation; the
# verdict needs the whole 95 % interval above `MIN_EFFECT_R`, with every token row AND without the
# massive-activation rows. The correlation of `cross_var` with depth shows how much of the seed's
# statistic is just the growing residual norm.

# %%
r_cv = layer_correlation(lv.values("cross_cv"), crit, method="spearman", n_boot=N_BOOT, seed=SEED)
r_var = layer_correlation(lv.values("cross_var"), crit, method="spearman", n_boot=N_BOOT, seed=SEED)
r_clean = layer_correlation(lv_clean.values("cross_cv"), crit, method="spearman", n_boot=N_BOOT, seed=SEED)
r_var_clean = layer_correlation(lv_clean.values("cross_var"), crit, method="spearman", n_boot=N_BOOT, seed=SEED)
r_depth = layer_correlation(lv.values("cross_var"), lv.values("depth"), method="spearman", n_boot=N_BOOT, seed=SEED)
print(f"Spearman r(cross_var, depth) = {r_depth['r']:.3f} [{r_depth['ci_low']:.3f}, {r_depth['ci_high']:.3f}], n = {r_depth['n']}")
dropped = f"{len(clean.dropped_tokens)} token rows above {MASSIVE_RATIO:g} x the median norm dropped"
judge = dict(min_effect=MIN_EFFECT_R, premise=premise)
analyses = {
    "H1.3-all": Hypothesis.evaluate("H1.3-all", "critical layers show more cross-language activation variance (cross_cv, every token row)",
                                    r_cv, 0.0, ">", quantity="Spearman r(cross_cv, criticality)", **judge),
    "H1.3-robust": Hypothesis.evaluate("H1.3-robust", "the same without the massive-activation token rows",
                                       r_clean, 0.0, ">", quantity="Spearman r(cross_cv without massive tokens, criticality)",
                                       notes=dropped, **judge),
    "H1.3-seed-all": Hypothesis.evaluate("H1.3-seed-all", "the same with the seed's np.var (cross_var), every token row",
                                         r_var, 0.0, ">", quantity="Spearman r(cross_var, criticality)", **judge),
    "H1.3-seed-robust": Hypothesis.evaluate("H1.3-seed-robust", "the same with cross_var, massive-activation token rows dropped",
                                            r_var_clean, 0.0, ">", quantity="Spearman r(cross_var without massive tokens, criticality)",
                                            notes=dropped, **judge),
}
for h in analyses.values():
    print(f"[one analysis] {h.sentence()}")
hypotheses = adjust_families([
    agreeing(analyses["H1.3-all"], analyses["H1.3-robust"], id="H1.3", primary=True,
             statement="critical layers show more cross-language activation variance (scale-free cross_cv; "
                       "with and without massive-activation tokens)"),
    agreeing(analyses["H1.3-seed-all"], analyses["H1.3-seed-robust"], id="H1.3-seed", family="seed statistic",
             statement="critical layers show more cross-language activation variance (seed's np.var: cross_var; "
                       "with and without massive-activation tokens)"),
    premise,
])
for h in hypotheses:
    print(h.sentence())

# %% [markdown]
# ## Figures
# Shaded bands are 95 % bootstrap intervals over texts (criticality: paired over texts too).

# %%
fig, axes = plt.subplots(2, 2, figsize=(15, 10))
plots.layer_profile(lv.per_language, "variance", hue="lang", ax=axes[0, 0], logy=True, hue_order=LANGS,
                   title="Activation variance per language (dashed: low-resource)", ylabel="mean per-dimension variance")
plots.layer_profile(lv.cross, "cross_cv", ax=axes[0, 1], title="Spread across languages (coefficient of variation)",
                   ylabel="cross_cv")
plots.layer_profile(lv_clean.cross, "cross_cv", ax=axes[0, 1], ylabel="cross_cv", color="black")
axes[0, 1].legend(axes[0, 1].lines, ["all token rows", "massive-activation tokens dropped"], fontsize=8)
plots.layer_profile(crit.table, "criticality", ax=axes[1, 0], reference=0.0,
                   title="Layer criticality (protect one layer)", ylabel="criticality (bits per byte)")
merged = lv.cross.merge(crit.table[["layer", "criticality", "criticality_ci_low", "criticality_ci_high"]], on="layer")
plots.layer_scatter(merged, "cross_cv", "criticality", ax=axes[1, 1], corr=r_cv, reference=0.0,
                    title="Criticality vs cross-language spread")
fig.tight_layout()
figures = [plots.save_figure(fig, OUTPUT_DIR, "t003_language_variance")]

# %% [markdown]
# ## Verdict and record
# The sentences above and the table below are generated from the intervals; read them with the caveats at
# the top. The primary H1.3 comes first, then the seed's statistic and the premise, each with its raw and
# Holm-adjusted verdict and n (layers). `cross_var` and `cross_cv` can disagree (the former tracks the
# residual norm, the latter the relative spread between languages); where the analyses with and without the
# massive-activation tokens disagree, the notes say so and give both intervals, and the verdict is
# INCONCLUSIVE: a few tokens, not how languages use a layer as a whole, would decide it. `results.json` in
# `OUTPUT_DIR` holds every parameter, the environment, the metrics and the hypotheses.

# %%
# NBVAL_IGNORE_OUTPUT
metrics = {
    "damage_card": damage_card_records(crit_card, configs=["all_quantized"]),
    "n_layers": loaded.n_layers,
    "hidden": acts.hidden,
    "texts": acts.summary(),
    "definition": lv.definition,
    "per_language": lv.per_language,
    "cross_language": lv.cross,
    "massive_tokens_dropped": clean.dropped_tokens,
    "cross_language_without_massive": lv_clean.cross,
    "spearman_cross_cv_without_massive_criticality": r_clean,
    "spearman_cross_var_without_massive_criticality": r_var_clean,
    "premise_disparity_all_quantized": d_all.to_dict(),
    "analyses": [h.to_dict() for h in analyses.values()],
    "criticality": crit.table,
    "criticality_definition": crit.describe(),
    "spearman_cross_cv_criticality": r_cv,
    "spearman_cross_var_criticality": r_var,
    "spearman_cross_var_depth": r_depth,
}
parameters = current_parameters(globals(), DEVICE=str(loaded.device), DTYPE=loaded.metadata["dtype"])
path = write_results(OUTPUT_DIR, "t003_language_activation_variance", parameters, metrics, hypotheses, figures,
                     loaded.metadata)
print("wrote", path)

# %%
verdict_table = print_verdicts(hypotheses)

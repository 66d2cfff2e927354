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
#       full: 82
#       quick: 336
#     purpose: 'T-001 information content: do high-variance layers carry more information
#       (activation entropy, token decodability), and does information predict criticality?
#       (seed 004 H1.1)'
#     source: notebooks/src/t001_information_content.py
# ---

# %% [markdown]
# # T-001: do high-variance layers encode more information?
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qhelpers/qhelpers/blob/main/notebooks/t001_information_content.ipynb)
#
# **Question.** Seed 004 found that a layer's weight variance predicts how critical it is for the
# low-resource disparity. Is that because high-variance layers carry more information, so that losing
# precision there costs more?
#
# **Hypothesis H1.1 (seed 004).** *"High-variance layers encode MORE information, so losing precision
# costs more."* Prediction: information content (activation entropy; how well the input can be decoded
# from the layer's activations) correlates with weight variance -- the seed's chain is *high variance ->
# high entropy -> low reconstruction loss* -- and information content predicts criticality.
#
# * **H1.1a** (the primary hypothesis of this notebook: the seed's claim that high-variance layers
#   *encode more information*) weight variance vs activation entropy: Spearman r > 0.
# * **H1.1b** weight variance vs decoding accuracy of the current token: r > 0 (**H1.1b-prev**: the
#   previous token, a harder target). Family "decoding".
# * **H1.1c** information content predicts criticality: r(entropy, criticality) > 0 and
#   r(decoding accuracy, criticality) > 0 (**H1.1c-decode**). Family "criticality".
#
# **Premise of H1.1c.** Criticality is "how much disparity protecting a layer removes", with the
# disparity `D` = mean LR minus mean HR change in bits per byte when every layer is quantized. If
# low-resource languages do not lose more (`D` not above 0), "removing disparity" has no meaning and the
# sign of every criticality flips, so H1.1c and H1.1c-decode declare the premise `P-D` (D > 0 by at least
# 0.01 bits per byte, family "premises"); when it is not SUPPORTED they are INCONCLUSIVE with the reason
# "premise not met (...)".
#
# **Effect size and multiplicity.** A correlation counts only beyond r = `MIN_EFFECT_R` = 0.1 (below it
# the two quantities share less than 1 % of their rank variance: nothing a reader could act on). Each
# family is Holm-adjusted (`adjust_families`); n is the number of layers, and a verdict needs at least 10.
#
# **Method.**
# 1. Token-level residual-stream activations (the output of every decoder block) for parallel UDHR
#    paragraphs in all languages, at most `MAX_TOKENS_PER_TEXT` token rows per text (a seeded draw; the
#    BOS and first token are left out, so every row has a real previous token).
# 2. *Entropy*: the Gaussian differential entropy of the per-unit standardized activations,
#    `0.5 log2 det(2 pi e R)` with `R` their correlation matrix, bias-corrected for the sample size. It is
#    invariant to the scale of every hidden unit, so the residual-stream norm, which grows with depth, does
#    not move it (a histogram entropy of raw values would track that norm). It is high when the units carry
#    non-redundant signals. The PCA-spectrum entropy (log2 of the effective rank) is shown beside it.
# 3. *Decoding probe* ("can you decode the input from the activations"): a closed-form ridge regression
#    from the layer's activation at position t to the identity of the token at t (and at t - 1), over the
#    `K_CLASSES` most frequent tokens of the training texts (rows with other tokens are dropped; the share
#    kept is reported as coverage). Texts, not tokens, are split into fit / validation / test (a paragraph
#    is in one split in every language); the penalty and a softmax temperature are chosen on the
#    validation texts; accuracy, cross-entropy and *decoded information* (the cross-entropy of the
#    training token frequencies minus the probe's, in bits per token: the Barber-Agakov form of a lower
#    bound on the mutual information between token and activation) are scored on the test texts, with a
#    bootstrap CI over test texts for every layer.
# 4. Weight variance per layer (all of the block's parameters pooled, as in seed 002) and per-layer
#    criticality: `D(all layers INT-BITS) - D(all but layer i INT-BITS)`, D the LR-minus-HR change in bits
#    per byte, with a paired bootstrap CI over texts. The sweep (one configuration per layer) is the
#    expensive part; it runs on the first `CRIT_N_TEXTS` texts per language and is cached on disk, so the
#    other theory notebooks with the same model, texts and settings reuse it.
# 5. Spearman correlations across layers with bootstrap CIs over layers; verdicts from those CIs.
#
# **Caveats.** The residual stream keeps the token embedding through the skip connections, so the current
# token is expected to stay decodable in every layer; the previous token must be moved there by attention
# and is the more telling target. A linear probe measures linearly accessible information only. The
# embedded model's "full-precision" weights are dequantized GGUF weights (already quantized once). With
# one layer per point, the correlations have n = number of layers, and neighbouring layers are not
# independent; quantities that both drift with depth correlate through depth alone, so read the scatters
# beside the per-layer profiles. Token coverage of the `K_CLASSES` classes differs between scripts, so the
# per-language accuracies are over different token sets and are not a ranking of languages.

# %%
# Colab only: install qhelpers (elsewhere it is installed by scripts/install.sh)
import subprocess
import sys

if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "qhelpers @ git+https://github.com/qhelpers/qhelpers@v0.1.0"], check=True)

# %% tags=["parameters"]
# Notebook parameters: papermill and run_all.py -p override them; results.json records their values
MODEL = "embedded:smollm2-135m"   # hub id, local folder, embedded:<name> or tiny:<arch>
CORPUS = "udhr"                   # "udhr" (50 parallel paragraphs per language)
LANGS = ["en", "de", "fr", "zh", "ar", "he", "sw"]
HR_LANGS = ["en", "de", "fr", "zh"]
LR_LANGS = ["ar", "he", "sw"]
N_TEXTS = 12                      # texts per language for entropy and probes (None: all); at least 3
CRIT_N_TEXTS = 4                  # texts per language for the criticality sweep (the first ones; None: all)
MAX_TOKENS_PER_TEXT = 48          # token rows kept per text (seeded draw; None: all)
K_CLASSES = 256                   # decode the K most frequent training tokens; rows of other tokens are dropped
TEST_FRAC = 0.3                   # share of texts held out for scoring the probe
VAL_FRAC = 0.2                    # share of the remaining texts used to choose the ridge penalty
BITS = 4                          # bit width of the criticality sweep
MAX_LENGTH = 256                  # tokens per text (longer texts are cut)
DEVICE = None                     # None: cuda if available, else cpu
DTYPE = None                      # None: fp32 on CPU, bf16 on CUDA (fp16 on a T4); "fp32" everywhere for reference numbers
SEED = 0
N_BOOT = 2000
MIN_EFFECT_R = 0.1                # practical size of a correlation over layers
MIN_EFFECT_BPB = 0.01             # practical size of the premise's disparity (bits per byte)
OUTPUT_DIR = "results/t001_information_content"

# %%
import matplotlib.pyplot as plt
import pandas as pd

from qhelpers import stats
from qhelpers.experiments import information_content
from qhelpers.measure.criticality import layer_criticality
from qhelpers.measure.scoring import MeasureConfig
from qhelpers.measure.weight_stats import layer_table
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
pd.set_option("display.max_columns", 30)

# %% [markdown]
# ## Model, texts and token activations

# %%
loaded = load_model(MODEL, device=DEVICE, dtype=DTYPE)
corpus = load_corpus(CORPUS, langs=LANGS, n_texts=N_TEXTS, seed=SEED)
crit_corpus = load_corpus(CORPUS, langs=LANGS, n_texts=CRIT_N_TEXTS, seed=SEED)
print(loaded.describe())
print("baseline:", loaded.metadata["baseline"])
print({lang: corpus.n_texts(lang) for lang in corpus.langs}, "texts per language (entropy and probes)")
print({lang: crit_corpus.n_texts(lang) for lang in crit_corpus.langs}, "texts per language (criticality)")

# %%
# NBVAL_IGNORE_OUTPUT
token_acts = information_content.capture_token_activations(loaded, corpus, max_tokens_per_text=MAX_TOKENS_PER_TEXT,
                                                   max_length=MAX_LENGTH, seed=SEED)
print(token_acts.describe())

# %%
token_acts.texts.groupby("lang", sort=False)[["n_tokens", "n_candidates", "n_kept"]].sum()

# %% [markdown]
# ## Entropy and decoding per layer
# `entropy_bits_per_dim` is the standardized Gaussian entropy divided by the width of the residual stream;
# `accuracy_*` is the held-out top-1 accuracy of the probe (CI over test texts), `chance_*` the accuracy of
# always answering the most frequent training token, `info_bits_*` the decoded information per token.

# %%
info = information_content.layer_information(token_acts, k=K_CLASSES, test_frac=TEST_FRAC, val_frac=VAL_FRAC,
                                     n_boot=N_BOOT, seed=SEED)
print("texts per language and split:")
print(info.split_counts())
info.decoding[["layer", "target", "n_classes", "alpha", "val_accuracy", "accuracy", "accuracy_ci_low", "accuracy_ci_high",
               "chance", "ce_bits", "prior_bits", "info_bits", "coverage", "n_test_rows", "n_test_texts"]].round(4)

# %% [markdown]
# Per language (the same probe, scored on each language's test rows; `coverage` is the share of that
# language's test tokens among the `K_CLASSES` classes, which differs a lot between scripts):

# %%
info.per_language.pivot_table(index="layer", columns=["target", "lang"], values="accuracy").round(3)

# %%
info.per_language.groupby(["target", "lang"], sort=False)[["coverage", "chance", "n_test_rows"]].mean().round(3)

# %% [markdown]
# ## Weight variance and criticality per layer

# %%
# NBVAL_IGNORE_OUTPUT
weights = layer_table(loaded.model)[["layer", "variance_pooled", "n_params"]]
crit = layer_criticality(loaded, crit_corpus, bits=BITS, lr_langs=LR_LANGS, hr_langs=HR_LANGS, n_boot=N_BOOT, seed=SEED,
                         measure_config=MeasureConfig(max_length=MAX_LENGTH))
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
per_layer = (info.table
             .merge(weights, on="layer")
             .merge(crit.table[["layer", "criticality", "criticality_ci_low", "criticality_ci_high", "reason"]], on="layer"))
per_layer[["layer", "depth", "variance_pooled", "entropy_bits_per_dim", "effective_rank", "accuracy_current",
           "accuracy_ci_low_current", "accuracy_ci_high_current", "accuracy_previous", "accuracy_ci_low_previous",
           "accuracy_ci_high_previous", "info_bits_previous", "criticality", "criticality_ci_low", "criticality_ci_high"]].round(4)

# %% [markdown]
# ## Premise of H1.1c: do low-resource languages lose more at all?
# `D` with every layer quantized (the configuration every criticality is measured against), with its
# paired bootstrap interval over texts.

# %%
d_all = stats.disparity_difference(crit.sweep.scores, "all_quantized", baseline=crit.sweep.baseline, lr_langs=LR_LANGS,
                                   hr_langs=HR_LANGS, metric="delta_bpb", n_boot=N_BOOT, seed=SEED)
premise = Hypothesis.evaluate("P-D", "with every layer quantized, LR languages lose more bits per byte than HR languages",
                              d_all, 0.0, ">", family="premises", min_effect=MIN_EFFECT_BPB, quantity="D (bits per byte)")
print(premise.sentence())

# %% [markdown]
# ## Hypotheses
# Spearman correlations across layers, each with a bootstrap CI over layers and a permutation p-value. A
# verdict is SUPPORTED only when the whole 95 % CI lies above `MIN_EFFECT_R`, and the printed verdicts are
# Holm-adjusted within their families. A criticality that is undefined (for example a collapsed
# random-init model) or a premise not met makes the H1.1c verdicts INCONCLUSIVE, with the reason in the notes.

# %%
corr = dict(method="spearman", n_boot=N_BOOT, seed=SEED)
r_var_entropy = stats.correlation(per_layer["variance_pooled"], per_layer["entropy_bits"], **corr)
r_var_acc = stats.correlation(per_layer["variance_pooled"], per_layer["accuracy_current"], **corr)
r_var_prev = stats.correlation(per_layer["variance_pooled"], per_layer["accuracy_previous"], **corr)
r_entropy_crit = stats.correlation(per_layer["entropy_bits"], per_layer["criticality"], **corr)
r_acc_crit = stats.correlation(per_layer["accuracy_current"], per_layer["criticality"], **corr)
practical = dict(min_effect=MIN_EFFECT_R)
hypotheses = adjust_families([
    Hypothesis.evaluate("H1.1a", "layers of higher weight variance have higher activation entropy", r_var_entropy, 0.0, ">",
                        primary=True, **practical),
    Hypothesis.evaluate("H1.1b", "layers of higher weight variance let the current token be decoded better", r_var_acc, 0.0, ">",
                        family="decoding", **practical),
    Hypothesis.evaluate("H1.1b-prev", "layers of higher weight variance let the previous token be decoded better", r_var_prev,
                        0.0, ">", family="decoding", **practical),
    Hypothesis.evaluate("H1.1c", "layers of higher activation entropy are more critical", r_entropy_crit, 0.0, ">",
                        family="criticality", premise=premise, **practical),
    Hypothesis.evaluate("H1.1c-decode", "layers whose current token is decoded better are more critical", r_acc_crit, 0.0, ">",
                        family="criticality", premise=premise, **practical),
    premise,
])
for h in hypotheses:
    print(h.sentence())

# %% [markdown]
# ## Figures
# Top: the per-layer profiles (bands: 95 % CI over test texts). Bottom: the hypotheses' scatters, one
# point per layer (labelled with its index).

# %%
fig = plt.figure(figsize=(17, 8))
top = [fig.add_subplot(2, 4, i + 1) for i in range(4)]
bottom = [fig.add_subplot(2, 4, i + 5) for i in range(4)]
information_content.plot_information_profile(per_layer, axes=top)
plots.layer_scatter(per_layer, "variance_pooled", "entropy_bits", ax=bottom[0], corr=r_var_entropy,
                               xlabel="weight variance", ylabel="standardized Gaussian entropy (bits)")
plots.layer_scatter(per_layer, "variance_pooled", "accuracy_current", ax=bottom[1], corr=r_var_acc,
                               xlabel="weight variance", ylabel="decoding accuracy, token t")
plots.layer_scatter(per_layer, "entropy_bits", "criticality", ax=bottom[2], corr=r_entropy_crit,
                               xlabel="standardized Gaussian entropy (bits)", ylabel="criticality (bits per byte)")
plots.layer_scatter(per_layer, "accuracy_current", "criticality", ax=bottom[3], corr=r_acc_crit,
                               xlabel="decoding accuracy, token t", ylabel="criticality (bits per byte)")
fig.tight_layout()
figures = [plots.save_figure(fig, OUTPUT_DIR, "t001_information_content")]

# %% [markdown]
# ## Verdict and record
# The verdicts below are computed from the intervals above: the primary H1.1a first, then the families
# with their raw and Holm-adjusted verdicts and n (layers). If they contradict the seed's chain (high
# variance -> high entropy -> good decoding -> critical), that is the finding; H1.1c is read only through
# its premise `P-D`. `results.json` in `OUTPUT_DIR` holds every parameter, the environment, the per-layer
# and per-language tables and the hypotheses.

# %%
# NBVAL_IGNORE_OUTPUT
metrics = {
    "damage_card": damage_card_records(crit_card, configs=["all_quantized"]),
    "n_layers": loaded.n_layers,
    "n_token_rows": token_acts.n_rows,
    "n_texts_per_language": {lang: corpus.n_texts(lang) for lang in corpus.langs},
    "n_texts_per_language_criticality": {lang: crit_corpus.n_texts(lang) for lang in crit_corpus.langs},
    "split": info.split,
    "probe_settings": info.settings,
    "per_layer": per_layer,
    "decoding": info.decoding,
    "decoding_per_language": info.per_language,
    "criticality": crit.table,
    "criticality_definition": crit.describe(),
    "premise_disparity_all_quantized": d_all.to_dict(),
    "correlations": {"variance_entropy": r_var_entropy, "variance_accuracy_current": r_var_acc,
                     "variance_accuracy_previous": r_var_prev, "entropy_criticality": r_entropy_crit,
                     "accuracy_criticality": r_acc_crit},
}
parameters = current_parameters(globals(), DEVICE=str(loaded.device), DTYPE=loaded.metadata["dtype"])
path = write_results(OUTPUT_DIR, "t001_information_content", parameters, metrics, hypotheses, figures, loaded.metadata)
print("wrote", path)

# %%
verdict_table = print_verdicts(hypotheses)

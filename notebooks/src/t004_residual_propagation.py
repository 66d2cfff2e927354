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
#       full: 46
#       quick: 26
#     purpose: 'T-004 residual stream theory: is L_last closer to full precision when
#       L0 is protected too? (seed 004 H2.1)'
#     source: notebooks/src/t004_residual_propagation.py
# ---

# %% [markdown]
# # T-004: residual propagation — does protecting L0 keep the last layer closer to full precision?
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qhelpers/qhelpers/blob/main/notebooks/t004_residual_propagation.ipynb)
#
# **Question.** Seed 000 found that protecting the last decoder layer alone barely helps, while
# protecting layer 0 and the last layer together does. Is that because layer 0's quantization error
# travels up the residual stream, so that the last layer receives corrupted input whatever its own
# precision?
#
# **Hypothesis H2.1 (seed 004, residual stream theory).** *"L0 errors propagate through the residual
# stream. Without L0 protection, L11 protection is useless because it receives corrupted input."*
# Prediction: *"Activations at L11 are more similar (FP32 vs INT4) when L0 is protected."* Here L11 is
# the model's last layer, L_last.
#
# **Method.** One model, four configurations applied and restored in turn: every decoder layer
# quantized, only L_last protected, L0 + L_last protected, only L0 protected; the full-precision (FP)
# forward is the reference. For every text and every layer we compare the residual stream after the
# block with FP on the same tokens: the mean over tokens of the per-token cosine similarity and of the
# per-token relative L2 error `||a_q - a_fp|| / ||a_fp||` (BOS and padding left out; the error pooled
# over the whole text, `rel_l2_fro`, is recorded too, but a few tokens with massive activations dominate
# it). At the output we measure `KL(p_fp || p_q)` of
# the next-token distributions, per prediction and, to compare languages on the same content, in bits
# per byte of text. H2.1 is measured by the per-text difference `cosine(L0 + L_last protected) -
# cosine(L_last protected)` at L_last, with a paired bootstrap over texts (the same resample for every
# language of the parallel corpus), pooled over languages; the same contrast is taken at the output.
# A third test asks the seed's stronger claim: is protecting L_last worth more once L0 is protected
# (a positive interaction of the two protections on the output KL)? Finally we ask whether the
# low-resource (LR) languages' error is larger than the high-resource (HR) languages'.
#
# **Which test decides.** The seed's prediction compares a configuration with one more full-precision
# layer against one with fewer, so it is true by construction (up to rare error cancellation): H2.1 and
# its output version are reported as **sanity checks**, not findings. The seed's claim itself, "without
# L0 protection, L_last protection is useless", is the interaction, and that is the **primary
# hypothesis** (`H2.1-interaction`), declared before the data. The LR-versus-HR comparisons form one
# family ("LR vs HR"), Holm-adjusted together. Minimum effects of practical size
# (`error_propagation.T004_MIN_EFFECTS`): 0.01 nats of output KL per predicted token (a few per cent of
# what INT4 costs a 135M model), 0.01 of relative L2 error (one per cent of the activation norm), and
# 0.01 bits of KL per byte (the project's bits-per-byte minimum); SUPPORTED needs the 95 % interval to
# clear them. Fewer than 10 texts per language give no verdict ("too few texts").
#
# `PROTOCOL = "sound"` (default) quantizes the linear weights of the decoder blocks per output channel;
# `"seed"` is the seeds' per-tensor symmetric INT-b on every weight inside the decoder layers.

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
DEVICE = None                     # None: cuda if available, else cpu
DTYPE = None                      # None: fp32 on CPU, bf16 on CUDA (fp16 on a T4); "fp32" everywhere for reference numbers
SEED = 0
N_BOOT = 2000
OUTPUT_DIR = "results/t004_residual_propagation"

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
# The model is loaded once; each configuration is applied to it and restored (its weights are never
# overwritten).

# %%
loaded = load_model(MODEL, device=DEVICE, dtype=DTYPE)
corpus = load_corpus(CORPUS, langs=LANGS, n_texts=N_TEXTS, seed=SEED)
LAST = loaded.n_layers - 1
print(loaded.describe())
print("baseline:", loaded.metadata["baseline"])
print({lang: corpus.n_texts(lang) for lang in corpus.langs}, "texts per language; last layer:", LAST)
variants = error_propagation.propagation_variants(loaded.n_layers, protocol=PROTOCOL, bits=BITS)
for name, variant in variants.items():
    print(f"{name:18s} protected layers {list(variant.protect.layers)}: {error_propagation.PROPAGATION_CONFIGS[name]}")

# %%
# NBVAL_IGNORE_OUTPUT
prop = error_propagation.residual_propagation(loaded, corpus, variants, max_length=MAX_LENGTH, progress=True)
print(f"{len(prop.logits)} (text, configuration) pairs, {loaded.n_layers} layers each, in {prop.seconds:.1f} s")

# %% [markdown]
# ## Error growth through the layers
# The mean over texts (pooled: the mean of the language means) of the per-token relative L2 error of
# the residual stream after each block, per configuration. A protected layer adds no error of its own,
# but it still passes on (and transforms) the error it receives.

# %%
groups = dict(lr_langs=LR_LANGS, hr_langs=HR_LANGS, n_boot=N_BOOT, seed=SEED)
rel_curve = prop.curve("rel_l2", **groups)
cos_curve = prop.curve("cosine", **groups)
rel_curve[rel_curve["lang"] == "all"].pivot(index="layer", columns="config", values="rel_l2")[list(variants)]

# %% [markdown]
# ## Output divergence
# `kl`: mean `KL(p_fp || p_q)` per predicted token (nats); `kl_bpb`: the text's summed KL in bits per
# UTF-8 byte, the measure to compare languages with (tokenizers split languages into very different
# numbers of tokens).

# %%
kl = error_propagation.text_means(prop.logits, "kl", by=["config"], **groups)
kl_bpb = error_propagation.text_means(prop.logits, "kl_bpb", by=["config"], **groups)
kl.merge(kl_bpb, on=["config", "lang"], suffixes=("", "_bpb"))[
    ["config", "lang", "kl", "kl_ci_low", "kl_ci_high", "kl_bpb", "kl_bpb_ci_low", "kl_bpb_ci_high", "n"]]

# %% [markdown]
# ## H2.1: what protecting L0 adds when L_last is protected
# Per text: `cosine gain` = cosine(L0 + L_last protected) - cosine(L_last protected) at L_last (the
# seed's prediction: > 0), `rel_l2 reduction` = the same contrast on the relative error (sign flipped
# so that positive means closer to FP), and `KL reduction` = KL(L_last protected) - KL(L0 + L_last
# protected) at the output. `L_last protection gain interaction` asks the seed's stronger claim: the
# output KL removed by protecting L_last when L0 is protected, minus the KL it removes when L0 is
# quantized, `[KL(L0) - KL(L0 + L_last)] - [KL(all) - KL(L_last)]`; positive means protecting L_last is
# worth more once L0 is protected. Rows per language, pooled (`all`), per group and LR minus HR.

# %%
L0_GAIN = error_propagation.T004_CONTRASTS["l0_gain"]
L0_REDUCTION = error_propagation.T004_CONTRASTS["l0_reduction"]
INTERACTION = error_propagation.T004_CONTRASTS["interaction"]
gain_cos = error_propagation.text_contrast(prop.layers, "cosine", L0_GAIN, layer=LAST)
gain_rel = error_propagation.text_contrast(prop.layers, "rel_l2", L0_REDUCTION, layer=LAST)
gain_kl = error_propagation.text_contrast(prop.logits, "kl", L0_REDUCTION)
interaction_kl = error_propagation.text_contrast(prop.logits, "kl", INTERACTION)
h21_table = pd.concat([
    error_propagation.text_means(gain_cos, **groups).assign(quantity="cosine gain at L_last"),
    error_propagation.text_means(gain_rel, **groups).assign(quantity="rel_l2 reduction at L_last"),
    error_propagation.text_means(gain_kl, **groups).assign(quantity="KL reduction (output)"),
    error_propagation.text_means(interaction_kl, **groups).assign(quantity="L_last protection gain interaction (KL)"),
], ignore_index=True)
h21_table[["quantity", "lang", "value", "value_ci_low", "value_ci_high", "n", "reason"]]

# %% [markdown]
# ## Are the low-resource languages hurt more?
# With every layer quantized: the relative error at L_last and the output KL in bits per byte, LR minus
# HR (paired: the corpus is parallel, so each resample draws the same paragraphs in every language). The
# relative error is a mean over tokens and so partly reflects how each tokenizer splits a language; the
# KL per byte compares the same content.

# %%
err_last = error_propagation.text_contrast(prop.layers, "rel_l2", {"all_quantized": 1}, layer=LAST)
err_out = error_propagation.text_contrast(prop.logits, "kl_bpb", {"all_quantized": 1})
lr_table = pd.concat([
    error_propagation.text_means(err_last, **groups).assign(quantity="rel_l2 at L_last, all quantized"),
    error_propagation.text_means(err_out, **groups).assign(quantity="KL bits per byte, all quantized"),
], ignore_index=True)
lr_table[["quantity", "lang", "value", "value_ci_low", "value_ci_high", "n", "reason"]]

# %% [markdown]
# ## Hypotheses
# Every verdict is computed from the bootstrap interval (the claims of `error_propagation.t004_claims`, each with its estimate and role): SUPPORTED
# when the whole 95 % interval lies beyond 0 by the minimum effect in the predicted direction,
# NOT_SUPPORTED when it lies wholly short of that, else INCONCLUSIVE. `H2.1-interaction` is the primary
# hypothesis; `H2.1` and `H2.1-output` are sanity checks (one more protected layer, less error: some gain
# is expected from the reduced amount of quantization alone), so they say the measurement behaves, not
# that L0's error propagates; only the interaction separates "L_last protection needs L0" from "less
# quantization, less error". A negative interaction would mean protecting L_last is worth *less* once L0
# is protected. `LR-error-*` share the family "LR vs HR" and are Holm-adjusted together.

# %%
claims = error_propagation.t004_claims(prop, LR_LANGS, HR_LANGS, n_boot=N_BOOT, seed=SEED)
hypotheses = [Hypothesis.evaluate(**claim) for claim in claims]
for h in hypotheses:
    print(h.sentence())

# %% [markdown]
# ## Figures
# Top: the error growth curves of the four configurations (pooled over languages, 95 % bands). Bottom
# left: the relative error per language with every layer quantized (HR blue, LR red). Bottom right: the
# cosine gain from protecting L0 in addition to L_last, at every layer. Last panel: the output KL.

# %%
gain_curve = prop.layer_contrast(L0_GAIN, "cosine", **groups)
fig, axes = plt.subplots(2, 2, figsize=(15, 10))
error_propagation.plot_error_growth(rel_curve, "rel_l2", ax=axes[0, 0], title="Per-token relative L2 error of the residual stream vs FP")
error_propagation.plot_error_growth(cos_curve, "cosine", ax=axes[0, 1], title="Mean token cosine similarity to FP")
error_propagation.plot_language_growth(rel_curve, "all_quantized", "rel_l2", ax=axes[1, 0], title="Per-token relative L2 error per language, all quantized")
error_propagation.plot_error_growth(gain_curve, "value", lang=["all", "LR", "HR"], lines="lang", ax=axes[1, 1], reference=0.0,
                              title="Cosine gain from protecting L0 too (L0 + L_last minus L_last protected)")
fig.tight_layout()
figures = [plots.save_figure(fig, OUTPUT_DIR, "t004_error_growth")]
fig_kl = plots.estimate_bars(kl[kl["lang"] == "all"], "kl", label="config", reference=0.0,
                             title="Output KL(fp || q) per token, pooled over languages", xlabel="nats per token")
figures.append(plots.save_figure(fig_kl, OUTPUT_DIR, "t004_output_kl"))

# %% [markdown]
# ## Verdict and record
# The sentences above are generated from the intervals. Below, the family "LR vs HR" is Holm-adjusted
# (the primary and the sanity checks are not: a family of one keeps its verdict, and sanity checks are
# never counted as findings); the table shows the adjusted verdict beside the raw one. `results.json` in
# `OUTPUT_DIR` holds every parameter, the environment, the per-layer curves, the contrasts and the
# hypotheses with their raw and adjusted verdicts.

# %%
hypotheses = adjust_families(hypotheses)

# %%
# NBVAL_IGNORE_OUTPUT
metrics = {
    "n_layers": loaded.n_layers,
    "n_texts_per_language": {lang: corpus.n_texts(lang) for lang in corpus.langs},
    "rel_l2_curve": rel_curve,
    "cosine_curve": cos_curve,
    "kl": kl,
    "kl_bpb": kl_bpb,
    "h21_contrasts": h21_table,
    "l0_gain_by_layer": gain_curve,
    "lr_vs_hr": lr_table,
    "seconds": prop.seconds,
}
parameters = current_parameters(globals(), DEVICE=str(loaded.device), DTYPE=loaded.metadata["dtype"])
path = write_results(OUTPUT_DIR, "t004_residual_propagation", parameters, metrics, hypotheses, figures, loaded.metadata)
print("wrote", path)

# %%
verdict_table = print_verdicts(hypotheses)

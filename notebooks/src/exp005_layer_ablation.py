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
# **Hypothesis H5 (seed 000).** Layers 0 and the final layer are disproportionately important for
# low-resource languages: *protecting L0 + L_final reduces the disparity by more than 30 %*.
# Null: all layers are equally important.
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
N_TEXTS = 6                       # texts per language (None: all)
PROTOCOL = "sound"                # "sound" or "seed"
BITS = 4
MAX_LENGTH = 512                  # tokens per forward window
DEVICE = None                     # None: cuda if available, else cpu
DTYPE = None                      # None: fp32 on CPU, bf16 on CUDA (fp16 on a T4); "fp32" everywhere for reference numbers
SEED = 0
N_BOOT = 2000
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
from qhelpers.report.record import current_parameters
from qhelpers.report.results import (
    Hypothesis,
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
# ## Disparity per configuration
# `disparity` is the seed's ratio (mean LR degradation / mean HR degradation); `difference` is mean LR minus
# mean HR change in bits per byte, which stays defined when the high-resource change is near zero.

# %%
groups = dict(lr_langs=LR_LANGS, hr_langs=HR_LANGS, n_boot=N_BOOT, seed=SEED)
ratio = sweep.disparity_table(metric="degradation", **groups)
difference = sweep.disparity_table(measure="difference", metric="delta_bpb", **groups)
disparities = ratio.merge(difference, on=["config", "protected_fraction", "n"], suffixes=("", "_bpb_diff"))
disparities[["config", "protected_fraction", "disparity", "disparity_ci_low", "disparity_ci_high", "disparity_bpb_diff", "disparity_ci_low_bpb_diff", "disparity_ci_high_bpb_diff", "reason"]].round(4)

# %% [markdown]
# ## H5 and the synergy analysis
# H5 is judged on the reduction of disparity from *all quantized* to *gateway protected*, with a paired
# bootstrap interval. The synergy contrast is seed 000's: expected additive effect
# `D(first) + D(last) - D(all)` minus the observed `D(gateway)`; positive means the two layers help more
# together than their separate effects add up to.

# %%
h5_ratio = stats.reduction(sweep.scores, "all_quantized", "gateway_protected", metric="degradation", **groups)
h5_bpb = stats.reduction(sweep.scores, "all_quantized", "gateway_protected", metric="delta_bpb", measure="difference", **groups)
synergy = stats.disparity_contrast(
    sweep.scores, {"first_protected": 1, "last_protected": 1, "all_quantized": -1, "gateway_protected": -1},
    metric="delta_bpb", measure="difference", **groups,
)
halves = stats.disparity_contrast(
    sweep.scores, {"second_half_protected": 1, "first_half_protected": -1}, metric="delta_bpb", measure="difference", **groups,
)
hypotheses = [
    Hypothesis.evaluate("H5", "protecting L0 + L_final reduces the disparity ratio (degradation) by more than 30 %",
                        h5_ratio, 30.0, ">", quantity="reduction %"),
    Hypothesis.evaluate("H5-bpb", "protecting L0 + L_final reduces the LR-minus-HR bits-per-byte excess by more than 30 %",
                        h5_bpb, 30.0, ">", quantity="reduction %"),
    Hypothesis.evaluate("H5-synergy", "L0 and L_final protection act synergistically (bits-per-byte disparity)",
                        synergy, 0.0, ">", quantity="synergy"),
    Hypothesis.evaluate("H5-early", "protecting the first half removes more disparity than protecting the second half",
                        halves, 0.0, ">", quantity="D(second half protected) - D(first half protected)"),
]
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
# The sentences below are generated from the intervals above; `results.json` in `OUTPUT_DIR` holds every
# parameter, the environment (package versions, device, git commit), the metrics and the hypotheses.

# %%
# NBVAL_IGNORE_OUTPUT
metrics = {
    "n_layers": loaded.n_layers,
    "n_texts_per_language": {lang: corpus.n_texts(lang) for lang in corpus.langs},
    "baseline": sweep.baseline_table(n_boot=N_BOOT, seed=SEED),
    "per_language": table,
    "disparity_ratio": ratio,
    "disparity_bpb_difference": difference,
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

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
#       full: 253
#       quick: 307
#     purpose: 'The methods people deploy (GGUF k-quants, HQQ, AWQ, NF4, round-to-nearest),
#       judged per language: damage card, disparity and ranking of methods (issue 12)'
#     source: notebooks/src/methods_by_language.py
# ---

# %% [markdown]
# # Quantization methods, language by language
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qhelpers/qhelpers/blob/main/notebooks/methods_by_language.ipynb)
#
# **Question.** Nobody deploys plain round-to-nearest: models ship as GGUF k-quants (llama.cpp), HQQ, AWQ
# or NF4. Do low-resource languages lose more under *those* methods, and does the best method for English
# stay the best for every language?
#
# **Primary hypothesis (`M-rank`).** *The languages rank the methods alike*: ordered by the change in bits
# per byte each method causes, the ranking is the same in every language. Measured by Kendall's W with the
# languages as raters (1: identical rankings, 0: no agreement), with a bootstrap interval over texts.
# SUPPORTED needs the whole 95 % interval above `MIN_CONCORDANCE` (0.9: at most a swap of neighbours in a
# few languages); NOT_SUPPORTED needs it wholly below.
#
# **Secondary family (`M-disparity-*`).** For each method, *low-resource languages lose more than
# high-resource ones*: D = mean over LR languages minus mean over HR languages of the change in bits per
# parallel paragraph (the same UDHR paragraph in every language), above `MIN_EFFECT_BITS`. Holm-adjusted
# within the family.
#
# **Methods** are spec strings (`qhelpers.quant.catalog`): `rtn:<bits>` round-to-nearest per channel,
# `nf4` (bitsandbytes, simulated bit-exactly), `hqq:<bits>` (HQQ, group 64), `gguf:<type or preset>`
# (libgguf's GGML types with llama-quantize's per-tensor rules for presets such as Q4_K_M), `awq:<bits>` and
# `signround:<bits>` (auto-round, calibrated on `CALIBRATION` text, never the evaluation text). Each is
# compared at its honest size: bits per weight counts everything its format stores (scales, minimums,
# super-block headers), as llama.cpp reports a file's size.
#
# **Baseline caveat.** The embedded models ship as 4-bit GGUF files: their "full precision" is the
# dequantized Q4/Q8 weights, so every method here re-quantizes an already quantized model. Differences
# between methods are real measurements of these weights, not of the original BF16 model.

# %%
# Colab only: install qhelpers (elsewhere it is installed by scripts/install.sh)
import subprocess
import sys

if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "qhelpers @ git+https://github.com/qhelpers/qhelpers@v0.1.0"], check=True)

# %% tags=["parameters"]
# Notebook parameters: papermill and run_all.py -p override them; results.json records their values
MODEL = "embedded:smollm2-135m"   # hub id, local folder, embedded:<name> or tiny:<arch>
CORPUS = "udhr"                   # parallel: bits per paragraph compare the same content
LANGS = ["en", "de", "fr", "zh", "ar", "he", "sw"]
HR_LANGS = ["en", "de", "fr", "zh"]
LR_LANGS = ["ar", "he", "sw"]
N_TEXTS = 10                      # parallel paragraphs per language (None: all 50); verdicts need >= 10
METHODS = ["rtn:4", "rtn:3", "nf4", "hqq:4", "hqq:3", "gguf:Q4_K_M", "gguf:Q3_K_M", "gguf:Q2_K"]  # full profile adds awq:4
CALIBRATION = "en"                # calibration text of AWQ / SignRound (and GGUF importance matrices): "en", a language, "mix"
GGUF_IMATRIX = False              # True: GGUF methods use an importance matrix from CALIBRATION text
SCOPE = "linear"                  # "linear": the decoder blocks' linear weights; "all" adds embeddings and norms
MAX_LENGTH = 512                  # tokens per forward window
DEVICE = None                     # None: cuda if available, else cpu
DTYPE = None                      # None: fp32 on CPU, bf16 on CUDA (fp16 on a T4)
SEED = 0
N_BOOT = 2000
MIN_CONCORDANCE = 0.9             # Kendall's W above which the rankings count as the same
MIN_EFFECT_BITS = 2.0             # practical size of a disparity in bits per parallel paragraph
OUTPUT_DIR = "results/methods_by_language"

# %%
import pandas as pd

from qhelpers import stats
from qhelpers.experiments import quant_methods as qm
from qhelpers.measure.scoring import MeasureConfig
from qhelpers.measure.sweep import run_sweep
from qhelpers.models.loading import load_model
from qhelpers.quant.catalog import catalog_table
from qhelpers.quant.engine import QuantEngine
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
# ## Methods, model and texts
# Every spec is parsed before the model loads, so a typo fails at once.

# %%
# NBVAL_IGNORE_OUTPUT
variants = qm.method_variants(METHODS, calibration=CALIBRATION, imatrix=GGUF_IMATRIX, scope=SCOPE)
pd.DataFrame(catalog_table())

# %%
loaded = load_model(MODEL, device=DEVICE, dtype=DTYPE)
corpus = load_corpus(CORPUS, langs=LANGS, n_texts=N_TEXTS, seed=SEED)
print(loaded.describe())
print("baseline:", loaded.metadata["baseline"])
print({lang: corpus.n_texts(lang) for lang in corpus.langs}, "texts per language")

# %%
# NBVAL_IGNORE_OUTPUT
engine = QuantEngine(loaded)
sweep = run_sweep(loaded, corpus, variants, MeasureConfig(max_length=MAX_LENGTH), engine=engine)

# %% [markdown]
# ## Bits per weight
# Over the tensors each method quantizes (scope `SCOPE`), counting codes, scales, minimums and headers
# (recorded by the engine while the sweep quantized: no second quantization).

# %%
# NBVAL_IGNORE_OUTPUT
bits = qm.bits_table(engine, variants)
bits.round(4)

# %% [markdown]
# ## Damage card, per method and language
# Change in bits per byte, KL from the full model's next-token distribution (bits per byte of text), the
# share of tokens whose top-1 prediction is unchanged, and the 99th percentile of per-token KL (nats), each
# with a paired bootstrap 95 % interval over texts.

# %%
table = sweep.language_table(n_boot=N_BOOT, seed=SEED)
damage_card(table)

# %% [markdown]
# ## Damage against size
# One panel per language; one line per method family across its sizes. A method below another at equal
# bits per weight damages that language less.

# %%
data = qm.damage_vs_bits(table, bits, "delta_bpb")
fig = qm.damage_vs_bits_plot(data, "delta_bpb", ylabel="Δ bits per byte")
figures = [plots.save_figure(fig, OUTPUT_DIR, "methods_delta_bpb")]
kl = qm.damage_vs_bits(table, bits, "kl_bpb")
fig_kl = qm.damage_vs_bits_plot(kl, "kl_bpb", ylabel="KL to the full model (bits per byte)")
figures.append(plots.save_figure(fig_kl, OUTPUT_DIR, "methods_kl_bpb"))

# %% [markdown]
# ## Hypotheses
# `M-rank` from Kendall's W over the quantized configurations; one `M-disparity` per method. The verdicts
# printed are Holm-adjusted within their family.

# %%
configs = list(bits["config"])
concordance = stats.ranking_concordance(sweep.scores, configs, langs=LANGS, metric="delta_bpb", n_boot=N_BOOT, seed=SEED)
groups = dict(lr_langs=LR_LANGS, hr_langs=HR_LANGS, n_boot=N_BOOT, seed=SEED)
disparities = {c: stats.disparity_difference(sweep.scores, c, metric="delta_bits_per_paragraph", **groups) for c in configs}
hypotheses = adjust_families([
    Hypothesis.evaluate(
        "M-rank", "the languages rank the quantization methods alike by their change in bits per byte",
        concordance, MIN_CONCORDANCE, ">", quantity="Kendall's W", primary=True),
    *[Hypothesis.evaluate(
        f"M-disparity-{c}", f"under {c}, low-resource languages lose more bits per parallel paragraph than high-resource ones",
        d, 0.0, ">", quantity="D (bits per paragraph)", family="LR lose more, per method", min_effect=MIN_EFFECT_BITS)
      for c, d in disparities.items()],
])
for h in hypotheses:
    print(h.sentence())

# %% [markdown]
# ## Verdict and record
# Generated from the intervals above. `results.json` in `OUTPUT_DIR` holds every parameter, the
# environment, bits per weight, the damage card and the hypotheses (raw and adjusted).

# %%
primary = next(h for h in hypotheses if h.primary)
supported = [h.id.removeprefix("M-disparity-") for h in hypotheses if h.family.startswith("LR") and h.verdict == "SUPPORTED"]
print(f"Primary (M-rank): {primary.verdict}; Kendall's W {concordance.value:.3f} "
      f"(95% CI {concordance.ci_low:.3f} to {concordance.ci_high:.3f}) over {len(configs)} methods and {len(LANGS)} languages. "
      f"Methods under which LR languages lose more (adjusted): {supported or 'none'}.")

# %%
# NBVAL_IGNORE_OUTPUT
metrics = {
    "n_texts_per_language": {lang: corpus.n_texts(lang) for lang in corpus.langs},
    "methods": {name: v.to_dict() for name, v in variants.items()},
    "bits_per_weight": bits,
    "per_language": table,
    "damage_card": damage_card_records(table),
    "concordance": concordance.to_dict(),
    "disparity_par": {c: d.to_dict() for c, d in disparities.items()},
    "catalog": catalog_table(),
    "seconds": sweep.seconds,
}
parameters = current_parameters(globals(), DEVICE=str(loaded.device), DTYPE=loaded.metadata["dtype"])
path = write_results(OUTPUT_DIR, "methods_by_language", parameters, metrics, hypotheses, figures, loaded.metadata)
print("wrote", path)

# %%
verdict_table = print_verdicts(hypotheses)

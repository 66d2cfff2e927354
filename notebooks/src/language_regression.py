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
#       full: 24
#       quick: 109
#     purpose: 'Language as the unit: does INT4 damage grow with the model''s baseline
#       difficulty for a language, or with its resource class, across up to 61 languages?
#       (issue 11)'
#     source: notebooks/src/language_regression.py
# ---

# %% [markdown]
# # Language as the unit: a cross-language regression of quantization damage
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qhelpers/qhelpers/blob/main/notebooks/language_regression.ipynb)
#
# **Question.** The seeds' premise is that low-resource languages lose more when a model is quantized.
# Tested on seven languages (four "high", three "low"), a verdict describes *those* languages, and the
# labels are world-wide resource levels rather than what the model knows. Here every language of the
# UDHR corpus (up to 61, in 25 scripts) is one observation, and the claim is about languages in general.
#
# **Primary hypothesis (`LR-difficulty`).** *Quantization damage grows with the model's baseline
# difficulty for the language*: across languages, the change in **bits per parallel paragraph** (the
# same UDHR paragraph in every language, so no language is charged for its script's bytes) under
# per-channel INT4 of the linear layers rises with the full-precision model's **bits per byte** on that
# language, controlling for the script's UTF-8 bytes per character and the tokenizer's bytes per token.
# The slope is *relative*: damage divided by the average language's damage, so a slope of 0.10 means a
# language one bit per byte harder loses 10 % more than the average language. SUPPORTED needs the whole
# 95 % interval above the minimum effect of practical size, 0.10 per bit per byte.
#
# **Secondary families.** *Resource class*: damage falls with the published resource class of Joshi et
# al. (2020, ACL, "The State and Fate of Linguistic Diversity and Inclusion in the NLP World", classes
# 0-5), with the same controls and without them (minimum effect 0.05 of the average damage per class).
# *Robustness of the primary*: the same slope for the change in bits per byte, and without controls.
# *The seeds' 7-language contrast (fixed languages)*: mean over ar, he, sw minus mean over en, de, fr, zh
# of the change in bits per paragraph (minimum 2 bits) and per byte (minimum 0.01), with intervals over
# texts only: a statement about these seven languages, not about languages in general; its verdicts need
# at least 10 texts per language (the full profile). Holm adjusts the verdicts within each family.
#
# **Method.** One full-precision and one quantized run over `N_TEXTS` parallel paragraphs per language
# (`SELECT = "shortest"`: the paragraphs with the fewest bytes over the languages, so that 61 languages fit
# a CPU budget: scripts that SmolLM2's tokenizer splits byte by byte cost ten times more tokens than
# English; the full profile uses all 50 paragraphs).
# Per language, from its texts' sums: baseline bits per byte, bytes per token, the change in bits per byte
# and per paragraph. Regression: statsmodels OLS across languages for the point estimate; the interval is
# a **hierarchical bootstrap** (`qhelpers.stats.hierarchical`): languages are resampled, then texts within
# each resampled language, and every per-language measure and the regression are recomputed in each
# replicate, so the interval covers the sampling of languages as well as of texts (a simulation with a
# planted slope covers it in about 97 % of studies; resampling texts only covered 80 %).
#
# **Caveat.** The embedded models' "full precision" is the dequantized weights of an already 4-bit GGUF
# file (SmolLM2: Q4_1). INT4 damage here is measured on top of an earlier quantization, and a model that
# saw little of a language may have little left to lose there. The Joshi classes count labelled data and
# NLP publications as of 2020, not what a particular model was trained on; the baseline bits per byte is
# that model's own difficulty.

# %%
# Colab only: install qhelpers (elsewhere it is installed by scripts/install.sh)
import subprocess
import sys

if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "qhelpers @ git+https://github.com/qhelpers/qhelpers@v0.1.0"], check=True)

# %% tags=["parameters"]
# Notebook parameters: papermill and run_all.py -p override them; results.json records their values
MODEL = "embedded:smollm2-135m"   # hub id, local folder, embedded:<name> or tiny:<arch>
CORPUS = "udhr"                   # must be parallel (bits per paragraph compare the same content)
LANGS = None                      # None: every language the corpus offers (61 for udhr)
HR_LANGS = ["en", "de", "fr", "zh"]  # the seeds' groups, for the 7-language contrast only
LR_LANGS = ["ar", "he", "sw"]
N_TEXTS = 4                       # parallel paragraphs per language (None: all 50)
SELECT = "shortest"               # which paragraphs: "shortest" (fewest bytes over LANGS), "first" or "random"
PROTOCOL = "sound"                # "sound": per-channel INT-b on the linear layers (the project's default)
BITS = 4
MAX_LENGTH = 512                  # tokens per forward window
DEVICE = None                     # None: cuda if available, else cpu
DTYPE = None                      # None: fp32 on CPU, bf16 on CUDA (fp16 on a T4)
SEED = 0
N_BOOT = 2000
DAMAGE = True                     # the damage card (KL to the full model, top-1 agreement); False: NLL only, ~1.4x faster
OUTPUT_DIR = "results/language_regression"

# %%
import pandas as pd

from qhelpers import stats
from qhelpers.experiments import language_regression as lr
from qhelpers.measure.scoring import MeasureConfig
from qhelpers.measure.sweep import run_sweep
from qhelpers.models.loading import load_model
from qhelpers.quant import strategies
from qhelpers.quant.engine import QuantEngine, Variant
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
from qhelpers.text.corpora import language_covariates, load_corpus

seed_everything(SEED)
pd.set_option("display.precision", 4)
pd.set_option("display.width", 160)

# %% [markdown]
# ## Model, languages and their covariates

# %%
loaded = load_model(MODEL, device=DEVICE, dtype=DTYPE)
langs = list(load_corpus(CORPUS).langs) if LANGS is None else list(LANGS)
corpus = lr.select_paragraphs(load_corpus(CORPUS, langs=langs), N_TEXTS, SELECT, seed=SEED)
covariates = language_covariates(langs)
print(loaded.describe())
print("baseline:", loaded.metadata["baseline"])
print(f"{len(langs)} languages, {corpus.n_texts(langs[0])} parallel paragraphs each ({', '.join(corpus.ids[langs[0]])}); "
      f"{covariates['iso15924'].nunique()} scripts; Joshi classes {covariates['joshi_class'].value_counts().sort_index().to_dict()}")
covariates[["lang", "name", "script", "family", "joshi_class", "seed_resource", "utf8_bytes_per_char"]]

# %% [markdown]
# ## One quantized configuration, scored beside the baseline

# %%
quant, scope = strategies.protocol_settings(PROTOCOL, BITS)
variant = Variant(f"int{BITS}", quant, scope=scope)
print(variant.name, quant, "scope:", scope)

# %%
# NBVAL_IGNORE_OUTPUT
# resident: the quantized weights are dequantized once, not at every batch (on a CPU, 1 thread: 26 s vs
# 32 s for 7k tokens of SmolLM2, full precision 24 s); costs one more copy of the model's linear weights
sweep = run_sweep(loaded, corpus, {variant.name: variant}, MeasureConfig(max_length=MAX_LENGTH, damage=DAMAGE),
                  engine=QuantEngine(loaded, resident=True))

# %% [markdown]
# ## Per-language measures
# Baseline bits per byte and bytes per token are the model's own (measured here, not shipped); the
# damage columns are changes under the quantized configuration. The table is sorted by baseline
# difficulty; the interval columns are per-language paired bootstrap intervals over texts.

# %%
per_text = lr.per_text_table(sweep.scores, variant.name, parallel=True)
measures = lr.language_measures(per_text, covariates)
table = sweep.language_table(n_boot=N_BOOT, seed=SEED)
measures = measures.merge(
    table[["lang", "delta_bits_per_paragraph_ci_low", "delta_bits_per_paragraph_ci_high", "delta_bpb_ci_low", "delta_bpb_ci_high"]],
    on="lang")
show = ["lang", "name", "script", "joshi_class", "bpb_fp", "bytes_per_token", "delta_bpb", "delta_bits_per_paragraph",
        "delta_bits_per_paragraph_ci_low", "delta_bits_per_paragraph_ci_high"]
measures.sort_values("bpb_fp")[show].round(3)

# %% [markdown]
# ### Damage card
# Per language: the change in bits per byte, the KL from the full model's next-token distribution (bits per
# byte), the share of unchanged top-1 predictions and the 99th percentile of per-token KL (nats), with
# paired bootstrap 95 % intervals over the language's paragraphs.

# %%
damage_card(table) if DAMAGE else "DAMAGE = False: no damage card"

# %% [markdown]
# ## Regressions across languages
# Each row: the slope of the predictor (relative to the average language's damage), statsmodels' OLS
# point estimate, and the hierarchical bootstrap interval (languages, then texts). A language without a
# Joshi class would be left out of the resource-class regressions and named. The relative slope needs
# a scale: when the average damage's interval (last columns) is not wholly above 0 there is no damage
# to grow, and the slope is undefined (NaN) rather than a ratio to noise.

# %%
controls = ("utf8_bytes_per_char", "log2_bytes_per_token")
specs = {
    "difficulty": lr.RegressionSpec("delta_bits_per_paragraph", "bpb_fp", controls),
    "difficulty_bpb": lr.RegressionSpec("delta_bpb", "bpb_fp", controls),
    "difficulty_no_controls": lr.RegressionSpec("delta_bits_per_paragraph", "bpb_fp", ()),
    "resource": lr.RegressionSpec("delta_bits_per_paragraph", "joshi_class", controls),
    "resource_no_controls": lr.RegressionSpec("delta_bits_per_paragraph", "joshi_class", ()),
}
fits = {name: lr.fit_language_regression(per_text, covariates, spec, n_boot=N_BOOT, seed=SEED) for name, spec in specs.items()}
pd.DataFrame([
    {"regression": name, "model": f.spec.describe(), "n_languages": len(f.languages), "slope": f.slope.value,
     "ci_low": f.slope.ci_low, "ci_high": f.slope.ci_high, "r_squared": f.r_squared, "mean_damage": f.mean_damage.value,
     "mean_damage_ci_low": f.mean_damage.ci_low, "mean_damage_ci_high": f.mean_damage.ci_high}
    for name, f in fits.items()
]).round(4)

# %%
fits["difficulty"].coefficients.round(4)

# %% [markdown]
# ## The seeds' contrast on their seven languages (fixed languages, intervals over texts)

# %%
seven = all(lang in langs for lang in [*HR_LANGS, *LR_LANGS])
groups = dict(lr_langs=LR_LANGS, hr_langs=HR_LANGS, n_boot=N_BOOT, seed=SEED)
if seven:
    d_par = stats.disparity_difference(sweep.scores, variant.name, metric="delta_bits_per_paragraph", **groups)
    d_bpb = stats.disparity_difference(sweep.scores, variant.name, metric="delta_bpb", **groups)
    print("D, bits per paragraph:", d_par)
    print("D, bits per byte:     ", d_bpb)
else:
    print(f"the seeds' languages {HR_LANGS + LR_LANGS} are not all in LANGS: no 7-language contrast")

# %% [markdown]
# ## Hypotheses
# Verdicts come from the intervals above; the printed verdicts are Holm-adjusted within each family.

# %%
slope_q = "relative slope (fraction of mean damage per unit)"
found = [
    Hypothesis.evaluate(
        "LR-difficulty", "quantization damage (Δ bits per parallel paragraph) grows with the model's baseline bits per byte "
        "for the language, controlling for UTF-8 bytes per character and bytes per token",
        fits["difficulty"].slope, 0.0, ">", quantity=slope_q, primary=True, min_effect=lr.MIN_EFFECTS["bpb_fp"]),
    Hypothesis.evaluate(
        "LR-resource", "quantization damage (Δ bits per paragraph) falls with the language's Joshi et al. (2020) resource class, "
        "controlling for UTF-8 bytes per character and bytes per token",
        fits["resource"].slope, 0.0, "<", quantity=slope_q, family="resource class", min_effect=lr.MIN_EFFECTS["joshi_class"]),
    Hypothesis.evaluate(
        "LR-resource-raw", "quantization damage (Δ bits per paragraph) falls with the Joshi resource class (no controls)",
        fits["resource_no_controls"].slope, 0.0, "<", quantity=slope_q, family="resource class",
        min_effect=lr.MIN_EFFECTS["joshi_class"]),
    Hypothesis.evaluate(
        "LR-difficulty-bpb", "the change in bits per byte grows with the baseline bits per byte (same controls)",
        fits["difficulty_bpb"].slope, 0.0, ">", quantity=slope_q, family="difficulty: robustness",
        min_effect=lr.MIN_EFFECTS["bpb_fp"]),
    Hypothesis.evaluate(
        "LR-difficulty-raw", "Δ bits per paragraph grows with the baseline bits per byte (no controls)",
        fits["difficulty_no_controls"].slope, 0.0, ">", quantity=slope_q, family="difficulty: robustness",
        min_effect=lr.MIN_EFFECTS["bpb_fp"]),
]
if seven:
    found += [
        Hypothesis.evaluate(
            "LR-seed7", "on the seeds' seven languages, ar/he/sw lose more bits per parallel paragraph than en/de/fr/zh",
            d_par, 0.0, ">", quantity="D (bits per paragraph)", family="seeds' 7-language contrast (fixed languages)",
            min_effect=lr.MIN_EFFECTS["delta_bits_per_paragraph"]),
        Hypothesis.evaluate(
            "LR-seed7-bpb", "on the seeds' seven languages, ar/he/sw lose more bits per byte than en/de/fr/zh",
            d_bpb, 0.0, ">", quantity="D (bits per byte)", family="seeds' 7-language contrast (fixed languages)",
            min_effect=lr.MIN_EFFECTS["delta_bpb"]),
    ]
hypotheses = adjust_families(found)
for h in hypotheses:
    print(h.sentence())

# %% [markdown]
# ## Figure: damage against baseline difficulty, one point per language

# %%
fig = lr.damage_plot(
    measures, x="bpb_fp", y="delta_bits_per_paragraph", hue="joshi_class",
    yerr=("delta_bits_per_paragraph_ci_low", "delta_bits_per_paragraph_ci_high"), fit=fits["difficulty"],
    title=f"INT{BITS} damage against the model's baseline difficulty ({len(langs)} languages)",
    xlabel="baseline bits per byte (full precision)", ylabel="Δ bits per parallel paragraph")
fig.tight_layout()
figures = [plots.save_figure(fig, OUTPUT_DIR, "language_regression")]

# %% [markdown]
# ## Verdict and record
# The verdict below is generated from the intervals; `results.json` in `OUTPUT_DIR` holds every parameter,
# the environment, the per-language table, every regression and the hypotheses (raw and adjusted).

# %%
primary = next(h for h in hypotheses if h.primary)
fit = fits["difficulty"]
meaning = {"SUPPORTED": "damage grows with baseline difficulty by more than the practical size",
           "NOT_SUPPORTED": "damage does not grow with baseline difficulty by the practical size",
           "INCONCLUSIVE": "the data cannot decide whether damage grows with baseline difficulty"}[primary.verdict]
print(f"Primary ({primary.id}), {len(fit.languages)} languages x {corpus.n_texts(langs[0])} paragraphs: "
      f"{primary.verdict}: {meaning}. "
      + (f"Relative slope {fit.slope.value:.3f} per bit per byte (95% hierarchical CI {fit.slope.ci_low:.3f} to "
         f"{fit.slope.ci_high:.3f}; minimum effect {primary.min_effect:g}); " if fit.slope.defined else
         f"No relative slope: {fit.slope.reason}. ")
      + f"Average damage over the languages: {fit.mean_damage.value:.2f} bits per paragraph "
        f"(95% CI {fit.mean_damage.ci_low:.2f} to {fit.mean_damage.ci_high:.2f}).")

# %%
# NBVAL_IGNORE_OUTPUT
metrics = {
    "n_languages": len(langs),
    "n_texts_per_language": corpus.n_texts(langs[0]),
    "languages": langs,
    "variant": variant.to_dict(),
    "per_language": measures,
    "damage_card": damage_card_records(table) if DAMAGE else None,
    "regressions": {name: f.to_dict() for name, f in fits.items()},
    "seed_contrast": {"bits_per_paragraph": d_par.to_dict(), "bits_per_byte": d_bpb.to_dict()} if seven else None,
    "covariate_sources": covariates.attrs.get("sources"),
    "seconds": sweep.seconds,
}
parameters = current_parameters(globals(), DEVICE=str(loaded.device), DTYPE=loaded.metadata["dtype"])
path = write_results(OUTPUT_DIR, "language_regression", parameters, metrics, hypotheses, figures, loaded.metadata)
print("wrote", path)

# %%
verdict_table = print_verdicts(hypotheses)

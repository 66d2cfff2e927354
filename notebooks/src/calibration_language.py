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
#       full: 180
#       quick: 180
#     purpose: 'Calibration language as an axis: does calibrating a quantizer on the
#       target language (or a mix) instead of English reduce that language''s damage?
#       (issue 12)'
#     source: notebooks/src/calibration_language.py
# ---

# %% [markdown]
# # Which language should a quantizer calibrate on?
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qhelpers/qhelpers/blob/main/notebooks/calibration_language.ipynb)
#
# **Question.** AWQ, GPTQ, SignRound and llama.cpp's importance matrices learn from calibration text, and that
# text is almost always English. Users of those tools report garbled Japanese after English calibration
# (llm-awq #87) and worse Traditional Chinese (AutoFP8 #35); Chimoto et al. (2026) and Marie & Fujita (2025)
# measure the effect on 7-8B models, without intervals. Here each calibrated method is calibrated on English,
# on each evaluated language and on an equal-token mix, and every language's damage is compared with its
# damage under English calibration, on the same evaluation texts.
#
# **Primary hypothesis (`C-target`).** *Calibrating on the target language reduces that language's damage*:
# for the first method of `METHODS`, the mean over the non-English languages of [Δ bits per byte when
# calibrated on the language − Δ bits per byte when calibrated on English] is below 0 by at least
# `MIN_EFFECT_BPB`.
#
# **Secondary families.** `C-target-<method>-<lang>`: the same per method and language. `C-mix-<method>-<lang>`:
# *mixed calibration is never worse than English-only* (non-inferiority: the difference mix − English is below
# the margin `MIN_EFFECT_BPB`; the claim "for every language" holds when every language's verdict does).
# `C-bits`: *the effect grows as bits fall*: the target-calibration gain of `BITS_CONTRAST[1]` (fewer bits)
# exceeds that of `BITS_CONTRAST[0]`. Holm within each family.
#
# **Text.** Calibration text (`qhelpers.text.calibration`, machine-generated paragraphs per language, origin
# and licence in `results.json`) never overlaps the UDHR evaluation paragraphs.
#
# **Baseline caveat.** The embedded models ship as 4-bit GGUF files; their "full precision" is the dequantized
# weights, so every configuration re-quantizes an already quantized model.

# %%
# Colab only: install qhelpers (elsewhere it is installed by scripts/install.sh)
import subprocess
import sys

if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "qhelpers @ git+https://github.com/qhelpers/qhelpers@v0.1.0"], check=True)

# %% tags=["parameters"]
# Notebook parameters: papermill and run_all.py -p override them; results.json records their values
MODEL = "embedded:smollm2-135m"   # hub id, local folder, embedded:<name> or tiny:<arch>
CORPUS = "udhr"
LANGS = ["en", "sw"]              # evaluated languages (each also a calibration set); full: the seeds' seven
N_TEXTS = 10                      # evaluation paragraphs per language; verdicts need >= 10
METHODS = ["gguf:Q4_K_M", "gguf:Q2_K"]   # calibrated methods (GGUF: importance matrix); full adds awq:4
CALIBRATIONS = ["en", "sw"]       # None: "en", every language of LANGS, and "mix" (the full profile)
BITS_CONTRAST = ["gguf:Q4_K_M", "gguf:Q2_K"]      # (more bits, fewer bits) of one method, or None
SCOPE = "linear"
MAX_LENGTH = 512
DEVICE = None                     # None: cuda if available, else cpu
DTYPE = None                      # None: fp32 on CPU, bf16 on CUDA (fp16 on a T4)
SEED = 0
N_BOOT = 2000
MIN_EFFECT_BPB = 0.01             # practical size of a change in bits per byte
OUTPUT_DIR = "results/calibration_language"

# %%
import pandas as pd

from qhelpers import stats
from qhelpers.experiments import quant_methods as qm
from qhelpers.measure.scoring import MeasureConfig
from qhelpers.measure.sweep import run_sweep
from qhelpers.models.loading import load_model
from qhelpers.quant.engine import QuantEngine
from qhelpers.report import plots
from qhelpers.report.damage import damage_card_records
from qhelpers.report.record import current_parameters
from qhelpers.report.results import (
    Hypothesis,
    adjust_families,
    print_verdicts,
    seed_everything,
    write_results,
)
from qhelpers.text.calibration import calibration_info
from qhelpers.text.corpora import load_corpus

seed_everything(SEED)
pd.set_option("display.precision", 4)
pd.set_option("display.width", 160)

# %% [markdown]
# ## Configurations
# Every calibrated method under every calibration set; the specs are checked before the model loads.

# %%
calibrations = list(CALIBRATIONS) if CALIBRATIONS is not None else ["en", *[x for x in LANGS if x != "en"], "mix"]
variants = qm.calibration_variants(METHODS, calibrations, scope=SCOPE)
bits_contrast = qm.check_bits_contrast(BITS_CONTRAST, METHODS)
others = [x for x in LANGS if x != "en"]
print(f"{len(variants)} configurations: {len(METHODS)} methods x {len(calibrations)} calibration sets {calibrations}")
pd.DataFrame([calibration_info(c) for c in calibrations])

# %%
loaded = load_model(MODEL, device=DEVICE, dtype=DTYPE)
corpus = load_corpus(CORPUS, langs=LANGS, n_texts=N_TEXTS, seed=SEED)
print(loaded.describe())
print("baseline:", loaded.metadata["baseline"])

# %%
# NBVAL_IGNORE_OUTPUT
engine = QuantEngine(loaded)
sweep = run_sweep(loaded, corpus, variants, MeasureConfig(max_length=MAX_LENGTH), engine=engine)
bits = qm.bits_table(engine, variants)

# %% [markdown]
# ## Damage per language under each calibration set
# Rows: method and calibration set; columns: evaluated language; values: Δ bits per byte (point estimates;
# intervals in the next table and in `results.json`).

# %%
table = sweep.language_table(n_boot=N_BOOT, seed=SEED)
quantized = table[table["config"] != sweep.baseline].assign(
    method=lambda t: t["config"].str.split("@").str[0], calibration=lambda t: t["config"].str.split("@").str[1])
quantized.pivot_table(index=["method", "calibration"], columns="lang", values="delta_bpb", sort=False).round(4)

# %% [markdown]
# ## Against English calibration
# Per method, calibration set and language: Δ bits per byte under that calibration minus under English
# calibration, paired over the language's texts (negative: less damage than English calibration gives).

# %%
effects = qm.calibration_effects(sweep.scores, METHODS, calibrations, LANGS, reference="en", n_boot=N_BOOT, seed=SEED)
effects.round(4)

# %%
fig = plots.language_points(
    effects[effects["target"]].rename(columns={"difference": "target_gain", "ci_low": "target_gain_ci_low",
                                               "ci_high": "target_gain_ci_high", "method": "config"}),
    "target_gain", title="Calibrated on the language itself minus calibrated on English (Δ bits per byte)")
figures = [plots.save_figure(fig, OUTPUT_DIR, "calibration_target_gain")]

# %% [markdown]
# ## Hypotheses

# %%
target = stats.config_contrast(sweep.scores, qm.target_calibration_terms(METHODS[0], LANGS), n_boot=N_BOOT, seed=SEED)
found = [Hypothesis.evaluate(
    "C-target", f"under {METHODS[0]}, calibrating on the target language reduces its damage compared with English "
    "calibration (mean over the non-English languages)", target, 0.0, "<", quantity="Δ bits per byte difference",
    primary=True, min_effect=MIN_EFFECT_BPB)]
for row in effects.itertuples():
    est = effects.attrs["estimates"][(row.method, row.calibration, row.lang)]
    if row.target:
        found.append(Hypothesis.evaluate(
            f"C-target-{row.method}-{row.lang}", f"under {row.method}, calibrating on {row.lang} reduces {row.lang}'s damage "
            "compared with English calibration", est, 0.0, "<", quantity="Δ bits per byte difference",
            family=f"target calibration ({row.method})", min_effect=MIN_EFFECT_BPB))
    elif row.calibration == "mix":
        found.append(Hypothesis.evaluate(
            f"C-mix-{row.method}-{row.lang}", f"under {row.method}, mixed calibration is not worse than English-only for "
            f"{row.lang} (by more than the margin)", est, MIN_EFFECT_BPB, "<", quantity="Δ bits per byte difference",
            family=f"mix not worse ({row.method})"))
if bits_contrast is not None:
    high, low = bits_contrast
    grows = stats.config_contrast(sweep.scores, {**qm.target_calibration_terms(low, LANGS),
                                                 **qm.target_calibration_terms(high, LANGS, weight=-1.0)},
                                  n_boot=N_BOOT, seed=SEED)
    found.append(Hypothesis.evaluate(
        "C-bits", f"the gain from target-language calibration is larger at {low} than at {high}", grows, 0.0, "<",
        quantity="gain difference (Δ bits per byte)", family="effect grows as bits fall", min_effect=MIN_EFFECT_BPB))
hypotheses = adjust_families(found)
for h in hypotheses:
    print(h.sentence())

# %% [markdown]
# ## Verdict and record
# "Mixed calibration is never worse than English" holds for a method when every language's (adjusted) verdict
# is SUPPORTED, fails when any is NOT_SUPPORTED; computed below.

# %%
primary = next(h for h in hypotheses if h.primary)
mix_verdicts = {m: qm.all_languages_verdict([h.verdict for h in hypotheses if h.family == f"mix not worse ({m})"])
                for m in METHODS if "mix" in calibrations}
print(f"Primary (C-target, {METHODS[0]}): {primary.verdict}; mean gain {target.value:.4f} bits per byte "
      f"(95% CI {target.ci_low:.4f} to {target.ci_high:.4f}) over {others}. "
      f"Mixed calibration never worse than English, per method: {mix_verdicts or 'not measured (no mix in CALIBRATIONS)'}.")

# %%
# NBVAL_IGNORE_OUTPUT
metrics = {
    "n_texts_per_language": {lang: corpus.n_texts(lang) for lang in corpus.langs},
    "calibrations": {c: calibration_info(c) for c in calibrations},
    "methods": {name: v.to_dict() for name, v in variants.items()},
    "bits_per_weight": bits,
    "per_language": table,
    "damage_card": damage_card_records(table),
    "effects_vs_english": effects,
    "target_gain": target.to_dict(),
    "mix_never_worse": mix_verdicts,
    "seconds": sweep.seconds,
}
parameters = current_parameters(globals(), DEVICE=str(loaded.device), DTYPE=loaded.metadata["dtype"])
path = write_results(OUTPUT_DIR, "calibration_language", parameters, metrics, hypotheses, figures, loaded.metadata)
print("wrote", path)

# %%
verdict_table = print_verdicts(hypotheses)

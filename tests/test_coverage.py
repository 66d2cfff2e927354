"""Coverage of the 95 % intervals of qhelpers.stats, by simulation with a planted truth.

Each simulated language has ``n`` texts of 200 bytes whose per-text Δ bits per byte (quantized
minus baseline) are drawn from a known distribution with mean ``MU``; its Δbpb is then the
mean of the draws and the truth is ``MU``. Many simulated languages go through one call (texts
have distinct ids, so each language is resampled with its own generator); the coverage is the
share of intervals that contain the truth. The numbers are deterministic (fixed seeds), and
the coverage table in the docstring of :mod:`qhelpers.stats` is checked against them.

Monte Carlo error: with 1000 simulations a coverage of 0.95 is measured to +-0.007 (one
standard error). The bar of issue 11 (>= 0.93 at n >= 10 for normal and skewed data) is met
by the studentized interval in every such cell (measured 0.939-0.958); the percentile
interval fails it by far more (exponential, n = 10: 0.853). The default run measures 13
cells (about 30 s on 2 cores); ``-m slow`` measures the whole documented table.
"""
from __future__ import annotations

import math
import re
from functools import cache

import numpy as np
import pandas as pd
import pytest

from qhelpers import stats
from qhelpers.stats import PairedScores

LN2 = math.log(2.0)
MU = 0.1  # true Δ bits per byte
SIMS = 1000  # simulations per cell
N_BOOT = 999
CHUNK = 250  # simulated languages per call (bounds memory: CHUNK x N_BOOT x n counts)
BAR = 0.93


def draw(dist: str, rng: np.random.Generator, size) -> np.ndarray:
    """Per-text Δ bits per byte with mean ``MU``: normal (sd MU/2), exponential (skewness 2),
    lognormal with sigma = 1 (skewness 6.2)."""
    if dist == "normal":
        return rng.normal(MU, MU / 2, size)
    if dist == "exponential":
        return rng.exponential(MU, size)
    if dist == "lognormal":
        return MU * np.exp(rng.normal(0.0, 1.0, size) - 0.5)
    raise ValueError(dist)


def frame(langs: np.ndarray, ids: np.ndarray, fp_bits: np.ndarray, x: np.ndarray, byt: np.ndarray | None = None) -> pd.DataFrame:
    """Scores of baseline "fp" (``fp_bits`` bits per byte) and config "q", which adds ``x``
    bits per byte to every text; texts of ``byt`` bytes (default 200) and byt/4 tokens."""
    byt = np.full(fp_bits.shape, 200) if byt is None else byt
    fp = fp_bits * byt * LN2
    parts = [
        pd.DataFrame({"config": c, "lang": langs.ravel(), "text_id": ids.ravel(), "nll": nll.ravel(),
                      "n_tokens": (byt // 4).ravel(), "n_bytes": byt.ravel()})
        for c, nll in (("fp", fp), ("q", fp + x * byt * LN2))
    ]
    return pd.concat(parts, ignore_index=True)


def planted_languages(dist: str, n: int, sims: int, seed: int, variable_length: bool = False) -> pd.DataFrame:
    """``sims`` independent languages of ``n`` texts each (distinct text ids). With
    ``variable_length`` the texts have 50-400 bytes: Δbpb is then the byte-weighted mean of
    the draws (a ratio of sums), whose expectation is still MU."""
    rng = np.random.default_rng(seed)
    names = np.array([f"L{s:04d}" for s in range(sims)])
    langs = np.repeat(names[:, None], n, axis=1)
    ids = np.char.add(np.char.add(langs, "_"), np.array([f"{i:03d}" for i in range(n)])[None, :])
    fp_bits = rng.uniform(1.0, 2.0, (sims, n))
    x = draw(dist, rng, (sims, n))
    byt = rng.integers(50, 401, (sims, n)) if variable_length else None
    return frame(langs, ids, fp_bits, x, byt)


@cache
def coverage(dist: str, n: int, method: str = "studentized", sims: int = SIMS, variable_length: bool = False) -> float:
    """Share of the 95 % intervals of language_table's delta_bpb (computed, as the table does,
    by PairedScores.metric_estimate) that contain MU."""
    hits = 0
    for start in range(0, sims, CHUNK):
        k = min(CHUNK, sims - start)
        seed = 1000 * n + start + {"normal": 0, "exponential": 1, "lognormal": 2}[dist] * 10**6 + variable_length * 10**7
        df = planted_languages(dist, n, k, seed, variable_length)
        eng = PairedScores(df, "fp", None, None, N_BOOT, seed, 0.95, method)
        for lang in eng.langs:
            est = eng.metric_estimate("q", lang, "delta_bpb")
            hits += bool(est.ci_low <= MU <= est.ci_high)  # an undefined interval (NaN) misses
    return hits / sims


def planted_pairs(n: int, sims: int, seed: int, parallel: bool) -> pd.DataFrame:
    """``sims`` pairs of languages (lr<s>, hr<s>) with a skewed shared component: per text
    x_lr = 0.10 e + N(0.05, 0.02), x_hr = 0.03 e + N(0.02, 0.02), e ~ Exp(1) shared by the two
    languages of a pair (the same paragraph), so the true disparity difference is 0.10.
    ``parallel``: every language has the same text ids (one shared resample per call)."""
    rng = np.random.default_rng(seed)
    e = rng.exponential(1.0, (sims, n))
    x = {"lr": 0.10 * e + rng.normal(0.05, 0.02, (sims, n)), "hr": 0.03 * e + rng.normal(0.02, 0.02, (sims, n))}
    parts = []
    for group in ("lr", "hr"):
        names = np.array([f"{group}{s:04d}" for s in range(sims)])
        langs = np.repeat(names[:, None], n, axis=1)
        texts = np.array([f"{i:03d}" for i in range(n)])[None, :]
        ids = np.broadcast_to(texts, (sims, n)) if parallel else np.char.add(np.char.add(langs, "_"), texts)
        parts.append(frame(langs, np.asarray(ids), rng.uniform(1.0, 2.0, (sims, n)), x[group]))
    return pd.concat(parts, ignore_index=True)


@cache
def disparity_coverage(n: int, parallel: bool, sims: int = SIMS) -> float:
    """Share of the 95 % intervals of the disparity difference (mean LR Δbpb - mean HR Δbpb,
    computed as disparity_difference does, by PairedScores.disparity) that contain 0.10."""
    hits = 0
    for start in range(0, sims, CHUNK):
        k = min(CHUNK, sims - start)
        seed = 7 * 10**6 + 1000 * n + start + int(parallel)
        eng = PairedScores(planted_pairs(n, k, seed, parallel), "fp", None, None, N_BOOT, seed, 0.95)
        assert eng.parallel is parallel
        for s in range(k):
            est, _ = eng.disparity("q", [f"lr{s:04d}"], [f"hr{s:04d}"], "delta_bpb", "difference")
            hits += bool(est.ci_low <= 0.10 <= est.ci_high)
    return hits / sims


def documented_coverage() -> dict[tuple[str, int], float]:
    """The coverage table of the qhelpers.stats docstring: {(row label, n): coverage}."""
    doc = stats.__doc__ or ""
    header = re.search(r"^\s+method, data\s+n = 5\s+n = 10\s+n = 20\s+n = 50\s*$", doc, re.MULTILINE)
    assert header, "the coverage table of the qhelpers.stats docstring is missing"
    table = {}
    for line in doc[header.end():].splitlines()[2:]:  # after the header's rule
        if line.strip().startswith("="):
            break
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == 5, f"malformed row of the coverage table: {line!r}"
        for n, v in zip((5, 10, 20, 50), cells[1:]):
            if v != "--":
                table[(cells[0], n)] = float(v)
    return table


ROWS = {  # docstring row label -> how to measure it
    "studentized, normal": lambda n: coverage("normal", n),
    "studentized, exponential": lambda n: coverage("exponential", n),
    "studentized, lognormal": lambda n: coverage("lognormal", n),
    "studentized, exponential, 50-400 bytes": lambda n: coverage("exponential", n, variable_length=True),
    "percentile, normal": lambda n: coverage("normal", n, "percentile"),
    "percentile, exponential": lambda n: coverage("exponential", n, "percentile"),
    "bca, exponential": lambda n: coverage("exponential", n, "bca"),
    "studentized, disparity difference": lambda n: disparity_coverage(n, True),
}


# --------------------------------------------------------------------------- default run


@pytest.mark.parametrize("dist", ["normal", "exponential"])
@pytest.mark.parametrize("n", [10, 20, 50])
def test_studentized_interval_keeps_its_coverage_from_n_10(dist, n):
    assert coverage(dist, n) >= BAR, (dist, n, coverage(dist, n))


@pytest.mark.parametrize("n", [10, 20])
def test_disparity_difference_keeps_its_coverage_on_a_parallel_corpus(n):
    assert disparity_coverage(n, True) >= BAR, disparity_coverage(n, True)


def test_disparity_difference_engine_is_the_public_function():
    """The simulation calls PairedScores.disparity; disparity_difference gives the same."""
    df = planted_pairs(10, 1, 3, True)
    eng = PairedScores(df, "fp", None, None, N_BOOT, 3, 0.95)
    est, _ = eng.disparity("q", ["lr0000"], ["hr0000"], "delta_bpb", "difference")
    pub = stats.disparity_difference(df, "q", lr_langs=["lr0000"], hr_langs=["hr0000"], metric="delta_bpb",
                                     n_boot=N_BOOT, seed=3)
    assert (pub.value, pub.ci_low, pub.ci_high) == pytest.approx((est.value, est.ci_low, est.ci_high), rel=1e-12)
    tab = stats.language_table(planted_languages("exponential", 10, 3, 5), n_boot=N_BOOT, seed=5)
    eng = PairedScores(planted_languages("exponential", 10, 3, 5), "fp", None, None, N_BOOT, 5, 0.95)
    for _, row in tab.iterrows():
        est = eng.metric_estimate("q", row["lang"], "delta_bpb")
        assert (row["delta_bpb_ci_low"], row["delta_bpb_ci_high"]) == pytest.approx((est.ci_low, est.ci_high), rel=1e-12)


def test_percentile_interval_fails_the_bar():
    """The method this issue replaces: the percentile interval undercovers skewed data at
    small n (the studentized one is asserted above on the same simulated data)."""
    assert coverage("exponential", 10, "percentile") < 0.90
    assert coverage("normal", 10, "percentile") < BAR
    assert coverage("exponential", 10) - coverage("exponential", 10, "percentile") > 0.05


def test_documented_limitations_small_n_and_heavy_tails():
    """What is documented, not promised: n = 5 (measured and in the table; verdicts need
    n >= 10) and heavy right tails (lognormal, sigma = 1), which stay below the bar at
    n = 10."""
    doc = documented_coverage()
    assert all(("studentized, " + d, 5) in doc for d in ("normal", "exponential", "lognormal"))
    assert coverage("lognormal", 10) < BAR
    assert doc[("studentized, lognormal", 10)] < BAR


def test_documented_coverage_matches_the_simulation():
    """Every cell of the docstring table measured in the default run equals the simulation
    within 0.02 (about three Monte Carlo standard errors)."""
    doc = documented_coverage()
    assert {label for label, _ in doc} == set(ROWS), sorted(doc)
    measured_here = {("studentized, normal", n) for n in (5, 10, 20, 50)} | {
        ("studentized, exponential", n) for n in (5, 10, 20, 50)} | {
        ("percentile, exponential", 10), ("percentile, normal", 10), ("studentized, lognormal", 10)} | {
        ("studentized, disparity difference", n) for n in (10, 20)}
    for key in sorted(measured_here):
        assert key in doc, f"{key} is not in the docstring table"
        assert doc[key] == pytest.approx(ROWS[key[0]](key[1]), abs=0.02), key


# --------------------------------------------------------------------------- slow: the whole table


@pytest.mark.slow
def test_documented_coverage_matches_the_simulation_everywhere():
    """All cells, lognormal, BCa and variable text lengths included (about 2 minutes)."""
    doc = documented_coverage()
    for (label, n), value in sorted(doc.items()):
        assert value == pytest.approx(ROWS[label](n), abs=0.02), (label, n)
    # the documented limitation: heavy right tails (lognormal, sigma = 1) stay below the bar
    assert max(coverage("lognormal", n) for n in (10, 20)) < BAR

"""qhelpers.experiments.rate_distortion (seed 004 T-010): planted laws recovered with covering CIs, hand-computed
criteria, effective bits and hulls, exact grid measures, and a real tiny:gpt2 grid with hand-counted
protected fractions."""
from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from qhelpers import stats
from qhelpers.experiments import rate_distortion as rd
from qhelpers.measure.sweep import SweepResult
from qhelpers.util.errors import ConfigError

LN2 = math.log(2.0)
BITS = [3, 4, 6, 8]
PCTS = [0, 10, 20, 30, 50]
TRUTH = {"a": 8.0, "b": 1.2, "c": 1.1}


def seed_law(bits, p, a=TRUTH["a"], b=TRUTH["b"], c=TRUTH["c"]):
    return a * 2.0 ** (-b * np.asarray(bits, float)) * (1.0 - c * np.asarray(p, float))


def exp_law(bits, p, a=8.0, b=1.2, c=3.0):
    return a * 2.0 ** (-b * np.asarray(bits, float)) * np.exp(-c * np.asarray(p, float))


def grid_xy(bits=BITS, pcts=PCTS):
    b = np.repeat(np.asarray(bits, float), len(pcts))
    p = np.tile(np.asarray(pcts, float) / 100.0, len(bits))
    return b, p


# --------------------------------------------------------------------------- planted sweeps


def planted_grid(law, noise: float = 0.0, n_texts: int = 30, seed: int = 0, hr_shift: float = 0.05,
                 bits=BITS, pcts=PCTS, collapsed_bits=()):
    """A SweepResult + RDGrid where, in cell (bits, p), every HR text's bits per byte rise by
    ``hr_shift`` and every LR text's by ``hr_shift + law(bits, p) + noise * e_t`` (e_t standard
    normal, independent per cell and text; every text has the same byte count, so a language's
    change is the plain mean over its texts). ``collapsed_bits`` cells push bpb above 8."""
    rng = np.random.default_rng(seed)
    langs = {"en": "HR", "de": "HR", "he": "LR", "sw": "LR"}
    n_bytes, n_tok = 300, 100
    base_bpb = {lang: rng.uniform(1.0, 2.0, n_texts) for lang in langs}
    rows, cells, overhead = [], [], [{"config": "fp", "protected_fraction": 1.0, "scope_kept_fraction": math.nan}]

    def add(config, shift_fn):
        for lang, group in langs.items():
            shift = shift_fn(group)
            for t in range(n_texts):
                bpb = base_bpb[lang][t] + (shift[t] if np.ndim(shift) else shift)
                rows.append({"config": config, "lang": lang, "text_id": f"t{t}", "nll": bpb * n_bytes * LN2,
                             "n_tokens": n_tok, "n_bytes": n_bytes})

    add("fp", lambda g: 0.0)
    for bits_ in bits:
        for pct in pcts:
            p = pct / 100.0
            config = f"int{bits_}:layers{pct}"
            d = float(law(bits_, p))
            extra = 9.0 if bits_ in collapsed_bits else 0.0
            nz = noise * rng.standard_normal(n_texts)  # the same text effects in both LR languages
            add(config, lambda g, d=d, extra=extra, nz=nz: hr_shift + extra + (d + nz if g == "LR" else 0.0))
            cells.append({"policy": "layers", "bits": bits_, "pct": float(pct), "config": config,
                          "protected_layers": [], "spec": ""})
            overhead.append({"config": config, "protected_fraction": p / 2, "scope_kept_fraction": p})
    sweep = SweepResult(scores=pd.DataFrame(rows), variants={}, overhead=pd.DataFrame(overhead), baseline="fp")
    grid = rd.RDGrid(variants={}, cells=pd.DataFrame(cells), policies={}, protocol="sound")
    return sweep, grid


def measures_of(sweep, grid, n_boot=200, seed=0):
    return rd.grid_measures(sweep, grid, lr_langs=["he", "sw"], hr_langs=["en", "de"], n_boot=n_boot, seed=seed)


# --------------------------------------------------------------------------- hand-computed quantities


def test_effective_bits_by_hand():
    assert rd.effective_bits(4, 0.0) == 4.0
    assert rd.effective_bits(4, 0.1) == pytest.approx(0.9 * 4 + 0.1 * 16)  # 5.2
    assert rd.effective_bits(2, 0.5) == pytest.approx(9.0)
    assert rd.effective_bits(8, 1.0) == pytest.approx(16.0)
    np.testing.assert_allclose(rd.effective_bits([3, 6], [0.2, 0.3]), [0.8 * 3 + 3.2, 0.7 * 6 + 4.8])
    with pytest.raises(ConfigError, match="fraction"):
        rd.effective_bits(4, 10)  # a percentage passed as a fraction
    with pytest.raises(ConfigError, match="positive"):
        rd.effective_bits(0, 0.1)


def test_lower_convex_hull_of_hand_points():
    x, y = [0, 1, 2, 3, 4], [4, 1, 2, 0.5, 3]
    # (2, 2) lies above the chord (1, 1)-(3, 0.5); (1, 1) lies below the chord (0, 4)-(3, 0.5) (2.83 at x=1)
    assert rd.lower_convex_hull(x, y).tolist() == [0, 1, 3, 4]
    assert rd.lower_convex_hull(x, y, decreasing=True).tolist() == [0, 1, 3]
    assert rd.lower_convex_hull([0, 1, 2], [0, 1, 2]).tolist() == [0, 2]  # collinear middle point dropped
    assert rd.lower_convex_hull([1, 1, 2], [5, 2, 0]).tolist() == [1, 2]  # equal x: only the lowest
    assert rd.lower_convex_hull([2, 0, 1], [1, 1, 0]).tolist() == [1, 2, 0]  # sorted by x, original indices
    assert rd.lower_convex_hull([0, 1, 2], [1, np.nan, 0]).tolist() == [0, 2]
    with pytest.raises(ConfigError, match="same length"):
        rd.lower_convex_hull([0, 1], [0])


def test_information_criteria_by_hand():
    # SSE 2 on n = 10 points, k = 3 mean parameters + the error variance: K = 4
    # logL = -5 * (ln(2 pi 0.2) + 1) = -5 * (0.2284392 + 1) = -6.142196
    out = rd.information_criteria(2.0, 10, 3)
    assert out["loglik"] == pytest.approx(-6.142196, abs=1e-6)
    assert out["aic"] == pytest.approx(8 + 12.284392, abs=1e-5)            # 2K - 2 logL
    assert out["aicc"] == pytest.approx(8 + 12.284392 + 40 / 5, abs=1e-5)  # + 2K(K+1)/(n-K-1)
    assert out["bic"] == pytest.approx(4 * 2.302585 + 12.284392, abs=1e-5)  # K ln n - 2 logL
    assert math.isnan(rd.information_criteria(1.0, 5, 3)["aicc"])  # n - K - 1 = 0
    with pytest.raises(ConfigError):
        rd.information_criteria(-1.0, 10, 3)


# --------------------------------------------------------------------------- fits on planted laws


@pytest.mark.parametrize("model, law, truth", [
    ("seed", seed_law, {"a": 8.0, "b": 1.2, "c": 1.1}),
    ("exp", exp_law, {"a": 8.0, "b": 1.2, "c": 3.0}),
])
def test_noise_free_law_is_recovered_exactly(model, law, truth):
    b, p = grid_xy()
    fit = rd.fit_model(model, b, p, law(b, p))
    assert fit.defined and fit.converged and not fit.at_bound
    for name, value in truth.items():
        assert fit.params[name] == pytest.approx(value, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0, abs=1e-10)
    assert fit.loo_rmse < 1e-8
    np.testing.assert_allclose(fit.predict([5.0], [0.4]), law(5.0, 0.4), rtol=1e-6)


def test_negative_disparity_law_is_recovered():
    # LR degrading LESS than HR (the research notes' SmolLM2 finding) is a negative a
    b, p = grid_xy()
    fit = rd.fit_model("seed", b, p, seed_law(b, p, a=-3.0, b=0.9, c=-0.8))
    assert (fit.params["a"], fit.params["b"], fit.params["c"]) == pytest.approx((-3.0, 0.9, -0.8), rel=1e-6)


def test_free_intercepts_recover_a_non_exponential_bit_law():
    b, p = grid_xy()
    intercepts = {3: 0.9, 4: 0.05, 6: 0.4, 8: 0.01}  # no 2^(-b bits) law
    y = np.array([intercepts[int(x)] for x in b]) * (1 - 0.7 * p)
    free = rd.fit_model("free", b, p, y)
    assert [free.params[f"a@{k}"] for k in intercepts] == pytest.approx(list(intercepts.values()), rel=1e-6)
    assert free.params["c"] == pytest.approx(0.7, rel=1e-6)
    seed = rd.fit_model("seed", b, p, y)
    assert seed.r2 < 0.9 and seed.loo_rmse > 100 * free.loo_rmse
    assert seed.aic > free.aic


def test_a_step_in_bits_stops_b_at_its_bound_and_the_fit_counts_as_failed():
    # disparity only at INT3, none from INT4 on: faster than any 2^(-b bits) with b <= 8. Issue 11:
    # T-010 reported b = 8 with the "interval" [8, 8] from 200 of 200 refits at the bound, and
    # called H4.1-i SUPPORTED; a fit at a bound is a failed fit and the verdict INCONCLUSIVE.
    sweep, grid = planted_grid(lambda bits, p: (0.8 if bits == 3 else 0.0) * (1 - p), noise=0.01, seed=4)
    fit = rd.fit_grid(measures_of(sweep, grid), models=["seed", "free"], n_fit_boot=20)
    assert fit.fits["seed"].at_bound == ("b",) and fit.fits["seed"].params["b"] == pytest.approx(rd.B_BOUNDS[1])
    b = fit.estimate("seed", "b")
    assert not b.defined and b.reason.startswith("fit at bound") and "b = 8" in b.reason
    assert b.value == pytest.approx(8.0)  # what the fit stopped at is kept, with no interval
    assert stats.verdict(b, 0.0, ">") == stats.INCONCLUSIVE
    assert not fit.estimate("seed", "c").defined  # the whole fit failed, not only b
    assert fit.loo_difference("free").reason.startswith("fit at bound")
    comp = fit.comparison.set_index("model")
    assert comp.loc["seed", "boot_failed"] == 20 and comp.loc["seed", "boot_failed_frac"] == 1.0
    assert comp.loc["seed", "boot_ok"] == 0  # refits at the bound are failures, not successes
    assert comp.loc["free", "boot_failed"] == 0 and fit.estimate("free", "c").defined
    note = fit.bound_note("seed", "b")
    assert "failed fit" in note and "20 of 20 bootstrap refits failed" in note
    assert fit.params.set_index(["model", "param"]).loc[("seed", "b"), "boot_at_bound"] == 20


def test_bootstrap_refits_at_a_bound_are_failures_and_too_many_make_the_interval_undefined():
    b, p = grid_xy()
    base = seed_law(b, p)
    fit = rd.fit_grid(_fake_measures(b, p, base, n_boot=40, bound_every=None), models=["seed"], loo=False)
    assert fit.estimate("seed", "b").defined and fit.comparison["boot_failed"].iloc[0] == 0
    # one replicate in 40 is a step (b would run to its bound): 2.5 %, the interval stays defined
    one = rd.fit_grid(_fake_measures(b, p, base, n_boot=40, bound_every=40), models=["seed"], loo=False)
    assert one.comparison["boot_failed"].iloc[0] == 1 and one.failed_fraction("seed") == pytest.approx(1 / 40)
    assert one.estimate("seed", "b").defined and "1 of 40 bootstrap refits failed" in one.bound_note("seed", "b")
    # one in 10 (10 % > 2.5 %): the interval would sit on the failed refits, so it is undefined
    many = rd.fit_grid(_fake_measures(b, p, base, n_boot=40, bound_every=10), models=["seed"], loo=False)
    est = many.estimate("seed", "b")
    assert not est.defined and est.reason.startswith("fit at bound: 4 of 40 bootstrap refits")
    assert est.value == pytest.approx(TRUTH["b"], rel=1e-3)


def _fake_measures(bits, p, y, n_boot: int, bound_every: int | None) -> rd.GridMeasures:
    """GridMeasures whose point cells are ``y`` and whose replicate grids are ``y`` times 1 +- 1 %,
    except every ``bound_every``-th, a step in bits (all disparity at the smallest bit width)."""
    rng = np.random.default_rng(0)
    configs = [f"c{i}" for i in range(len(y))]
    reps = y[None, :] * (1 + 0.01 * rng.standard_normal((n_boot, len(y))))
    if bound_every:
        step = np.where(bits == bits.min(), 1.0, 0.0) * (1 - p)
        reps[bound_every - 1::bound_every] = step
    table = pd.DataFrame({"policy": "layers", "bits": bits, "pct": 100 * p, "config": configs, "p": p, "n": 30,
                          "disparity": y, "defined": True, "reason": ""})
    return rd.GridMeasures(table=table, disparity_reps=pd.DataFrame(reps, columns=configs), distortion_reps=pd.DataFrame(),
                           lr_langs=["he"], hr_langs=["en"], langs=["he", "en"], n_boot=n_boot, seed=0, level=0.95)


def test_too_few_or_degenerate_cells_give_an_undefined_fit():
    fit = rd.fit_model("seed", [3, 4, 6], [0, 0.1, 0.2], [1, 0.5, 0.1])
    assert not fit.defined and fit.reason.startswith("too few") and "needs at least 5" in fit.reason
    one_width = rd.fit_model("seed", [4] * 6, np.linspace(0, 0.5, 6), np.linspace(1, 0.5, 6))
    assert not one_width.defined and "bit widths" in one_width.reason
    assert np.isnan(one_width.predict(4, 0.1)).all()
    with pytest.raises(ConfigError, match="unknown model"):
        rd.fit_model("power", [3, 4], [0, 0], [1, 1])
    with pytest.raises(ConfigError, match="finite"):
        rd.fit_model("seed", [3, 4, 6, 8, 3], [0, 0, 0, 0, 0.1], [1, 2, np.nan, 1, 1])


def test_planted_law_through_the_grid_pipeline_recovers_parameters_and_cis_cover():
    sweep, grid = planted_grid(seed_law, noise=0.02, n_texts=30, seed=1)
    measures = measures_of(sweep, grid, n_boot=300)
    fit = rd.fit_grid(measures, models=["seed"], loo=False)
    assert fit.n_fit_boot == 300 and len(fit.cells) == 20 and fit.excluded.empty
    for name, true in TRUTH.items():
        est = fit.estimate("seed", name)
        sd = float(np.nanstd(fit.boot_params["seed"][name]))
        assert est.defined and est.n == 30
        assert abs(est.value - true) < 4 * sd, (name, est, sd)        # within the expected error
        assert est.ci_low <= true <= est.ci_high, (name, est)          # the CI covers the truth
    assert fit.fits["seed"].r2 > 0.99


def test_bootstrap_cis_cover_the_truth_in_most_planted_datasets():
    covered = {k: 0 for k in TRUTH}
    n_sets = 8
    for s in range(n_sets):
        sweep, grid = planted_grid(seed_law, noise=0.03, n_texts=20, seed=100 + s)
        fit = rd.fit_grid(measures_of(sweep, grid, n_boot=100, seed=s), models=["seed"], loo=False)
        for name, true in TRUTH.items():
            est = fit.estimate("seed", name)
            covered[name] += est.ci_low <= true <= est.ci_high
    # nominal 95 %: P(6 or fewer of 8) is about 0.6 % per parameter for a correct interval
    assert all(v >= 7 for v in covered.values()), covered


def test_leave_one_out_and_criteria_prefer_the_law_that_generated_the_data():
    for law, truth_model, other in ((seed_law, "seed", "exp"), (exp_law, "exp", "seed")):
        sweep, grid = planted_grid(law, noise=0.002, n_texts=20, seed=3)
        fit = rd.fit_grid(measures_of(sweep, grid), models=["seed", "exp"], n_fit_boot=40)
        comp = fit.comparison.set_index("model")
        assert comp.loc[truth_model, "loo_rmse"] < comp.loc[other, "loo_rmse"]
        assert comp.loc[truth_model, "aic"] < comp.loc[other, "aic"]
        assert comp.loc[truth_model, "delta_aic"] == 0.0
        diff = fit.loo_difference(other, model=truth_model)
        assert diff.defined and diff.value < 0 and diff.ci_high < 0  # clearly better held out
        absolute = fit.loo_difference(other, model=truth_model, relative=False)
        assert absolute.value == pytest.approx(comp.loc[truth_model, "loo_rmse"] - comp.loc[other, "loo_rmse"])


# --------------------------------------------------------------------------- grid measures


def test_grid_measures_are_exact_and_match_stats():
    sweep, grid = planted_grid(seed_law, noise=0.0, collapsed_bits=(3,))
    m = measures_of(sweep, grid)
    t = m.table.set_index("config")
    cell = t.loc["int6:layers20"]
    assert cell["disparity"] == pytest.approx(seed_law(6, 0.2), abs=1e-12)
    assert cell["disparity_ci_low"] == pytest.approx(seed_law(6, 0.2), abs=1e-12)  # no text noise
    assert cell["lr_change"] == pytest.approx(0.05 + seed_law(6, 0.2), abs=1e-12)
    assert cell["hr_change"] == pytest.approx(0.05, abs=1e-12)
    assert cell["distortion"] == pytest.approx(0.05 + seed_law(6, 0.2) / 2, abs=1e-12)
    assert cell["p"] == 0.2 and cell["protected_fraction"] == 0.1
    assert cell["effective_bits"] == pytest.approx(0.8 * 6 + 0.2 * 16)
    # the seeds' ratio: mean LR degradation / mean HR degradation, defined here
    assert cell["ratio"] > 1 and cell["ratio_reason"] == ""
    collapsed = t.loc["int3:layers0"]
    assert not collapsed["defined"] and collapsed["reason"].startswith("collapsed")
    assert collapsed["collapsed"] and math.isnan(collapsed["disparity"])
    assert len(m.excluded()) == 5 and set(m.excluded()["bits"]) == {3}
    assert m.pivot("disparity").shape == (4, 5)
    # an independent computation: stats.disparity_difference with the same seed
    sweep2, grid2 = planted_grid(seed_law, noise=0.05, n_texts=12, seed=7)
    m2 = measures_of(sweep2, grid2, n_boot=250, seed=5)
    for config in ("int4:layers0", "int8:layers50"):
        ref = stats.disparity_difference(sweep2.scores, config, lr_langs=["he", "sw"], hr_langs=["en", "de"],
                                         metric="delta_bpb", n_boot=250, seed=5)
        row = m2.table.set_index("config").loc[config]
        assert (row["disparity"], row["disparity_ci_low"], row["disparity_ci_high"]) == pytest.approx(
            (ref.value, ref.ci_low, ref.ci_high), abs=1e-12)
        ratio = stats.disparity(sweep2.scores, config, lr_langs=["he", "sw"], hr_langs=["en", "de"],
                                n_boot=250, seed=5)
        assert (row["ratio"], row["ratio_ci_low"], row["ratio_ci_high"]) == pytest.approx(
            (ratio.value, ratio.ci_low, ratio.ci_high), rel=1e-12)
        # the replicates the fit is refitted on, by hand: one shared resample of the 12 parallel texts
        # (equal byte counts, so a language's change is the resampled mean of its per-text changes)
        counts = stats.bootstrap_counts(12, 250, np.random.default_rng(5))
        df = sweep2.scores.set_index(["config", "lang", "text_id"])["nll"]
        per_text = {lang: ((df[config][lang] - df["fp"][lang]) / LN2 / 300).sort_index().to_numpy() for lang in ("en", "de", "he", "sw")}
        group = lambda langs: np.mean([counts @ per_text[g] / 12 for g in langs], axis=0)  # noqa: E731
        np.testing.assert_allclose(m2.disparity_reps[config].to_numpy(), group(["he", "sw"]) - group(["en", "de"]), atol=1e-12)


def test_fit_excludes_collapsed_cells_with_their_reason():
    sweep, grid = planted_grid(seed_law, noise=0.0, collapsed_bits=(3,))
    fit = rd.fit_grid(measures_of(sweep, grid), models=["seed"], n_fit_boot=5)
    assert len(fit.cells) == 15 and set(fit.cells["bits"]) == {4, 6, 8}
    assert len(fit.excluded) == 5 and fit.excluded["reason"].str.startswith("collapsed").all()
    for name, true in TRUTH.items():
        assert fit.fits["seed"].params[name] == pytest.approx(true, rel=1e-6)


def test_all_cells_collapsed_gives_undefined_estimates_not_errors():
    sweep, grid = planted_grid(seed_law, collapsed_bits=tuple(BITS))
    fit = rd.fit_grid(measures_of(sweep, grid), n_fit_boot=5)
    assert fit.cells.empty and len(fit.excluded) == 20
    b = fit.estimate("seed", "b")
    assert not b.defined and b.reason.startswith("too few")
    assert not fit.loo_difference("exp").defined
    assert stats.verdict(b, 0.0, ">") == stats.INCONCLUSIVE


# --------------------------------------------------------------------------- policies and layer orders


def test_layer_policy_rules_by_hand():
    shares = {0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25}
    reach = rd.ProtectionPolicy("layers", (0, 3, 1, 2), "reach")
    nearest = rd.ProtectionPolicy("layers", (0, 3, 1, 2), "nearest")
    assert [reach.n_layers_for(p, shares) for p in (0, 10, 20, 30, 50)] == [0, 1, 1, 2, 2]
    assert [nearest.n_layers_for(p, shares) for p in (0, 10, 20, 30, 50)] == [0, 0, 1, 1, 2]
    assert reach.spec(30, shares).layers == (0, 3)
    assert reach.spec(0, shares).is_empty
    assert rd.ProtectionPolicy("magnitude").spec(20).magnitude_fraction == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="more layers"):
        rd.ProtectionPolicy("layers", (0,)).spec(50, shares)
    with pytest.raises(ConfigError, match=r"\[0, 100\)"):
        reach.spec(100, shares)
    with pytest.raises(ConfigError, match="unknown protection policy"):
        rd.ProtectionPolicy("random")
    with pytest.raises(ConfigError, match="layer_order"):
        rd.ProtectionPolicy("layers")


def test_layer_orders_recover_a_planted_high_variance_layer(tiny_model):
    lm = copy.deepcopy(tiny_model("gpt2").model)
    with torch.no_grad():
        for param in lm.transformer.h[2].parameters():
            param.mul_(10.0)  # layer 2 now has by far the largest weight variance
    assert rd.layer_order(lm, "gateway-variance") == (0, 3, 2, 1)
    assert rd.layer_order(lm, "variance")[0] == 2
    assert rd.layer_order(lm, "index") == (0, 1, 2, 3)
    assert rd.layer_order(lm, "gateway-index") == (0, 3, 1, 2)
    crit = pd.Series({0: 0.0, 1: 0.1, 2: 0.9, 3: 0.0})
    assert rd.layer_order(lm, "gateway-criticality", criticality=crit) == (0, 3, 2, 1)
    assert rd.layer_order(lm, "criticality", criticality=crit) == (2, 1, 0, 3)
    assert rd.layer_order(lm, [-1, 0]) == (3, 0)
    with pytest.raises(ConfigError, match="criticality="):
        rd.layer_order(lm, "gateway-criticality")
    with pytest.raises(ConfigError, match="unknown layer order"):
        rd.layer_order(lm, "random")
    with pytest.raises(ConfigError, match="out of range"):
        rd.layer_order(lm, [0, 7])


def test_bad_grid_inputs_name_the_fix(tiny_model):
    lm = tiny_model("gpt2")
    with pytest.raises(ConfigError, match="2..8"):
        rd.rd_grid(lm, [1, 4], [0, 10])
    with pytest.raises(ConfigError, match="repeats"):
        rd.rd_grid(lm, [4, 4], [0, 10])
    with pytest.raises(ConfigError, match=r"\[0, 100\)"):
        rd.rd_grid(lm, [4], [0, 0.1, 120])
    with pytest.raises(ConfigError, match="unknown protection policy"):
        rd.rd_grid(lm, [4], [0, 10], policies="random")
    with pytest.raises(ConfigError, match="models must be"):
        rd.fit_grid(measures_of(*planted_grid(seed_law)), models="seed")


# --------------------------------------------------------------------------- a real grid


def test_tiny_gpt2_grid_table_shape_and_hand_counted_fractions(tiny_model):
    from qhelpers.measure.scoring import MeasureConfig
    from qhelpers.measure.sweep import run_sweep
    from qhelpers.text.corpora import load_corpus

    lm = tiny_model("gpt2")
    grid = rd.rd_grid(lm, [2, 4], [0, 30], ["layers", "magnitude"], order="gateway-index")
    # 2 bits x {none, layers30, magnitude30}: the unprotected cell is shared by both policies
    assert list(grid.variants) == ["int2:none", "int2:layers30", "int4:none", "int4:layers30",
                                   "int2:magnitude30", "int4:magnitude30"]
    assert len(grid.cells) == 8
    # tiny:gpt2: 4 layers of 49152 linear weights each (c_attn 64x192, attn c_proj 64x64, c_fc 64x256,
    # mlp c_proj 256x64), 25 % each: reaching 30 % takes two whole layers, L0 and L_last
    assert grid.cells.set_index("config").loc["int4:layers30", "protected_layers"] == [0, 3]

    corpus = load_corpus("udhr", langs=["en", "he"], n_texts=4, seed=0)
    sweep = run_sweep(lm, corpus, grid.variants, MeasureConfig(max_length=64), progress=False)
    m = rd.grid_measures(sweep, grid, lr_langs=["he"], hr_langs=["en"], n_boot=50)
    assert m.table.shape[0] == 8 and m.disparity_reps.shape == (50, 6)
    t = m.table.drop_duplicates("config").set_index("config")
    assert t.loc["int4:none", "p"] == 0.0
    assert t.loc["int4:layers30", "p"] == 0.5  # 2 x 49152 / 196608
    # magnitude: per tensor round(0.3 * numel) largest |w| kept: 3686 + 1229 + 4915 + 4915 = 14745 of 49152
    assert t.loc["int4:magnitude30", "p"] == pytest.approx(14745 / 49152, abs=1e-15)
    assert t.loc["int2:layers30", "effective_bits"] == pytest.approx(0.5 * 2 + 0.5 * 16)
    # protected share of ALL parameters: the two layers' 49984 parameters each (norms and biases included)
    total = sum(p.numel() for p in lm.model.parameters())
    assert t.loc["int4:layers30", "protected_fraction"] == pytest.approx(2 * 49984 / total)
    # a random-init tiny model is collapsed (bpb > 8): every disparity undefined, with the reason
    assert not t["defined"].any() and t["reason"].str.startswith("collapsed").all()
    # computed anyway (collapse rule lifted), the cells equal stats' own disparity_difference
    m2 = rd.grid_measures(sweep, grid, lr_langs=["he"], hr_langs=["en"], n_boot=50, collapse_bpb=1e9)
    ref = stats.disparity_difference(sweep.scores, "int2:layers30", lr_langs=["he"], hr_langs=["en"],
                                     metric="delta_bpb", n_boot=50, collapse_bpb=1e9)
    row = m2.table.drop_duplicates("config").set_index("config").loc["int2:layers30"]
    assert math.isfinite(ref.ci_low)  # 4 texts: a studentized interval exists (<= 3 texts: unbounded)
    assert (row["disparity"], row["disparity_ci_low"]) == pytest.approx((ref.value, ref.ci_low), abs=1e-12)


def test_gap_is_the_unprotected_cell_at_the_smallest_defined_bit_width():
    sweep, grid = planted_grid(seed_law, noise=0.0, collapsed_bits=(3,))
    m = measures_of(sweep, grid, n_boot=50)
    gap = m.gap()
    assert m.gap_cell() == (4, 0.0)  # INT3 collapsed, so INT4 with nothing protected
    assert gap.defined and gap.value == pytest.approx(float(seed_law(4, 0.0)))
    assert gap.n == 30

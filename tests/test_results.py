"""Tests of qhelpers.report.results: hypotheses, JSON conversion, atomic writes, results.json."""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from qhelpers.report import results
from qhelpers.report.results import HYPOTHESIS_KEYS, RESULTS_KEYS, Hypothesis
from qhelpers.stats.bootstrap import Estimate
from qhelpers.util.errors import ConfigError, MeasurementError

ENV = {"python": "3.11", "packages": {}, "device": {"cuda": False}, "git": None, "timestamp": "t"}


@pytest.fixture(autouse=True)
def _no_git_subprocess(monkeypatch):
    """Never run git against the real checkout from the tests (the dirty check)."""
    monkeypatch.setattr(results, "_git_dirty", lambda work_tree: None)


# --------------------------------------------------------------------------- Hypothesis


def test_hypothesis_evaluate_computes_verdicts():
    h = Hypothesis.evaluate("H5", "gateway protection cuts disparity", Estimate(41.0, 33.0, 50.0, 60), 30, ">",
                            quantity="disparity reduction (%)")
    assert h.verdict == "SUPPORTED" and h.value == 41.0 and h.ci_low == 33.0 and h.n == 60
    assert "disparity reduction (%) > 30" in h.criterion and "95%" in h.criterion
    assert Hypothesis.evaluate("H", "s", Estimate(20.0, 10.0, 29.0, 60), 30).verdict == "NOT_SUPPORTED"
    assert Hypothesis.evaluate("H", "s", Estimate(31.0, 10.0, 50.0, 60), 30).verdict == "INCONCLUSIVE"
    und = Hypothesis.evaluate("H", "s", Estimate.undefined("collapsed: q/sw bpb=9", 60), 30, notes="seed protocol")
    assert und.verdict == "INCONCLUSIVE" and math.isnan(und.value)
    assert und.notes.startswith("seed protocol") and "collapsed: q/sw" in und.notes
    corr = {"r": -0.85, "ci_low": -0.97, "ci_high": -0.75, "n": 12, "defined": True, "p_perm": 0.01,
            "perm_exact": True, "p_parametric": 0.015, "method": "pearson", "level": 0.95}
    h2 = Hypothesis.evaluate("H2", "kurtosis predicts degradation", corr, 0.7, abs_value=True)
    assert h2.verdict == "SUPPORTED" and h2.value == -0.85 and h2.n == 12
    assert "|r| > 0.7" in h2.criterion and "p_perm=0.01" in h2.notes
    assert set(h2.to_dict()) == set(HYPOTHESIS_KEYS)
    few = Hypothesis.evaluate("H2", "kurtosis predicts degradation", {**corr, "n": 7}, 0.7, abs_value=True)
    assert few.verdict == "INCONCLUSIVE" and "too few pairs (n = 7 < 10)" in few.notes


def test_hypothesis_rejects_hand_written_verdict():
    with pytest.raises(ConfigError, match="evaluate"):
        Hypothesis("H1", "s", "c", 1.0, 0.0, 2.0, "TRUE", 3)


# --------------------------------------------------------------------------- to_jsonable


@dataclass
class _DC:
    a: float
    p: Path


def test_to_jsonable_conversions():
    df = pd.DataFrame({"lang": ["en", "he"], "v": [1.5, np.nan]})
    obj = {
        "f": np.float32(2.5), "i": np.int64(3), "b": np.bool_(True), "nan": float("nan"),
        "inf": np.float64(np.inf), "arr": np.array([[1.0, np.nan], [np.inf, 2.0]]),
        "df": df, "series": pd.Series({"a": 1, "b": np.nan}), "dc": _DC(math.nan, Path("/x/y.png")),
        "est": Estimate.undefined("denominator <= 0: x", 4), "dtype": torch.float16,
        "device": torch.device("cpu"), "tensor": torch.tensor([1.0, float("nan")]), 1: "int key",
        "set": {3, 1, 2}, "tuple": (1, 2), "na": pd.NA, "nat": pd.NaT,
    }
    out = results.to_jsonable(obj)
    assert out["f"] == 2.5 and isinstance(out["i"], int) and out["b"] is True
    assert out["nan"] is None and out["inf"] is None
    assert out["arr"] == [[1.0, None], [None, 2.0]]
    assert out["df"] == [{"lang": "en", "v": 1.5}, {"lang": "he", "v": None}]
    assert out["series"] == {"a": 1.0, "b": None}
    assert out["dc"] == {"a": None, "p": "/x/y.png"}
    assert out["est"]["value"] is None and out["est"]["reason"] == "denominator <= 0: x"
    assert out["dtype"] == "torch.float16" and out["device"] == "cpu"
    assert out["tensor"] == [1.0, None] and out["1"] == "int key"
    assert out["set"] == [1, 2, 3] and out["tuple"] == [1, 2] and out["na"] is None and out["nat"] is None
    json.dumps(out, allow_nan=False)  # strictly valid JSON
    with pytest.raises(ConfigError, match=r"\$\['metrics'\]\['bad'\]"):
        results.to_jsonable({"metrics": {"bad": object()}})


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_keeps_existing_file_when_serialisation_fails(tmp_path):
    target = tmp_path / "results.json"
    results.atomic_write_json(target, {"ok": 1})
    before = target.read_text()
    with pytest.raises(ConfigError):
        results.atomic_write_json(target, {"ok": 2, "bad": object()})
    assert target.read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["results.json"]


def test_atomic_write_cleans_up_when_replace_fails(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    results.atomic_write_text(target, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        results.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]


def test_atomic_write_text_creates_folder(tmp_path):
    p = results.atomic_write_text(tmp_path / "a" / "b.txt", "héllo")
    assert p.read_text(encoding="utf-8") == "héllo"
    assert os.listdir(tmp_path / "a") == ["b.txt"]


# --------------------------------------------------------------------------- results.json


def _hyps():
    return [
        Hypothesis.evaluate("H5", "protecting L0+L_final cuts disparity by > 30 %", Estimate(41.0, 33.0, 50.0, 60), 30,
                            primary=True),
        Hypothesis.evaluate("H1", "ratio defined", Estimate.undefined("unbounded CI: x", 60, value=2.0), 1.0),
    ]


def test_write_read_round_trip(tmp_path):
    (tmp_path / "bars.png").write_bytes(b"\x89PNG")
    metrics = {"disparity": Estimate(2.5, 2.0, 3.0, 60), "table": pd.DataFrame({"x": [1.0, np.nan]}), "nan": np.nan}
    path = results.write_results(
        tmp_path, "exp005", {"n_boot": 2000, "langs": ("en", "he")}, metrics, _hyps(),
        figures=["bars.png"], model_metadata={"name": "facebook/opt-125m", "dtype": torch.float32},
        environment=ENV,
    )
    assert path == tmp_path / "results.json"
    raw = path.read_text()
    assert "NaN" not in raw and "Infinity" not in raw and "null" in raw
    doc = results.read_results(tmp_path)
    assert list(doc) == list(RESULTS_KEYS)
    assert doc["experiment_id"] == "exp005" and doc["parameters"] == {"n_boot": 2000, "langs": ["en", "he"]}
    assert doc["environment"] == ENV and doc["model"] == {"name": "facebook/opt-125m", "dtype": "torch.float32"}
    assert doc["metrics"]["disparity"]["value"] == 2.5 and doc["metrics"]["nan"] is None
    assert doc["metrics"]["table"] == [{"x": 1.0}, {"x": None}]
    assert doc["figures"] == ["bars.png"]
    assert [list(h) for h in doc["hypotheses"]] == [list(HYPOTHESIS_KEYS)] * 2
    h5, h1 = doc["hypotheses"]
    assert h5["verdict"] == "SUPPORTED" and h5["ci_low"] == 33.0 and h5["n"] == 60
    assert h1["verdict"] == "INCONCLUSIVE" and h1["value"] == 2.0 and h1["ci_low"] is None
    assert doc["created"].endswith("+00:00")
    assert sorted(os.listdir(tmp_path)) == ["bars.png", "results.json"]


def test_write_results_validation(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        results.write_results(tmp_path, "e", {}, {}, _hyps(), figures=["missing.png"], environment=ENV)
    with pytest.raises(ConfigError, match="Hypothesis"):
        results.write_results(tmp_path, "e", {}, {}, [{"id": "H1"}], environment=ENV)
    h = _hyps()[0]
    with pytest.raises(ConfigError, match="more than once"):
        results.write_results(tmp_path, "e", {}, {}, [h, h], environment=ENV)
    assert not (tmp_path / "results.json").exists()
    (tmp_path / "results.json").write_text(json.dumps({"experiment_id": "x"}))
    with pytest.raises(MeasurementError, match="lacks keys"):
        results.read_results(tmp_path / "results.json")


def test_print_verdicts_aligned(capsys):
    text = results.print_verdicts(_hyps())
    assert capsys.readouterr().out.strip() == text.strip()
    lines = text.splitlines()
    assert len(lines) == 3 and lines[0].startswith("id")
    col = lines[0].index("verdict")
    assert lines[1][col:].startswith("SUPPORTED") and lines[2][col:].startswith("INCONCLUSIVE")
    assert "41 [33, 50]" in lines[1] and "2 [nan, nan]" in lines[2]
    assert lines[0].split()[:5] == ["id", "family", "verdict", "raw", "verdict"]


def test_print_verdicts_primary_first_then_families_then_sanity_checks():
    hyps = [
        Hypothesis.evaluate("S1", "one more fp layer is closer to fp", E(0.5, 0.3, 0.7), 0.0, kind="sanity check"),
        Hypothesis.evaluate("A1", "a", E(0.5, 0.3, 0.7), 0.0, family="a"),
        Hypothesis.evaluate("B1", "b", E(0.5, 0.3, 0.7), 0.0, family="b"),
        Hypothesis.evaluate("A2", "a", E(0.5, 0.3, 0.7), 0.0, family="a"),
        Hypothesis.evaluate("P", "main", E(0.5, 0.3, 0.7), 0.0, primary=True),
    ]
    text = results.print_verdicts(hyps, file=io.StringIO())
    assert [line.split()[0] for line in text.splitlines()[1:]] == ["P", "A1", "A2", "B1", "S1"]
    assert [line.split()[1] for line in text.splitlines()[1:]] == ["primary", "a", "a", "b", "sanity"]


# --------------------------------------------------------------------------- environment


def test_environment_info_without_gpu_requirements(tmp_path):
    env = results.environment_info()
    assert set(env) >= {"python", "platform", "packages", "device", "git", "timestamp"}
    assert env["packages"]["numpy"] == np.__version__
    assert env["packages"]["pandas"] == pd.__version__
    assert env["packages"]["torch"] is not None and "bitsandbytes" in env["packages"]
    assert isinstance(env["packages"]["qhelpers"], str)
    assert env["device"]["cpu_count"] == os.cpu_count() and isinstance(env["device"]["cuda"], bool)
    if env["git"] is not None and env["git"]["commit"] is not None:
        assert len(env["git"]["commit"]) == 40
    json.dumps(results.to_jsonable(env), allow_nan=False)


def test_git_info_reads_refs_without_git(tmp_path):
    assert results.git_info(tmp_path) is None or str(tmp_path).startswith(results.git_info(tmp_path)["root"])
    repo = tmp_path / "repo"
    (repo / ".git" / "refs" / "heads").mkdir(parents=True)
    sha = "a" * 40
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / ".git" / "packed-refs").write_text(f"# pack-refs with: peeled\n{sha} refs/heads/main\n")
    (repo / "pkg").mkdir()
    info = results.git_info(repo / "pkg")
    assert info == {"commit": sha, "branch": "main", "dirty": None, "root": str(repo.resolve())}
    (repo / ".git" / "refs" / "heads" / "main").write_text("b" * 40 + "\n")  # loose ref wins
    assert results.git_info(repo)["commit"] == "b" * 40
    (repo / ".git" / "HEAD").write_text("c" * 40 + "\n")  # detached
    assert results.git_info(repo)["commit"] == "c" * 40 and results.git_info(repo)["branch"] is None


def test_hypothesis_sentence_states_the_verdict_plainly():
    from qhelpers.report.results import Hypothesis
    from qhelpers.stats.bootstrap import Estimate

    h = Hypothesis.evaluate("H5", "gateway protection cuts disparity by >30%", Estimate(12.0, -3.0, 20.0, 80), 30.0, ">")
    assert h.verdict == "NOT_SUPPORTED"
    assert h.sentence().startswith("H5 (gateway protection cuts disparity by >30%): NOT_SUPPORTED: the data contradict it; observed 12")
    assert "n = 80" in h.sentence()


def test_seed_everything_makes_torch_and_numpy_repeatable():
    import numpy as np
    import torch

    from qhelpers.report.results import seed_everything

    seed_everything(7)
    a = (torch.rand(3), np.random.rand(3))
    seed_everything(7)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


# --------------------------------------------------------------------------- families, premises, primaries


def E(value, lo, hi, n=50):
    return Estimate(value, lo, hi, n)


def test_evaluate_records_family_kind_min_effect_and_direction():
    h = Hypothesis.evaluate("H1", "LR lose more bits", E(0.05, 0.02, 0.08), 0.0, "<", family="layers", min_effect=0.01)
    assert (h.family, h.kind, h.primary, h.min_effect, h.threshold, h.direction) == ("layers", "finding", False, 0.01, 0.0, "<")
    assert h.verdict == h.raw_verdict == "NOT_SUPPORTED" and h.adjusted is None
    p = Hypothesis.evaluate("H0", "main", E(0.05, 0.02, 0.08), 0.0, primary=True, min_effect=0.01)
    assert p.family == "primary" and p.primary and p.verdict == "SUPPORTED"
    assert "by at least 0.01" in p.criterion and "above 0.01" in p.criterion
    # the practical size decides: the same interval with min_effect 0.03 straddles 0.03
    assert Hypothesis.evaluate("H0", "main", E(0.05, 0.02, 0.08), 0.0, min_effect=0.03).verdict == "INCONCLUSIVE"
    assert Hypothesis.evaluate("H0", "main", E(0.05, 0.02, 0.08), 0.0, min_effect=0.1).verdict == "NOT_SUPPORTED"
    with pytest.raises(ConfigError, match="reserved"):
        Hypothesis.evaluate("H", "s", E(1, 0.5, 2), 0.0, family="primary")
    with pytest.raises(ConfigError, match="primary=True"):
        Hypothesis.evaluate("H", "s", E(1, 0.5, 2), 0.0, family="layers", primary=True)
    with pytest.raises(ConfigError, match="kind"):
        Hypothesis.evaluate("H", "s", E(1, 0.5, 2), 0.0, kind="tautology")
    with pytest.raises(ConfigError, match="must be a finding"):
        Hypothesis.evaluate("H", "s", E(1, 0.5, 2), 0.0, kind="sanity check", primary=True)


def test_premise_not_met_makes_dependents_inconclusive_with_the_reason():
    # SmolLM2: LR languages lose LESS than HR (D = -0.25 [-0.31, -0.18])
    premise = Hypothesis.evaluate("P-D", "LR languages lose more than HR", E(-0.25, -0.31, -0.18), 0.0,
                                  family="premises", min_effect=0.01)
    assert premise.verdict == "NOT_SUPPORTED"
    h = Hypothesis.evaluate("H5", "protecting L0 + L_final reduces the disparity", E(40.0, 35.0, 45.0), 30.0,
                            premise=premise, family="protection")
    assert h.verdict == "INCONCLUSIVE" and h.raw_verdict == "INCONCLUSIVE"
    assert "premise not met (P-D: -0.25 [-0.31, -0.18], NOT_SUPPORTED)" in h.notes
    assert h.premise["id"] == "P-D" and h.premise["verdict"] == "NOT_SUPPORTED"
    assert "premise P-D" in h.sentence() and "is not met" in h.sentence()
    assert math.isnan(h.p_support)  # not tested: must not lower the Holm multipliers of its family
    # a premise that holds leaves the verdict to the interval
    ok = Hypothesis.evaluate("P-D", "LR languages lose more", E(0.25, 0.18, 0.31), 0.0, family="premises")
    h = Hypothesis.evaluate("H5", "protecting reduces the disparity", E(40.0, 35.0, 45.0), 30.0, premise=ok)
    assert h.verdict == "SUPPORTED" and "premise" not in h.notes and h.premise["verdict"] == "SUPPORTED"
    inconclusive = Hypothesis.evaluate("P-D", "LR languages lose more", E(0.1, -0.1, 0.3), 0.0, family="premises")
    assert Hypothesis.evaluate("H5", "s", E(40.0, 35.0, 45.0), 30.0, premise=inconclusive).verdict == "INCONCLUSIVE"
    with pytest.raises(ConfigError, match="premise must be a Hypothesis"):
        Hypothesis.evaluate("H5", "s", E(40.0, 35.0, 45.0), 30.0, premise={"id": "P"})


def test_adjust_families_holm_within_each_family_only():
    # one-sided p of E(v, lo, hi) for '> 0' at lo -> the normal approximation; pick intervals whose p
    # lie near 0.02 so that a family of three loses them, a family of one does not
    weak = E(0.5, 0.01, 0.9)  # raw SUPPORTED, p ~ 0.023
    strong = E(0.5, 0.3, 0.9)  # p ~ 5e-7
    hyps = [
        Hypothesis.evaluate("P", "main", weak, 0.0, primary=True),
        Hypothesis.evaluate("A1", "a", weak, 0.0, family="a"),
        Hypothesis.evaluate("A2", "a", weak, 0.0, family="a"),
        Hypothesis.evaluate("A3", "a", strong, 0.0, family="a"),
        Hypothesis.evaluate("B1", "b", weak, 0.0, family="b"),
        Hypothesis.evaluate("S", "sanity", weak, 0.0, kind="sanity check"),
    ]
    out = results.adjust_families(hyps)
    by = {h.id: h for h in out}
    assert [h.id for h in out] == [h.id for h in hyps]  # same order
    assert by["P"].verdict == "SUPPORTED" and by["P"].adjusted["family_size"] == 1  # family of one: unchanged
    assert by["B1"].verdict == "SUPPORTED"
    assert by["A3"].verdict == "SUPPORTED"
    for hid in ("A1", "A2"):  # p ~ 0.023 x 2 > 0.025
        assert by[hid].raw_verdict == "SUPPORTED" and by[hid].verdict == "INCONCLUSIVE"
        assert by[hid].adjusted["method"] == "holm" and by[hid].adjusted["family_size"] == 3
        assert by[hid].adjusted["p_adjusted"] == pytest.approx(2 * by[hid].adjusted["p_raw"])
        assert "does not survive the adjustment" in by[hid].sentence()
    assert by["S"].adjusted is None and by["S"].verdict == "SUPPORTED"  # sanity checks are not adjusted
    assert "not counted as a finding" in by["S"].sentence()
    assert results.adjust_families(out) == out  # idempotent


def test_adjusted_never_more_decisive_than_raw():
    rng = np.random.default_rng(2)
    hyps = []
    for i in range(30):
        lo = float(rng.normal(0, 0.3))
        hyps.append(Hypothesis.evaluate(f"H{i}", "s", E(lo + 0.2, lo, lo + 0.4, n=int(rng.integers(5, 40))), 0.0,
                                        family=f"f{i % 3}", min_effect=float(rng.choice([0.0, 0.05]))))
    for h in results.adjust_families(hyps):
        assert h.verdict in (h.raw_verdict, "INCONCLUSIVE")


def test_write_results_needs_exactly_one_primary(tmp_path):
    a = Hypothesis.evaluate("H1", "s", E(1.0, 0.5, 1.5), 0.0)
    b = Hypothesis.evaluate("H2", "s", E(1.0, 0.5, 1.5), 0.0)
    with pytest.raises(ConfigError, match=r"exactly one hypothesis must be primary.*got none.*primary=True"):
        results.write_results(tmp_path, "e", {}, {}, [a, b], environment=ENV)
    p1 = Hypothesis.evaluate("H1", "s", E(1.0, 0.5, 1.5), 0.0, primary=True)
    p2 = Hypothesis.evaluate("H2", "s", E(1.0, 0.5, 1.5), 0.0, primary=True)
    with pytest.raises(ConfigError, match=r"got 2 \(H1, H2\)"):
        results.write_results(tmp_path, "e", {}, {}, [p1, p2], environment=ENV)
    assert not (tmp_path / "results.json").exists()
    results.write_results(tmp_path, "e", {}, {}, [p1, b], environment=ENV)
    assert (tmp_path / "results.json").is_file()


def test_write_results_writes_adjusted_verdicts(tmp_path):
    weak = E(0.5, 0.01, 0.9)
    hyps = [Hypothesis.evaluate("P", "main", weak, 0.0, primary=True),
            Hypothesis.evaluate("A1", "a", weak, 0.0, family="a"),
            Hypothesis.evaluate("A2", "a", weak, 0.0, family="a")]
    results.write_results(tmp_path, "e", {}, {}, hyps, environment=ENV)
    doc = results.read_results(tmp_path)
    a1 = doc["hypotheses"][1]
    assert list(a1) == list(HYPOTHESIS_KEYS)
    assert a1["verdict"] == "INCONCLUSIVE" and a1["raw_verdict"] == "SUPPORTED" and a1["family"] == "a"
    assert a1["adjusted"]["family_size"] == 2 and a1["adjusted"]["verdict"] == "INCONCLUSIVE"
    assert doc["hypotheses"][0]["primary"] is True and doc["hypotheses"][0]["verdict"] == "SUPPORTED"
    assert a1["threshold"] == 0.0 and a1["direction"] == ">" and a1["kind"] == "finding" and a1["premise"] is None


def test_old_results_json_without_the_new_keys_is_readable(tmp_path):
    from qhelpers.runner.records import hypotheses_of

    old = {"id": "H1", "statement": "s", "criterion": "c", "value": 1.0, "ci_low": 0.5, "ci_high": 1.5,
           "verdict": "SUPPORTED", "n": 4, "notes": ""}
    doc = {"experiment_id": "x", "parameters": {}, "environment": {}, "model": None, "metrics": {},
           "hypotheses": [old], "figures": [], "created": "t"}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    (h,) = results.read_results(tmp_path)["hypotheses"]
    assert h["verdict"] == h["raw_verdict"] == "SUPPORTED" and h["primary"] is False
    assert h["family"] == "secondary" and h["kind"] == "finding" and h["adjusted"] is None
    (r,) = hypotheses_of(doc)
    assert r["family"] == "secondary" and r["raw_verdict"] == "SUPPORTED" and r["primary"] is False
    assert results.print_verdicts([h], file=io.StringIO()).splitlines()[1].split()[:3] == ["H1", "secondary", "SUPPORTED"]
    bad = {**doc, "hypotheses": [{**old, "surprise": 1}]}
    (tmp_path / "results.json").write_text(json.dumps(bad))
    with pytest.raises(MeasurementError, match="surprise"):
        results.read_results(tmp_path)


def test_agreeing_decides_only_when_both_analyses_agree():
    # H1.3: SUPPORTED with every token row (r = 0.53), NOT_SUPPORTED without 11 massive-activation rows (r = -0.40)
    corr = lambda r, lo, hi: {"r": r, "ci_low": lo, "ci_high": hi, "n": 30, "defined": True}  # noqa: E731
    all_rows = Hypothesis.evaluate("H1.3-all", "all token rows", corr(0.53, 0.2, 0.75), 0.0)
    without = Hypothesis.evaluate("H1.3-robust", "massive rows dropped", corr(-0.40, -0.65, -0.1), 0.0)
    h = results.agreeing(all_rows, without, id="H1.3", statement="critical layers vary more across languages",
                         primary=True)
    assert h.verdict == h.raw_verdict == "INCONCLUSIVE" and h.id == "H1.3" and h.primary and h.family == "primary"
    assert ("the two analyses disagree (H1.3-all: SUPPORTED, 0.53 [0.2, 0.75]; "
            "H1.3-robust: NOT_SUPPORTED, -0.4 [-0.65, -0.1])") in h.notes
    both = Hypothesis.evaluate("H1.3-robust", "massive rows dropped", corr(0.45, 0.15, 0.7), 0.0)
    h = results.agreeing(all_rows, both, id="H1.3", family="robustness")
    assert h.verdict == "SUPPORTED" and h.family == "robustness" and "agree" in h.notes
    assert h.value == 0.53 and h.p_support == max(all_rows.p_support, both.p_support)
    assert "decided only when H1.3-robust" in h.criterion
    disagree = results.agreeing(all_rows, without, family="robustness")
    assert math.isnan(disagree.p_support) and math.isnan(disagree.p_contra)

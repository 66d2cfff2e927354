"""Tests of qhelpers.report.results: hypotheses, JSON conversion, atomic writes, results.json."""
from __future__ import annotations

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
    corr = {"r": -0.85, "ci_low": -0.97, "ci_high": -0.75, "n": 7, "defined": True, "p_perm": 0.01,
            "perm_exact": True, "p_parametric": 0.015, "method": "pearson", "level": 0.95}
    h2 = Hypothesis.evaluate("H2", "kurtosis predicts degradation", corr, 0.7, abs_value=True)
    assert h2.verdict == "SUPPORTED" and h2.value == -0.85 and h2.n == 7
    assert "|r| > 0.7" in h2.criterion and "p_perm=0.01" in h2.notes
    assert set(h2.to_dict()) == set(HYPOTHESIS_KEYS)


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
        Hypothesis.evaluate("H5", "protecting L0+L_final cuts disparity by > 30 %", Estimate(41.0, 33.0, 50.0, 60), 30),
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
        results.write_results(tmp_path, "e", {}, {}, [], figures=["missing.png"], environment=ENV)
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

    h = Hypothesis.evaluate("H5", "gateway protection cuts disparity by >30%", Estimate(12.0, -3.0, 20.0, 8), 30.0, ">")
    assert h.verdict == "NOT_SUPPORTED"
    assert h.sentence().startswith("H5 (gateway protection cuts disparity by >30%): NOT_SUPPORTED: the data contradict it; observed 12")
    assert "n = 8" in h.sentence()


def test_seed_everything_makes_torch_and_numpy_repeatable():
    import numpy as np
    import torch

    from qhelpers.report.results import seed_everything

    seed_everything(7)
    a = (torch.rand(3), np.random.rand(3))
    seed_everything(7)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])

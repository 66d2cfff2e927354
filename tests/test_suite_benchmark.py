"""benchmarks/suite_benchmark.py: the fixed cost per notebook from papermill's cell durations (a planted
notebook), and one real run of a fixture notebook through it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "notebooks"


@pytest.fixture(scope="module")
def suite_bench(load_benchmark):
    return load_benchmark("suite_benchmark")


def _executed(path: Path, cells: list[tuple[str, float | None]]) -> Path:
    doc = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# title"]}]
           + [{"cell_type": "code", "metadata": {} if d is None else {"papermill": {"duration": d}},
               "source": [src], "outputs": []} for src, d in cells],
           "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(doc))
    return path


def test_fixed_cost_counts_cells_up_to_the_model_load(suite_bench, tmp_path):
    nb = _executed(tmp_path / "x.ipynb", [
        ("# Colab only\nimport sys", 0.01), ("MODEL = 'tiny:gpt2'", None), ("MODEL = 'x'", 0.002),
        ("from qhelpers.models.loading import load_model", 2.5),
        ("loaded = load_model(MODEL)\ncorpus = load_corpus('udhr')", 3.5),
        ("sweep = run_sweep(loaded, corpus)", 20.0), ("fig = plot(sweep)", 1.0),
        ("loaded2 = load_model(OTHER)", 4.0),  # a later load is the experiment's work
    ])
    parts = suite_bench.fixed_cost(nb, 40.0)  # seconds rounded to 0.01
    assert parts["outside_cells_s"] == round(40.0 - 31.012, 2)
    assert parts["setup_cells_s"] == round(6.012, 2)
    assert parts["fixed_s"] == 15.0 and parts["work_s"] == 25.0
    assert parts["setup_until"] == "corpus = load_corpus('udhr')"
    assert parts["exposed_warm_s"] == parts["hidden_warm_s"] == 0.0  # a cold kernel
    warm = suite_bench.fixed_cost(nb, 40.0, {"kernel_s": 1.0, "warm_s": 5.5, "exposed_s": 2.25})
    assert warm["exposed_warm_s"] == 2.25 and warm["hidden_warm_s"] == 4.25
    assert warm["fixed_s"] == 17.25 and warm["work_s"] == 25.0  # the waited-for warm-up is fixed cost
    assert parts["slowest_cells"] == [[5, 20.0, "sweep = run_sweep(loaded, corpus)"],
                                      [7, 4.0, "loaded2 = load_model(OTHER)"],
                                      [4, 3.5, "corpus = load_corpus('udhr')"]]


def test_fixed_cost_without_a_model_load_stops_at_the_qhelpers_import(suite_bench, tmp_path):
    nb = _executed(tmp_path / "y.ipynb", [("N = 1", 0.0), ("import qhelpers", 1.5), ("work()", 10.0)])
    parts = suite_bench.fixed_cost(nb, 12.0)
    assert parts["setup_cells_s"] == pytest.approx(1.5) and parts["work_s"] == pytest.approx(10.0)
    nb = _executed(tmp_path / "z.ipynb", [("N = 1", 0.5), ("work()", 10.0)])
    parts = suite_bench.fixed_cost(nb, 12.0)
    assert parts["setup_cells_s"] == 0.0 and parts["fixed_s"] == pytest.approx(1.5)
    assert parts["setup_until"] is None


def test_suite_benchmark_times_a_real_run(suite_bench, tmp_path, capsys):
    out = tmp_path / "suite.json"
    rc = suite_bench.main(["--label", "fixture", "--out", str(out), "--commit", "abc", "--",
                           "--notebooks-dir", str(FIX), "--profiles", str(FIX / "profiles.yaml"), "--only", "a_ok"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["label"] == "fixture" and doc["commit"] == "abc" and doc["completed"] == 1 and doc["failed"] == []
    parts = doc["fixed_parts"]["a_ok"]
    # a_ok imports no qhelpers: its fixed cost is what the run spent outside its cells
    assert parts["setup_cells_s"] == 0.0 and parts["setup_until"] is None
    assert 0 < parts["outside_cells_s"] < doc["notebook_s"]["a_ok"] <= doc["wall_s"]
    # its warm kernel: started by its own worker (no worker ahead of it), so all of it was waited for
    assert parts["exposed_warm_s"] > 0 and parts["hidden_warm_s"] < 0.5
    assert parts["fixed_s"] + parts["work_s"] == pytest.approx(doc["notebook_s"]["a_ok"] + parts["exposed_warm_s"],
                                                               abs=0.02)
    assert doc["fixed_s"] == {"a_ok": parts["fixed_s"]} and doc["fixed_s_mean"] == doc["fixed_s_max"] == parts["fixed_s"]
    assert '"fixed_s_mean"' in capsys.readouterr().out
    assert "quick_suite_s" not in doc  # --only: not the whole quick suite
    assert suite_bench._is_quick_suite(["--device", "cuda", "--workers", "8"])
    assert not suite_bench._is_quick_suite(["--profile", "full"])

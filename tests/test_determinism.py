"""Same parameters on CPU give bit-identical metrics twice in a row (ci profile)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_ci(out: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "run_all.py"), "--profile", "ci", "--only", "exp005_layer_ablation", "--out", str(out)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def results(proc: subprocess.Popen, out: Path) -> dict:
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-3000:]
    return json.loads((out / "exp005_layer_ablation" / "results.json").read_text())


@pytest.mark.slow  # a minute on 2 cores; the goldens check every run's numbers to 6 significant digits
def test_ci_profile_metrics_are_bit_identical_twice(tmp_path):
    # two runs side by side (separate processes competing for the cores): no thread-count or timing
    # dependence may reach a number
    a, b = tmp_path / "a", tmp_path / "b"
    procs = run_ci(a), run_ci(b)
    first, second = results(procs[0], a), results(procs[1], b)
    for key in ("seconds",):
        first["metrics"].pop(key), second["metrics"].pop(key)
    assert first["metrics"] == second["metrics"]
    assert first["hypotheses"] == second["hypotheses"]
    assert first["parameters"] == second["parameters"]
    assert first["environment"]["packages"] == second["environment"]["packages"]

"""Same parameters on CPU give bit-identical metrics twice in a row (ci profile)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_ci(out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "run_all.py"), "--profile", "ci", "--only", "exp005_layer_ablation", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "exp005_layer_ablation" / "results.json").read_text())


def test_ci_profile_metrics_are_bit_identical_twice(tmp_path):
    first, second = run_ci(tmp_path / "a"), run_ci(tmp_path / "b")
    for key in ("seconds",):
        first["metrics"].pop(key), second["metrics"].pop(key)
    assert first["metrics"] == second["metrics"]
    assert first["hypotheses"] == second["hypotheses"]
    assert first["parameters"] == second["parameters"]
    assert first["environment"]["packages"] == second["environment"]["packages"]

#!/usr/bin/env python3
"""Regenerate tests/goldens/*.ipynb: every notebook executed under the ci profile.

Run after an intended change to a notebook or to numbers it prints:

    python scripts/update_goldens.py

then review `git diff tests/goldens` and commit.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    goldens = ROOT / "tests" / "goldens"
    goldens.mkdir(parents=True, exist_ok=True)
    for old in goldens.glob("*.ipynb"):
        old.unlink()
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(ROOT / "run_all.py"), "--profile", "ci", "--out", out, "--write-goldens", str(goldens)]
        return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())

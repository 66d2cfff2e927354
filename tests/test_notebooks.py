"""Notebook conventions: built from their sources, a parameters cell, a Colab badge, thin code."""
from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest

from qhelpers.report.record import PARAMETERS_MARKER

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def load_builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", ROOT / "scripts" / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_are_built_from_their_sources():
    assert load_builder().main(["--check"]) == 0, "run: python scripts/build_notebooks.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_conventions(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    cells = nb["cells"]
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 5 and all("id" in c for c in cells)
    assert cells[0]["cell_type"] == "markdown" and "colab-badge.svg" in "".join(cells[0]["source"])
    assert f"notebooks/{path.stem}.ipynb" in "".join(cells[0]["source"])
    code = [c for c in cells if c["cell_type"] == "code"]
    tagged = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    names = {t.id for node in ast.parse("".join(tagged[0]["source"])).body if isinstance(node, ast.Assign) for t in node.targets}
    assert {"MODEL", "DEVICE", "SEED", "OUTPUT_DIR"} <= names
    assert "".join(tagged[0]["source"]).startswith(PARAMETERS_MARKER), "current_parameters finds the cell by it"
    source = "\n".join("".join(c["source"]) for c in code)
    assert len(re.findall(r"^\s*(def|class) ", source, flags=re.M)) == 0, "computations belong in qhelpers"
    assert "google.colab" in source, "a setup cell that installs qhelpers only in Colab"
    assert "write_results(" in source and "Hypothesis.evaluate(" in source
    assert re.search(r"current_parameters\(\s*globals\(\)", source), "parameters are recorded from the parameters cell, not typed again"
    assert not any(o for c in code for o in c.get("outputs", [])), "sources carry no outputs"

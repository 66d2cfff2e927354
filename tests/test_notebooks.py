"""Notebook conventions: paired with their sources by jupytext, a parameters cell, a Colab badge, thin code."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
from pathlib import Path

import jupytext
import jupytext.cli
import pytest

from qhelpers.report.record import PARAMETERS_MARKER

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SOURCES = sorted((ROOT / "notebooks" / "src").glob("*.py"))


def test_notebooks_are_in_sync_with_their_sources(tmp_path):
    """``jupytext --sync notebooks/src/*.py`` (pairing in notebooks/jupytext.toml) would change no file."""
    copy = tmp_path / "notebooks"
    (copy / "src").mkdir(parents=True)
    shutil.copy(ROOT / "notebooks" / "jupytext.toml", copy)
    for path in NOTEBOOKS:
        shutil.copy(path, copy)
    for path in SOURCES:
        shutil.copy(path, copy / "src")
        os.utime(copy / "src" / path.name, (2e9, 2e9))  # the sources are newer: they are what gets edited
    assert {p.stem for p in SOURCES} == {p.stem for p in NOTEBOOKS}, "every notebook has a source and back"
    jupytext.cli.jupytext(["--sync", "--quiet", *map(str, sorted((copy / "src").glob("*.py")))])
    stale = [p.name for p in NOTEBOOKS if (copy / p.name).read_bytes() != p.read_bytes()]
    stale += [p.name for p in SOURCES if (copy / "src" / p.name).read_bytes() != p.read_bytes()]
    assert not stale, f"out of date: {stale}; run: jupytext --sync notebooks/src/*.py"


@pytest.mark.parametrize("path", SOURCES, ids=[p.stem for p in SOURCES])
def test_source_names_itself(path):
    notebook = jupytext.read(path)
    assert notebook.metadata["qhelpers"]["source"] == f"notebooks/src/{path.name}"
    assert notebook.metadata["qhelpers"]["purpose"], "the runner lists each notebook by its purpose"
    assert notebook.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_conventions(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    cells = nb["cells"]
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 5 and all("id" in c for c in cells)
    assert cells[0]["cell_type"] == "markdown" and "colab-badge.svg" in "".join(cells[0]["source"])
    assert f"notebooks/{path.stem}.ipynb" in "".join(cells[0]["source"])
    assert len({c["id"] for c in cells}) == len(cells), "cell ids are unique (jupytext --sync keeps them)"
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

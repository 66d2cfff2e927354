"""Tests of qhelpers.report.record: a notebook's parameters as run, read back from the cells the
kernel ran (papermill with an injected override, nbval without history, plain namespaces)."""
from __future__ import annotations

import json
import linecache
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

from qhelpers.report.record import PARAMETERS_MARKER, assigned_names, current_parameters
from qhelpers.util.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "notebooks" / "src").glob("*.py"))

PARAMETERS_CELL = f"""{PARAMETERS_MARKER}: a tiny notebook's
A = 1
B = [1, 2]
DEVICE = None
OUTPUT_DIR = "."
"""
RECORD_CELL = """import json
from pathlib import Path
from qhelpers.report.record import current_parameters

B.append(3)  # a value changed after the parameters cell counts as it is now
Path(OUTPUT_DIR, "parameters.json").write_text(json.dumps(current_parameters(globals(), DEVICE="cpu")))
"""


def parameters_cell(notebook) -> str:
    """The source of ``notebook``'s one cell tagged ``parameters``, which must start with the marker."""
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1 or not tagged[0].source.startswith(PARAMETERS_MARKER):
        raise ValueError(f"the cell tagged 'parameters' must start with the line {PARAMETERS_MARKER!r}")
    return tagged[0].source


def tiny_notebook(path: Path) -> Path:
    params = nbformat.v4.new_code_cell(PARAMETERS_CELL)
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(RECORD_CELL)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


# --------------------------------------------------------------------------- real kernels


@pytest.fixture(scope="module")
def papermill_run(tmp_path_factory):
    """The tiny notebook run by papermill with A and OUTPUT_DIR injected: (output notebook, results folder)."""
    papermill = pytest.importorskip("papermill")
    folder = tmp_path_factory.mktemp("record")
    out = folder / "out.ipynb"
    papermill.execute_notebook(str(tiny_notebook(folder / "in.ipynb")), str(out), kernel_name="python3",
                               parameters={"A": 5, "OUTPUT_DIR": str(folder)}, progress_bar=False)
    return out, folder


def test_papermill_run_records_the_injected_values(papermill_run):
    out, folder = papermill_run
    assert json.loads((folder / "parameters.json").read_text()) == {"A": 5, "B": [1, 2, 3], "DEVICE": "cpu"}
    injected = [c for c in nbformat.read(out, as_version=4).cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and injected[0].source.startswith("# Parameters")


def test_nbval_rerun_without_history_records_the_injected_values(papermill_run):
    """nbval executes cells with store_history=False, so ``In`` stays empty; the cells are found in
    IPython's cell cache instead."""
    pytest.importorskip("nbval")
    out, folder = papermill_run
    (folder / "parameters.json").unlink()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "--nbval-lax", "-p", "no:cacheprovider", str(out)],
                          cwd=folder, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((folder / "parameters.json").read_text()) == {"A": 5, "B": [1, 2, 3], "DEVICE": "cpu"}


# --------------------------------------------------------------------------- namespaces


def test_no_history_is_an_error_naming_the_marker(monkeypatch):
    monkeypatch.setattr(linecache, "cache", {})
    with pytest.raises(ConfigError, match="no parameters cell found") as info:
        current_parameters({"MODEL": "tiny:gpt2"})
    assert PARAMETERS_MARKER in str(info.value) and "write_results" in str(info.value)


def test_history_without_a_marked_cell_is_an_error(monkeypatch):
    monkeypatch.setattr(linecache, "cache", {})
    with pytest.raises(ConfigError, match="no parameters cell found"):
        current_parameters({"In": ["", "MODEL = 'x'\n"], "MODEL": "x"})


def test_last_parameters_cell_and_later_injected_cells_count():
    history = [
        "",
        f"{PARAMETERS_MARKER}\nOLD = 1\n",
        "# Parameters\nSTALE = 2\n",  # injected before the parameters cell was run again: ignored
        f"{PARAMETERS_MARKER}\nA = 1\nB: int = 2\nC, D = 3, 4\nOUTPUT_DIR = 'out'\nif A:\n    E = 5\n",
        "# Parameters\nA = 10\nEXTRA = 'x'\n",
        "A = 11\n",
    ]
    namespace = {"In": history, "A": 11, "B": 2, "C": 3, "D": 4, "E": 5, "EXTRA": "x", "OUTPUT_DIR": "out",
                 "OLD": 1, "STALE": 2}
    assert current_parameters(namespace) == {"A": 11, "B": 2, "C": 3, "D": 4, "E": 5, "EXTRA": "x"}
    assert list(current_parameters(namespace, leave_out=())) == ["A", "B", "C", "D", "OUTPUT_DIR", "E", "EXTRA"]
    assert current_parameters(namespace, B="resolved")["B"] == "resolved"


def test_resolved_value_must_name_a_parameter():
    namespace = {"In": [f"{PARAMETERS_MARKER}\nDEVICE = None\n"], "DEVICE": None}
    with pytest.raises(ConfigError, match=r"\['DEVCE'\] name no parameter"):
        current_parameters(namespace, DEVCE="cpu")


def test_a_deleted_parameter_is_an_error():
    with pytest.raises(ConfigError, match=r"parameters \['B'\] are not defined now"):
        current_parameters({"In": [f"{PARAMETERS_MARKER}\nA = 1\nB = 2\n"], "A": 1})


def test_assigned_names_skips_functions_attributes_and_subscripts():
    source = "import os\nA = 1\nA += 2\nx.y = 3\nz[0] = 4\nP, *Q = 1, 2, 3\ndef f():\n    H = 1\nN: int\n"
    assert assigned_names(source) == ["A", "P", "Q"]


# --------------------------------------------------------------------------- the notebooks


@pytest.mark.parametrize("path", SOURCES, ids=[p.stem for p in SOURCES])
def test_every_parameters_cell_starts_with_the_marker(path):
    assert parameters_cell(jupytext.read(path)).startswith(PARAMETERS_MARKER)
    assert "parameters = dict(" not in path.read_text(encoding="utf-8"), "record parameters with current_parameters"


def test_a_parameters_cell_without_the_marker_is_refused():
    source = '# %% tags=["parameters"]\nMODEL = "tiny:gpt2"\n'
    with pytest.raises(ValueError, match="must start with the line"):
        parameters_cell(jupytext.reads(source, fmt="py:percent"))

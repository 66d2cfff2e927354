"""The notebooks to run: finding and selecting them, and reading what the runner needs from one
(its cells, its purpose line, its expected run time, the hash of its code, whether it names its language)."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from qhelpers.runner.errors import RunnerError


def read_notebook(path: Path) -> Any:
    """The notebook at ``path`` (nbformat version 4)."""
    import nbformat

    with open(path, encoding="utf-8") as fh:
        return nbformat.read(fh, as_version=4)


def cell_source(cell: Any) -> str:
    """A cell's source as one string."""
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def find_parameters_cell(nb: Any) -> Any | None:
    """The first code cell tagged ``parameters`` (papermill's rule), or None."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code" and "parameters" in (cell.get("metadata", {}).get("tags") or []):
            return cell
    return None


def _qhelpers_metadata(nb: Any) -> Mapping[str, Any]:
    """The notebook's ``qhelpers`` metadata block ({} when absent or not a mapping)."""
    meta = nb.get("metadata", {}).get("qhelpers")
    return meta if isinstance(meta, Mapping) else {}


def notebook_purpose(path: str | os.PathLike) -> str:
    """One line: the notebook metadata ``qhelpers.purpose``, else its first markdown heading."""
    nb = read_notebook(Path(path))
    purpose = _qhelpers_metadata(nb).get("purpose")
    if purpose:
        return " ".join(str(purpose).split())
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        for line in cell_source(cell).splitlines():
            m = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
            if m and m.group(1):
                return m.group(1)
    return "(no purpose: add metadata qhelpers.purpose or a markdown heading)"


def notebook_expected_seconds(path: str | os.PathLike, profile: str) -> float | None:
    """How long the notebook is expected to run under ``profile``, in seconds: its metadata
    ``qhelpers.expected_s`` (``{profile: seconds}``, measured), the ``quick`` entry standing in for a
    profile it does not list; None without one. Only the order in which notebooks start uses it.
    A malformed entry raises RunnerError naming the notebook and the form expected."""
    expected = _qhelpers_metadata(read_notebook(Path(path))).get("expected_s")
    if expected is None:
        return None
    if not isinstance(expected, Mapping) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in expected.values()
    ):
        raise RunnerError(
            f"{Path(path).name}: metadata qhelpers.expected_s must map profile names to seconds (numbers >= 0), "
            f"e.g. {{quick: 120, full: 600}}; got {expected!r}. Fix or remove it"
        )
    value = expected.get(profile, expected.get("quick"))
    return None if value is None else float(value)


def notebook_code_hash(path: str | os.PathLike) -> str:
    """sha256 of the notebook's code cells' sources (outputs and metadata do not count)."""
    nb = read_notebook(Path(path))
    h = hashlib.sha256()
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            h.update(cell_source(cell).encode("utf-8"))
            h.update(b"\x00")
    return h.hexdigest()


def notebook_has_language(path: Path) -> bool:
    """Whether the notebook's metadata names its language (else papermill must be told)."""
    nb = read_notebook(path)
    md = nb.get("metadata", {})
    return bool((md.get("kernelspec") or {}).get("language") or (md.get("language_info") or {}).get("name"))


def discover_notebooks(notebooks_dir: str | os.PathLike) -> list[Path]:
    """``notebooks_dir/*.ipynb`` sorted by name (checkpoints and hidden files excluded)."""
    d = Path(notebooks_dir)
    if not d.is_dir():
        raise RunnerError(f"notebooks folder {d} does not exist; pass --notebooks-dir DIR")
    return sorted(p for p in d.glob("*.ipynb") if p.is_file() and not p.name.startswith((".", "_")))


def select_notebooks(notebooks: Sequence[Path], only: Sequence[str] | None) -> list[Path]:
    """Keep the notebooks whose stem is in ``only`` (``name.ipynb`` accepted), in sorted order;
    an unknown name raises RunnerError listing the available notebooks."""
    if not only:
        return list(notebooks)
    by_stem = {p.stem: p for p in notebooks}
    wanted = [Path(n).stem if n.endswith(".ipynb") else n for n in only]
    unknown = [n for n in wanted if n not in by_stem]
    if unknown:
        avail = "\n".join(f"  {s}" for s in by_stem) or "  (none)"
        raise RunnerError(
            f"unknown notebook(s) {', '.join(unknown)} for --only; available notebooks:\n{avail}"
        )
    keep = set(wanted)
    return [p for p in notebooks if p.stem in keep]

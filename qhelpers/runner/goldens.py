"""Goldens for the nbval regression tests (``--write-goldens DIR``, normally with ``--profile ci``).

Each completed executed notebook is copied to ``DIR/<stem>.ipynb``. In that mode the notebook is
executed with ``OUTPUT_DIR = "nbval_out/<stem>"`` (relative) from a working directory
``<run>/.cwd/<stem>/`` whose ``nbval_out`` is a symlink to the run folder, so its outputs still
land in ``<run>/<stem>/``; when nbval re-executes the golden from DIR (nbval's working
directory is the notebook's folder) the outputs go to ``DIR/nbval_out/<stem>/`` (ignore
``nbval_out/`` in git)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Mapping, Sequence

from qhelpers.runner.records import load_record
from qhelpers.util.atomic import atomic_write_text

GOLDEN_OUTPUT_PREFIX = "nbval_out"


def golden_output_dir(stem: str) -> str:
    """The relative OUTPUT_DIR a notebook runs with when goldens are written."""
    return f"{GOLDEN_OUTPUT_PREFIX}/{stem}"


def golden_cwd(out_dir: Path, stem: str) -> Path:
    """``<out_dir>/.cwd/<stem>/``, created with its ``nbval_out`` link to the run folder."""
    cwd = out_dir / ".cwd" / stem
    cwd.mkdir(parents=True, exist_ok=True)
    link = cwd / GOLDEN_OUTPUT_PREFIX
    if not link.is_symlink():
        if link.exists():
            shutil.rmtree(link)
        os.symlink(os.path.join("..", ".."), link)  # .cwd/<stem>/nbval_out -> the run folder
    return cwd


def write_goldens(out_dir: Path, stems: Sequence[str], outcomes: Mapping[str, str], dest: Path, profile: str,
                  say: Callable[..., None]) -> list[str]:
    """Copy ``<out_dir>/<stem>/<stem>.ipynb`` of every completed notebook to ``dest``, reporting each
    through ``say(line, err=False)``. Returns the stems refused because they ran with an absolute
    OUTPUT_DIR (not in golden mode); the caller counts them as failed."""
    if profile != "ci":
        say(f"note: goldens are normally written with --profile ci (this run used {profile})")
    dest.mkdir(parents=True, exist_ok=True)
    refused = []
    for stem in stems:
        if outcomes.get(stem) != "completed":
            say(f"golden: {stem} not written (status {outcomes.get(stem)})")
            continue
        src = out_dir / stem / f"{stem}.ipynb"
        rec = load_record(out_dir / stem) or {}
        outdir = (rec.get("parameters") or {}).get("OUTPUT_DIR", "")
        if Path(str(outdir)).is_absolute():
            say(f"golden: {stem} not written: it ran with an absolute OUTPUT_DIR "
                "(re-run it in this folder with --write-goldens)", err=True)
            refused.append(stem)
            continue
        atomic_write_text(dest / f"{stem}.ipynb", src.read_text(encoding="utf-8"))
        say(f"golden: {dest / (stem + '.ipynb')}")
    return refused

#!/usr/bin/env python3
"""Build ``notebooks/*.ipynb`` from their percent-format sources in ``notebooks/src/*.py``.

The sources are the reviewed form of each notebook (plain text, diffable). Cell markers:

    # %% [markdown]          a markdown cell; each line's leading "# " is stripped
    # %% tags=["parameters"] a code cell with tags
    # %%                     a code cell

``{colab_badge}`` in a markdown cell becomes the "Open in Colab" badge of that notebook.
The cell tagged ``parameters`` must start with ``qhelpers.report.record.PARAMETERS_MARKER``: that
line is how ``current_parameters`` finds the cell in a running kernel, which knows no tags.
Cell ids are derived from the notebook name and position, so rebuilding is deterministic.

    python scripts/build_notebooks.py           # rebuild every notebook
    python scripts/build_notebooks.py --check   # exit 1 if a notebook is out of date
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's qhelpers, installed or not

from qhelpers.report.record import PARAMETERS_MARKER

SRC = ROOT / "notebooks" / "src"
OUT = ROOT / "notebooks"
GITHUB_REPO = "qhelpers/qhelpers"  # where Colab fetches the notebooks from; change for a fork
BRANCH = "main"
MARKER = re.compile(r"^# %%(?P<md> \[markdown\])?(?: tags=(?P<tags>\[.*\]))?\s*$")


def colab_badge(stem: str) -> str:
    url = f"https://colab.research.google.com/github/{GITHUB_REPO}/blob/{BRANCH}/notebooks/{stem}.ipynb"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def parse(source: str, stem: str) -> list[dict]:
    cells: list[dict] = []
    current: dict | None = None
    for line in source.splitlines():
        match = MARKER.match(line)
        if match:
            current = {"markdown": bool(match.group("md")), "tags": json.loads(match.group("tags") or "[]"), "lines": []}
            cells.append(current)
            continue
        if current is None:
            if line.strip():
                raise SystemExit(f"{stem}: text before the first '# %%' marker: {line!r}")
            continue
        current["lines"].append(line)
    out = []
    for index, cell in enumerate(cells):
        lines = cell["lines"]
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        if cell["markdown"]:
            lines = [l[2:] if l.startswith("# ") else l.lstrip("#") for l in lines]
            text = "\n".join(lines).replace("{colab_badge}", colab_badge(stem))
            out.append({"cell_type": "markdown", "id": f"{stem}-{index:02d}", "metadata": {}, "source": text})
        else:
            if "parameters" in cell["tags"] and not (lines and lines[0].startswith(PARAMETERS_MARKER)):
                raise SystemExit(f"{stem}: the cell tagged 'parameters' must start with the line {PARAMETERS_MARKER!r}")
            metadata = {"tags": cell["tags"]} if cell["tags"] else {}
            out.append(
                {
                    "cell_type": "code",
                    "execution_count": None,
                    "id": f"{stem}-{index:02d}",
                    "metadata": metadata,
                    "outputs": [],
                    "source": "\n".join(lines),
                }
            )
    return out


def build(path: Path) -> str:
    stem = path.stem
    source = path.read_text(encoding="utf-8")
    purpose = ""
    for line in source.splitlines():
        if line.startswith("# PURPOSE:"):
            purpose = line.split(":", 1)[1].strip()
    source = "\n".join(l for l in source.splitlines() if not l.startswith("# PURPOSE:"))
    notebook = {
        "cells": parse(source, stem),
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
            "qhelpers": {"purpose": purpose, "source": f"notebooks/src/{path.name}"},
            "colab": {"provenance": []},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    for cell in notebook["cells"]:
        cell["source"] = cell["source"].splitlines(keepends=True)
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a notebook differs from its source")
    args = parser.parse_args(argv)
    stale = []
    for path in sorted(SRC.glob("*.py")):
        text = build(path)
        target = OUT / f"{path.stem}.ipynb"
        if args.check:
            if not target.exists() or target.read_text(encoding="utf-8") != text:
                stale.append(target.name)
        else:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target.relative_to(ROOT)}")
    if stale:
        print("out of date (run python scripts/build_notebooks.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

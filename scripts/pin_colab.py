#!/usr/bin/env python3
"""Pin the Colab install cell of every notebook to the code the notebook was tested with.

The one setting is ``[tool.qhelpers.colab]`` in pyproject.toml: qhelpers is installed from the git
tag ``v<project.version>`` of ``repository``, and every other package the cell installs (bitsandbytes
in EXP-003) at the version in ``[tool.qhelpers.colab.pins]``. This script rewrites the install line
of each ``notebooks/src/*.py`` from that setting and syncs the paired notebooks with jupytext;
tests/test_safety.py fails while a notebook installs anything else.

    python scripts/pin_colab.py           # rewrite the install lines and sync the notebooks
    python scripts/pin_colab.py --check   # list the sources that differ (exit 1 if any)
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent

#: The install line of a notebook's Colab cell; group 2 is the list of requirements.
INSTALL_LINE = re.compile(r'^(\s*subprocess\.run\(\[sys\.executable, "-m", "pip", "install", "-q", )(.*)(\], check=True\))\s*$')


def colab_setting(root: Path = ROOT) -> dict:
    """``{"qhelpers": requirement, "pins": {package: version}}`` from pyproject.toml."""
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    colab = project["tool"]["qhelpers"]["colab"]
    version = project["project"]["version"]
    return {"qhelpers": f"qhelpers @ git+{colab['repository']}@v{version}", "pins": dict(colab.get("pins") or {})}


def requirements_of(line: str) -> list[str] | None:
    """The requirements an install line installs, or None for a line that is not one."""
    match = INSTALL_LINE.match(line)
    return None if match is None else list(ast.literal_eval(f"[{match.group(2)}]"))


def pinned(requirement: str, setting: dict) -> str:
    """``requirement`` as the setting pins it (KeyError naming a package without a pin)."""
    name = re.split(r"[\s=<>!~@\[;]", requirement.strip(), maxsplit=1)[0]
    if name == "qhelpers":
        return setting["qhelpers"]
    if name not in setting["pins"]:
        raise KeyError(f"no version for {name!r} in [tool.qhelpers.colab.pins] of pyproject.toml")
    return f"{name}=={setting['pins'][name]}"


def pinned_line(line: str, setting: dict) -> str:
    """The install line with every requirement pinned (other lines unchanged)."""
    match = INSTALL_LINE.match(line)
    if match is None:
        return line
    requirements = [pinned(r, setting) for r in requirements_of(line)]
    return f"{match.group(1)}{', '.join(json.dumps(r) for r in requirements)}{match.group(3)}\n"


def stale_sources(root: Path = ROOT) -> list[Path]:
    """The notebook sources whose install line differs from the setting."""
    setting = colab_setting(root)
    stale = []
    for src in sorted((root / "notebooks" / "src").glob("*.py")):
        lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
        if any(pinned_line(line, setting) != line for line in lines if INSTALL_LINE.match(line)):
            stale.append(src)
    return stale


def main(argv: list[str]) -> int:
    stale = stale_sources()
    if "--check" in argv:
        for src in stale:
            print(f"{src.relative_to(ROOT)}: install line not pinned to [tool.qhelpers.colab]")
        return 1 if stale else 0
    setting = colab_setting()
    for src in stale:
        lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
        src.write_text("".join(pinned_line(line, setting) for line in lines), encoding="utf-8")
        print(f"pinned {src.relative_to(ROOT)}")
    if stale:
        subprocess.run([sys.executable, "-m", "jupytext", "--sync", *map(str, stale)], check=True, cwd=ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Parameters: the names a notebook's ``parameters`` cell defines (parsed with :mod:`ast`, never
executed), the YAML values given on the command line (``-p NAME VALUE``) and the hash that tells
``--resume`` whether a notebook's parameters changed.

``OUTPUT_DIR`` (:data:`RUNNER_PARAMS`) is always set by the runner, never by a profile or ``-p``."""
from __future__ import annotations

import ast
import datetime as _dt
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from qhelpers.runner.errors import RunnerError
from qhelpers.runner.notebooks import cell_source, find_parameters_cell, read_notebook
from qhelpers.runner.records import clean_json

RUNNER_PARAMS = ("OUTPUT_DIR",)


@dataclass(frozen=True)
class Param:
    """A name assigned in a notebook's parameters cell.

    ``default`` is the literal value (``ast.literal_eval``) when ``literal`` is true; otherwise
    None, and ``source`` holds the expression's text (e.g. ``"cuda" if ... else "cpu"``)."""

    name: str
    default: Any
    source: str
    literal: bool
    annotation: str | None = None


def _python_source(src: str) -> str:
    """Turn IPython syntax (``%magic``, ``!cmd``) into plain Python, for :func:`ast.parse`."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        return TransformerManager().transform_cell(src)
    except Exception:
        lines = []
        for line in src.splitlines():
            stripped = line.lstrip()
            lines.append("" if stripped.startswith(("%", "!", "?")) else line)
        return "\n".join(lines)


def _assigned_names(target: ast.expr) -> list[ast.Name]:
    if isinstance(target, ast.Name):
        return [target]
    if isinstance(target, (ast.Tuple, ast.List)):
        out: list[ast.Name] = []
        for elt in target.elts:
            out.extend(_assigned_names(elt.value if isinstance(elt, ast.Starred) else elt))
        return out
    return []  # attributes and subscripts are not parameters


def _literal(node: ast.expr | None) -> tuple[Any, bool]:
    if node is None:
        return None, False
    try:
        return ast.literal_eval(node), True
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None, False


def parse_parameters_source(src: str, where: str = "parameters cell") -> dict[str, Param]:
    """Names (in order of first assignment; later assignments win for the default) that the
    parameters cell's code assigns, parsed with :mod:`ast` and never executed.

    Plain, annotated (``N: int = 4``) and augmented assignments count, at any depth outside
    function and class bodies; tuple targets (``A, B = 1, 2``) give each name its element.
    Imports are not parameters."""
    code = _python_source(src)
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        raise RunnerError(f"cannot parse the {where}: {exc.msg} (line {exc.lineno}); fix its Python syntax") from exc
    found: dict[str, Param] = {}

    def record(name: ast.Name, value: ast.expr | None, annotation: ast.expr | None = None, aug: bool = False) -> None:
        default, literal = (None, False) if aug else _literal(value)
        source = ast.unparse(value) if value is not None else ""
        ann = ast.unparse(annotation) if annotation is not None else None
        if aug and name.id in found:
            prev = found[name.id]
            found[name.id] = Param(name.id, None, f"{prev.source} (then augmented)", False, prev.annotation)
            return
        found[name.id] = Param(name.id, default, source, literal, ann)

    def visit(nodes: Iterable[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, (ast.Tuple, ast.List)) and isinstance(node.value, (ast.Tuple, ast.List)) \
                            and len(target.elts) == len(node.value.elts) \
                            and not any(isinstance(e, ast.Starred) for e in target.elts):
                        for t, v in zip(target.elts, node.value.elts):
                            for n in _assigned_names(t):
                                record(n, v if isinstance(t, ast.Name) else None)
                    else:
                        names = _assigned_names(target)
                        for n in names:
                            record(n, node.value if isinstance(target, ast.Name) else None)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                record(node.target, node.value, node.annotation)
            elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
                record(node.target, node.value, aug=True)
            # descend into compound statements (if/try/with/for) but not into defs
            for attr in ("body", "orelse", "finalbody"):
                sub = getattr(node, attr, None)
                if isinstance(sub, list) and sub and isinstance(sub[0], ast.stmt):
                    visit(sub)
            for handler in getattr(node, "handlers", []) or []:
                visit(handler.body)
            if isinstance(node, ast.Match):  # pragma: no cover - unusual in a parameters cell
                for case in node.cases:
                    visit(case.body)

    visit(tree.body)
    return found


def notebook_parameters(path: str | os.PathLike) -> dict[str, Param] | None:
    """The parameters of notebook ``path`` (see :func:`parse_parameters_source`), or None
    when it has no cell tagged ``parameters``."""
    path = Path(path)
    nb = read_notebook(path)
    cell = find_parameters_cell(nb)
    if cell is None:
        return None
    return parse_parameters_source(cell_source(cell), where=f"parameters cell of {path.name}")


def plain_yaml_value(v: Any) -> Any:
    """YAML dates/times become ISO strings (papermill cannot inject a date)."""
    if isinstance(v, (_dt.date, _dt.datetime)):
        return v.isoformat()
    if isinstance(v, list):
        return [plain_yaml_value(x) for x in v]
    if isinstance(v, Mapping):
        return {k: plain_yaml_value(x) for k, x in v.items()}
    return v


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def parse_value(text: str) -> Any:
    """A ``-p`` value: ``yaml.safe_load`` (``4`` -> int, ``0.5`` -> float, ``[en, sw]`` -> list,
    ``null`` -> None, ``true`` -> bool, anything else -> str); never evaluated as Python.
    Two fix-ups: exponent floats without a dot (``1e-3``, a string in YAML 1.1) become floats,
    and dates become ISO strings."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RunnerError(f"cannot parse value {text!r} as YAML: {exc}; quote it to pass a string") from exc
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return plain_yaml_value(value)


def parameters_hash(parameters: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``parameters`` (key order does not matter)."""
    text = json.dumps(clean_json(parameters), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


"""A notebook's parameters as run: the names its parameters cell assigns, with the values they
have now, for ``results.json``.

The cell tagged ``parameters`` starts with :data:`PARAMETERS_MARKER`; papermill (and so
``run_all.py -p``) puts its overrides in a cell right after it that starts with
:data:`PAPERMILL_HEADER`. A running kernel does not know cell tags, so the cells are found by
these first lines in the code the kernel ran: the input history ``In`` (Jupyter, Colab,
papermill), else IPython's cache of executed cells in :mod:`linecache` (where cells run
without history, as nbval runs them). Names come from the cells' assignments (parsed with
:mod:`ast`); values come from the namespace, so overrides and later interactive changes count.
"""
from __future__ import annotations

import ast
import linecache
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from qhelpers.util.errors import ConfigError

__all__ = ["NOT_RECORDED", "PAPERMILL_HEADER", "PARAMETERS_MARKER", "assigned_names", "current_parameters"]

PARAMETERS_MARKER = "# Notebook parameters"
"""First line of every notebook's parameters cell (tests/test_notebooks.py checks it)."""

PAPERMILL_HEADER = "# Parameters"
"""First line of the cell papermill injects (its ``comment`` argument, "Parameters" by default)."""

NOT_RECORDED: tuple[str, ...] = ("OUTPUT_DIR",)
"""Parameters left out by default: where results.json is written says nothing about what was measured."""


def assigned_names(source: str) -> list[str]:
    """The names that ``source`` assigns (plain, annotated, augmented and tuple assignments, also
    inside ``if``/``try``/``with`` blocks but not in function or class bodies), in order of first
    assignment. Raises :class:`SyntaxError` for code that does not parse."""
    names: dict[str, None] = {}

    def visit(statements: Iterable[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(node, ast.Assign):
                targets: list[ast.expr] = list(node.targets)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets = [node.target] if getattr(node, "value", None) is not None else []
            else:
                targets = []
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                        names.setdefault(sub.id)
            for block in (getattr(node, "body", None), getattr(node, "orelse", None), getattr(node, "finalbody", None)):
                if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                    visit(block)
            for handler in getattr(node, "handlers", None) or []:
                visit(handler.body)

    visit(ast.parse(source).body)
    return list(names)


def _first_line(source: str) -> str:
    return next((line.strip() for line in source.splitlines() if line.strip()), "")


def _history(namespace: Mapping[str, Any]) -> Sequence[str]:
    """IPython's input history (``In``, also bound as ``_ih``), oldest first; empty outside IPython."""
    for key in ("In", "_ih"):
        history = namespace.get(key)
        if isinstance(history, Sequence) and not isinstance(history, str):
            return [cell for cell in history if isinstance(cell, str)]
    return []


def _cached_cells() -> Iterator[str]:
    """Sources of the cells IPython compiled in this process, in first-run order: IPython caches
    every cell in :mod:`linecache` (mtime None) for tracebacks, with or without history."""
    for entry in list(linecache.cache.values()):
        if len(entry) == 4 and entry[1] is None and isinstance(entry[2], list):
            yield "".join(entry[2])


def _parameter_cells(cells: Sequence[str]) -> list[str] | None:
    """The last cell starting with the marker and the papermill cells run after it, or None."""
    starts = [i for i, cell in enumerate(cells) if _first_line(cell).startswith(PARAMETERS_MARKER)]
    if not starts:
        return None
    last = starts[-1]
    injected = [cell for cell in cells[last + 1:] if _first_line(cell) == PAPERMILL_HEADER]
    return [cells[last], *injected]


def current_parameters(
    namespace: Mapping[str, Any],
    /,
    *,
    leave_out: Iterable[str] = NOT_RECORDED,
    **resolved: Any,
) -> dict[str, Any]:
    """``{name: value}`` for the names the notebook's parameters cell (and papermill's injected
    cell) assign, valued as in ``namespace`` now; call it as ``current_parameters(globals())``.

    ``resolved`` replaces a parameter's value by what it resolved to, e.g.
    ``DEVICE=str(loaded.device)`` where the cell says ``DEVICE = None``; each must name a
    parameter. Names in ``leave_out`` (default :data:`NOT_RECORDED`) are not returned.
    Raises :class:`ConfigError` when no parameters cell was run in this IPython session, or
    when a parameter is no longer defined in ``namespace``.
    """
    cells = _parameter_cells(_history(namespace)) or _parameter_cells(list(_cached_cells()))
    if cells is None:
        raise ConfigError(
            f"no parameters cell found: current_parameters reads the cells run in this IPython session and "
            f"looks for one whose first line starts with {PARAMETERS_MARKER!r}. Run the notebook's parameters "
            f"cell first (its first line must be that marker), or, outside a notebook, pass write_results "
            f"a dict of the parameters yourself"
        )
    names: dict[str, None] = {}
    for cell in cells:
        try:
            names.update(dict.fromkeys(assigned_names(cell)))
        except SyntaxError as exc:
            raise ConfigError(
                f"the parameters cell does not parse ({exc.msg}, line {exc.lineno}); fix it and run it again"
            ) from exc
    unknown = sorted(set(resolved) - set(names))
    if unknown:
        raise ConfigError(f"resolved values {unknown} name no parameter; the parameters are {list(names)}")
    skipped = set(leave_out)
    missing = [name for name in names if name not in skipped and name not in resolved and name not in namespace]
    if missing:
        raise ConfigError(f"parameters {missing} are not defined now; run the parameters cell again")
    return {name: resolved[name] if name in resolved else namespace[name] for name in names if name not in skipped}

"""What each selected notebook gets injected, later entries winning:

1. the profile (:mod:`qhelpers.runner.profiles`);
2. ``--model SPEC`` (MODEL) and ``--device cpu|cuda`` (DEVICE);
3. ``-p NAME VALUE`` (repeatable; VALUE parsed with ``yaml.safe_load``, never eval);
4. ``OUTPUT_DIR``, always set by the supervisor when it starts the notebook: the absolute path of
   ``<run>/<stem>``, or with ``--write-goldens`` the relative path ``nbval_out/<stem>``.

A command-line name that no selected notebook defines is an error (exit 2) that lists each
notebook's parameters; one that only some define is applied only there, and the log says so."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from qhelpers.runner.errors import RunnerError
from qhelpers.runner.params import RUNNER_PARAMS, Param
from qhelpers.runner.profiles import profile_parameters


@dataclass
class Plan:
    """What to inject into one notebook."""

    stem: str
    path: Path
    defined: dict[str, Param] | None
    parameters: dict[str, Any]  # injected, without OUTPUT_DIR
    notes: list[str] = field(default_factory=list)


def plan_parameters(
    notebooks: Sequence[Path],
    defined: Mapping[str, Mapping[str, Param] | None],
    profiles: Mapping[str, Mapping[str, Mapping[str, Any]]],
    profile: str,
    overrides: Sequence[tuple[str, Any]] = (),
    profiles_path: str | os.PathLike | None = None,
) -> tuple[list[Plan], list[str]]:
    """Resolve the injected parameters of every selected notebook (profile, then
    ``overrides`` in order). Returns the plans and run-level notes (names applied to only some
    notebooks). A name no selected notebook defines raises RunnerError listing each notebook's
    parameters."""
    notes: list[str] = []
    names = list(dict.fromkeys(name for name, _ in overrides))
    for name in names:
        if name in RUNNER_PARAMS:
            raise RunnerError(f"{name} is set by the runner (the notebook's own output folder); use --out DIR instead")
        having = [p.stem for p in notebooks if name in (defined.get(p.stem) or {})]
        if not having:
            lines = "\n".join(
                f"  {p.stem}: {', '.join(defined[p.stem] or {}) or '(no parameters cell)'}" for p in notebooks
            )
            raise RunnerError(
                f"unknown parameter {name!r}: no selected notebook defines it (papermill would silently "
                f"ignore it). Parameters of the selected notebooks:\n{lines}"
            )
        lacking = [p.stem for p in notebooks if p.stem not in having]
        if lacking:
            notes.append(
                f"note: {name} is applied only to {', '.join(having)}; not defined in {', '.join(lacking)}"
            )
    plans = []
    for p in notebooks:
        d = defined.get(p.stem)
        names_here = set(d or {})
        params = profile_parameters(profiles, profile, p.stem, names_here, profiles_path)
        for name, value in overrides:
            if name in names_here:
                params[name] = value
        plan = Plan(p.stem, p, d, params)
        if d is None:
            plan.notes.append(f"note: {p.stem} has no cell tagged 'parameters'; papermill injects OUTPUT_DIR at the top")
        plans.append(plan)
    return plans, notes


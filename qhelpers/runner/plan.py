"""What each selected notebook gets injected, later entries winning:

1. the profile (:mod:`qhelpers.runner.profiles`);
2. ``--model SPEC`` (MODEL) and ``--device cpu|cuda`` (DEVICE);
3. ``-p NAME VALUE`` (repeatable; VALUE parsed with ``yaml.safe_load``, never eval);
4. ``OUTPUT_DIR``, always set by the supervisor when it starts the notebook: the absolute path of
   ``<run>/<stem>``, or with ``--write-goldens`` the relative path ``nbval_out/<stem>``.

A command-line name that no selected notebook defines is an error (exit 2) that lists each
notebook's parameters; one that only some define is applied only there, and the log says so.

Grids (:func:`expand_grid`): ``--models A B`` and ``--grid NAME '[v1, v2]'`` turn one notebook into
one job per combination of the values it defines (a notebook that defines none of the names runs
once). Each job has its own folder, named ``<stem>--<value>[--NAME-<value>...]``, and records its
notebook and setting, so the summary can set the same hypothesis side by side across models and
settings."""
from __future__ import annotations

import itertools
import os
import re
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
    setting: dict[str, Any] = field(default_factory=dict)  # the grid values of this job ({} outside a grid)
    expected_s: float | None = None  # the notebook's expected run time under this profile (its metadata)

    @property
    def notebook(self) -> str:
        """The notebook's file stem (``stem`` is the job's folder name, which a grid extends)."""
        return self.path.stem


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



_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def costliest_first(plans: Sequence[Plan]) -> list[Plan]:
    """``plans`` in the order several workers should start them: longest expected run time first
    (longest-processing-time-first list scheduling, which keeps a long notebook from starting last
    while the other workers idle), ties and plans without an estimate (given the mean of the known
    ones) in their given order. A notebook that computes a cache others wait for (t001's criticality
    sweep) should state the time it takes doing so: it then starts before its readers, which find the
    cache filled instead of holding a worker while they wait."""
    known = [p.expected_s for p in plans if p.expected_s is not None]
    guess = sum(known) / len(known) if known else 0.0
    return sorted(plans, key=lambda p: -(guess if p.expected_s is None else p.expected_s))


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value) if not isinstance(value, (list, tuple)) else \
        "-".join(map(str, value))
    return _UNSAFE.sub("_", str(text)).strip("_") or "none"


def job_folder(stem: str, setting: Mapping[str, Any]) -> str:
    """The folder of one grid job: ``t001--gpt2--BITS-2`` (MODEL's value alone, others as NAME-value)."""
    parts = [stem]
    for name, value in setting.items():
        parts.append(_slug(value) if name == "MODEL" else f"{name}-{_slug(value)}")
    return "--".join(parts)


def setting_label(setting: Mapping[str, Any]) -> str:
    """``gpt2, BITS=2``: a job's setting as the summary shows it."""
    return ", ".join(str(v) if k == "MODEL" else f"{k}={v}" for k, v in setting.items())


def expand_grid(plans: Sequence[Plan], axes: Sequence[tuple[str, Sequence[Any]]]) -> tuple[list[Plan], list[str]]:
    """One plan per combination of the ``axes`` (``[(NAME, values), ...]``, e.g. MODEL from
    ``--models``) a notebook defines; the grid's values win over the profile and ``-p``. Returns
    the jobs and notes (a name only some notebooks define). A name no selected notebook defines,
    an empty or repeated list, or two jobs falling into one folder raise RunnerError."""
    notes: list[str] = []
    seen_names: set[str] = set()
    for name, values in axes:
        if name in RUNNER_PARAMS:
            raise RunnerError(f"--grid {name}: set by the runner; it cannot be a grid axis")
        if name in seen_names:
            raise RunnerError(f"grid axis {name} given twice; give its values in one list")
        seen_names.add(name)
        if not isinstance(values, (list, tuple)) or not values:
            raise RunnerError(f"grid axis {name}: give a non-empty list of values, e.g. --grid {name} '[2, 3, 4]'")
        if len({repr(v) for v in values}) != len(values):
            raise RunnerError(f"grid axis {name}: a value is repeated in {list(values)}")
        having = [p.notebook for p in plans if name in (p.defined or {})]
        if not having:
            raise RunnerError(f"grid axis {name}: no selected notebook defines it (its parameters cell has no {name})")
        lacking = [p.notebook for p in plans if p.notebook not in having]
        if lacking:
            notes.append(f"note: grid axis {name} applies only to {', '.join(having)}; "
                         f"{', '.join(lacking)} run once")
    jobs: list[Plan] = []
    for plan in plans:
        mine = [(n, list(v)) for n, v in axes if n in (plan.defined or {})]
        if not mine:
            jobs.append(plan)
            continue
        for combo in itertools.product(*(values for _, values in mine)):
            setting = {name: value for (name, _), value in zip(mine, combo)}
            jobs.append(Plan(job_folder(plan.stem, setting), plan.path, plan.defined,
                             {**plan.parameters, **setting}, list(plan.notes), setting))
    folders: dict[str, Plan] = {}
    for job in jobs:
        other = folders.setdefault(job.stem, job)
        if other is not job:
            raise RunnerError(f"grid values {setting_label(other.setting)!r} and {setting_label(job.setting)!r} "
                              f"of {job.notebook} both make the folder {job.stem}; use values that differ in "
                              "letters or digits")
    return jobs, notes

"""Checks of the injected parameter values, made before any notebook runs (a failure exits 2 and
nothing in the run folder is touched):

- a value's kind must fit the notebook's literal default: a number where the default is a number,
  a string for a string, a list (or one element of it) for a list, true/false for a bool; None
  is always accepted (notebooks use it for "all" or "automatic"), and a default of None or an
  expression accepts anything;
- ``LANGS`` must not be empty, every other ``*_LANGS`` list (``HR_LANGS``, ``LR_LANGS``, ...)
  must name only languages of ``LANGS``, and no language may be in ``HR_LANGS`` and in another
  group (``LR_LANGS``, ``MRL_LANGS``).

The notebooks check their values again when they run; these checks only make the common mistakes
fail in a second instead of after a sweep."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qhelpers.runner.errors import RunnerError
from qhelpers.runner.params import Param
from qhelpers.runner.plan import Plan


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, Mapping):
        return "mapping"
    return type(value).__name__


def value_problem(value: Any, default: Param) -> str | None:
    """Why ``value`` cannot replace the parameter's literal default, or None when it can."""
    if value is None or not default.literal or default.default is None:
        return None
    want, got = _kind(default.default), _kind(value)
    if want == got:
        return None
    if want == "list":
        kinds = {_kind(x) for x in default.default}
        if got in kinds and len(kinds) == 1:
            return None  # one element for a list, e.g. LANGS en (the loaders accept a single code)
        element = f" of {next(iter(kinds))}s" if len(kinds) == 1 else ""
        return f"expects a list{element} like {default.default!r}, got {got} {value!r}"
    hint = "; quote it to pass a string" if want == "string" else ""
    return f"expects a {want} like {default.default!r}, got {got} {value!r}{hint}"


def _effective(plan: Plan) -> dict[str, Any]:
    values = {name: p.default for name, p in (plan.defined or {}).items() if p.literal}
    values.update(plan.parameters)
    return values


def check_plans(plans: list[Plan]) -> None:
    """Raise RunnerError listing every value (of every selected notebook) that fails the checks above."""
    problems = []
    for plan in plans:
        defined = plan.defined or {}
        for name, value in plan.parameters.items():
            if name in defined:
                why = value_problem(value, defined[name])
                if why:
                    problems.append(f"{plan.stem}: {name} {why}")
        values = _effective(plan)
        langs = values.get("LANGS")
        if "LANGS" in plan.parameters and isinstance(langs, (list, tuple)) and not langs:
            problems.append(f"{plan.stem}: LANGS is empty; name at least one language, e.g. [en, sw]")
            continue
        if isinstance(langs, str):
            langs = [langs]
        if not isinstance(langs, (list, tuple)) or not any(n.endswith("LANGS") for n in plan.parameters):
            continue  # the notebook's own language defaults are not checked here
        for name in sorted(values):
            group = values[name]
            if name == "LANGS" or not name.endswith("_LANGS") or group is None:
                continue
            members = [group] if isinstance(group, str) else group
            if not isinstance(members, (list, tuple)):
                continue
            outside = [x for x in members if x not in langs]
            high = values.get("HR_LANGS") if name != "HR_LANGS" else None
            high = [high] if isinstance(high, str) else high
            both = [x for x in members if isinstance(high, (list, tuple)) and x in high]
            if both:
                problems.append(f"{plan.stem}: {', '.join(map(str, both))} in both HR_LANGS and {name}; "
                                "put each language in one group")
            if outside:
                problems.append(
                    f"{plan.stem}: {name} names {', '.join(map(str, outside))}, which "
                    f"{'is' if len(outside) == 1 else 'are'} not in LANGS {list(langs)}; add "
                    f"{'it' if len(outside) == 1 else 'them'} to LANGS or change {name}"
                )
    if problems:
        raise RunnerError("invalid parameter value(s), nothing was run:\n" + "\n".join(f"  {p}" for p in problems))

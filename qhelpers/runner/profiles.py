"""Profiles: ``notebooks/profiles.yaml``, named sets of parameter values::

    <profile>:
      _all: {PARAM: value}       # applied only to notebooks whose parameters define PARAM
      <notebook stem>: {PARAM: value}   # every PARAM must be defined by that notebook

``quick`` (:data:`DEFAULT_PROFILE`) is normally empty: the notebooks' own defaults."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from qhelpers.runner.errors import RunnerError
from qhelpers.runner.params import RUNNER_PARAMS, plain_yaml_value

DEFAULT_PROFILE = "quick"


def load_profiles(path: str | os.PathLike | None) -> dict[str, dict[str, dict[str, Any]]]:
    """Read and check a profiles file: ``{profile: {_all | stem: {PARAM: value}}}``.
    A missing file gives ``{}``; an empty profile (``quick: {}`` or ``quick:``) gives ``{}``."""
    import yaml

    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RunnerError(f"{p} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise RunnerError(f"{p}: expected a mapping of profile names, got {type(data).__name__}")
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for prof, entries in data.items():
        if entries is None:
            entries = {}
        if not isinstance(entries, Mapping):
            raise RunnerError(f"{p}: profile {prof!r} must be a mapping of '_all' / notebook stems, got {entries!r}")
        out[str(prof)] = {}
        for key, params in entries.items():
            if params is None:
                params = {}
            if not isinstance(params, Mapping):
                raise RunnerError(
                    f"{p}: {prof}.{key} must be a mapping of PARAM: value, got {params!r}"
                )
            for name in params:
                if str(name) in RUNNER_PARAMS:
                    raise RunnerError(f"{p}: {prof}.{key} sets {name}, which the runner always sets; remove it")
            out[str(prof)][str(key)] = {str(k): plain_yaml_value(v) for k, v in params.items()}
    return out



def profile_parameters(
    profiles: Mapping[str, Mapping[str, Mapping[str, Any]]],
    profile: str,
    stem: str,
    defined: Iterable[str],
    profiles_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The profile's values for notebook ``stem``: ``_all`` entries whose name the notebook
    defines, then the notebook's own entries (each must be defined, else RunnerError).
    Entries for notebooks that are not being run are ignored."""
    where = f" in {profiles_path}" if profiles_path else ""
    if profile not in profiles:
        if profile == DEFAULT_PROFILE:
            return {}
        avail = ", ".join(sorted(profiles)) or "none"
        raise RunnerError(f"unknown profile {profile!r}{where}; available profiles: {avail}")
    defined = set(defined)
    entries = profiles[profile]
    out = {k: v for k, v in (entries.get("_all") or {}).items() if k in defined}
    own = entries.get(stem) or {}
    unknown = [k for k in own if k not in defined]
    if unknown:
        raise RunnerError(
            f"profile {profile!r}{where} sets {', '.join(unknown)} for {stem}, but its parameters cell "
            f"does not define {'it' if len(unknown) == 1 else 'them'}; {stem} defines: "
            f"{', '.join(sorted(defined)) or '(nothing)'}"
        )
    out.update(own)
    return out


"""The run folder's manifest, ``run_config.json``: the full command (:class:`RunCommand`), the
qhelpers version, git commit and code hash, and per notebook the hash of its inputs.

``--resume DIR`` requires a manifest and re-applies its command; an option given again on the
command line replaces the recorded one, and every such change is listed (:func:`merge_on_resume`)
and kept in the manifest's ``history``. A folder is a run folder when it holds a manifest
(:func:`is_run_folder`); ``--out`` refuses any other non-empty folder."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from qhelpers.runner.errors import RunnerError
from qhelpers.runner.records import read_json

MANIFEST = "run_config.json"
MANIFEST_FORMAT = 2  # 1 (no "format" key): profile and argv only, before the command was recorded

#: Entries the runner itself creates in a run folder before its manifest exists.
RUNNER_HIDDEN = (".runner.lock", ".locks", ".jobs", ".cwd", ".golden_sweeps")


@dataclass
class RunCommand:
    """The options that decide what a run computes (None: not given, the default applies)."""

    profile: str | None = None
    only: list[str] | None = None
    params: list[list[str]] = field(default_factory=list)  # [NAME, VALUE as typed], in order
    model: str | None = None
    device: str | None = None
    kernel: str | None = None
    cell_timeout: float | None = None
    workers: int | None = None
    notebooks_dir: str | None = None
    profiles: str | None = None
    write_goldens: str | None = None
    models: list[str] | None = None
    grid: list[list[str]] | None = None  # [NAME, VALUES as typed], in order
    backend: str | None = None
    address: str | None = None
    per_gpu: int | None = None
    cpus_per_job: int | None = None
    ray_cpus: int | None = None
    ray_gpus: int | None = None
    ship_code: bool | None = None
    start_ahead: int | None = None
    warm: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON for the manifest."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunCommand":
        """The command recorded in a manifest (unknown keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["params"] = [[str(n), str(v)] for n, v in kwargs.get("params") or []]
        if kwargs.get("grid") is not None:
            kwargs["grid"] = [[str(n), str(v)] for n, v in kwargs["grid"]]
        return cls(**kwargs)

    def with_defaults(self, **defaults: Any) -> "RunCommand":
        """A copy where every option still None takes ``defaults[name]`` (when given)."""
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


_FLAGS = {"profile": "--profile", "only": "--only", "model": "--model", "device": "--device", "kernel": "--kernel",
          "cell_timeout": "--cell-timeout", "workers": "--workers", "notebooks_dir": "--notebooks-dir",
          "profiles": "--profiles", "write_goldens": "--write-goldens", "models": "--models", "grid": "--grid",
          "backend": "--backend", "address": "--address", "per_gpu": "--per-gpu", "cpus_per_job": "--cpus-per-job",
          "ray_cpus": "--ray-cpus", "ray_gpus": "--ray-gpus", "ship_code": "--no-ship-code",
          "start_ahead": "--start-ahead", "warm": "--cold-kernels"}


def _shown(value: Any) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, list):
        return " ".join(" ".join(map(str, v)) if isinstance(v, list) else str(v) for v in value)
    return str(value)


def merge_on_resume(recorded: RunCommand, given: RunCommand) -> tuple[RunCommand, list[str]]:
    """The recorded command with the options ``given`` again on the command line replacing
    theirs (``-p NAME`` replaces that name's value and keeps the others); returns the merged
    command and one line per change."""
    merged = dataclasses.replace(recorded, params=[list(p) for p in recorded.params])
    changes = []
    for name, flag in _FLAGS.items():
        new = getattr(given, name)
        old = getattr(recorded, name)
        if new is not None and new != old:
            setattr(merged, name, new)
            changes.append(f"{flag}: {_shown(old)} -> {_shown(new)}")
    by_name = {n: i for i, (n, _) in enumerate(merged.params)}
    for name, text in given.params:
        if name in by_name:
            old_text = merged.params[by_name[name]][1]
            if old_text != text:
                merged.params[by_name[name]] = [name, text]
                changes.append(f"-p {name}: {old_text} -> {text}")
        else:
            by_name[name] = len(merged.params)
            merged.params.append([name, text])
            changes.append(f"-p {name}: (not set) -> {text}")
    return merged, changes


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """``run_dir/run_config.json`` as a dict, None when there is none; RunnerError when it is unreadable."""
    path = run_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise RunnerError(f"{path} is unreadable ({exc}); it is not a run folder run_all.py can continue") from None
    if not isinstance(data, dict):
        raise RunnerError(f"{path} does not hold a run manifest (a JSON object)")
    return data


def recorded_command(manifest: Mapping[str, Any], parse_argv: Callable[[Sequence[str]], RunCommand]) -> RunCommand:
    """The command a manifest records; a format-1 manifest (argv only) is read by parsing its argv."""
    if isinstance(manifest.get("command"), Mapping):
        return RunCommand.from_dict(manifest["command"])
    argv = manifest.get("argv")
    if not isinstance(argv, list):
        raise RunnerError(f"{MANIFEST} records no command; run again with --out and the options you want")
    cmd = parse_argv([str(a) for a in argv])
    if cmd.profile is None and manifest.get("profile"):
        cmd.profile = str(manifest["profile"])
    return cmd


def is_empty_for_a_run(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but what the runner creates before its manifest."""
    return all(entry.name in RUNNER_HIDDEN for entry in folder.iterdir())


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a readable run manifest."""
    try:
        return read_manifest(folder) is not None
    except RunnerError:
        return False


def manifest_document(previous: Mapping[str, Any] | None, command: RunCommand, resolved: RunCommand,
                      argv: Sequence[str], changes: Sequence[str], qhelpers: Mapping[str, Any],
                      notebooks: Mapping[str, Any], now: str) -> dict[str, Any]:
    """The manifest to write: ``previous`` (if any) updated with this invocation. ``command`` is
    what --resume re-applies (options not given stay None, so their defaults apply then too);
    ``resolved`` is what ran. Notebooks run earlier in the folder and not selected now keep their entries."""
    previous = previous or {}
    history = list(previous.get("history") or [])
    history.append({"at": now, "argv": list(argv), "changes": list(changes)})
    entries = dict(previous.get("notebooks") or {}) if isinstance(previous.get("notebooks"), Mapping) else {}
    entries.update(notebooks)
    return {
        "format": MANIFEST_FORMAT,
        "written_by": "qhelpers run_all.py",
        "created": previous.get("created") or now,
        "updated": now,
        "command": command.to_dict(),
        "resolved": resolved.to_dict(),
        "profile": resolved.profile,
        "kernel": resolved.kernel,
        "notebooks_dir": resolved.notebooks_dir,
        "golden": bool(resolved.write_goldens),
        "argv": list(argv),
        "history": history,
        "qhelpers": dict(qhelpers),
        "notebooks": entries,
    }

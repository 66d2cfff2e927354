"""Run the experiment notebooks headless with papermill and summarise their verdicts.

``python run_all.py`` (a thin wrapper around :func:`main`) executes every ``notebooks/*.ipynb``
with papermill, each in its own worker subprocess and kernel, and writes one run folder::

    runs/<UTC timestamp>/            (or --out DIR / --resume DIR)
        summary.md  index.html       rewritten atomically after every notebook
        run_config.json  runner.log  how the suite was invoked; the progress lines
        <stem>/<stem>.ipynb          the executed notebook (partial if it failed)
        <stem>/results.json, figures written by the notebook into OUTPUT_DIR
        <stem>/log.txt               papermill's log and every cell's output
        <stem>/run.json              status, parameters as run, their hash, times, error

Parameters
----------
Each notebook's cell tagged ``parameters`` is parsed with :mod:`ast` (never executed) to
learn which names it defines. The values injected are, later entries winning:

1. the profile (``notebooks/profiles.yaml``)::

       <profile>:
         _all: {PARAM: value}       # applied only to notebooks whose parameters define PARAM
         <notebook stem>: {PARAM: value}   # every PARAM must be defined by that notebook

   ``quick`` (the default) is normally empty: the notebooks' own defaults.
2. ``--model SPEC`` (MODEL) and ``--device cpu|cuda`` (DEVICE);
3. ``-p NAME VALUE`` (repeatable; VALUE parsed with ``yaml.safe_load``, never eval);
4. ``OUTPUT_DIR``, always set by the runner: the absolute path of ``<run>/<stem>``, or with
   ``--write-goldens`` the relative path ``nbval_out/<stem>`` (see below).

A command-line name that no selected notebook defines is an error (exit 2) that lists each
notebook's parameters; one that only some define is applied only there, and the log says so.

Status and resume
-----------------
``run.json`` holds ``status`` (running / completed / failed / interrupted), the injected
``parameters``, ``parameters_hash`` (sha256 of the injected parameters, OUTPUT_DIR reduced to
its mode) and ``notebook_sha256`` (of the notebook's code cells). ``--resume DIR`` skips a
notebook whose run.json says completed with the same two hashes and re-runs the others
(their folder is emptied first, so no stale results.json survives a failed re-run).

A failing notebook does not stop the others; the exit code is then 1. SIGINT (or SIGTERM)
stops the workers, marks running notebooks ``interrupted``, writes the summary and exits 130
(143 for SIGTERM). If run_all itself is SIGKILLed, each worker gets SIGTERM from the kernel
(``PR_SET_PDEATHSIG``), marks its notebook interrupted and shuts its kernel down; every
completed notebook's folder and the last summary stay valid, and ``--resume`` finishes the
suite. A per-notebook lock keeps a resumed run from touching a folder that a dying worker of
the killed run still holds; a per-folder lock refuses two runners in the same folder.

Goldens
-------
``--write-goldens DIR`` (normally with ``--profile ci``) copies each completed executed
notebook to ``DIR/<stem>.ipynb`` for the nbval regression tests. In that mode the notebook is
executed with ``OUTPUT_DIR = "nbval_out/<stem>"`` (relative) from a working directory
``<run>/.cwd/<stem>/`` whose ``nbval_out`` is a symlink to the run folder, so its outputs still
land in ``<run>/<stem>/``; when nbval re-executes the golden from DIR (nbval's working
directory is the notebook's folder) the outputs go to ``DIR/nbval_out/<stem>/`` (ignore
``nbval_out/`` in git).

Kernel environment: ``MPLBACKEND`` = the inline backend, ``PYTHONHASHSEED=0``, ``QHELPERS_PROFILE=<profile>``,
the repository root prepended to ``PYTHONPATH`` (so ``import qhelpers`` is this checkout), and
with ``--workers N`` on a machine with several GPUs, one GPU per worker slot through
``CUDA_VISIBLE_DEVICES``. Normal runs execute each notebook with ``<run>/<stem>/`` as the
working directory.
"""
from __future__ import annotations

import argparse
import ast
import datetime as _dt
import hashlib
import html
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from qhelpers.util.atomic import (
    atomic_write_text as _atomic_write_text,  # stdlib only: no heavy imports
)
from qhelpers.util.errors import ConfigError

try:  # POSIX only; without it the runner works but does not lock folders
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "RunnerError",
    "Param",
    "parse_parameters_source",
    "notebook_parameters",
    "notebook_purpose",
    "discover_notebooks",
    "select_notebooks",
    "load_profiles",
    "profile_parameters",
    "parse_value",
    "plan_parameters",
    "parameters_hash",
    "visible_gpus",
    "check_kernel",
    "render_markdown",
    "render_html",
    "write_summary",
    "build_parser",
    "main",
    "worker_main",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
DEFAULT_PROFILE = "quick"
DEFAULT_KERNEL = "python3"
GOLDEN_OUTPUT_PREFIX = "nbval_out"
RUNNER_PARAMS = ("OUTPUT_DIR",)
STATUSES = ("pending", "running", "completed", "failed", "interrupted")
VERDICTS = ("SUPPORTED", "NOT_SUPPORTED", "INCONCLUSIVE")
_INTERRUPT_GRACE_S = 30.0
_LOCK_WAIT_S = 120.0


class RunnerError(ConfigError):
    """A usage or configuration error of the runner (exit code 2)."""


# --------------------------------------------------------------------------- small helpers


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (_dt.date, _dt.datetime)):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    return repr(obj)


def _clean_json(obj: Any) -> Any:
    """Plain JSON types; non-finite floats -> None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return _json_default(obj)


def _atomic_write_json(path: Path, obj: Any) -> Path:
    text = json.dumps(_clean_json(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return _atomic_write_text(path, text)


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def fmt_duration(seconds: float | None) -> str:
    """``3.2 s``, ``41 s``, ``2 min 05 s``, ``1 h 02 min``."""
    if seconds is None:
        return ""
    s = float(seconds)
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 3600:
        m, r = divmod(int(round(s)), 60)
        return f"{m} min {r:02d} s"
    h, r = divmod(int(round(s)), 3600)
    return f"{h} h {r // 60:02d} min"


def _fmt_num(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return "n/a"
    return f"{f:.4g}"


def fmt_value_ci(h: Mapping[str, Any]) -> str:
    """``0.123 [0.05, 0.2]`` (``n/a`` for a missing or non-finite number)."""
    value = _fmt_num(h.get("value"))
    if h.get("ci_low") is None and h.get("ci_high") is None:
        return value
    return f"{value} [{_fmt_num(h.get('ci_low'))}, {_fmt_num(h.get('ci_high'))}]"


def verdict_counts(hypotheses: Sequence[Mapping[str, Any]]) -> str:
    """``2 hypotheses: 1 SUPPORTED, 1 INCONCLUSIVE`` / ``no hypotheses``."""
    if not hypotheses:
        return "no hypotheses"
    counts: dict[str, int] = {}
    for h in hypotheses:
        v = str(h.get("verdict", "?"))
        counts[v] = counts.get(v, 0) + 1
    order = [v for v in VERDICTS if v in counts] + sorted(v for v in counts if v not in VERDICTS)
    n = len(hypotheses)
    word = "hypothesis" if n == 1 else "hypotheses"
    return f"{n} {word}: " + ", ".join(f"{counts[v]} {v}" for v in order)


# --------------------------------------------------------------------------- notebooks


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


def _read_notebook(path: Path) -> Any:
    import nbformat

    with open(path, encoding="utf-8") as fh:
        return nbformat.read(fh, as_version=4)


def _cell_source(cell: Any) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def find_parameters_cell(nb: Any) -> Any | None:
    """The first code cell tagged ``parameters`` (papermill's rule), or None."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code" and "parameters" in (cell.get("metadata", {}).get("tags") or []):
            return cell
    return None


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
    nb = _read_notebook(path)
    cell = find_parameters_cell(nb)
    if cell is None:
        return None
    return parse_parameters_source(_cell_source(cell), where=f"parameters cell of {path.name}")


def notebook_purpose(path: str | os.PathLike) -> str:
    """One line: the notebook metadata ``qhelpers.purpose``, else its first markdown heading."""
    nb = _read_notebook(Path(path))
    meta = nb.get("metadata", {}).get("qhelpers") or {}
    purpose = meta.get("purpose") if isinstance(meta, Mapping) else None
    if purpose:
        return " ".join(str(purpose).split())
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        for line in _cell_source(cell).splitlines():
            m = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
            if m and m.group(1):
                return m.group(1)
    return "(no purpose: add metadata qhelpers.purpose or a markdown heading)"


def notebook_code_hash(path: str | os.PathLike) -> str:
    """sha256 of the notebook's code cells' sources (outputs and metadata do not count)."""
    nb = _read_notebook(Path(path))
    h = hashlib.sha256()
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            h.update(_cell_source(cell).encode("utf-8"))
            h.update(b"\x00")
    return h.hexdigest()


def _notebook_has_language(path: Path) -> bool:
    nb = _read_notebook(path)
    md = nb.get("metadata", {})
    return bool((md.get("kernelspec") or {}).get("language") or (md.get("language_info") or {}).get("name"))


def discover_notebooks(notebooks_dir: str | os.PathLike) -> list[Path]:
    """``notebooks_dir/*.ipynb`` sorted by name (checkpoints and hidden files excluded)."""
    d = Path(notebooks_dir)
    if not d.is_dir():
        raise RunnerError(f"notebooks folder {d} does not exist; pass --notebooks-dir DIR")
    return sorted(p for p in d.glob("*.ipynb") if p.is_file() and not p.name.startswith((".", "_")))


def select_notebooks(notebooks: Sequence[Path], only: Sequence[str] | None) -> list[Path]:
    """Keep the notebooks whose stem is in ``only`` (``name.ipynb`` accepted), in sorted order;
    an unknown name raises RunnerError listing the available notebooks."""
    if not only:
        return list(notebooks)
    by_stem = {p.stem: p for p in notebooks}
    wanted = [Path(n).stem if n.endswith(".ipynb") else n for n in only]
    unknown = [n for n in wanted if n not in by_stem]
    if unknown:
        avail = "\n".join(f"  {s}" for s in by_stem) or "  (none)"
        raise RunnerError(
            f"unknown notebook(s) {', '.join(unknown)} for --only; available notebooks:\n{avail}"
        )
    keep = set(wanted)
    return [p for p in notebooks if p.stem in keep]


# --------------------------------------------------------------------------- profiles & parameters


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
            out[str(prof)][str(key)] = {str(k): _yaml_plain(v) for k, v in params.items()}
    return out


def _yaml_plain(v: Any) -> Any:
    """YAML dates/times become ISO strings (papermill cannot inject a date)."""
    if isinstance(v, (_dt.date, _dt.datetime)):
        return v.isoformat()
    if isinstance(v, list):
        return [_yaml_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _yaml_plain(x) for k, x in v.items()}
    return v


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
    return _yaml_plain(value)


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


def parameters_hash(parameters: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``parameters`` (key order does not matter)."""
    text = json.dumps(_clean_json(parameters), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _hashable_parameters(params: Mapping[str, Any], golden: bool) -> dict[str, Any]:
    out = dict(params)
    out["OUTPUT_DIR"] = "<golden>" if golden else "<run>"
    return out


# --------------------------------------------------------------------------- environment


def check_kernel(name: str) -> None:
    """Raise RunnerError (with the install command) if Jupyter has no kernel ``name``."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    ksm = KernelSpecManager()
    try:
        ksm.get_kernel_spec(name)
    except NoSuchKernel:
        try:
            avail = ", ".join(sorted(ksm.find_kernel_specs())) or "none"
        except Exception:
            avail = "unknown"
        raise RunnerError(
            f"Jupyter kernel {name!r} not found (installed kernels: {avail}). Install it with:\n"
            f"  python -m ipykernel install --user --name {name}\n"
            f"or pass --kernel NAME for an installed one."
        ) from None


def visible_gpus(env: Mapping[str, str] | None = None, torch_count: int | None = -1) -> list[str]:
    """The GPU ids a worker may be given through CUDA_VISIBLE_DEVICES.

    ``torch.cuda.device_count()`` when torch imports (``torch_count=-1`` means ask torch), the
    entries of CUDA_VISIBLE_DEVICES naming those devices when it is set (so ``"2,3"`` stays
    ``["2", "3"]``), else ``0..n-1``; without torch, the entries of CUDA_VISIBLE_DEVICES."""
    env = os.environ if env is None else env
    raw = env.get("CUDA_VISIBLE_DEVICES")
    listed = [x.strip() for x in raw.split(",") if x.strip()] if raw is not None else None
    if listed is not None:
        # CUDA stops at the first invalid entry such as -1
        valid: list[str] = []
        for x in listed:
            if x.startswith("-"):
                break
            valid.append(x)
        listed = valid
    if torch_count == -1:
        try:
            import torch

            torch_count = int(torch.cuda.device_count())
        except Exception:
            torch_count = None
    if torch_count is None:
        return listed or []
    if listed is not None:
        return listed[:torch_count]
    return [str(i) for i in range(torch_count)]


INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


def cpu_threads_per_worker(workers: int, cpu_count: int | None = None) -> int | None:
    """BLAS threads for each of ``workers`` notebooks running side by side on the CPU: the
    cores shared out (at least 1), or None for a single worker (the libraries' default).
    Oversubscribed threads (2 kernels x all cores) made linear algebra up to 10x slower."""
    if workers <= 1:
        return None
    return max(1, (cpu_count or os.cpu_count() or 1) // workers)


def _kernel_env(profile: str, gpu: str | None, threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env.setdefault(var, str(threads))  # the user's own setting wins
    # figures inline in the executed notebooks, whatever the caller's MPLBACKEND
    env["MPLBACKEND"] = INLINE_BACKEND
    env["PYTHONHASHSEED"] = "0"
    env["QHELPERS_PROFILE"] = profile
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # silences ipykernel's debugger warning
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + old if old else "")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


# --------------------------------------------------------------------------- locks


class _Lock:
    """An exclusive ``flock`` on ``path`` (no-op without fcntl)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fh: Any = None

    def acquire(self, blocking: bool = False, timeout: float | None = None, on_wait: Any = None,
                cancel: Any = None) -> bool:
        if fcntl is None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")
        deadline = None if timeout is None else time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError:
                if not blocking or (deadline is not None and time.monotonic() > deadline) \
                        or (cancel is not None and cancel()):
                    self.fh.close()
                    self.fh = None
                    return False
                if not waited and on_wait is not None:
                    on_wait()
                waited = True
                time.sleep(0.2)

    def release(self) -> None:
        if self.fh is not None:
            try:
                fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            finally:
                self.fh.close()
                self.fh = None


# --------------------------------------------------------------------------- summary


def _load_record(nb_dir: Path) -> dict[str, Any] | None:
    rj = nb_dir / "run.json"
    if not rj.is_file():
        return None
    try:
        rec = _read_json(rj)
    except (OSError, ValueError) as exc:
        return {"notebook": nb_dir.name, "status": "failed", "error": {"ename": "RunnerError", "evalue": f"unreadable run.json: {exc}"}}
    return rec if isinstance(rec, dict) else None


def _load_results(nb_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    p = nb_dir / "results.json"
    if not p.is_file():
        return None, None
    try:
        doc = _read_json(p)
    except (OSError, ValueError) as exc:
        return None, f"results.json unreadable: {exc}"
    if not isinstance(doc, dict):
        return None, "results.json is not an object"
    return doc, None


def _model_name(results: Mapping[str, Any] | None, rec: Mapping[str, Any]) -> str:
    model = (results or {}).get("model")
    if isinstance(model, Mapping):
        for key in ("spec", "name", "id", "model"):
            if model.get(key):
                return str(model[key])
    elif isinstance(model, str) and model:
        return model
    params = rec.get("parameters") or {}
    if params.get("MODEL"):
        return str(params["MODEL"])
    defaults = rec.get("defaults") or {}
    return str(defaults["MODEL"]) if defaults.get("MODEL") is not None else ""


def collect_records(out_dir: Path, stems: Iterable[str] = ()) -> list[dict[str, Any]]:
    """One entry per notebook of the run folder (every ``<stem>/run.json``) plus ``stems`` not
    started yet (status pending), sorted by stem; each with its results.json loaded."""
    out_dir = Path(out_dir)
    names = set(stems)
    if out_dir.is_dir():
        for d in out_dir.iterdir():
            if d.is_dir() and not d.name.startswith(".") and (d / "run.json").is_file():
                names.add(d.name)
    rows = []
    for stem in sorted(names):
        nb_dir = out_dir / stem
        rec = _load_record(nb_dir) or {"notebook": stem, "status": "pending"}
        rec.setdefault("notebook", stem)
        results, err = _load_results(nb_dir)
        figures = []
        if results:
            for f in results.get("figures") or []:
                figures.append(f"{stem}/{Path(str(f)).as_posix()}")
        exec_nb = nb_dir / f"{stem}.ipynb"
        rows.append({
            "stem": stem,
            "record": rec,
            "results": results,
            "results_error": err,
            "hypotheses": [h for h in (results or {}).get("hypotheses") or [] if isinstance(h, Mapping)],
            "figures": figures,
            "notebook_link": f"{stem}/{stem}.ipynb" if exec_nb.is_file() else None,
            "log_link": f"{stem}/log.txt" if (nb_dir / "log.txt").is_file() else None,
            "model": _model_name(results, rec),
        })
    return rows


def _error_text(rec: Mapping[str, Any], short: bool = False) -> str:
    """``ename: evalue (In [n])``; ``short``: the first line of evalue, at most 200 characters."""
    err = rec.get("error")
    if not err:
        return ""
    if isinstance(err, Mapping):
        ename, evalue = err.get("ename") or "", str(err.get("evalue") or "")
        if short:
            lines = evalue.strip().splitlines()
            first = lines[0] if lines else ""
            evalue = (first[:197] + "...") if len(first) > 200 or len(lines) > 1 else first
        where = f" (In [{err['exec_count']}])" if err.get("exec_count") is not None else ""
        return f"{ename}: {evalue}{where}" if ename else f"{evalue}{where}"
    return str(err)


def _md_cell(text: Any) -> str:
    s = " ".join(str(text if text is not None else "").split())
    s = s.replace("\\", "\\\\").replace("|", "\\|")
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", s)


def _md_link(label: str, href: str | None) -> str:
    if not href:
        return ""
    from urllib.parse import quote

    return f"[{_md_cell(label)}]({quote(href)})"


def _status_counts(rows: Sequence[Mapping[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        s = str(r["record"].get("status", "pending"))
        counts[s] = counts.get(s, 0) + 1
    order = [s for s in STATUSES if s in counts] + sorted(s for s in counts if s not in STATUSES)
    return ", ".join(f"{counts[s]} {s}" for s in order) or "no notebooks"


def render_markdown(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """summary.md: the hypotheses across notebooks, then one row per notebook."""
    lines = [
        "# qhelpers run summary",
        "",
        f"- run folder: `{meta.get('out_dir', '')}`",
        f"- profile: `{meta.get('profile', '')}`; kernel: `{meta.get('kernel', '')}`",
        f"- updated: {meta.get('updated', '')}; state: {meta.get('state', '')}",
        f"- notebooks: {len(rows)} ({_status_counts(rows)})",
        "",
        "## Hypotheses",
        "",
    ]
    hyp_rows = [(r, h) for r in rows for h in r["hypotheses"]]
    if hyp_rows:
        lines += ["| notebook | id | statement | value [CI] | verdict | n |", "|---|---|---|---|---|---|"]
        for r, h in hyp_rows:
            status = r["record"].get("status")
            nb = r["stem"] + ("" if status == "completed" else f" ({status})")
            lines.append(
                f"| {_md_cell(nb)} | {_md_cell(h.get('id'))} | {_md_cell(h.get('statement'))} | "
                f"{_md_cell(fmt_value_ci(h))} | {_md_cell(h.get('verdict'))} | {_md_cell(h.get('n', ''))} |"
            )
    else:
        lines.append("(no hypotheses recorded yet)")
    lines += [
        "",
        "## Notebooks",
        "",
        "| notebook | status | duration | model | hypotheses | executed notebook | figures | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rec = r["record"]
        figs = ", ".join(_md_link(Path(f).name, f) for f in r["figures"])
        err = _error_text(rec) or (r["results_error"] or "")
        if err and r["log_link"]:
            err += f" (see {r['log_link']})"
        lines.append(
            f"| {_md_cell(r['stem'])} | {_md_cell(rec.get('status', 'pending'))} | "
            f"{_md_cell(fmt_duration(rec.get('duration_s')))} | {_md_cell(r['model'])} | "
            f"{_md_cell(verdict_counts(r['hypotheses']) if r['results'] else '')} | "
            f"{_md_link(r['stem'] + '.ipynb', r['notebook_link'])} | {figs} | {_md_cell(err)} |"
        )
    lines.append("")
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}
table{border-collapse:collapse;width:100%;font-size:.92em}
th,td{border:1px solid #ccc;padding:.35em .55em;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
.meta{color:#555}.num{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:nowrap}
.v-SUPPORTED{background:#d7f5d7 !important;font-weight:600}
.v-NOT_SUPPORTED{background:#f8d7d7 !important;font-weight:600}
.v-INCONCLUSIVE{background:#f5efd0 !important}
.s-completed{color:#17702a;font-weight:600}.s-failed{color:#b00020;font-weight:600}
.s-interrupted{color:#a05a00;font-weight:600}.s-running{color:#0050a0}.s-pending{color:#777}
pre{white-space:pre-wrap;margin:0;font-size:.9em}
"""


def render_html(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """index.html: self-contained (inline CSS, no scripts or external assets), every text
    HTML-escaped, links relative to the run folder."""
    from urllib.parse import quote

    e = lambda s: html.escape(str(s if s is not None else ""), quote=True)  # noqa: E731

    def link(label: str, href: str | None) -> str:
        return f'<a href="{e(quote(href))}">{e(label)}</a>' if href else ""

    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>qhelpers run {e(Path(str(meta.get('out_dir', ''))).name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>qhelpers run summary</h1>",
        '<p class="meta">',
        f"run folder <code>{e(meta.get('out_dir', ''))}</code> &middot; profile <code>{e(meta.get('profile', ''))}</code>"
        f" &middot; kernel <code>{e(meta.get('kernel', ''))}</code><br>",
        f"updated {e(meta.get('updated', ''))} &middot; state {e(meta.get('state', ''))} &middot; "
        f"{len(rows)} notebooks ({e(_status_counts(rows))})",
        "</p>",
        "<h2>Hypotheses</h2>",
    ]
    hyp_rows = [(r, h) for r in rows for h in r["hypotheses"]]
    if hyp_rows:
        out.append("<table><thead><tr><th>notebook</th><th>id</th><th>statement</th><th>value [CI]</th>"
                   "<th>verdict</th><th>n</th></tr></thead><tbody>")
        for r, h in hyp_rows:
            status = r["record"].get("status")
            nb = e(r["stem"]) + ("" if status == "completed" else f' <span class="s-{e(status)}">({e(status)})</span>')
            verdict = str(h.get("verdict", ""))
            vclass = f"v-{verdict}" if verdict in VERDICTS else ""
            out.append(
                f"<tr><td>{nb}</td><td>{e(h.get('id'))}</td>"
                f'<td title="{e(h.get("criterion", ""))}">{e(h.get("statement"))}</td>'
                f'<td class="num">{e(fmt_value_ci(h))}</td><td class="{vclass}">{e(verdict)}</td>'
                f'<td class="num">{e(h.get("n", ""))}</td></tr>'
            )
        out.append("</tbody></table>")
    else:
        out.append("<p>(no hypotheses recorded yet)</p>")
    out.append("<h2>Notebooks</h2>")
    out.append("<table><thead><tr><th>notebook</th><th>status</th><th>duration</th><th>model</th>"
               "<th>hypotheses</th><th>executed notebook</th><th>figures</th><th>error</th></tr></thead><tbody>")
    for r in rows:
        rec = r["record"]
        status = str(rec.get("status", "pending"))
        figs = "<br>".join(link(Path(f).name, f) for f in r["figures"])
        err = _error_text(rec) or (r["results_error"] or "")
        err_html = f"<pre>{e(err)}</pre>" if err else ""
        if err and r["log_link"]:
            err_html += link("log.txt", r["log_link"])
        nb_links = " ".join(x for x in (link(r["stem"] + ".ipynb", r["notebook_link"]), link("log", r["log_link"])) if x)
        out.append(
            f"<tr><td>{e(r['stem'])}</td><td class=\"s-{e(status)}\">{e(status)}</td>"
            f'<td class="num">{e(fmt_duration(rec.get("duration_s")))}</td><td>{e(r["model"])}</td>'
            f"<td>{e(verdict_counts(r['hypotheses']) if r['results'] else '')}</td>"
            f"<td>{nb_links}</td><td>{figs}</td><td>{err_html}</td></tr>"
        )
    out.append("</tbody></table>")
    out.append('<p class="meta">Written by run_all.py (qhelpers.runner.cli).</p>')
    out.append("</body></html>\n")
    return "\n".join(out)


def write_summary(out_dir: str | os.PathLike, meta: Mapping[str, Any], stems: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Rewrite ``summary.md`` and ``index.html`` of ``out_dir`` atomically; returns the rows."""
    out_dir = Path(out_dir)
    rows = collect_records(out_dir, stems)
    meta = {**meta, "out_dir": str(out_dir), "updated": _utc_now()}
    _atomic_write_text(out_dir / "summary.md", render_markdown(rows, meta))
    _atomic_write_text(out_dir / "index.html", render_html(rows, meta))
    return rows


# --------------------------------------------------------------------------- worker


def _child_pids(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:
        pass
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(x) for x in fh.read().split()]
    except OSError:
        pass
    return out


def _kill_children() -> None:
    for pid in _child_pids(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _error_dict(exc: BaseException) -> dict[str, Any]:
    try:
        from papermill.exceptions import PapermillExecutionError
    except Exception:  # pragma: no cover
        PapermillExecutionError = ()  # type: ignore[assignment]
    if PapermillExecutionError and isinstance(exc, PapermillExecutionError):
        tb = _strip_ansi("\n".join(exc.traceback or []))
        return {
            "ename": exc.ename,
            "evalue": _strip_ansi(str(exc.evalue)),
            "cell_index": exc.cell_index,
            "exec_count": exc.exec_count,
            "traceback": "\n".join(tb.splitlines()[-30:]),
        }
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {
        "ename": type(exc).__name__,
        "evalue": _strip_ansi(str(exc)) or repr(exc),
        "cell_index": None,
        "exec_count": None,
        "traceback": "\n".join(tb.splitlines()[-30:]),
    }


def worker_main(job_path: str) -> int:
    """Execute one notebook as described by the job file; write its final run.json.
    Exit 0 completed, 1 failed, 130 interrupted (SIGINT/SIGTERM, or the runner died)."""
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    interrupted = {"signal": None}

    def on_signal(signum: int, frame: Any) -> None:
        if interrupted["signal"] is None:
            interrupted["signal"] = signum
            raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = job.get("parent_pid")
    if parent and os.getppid() != parent:
        interrupted["signal"] = signal.SIGTERM  # the runner died before PDEATHSIG was set up
    elif parent:
        _watch_parent(parent)

    record = dict(job["record"])
    status, error = "completed", None
    lock = _Lock(Path(job["lock"])) if job.get("lock") else None
    t0 = time.time()
    try:
        if interrupted["signal"] is not None:
            raise KeyboardInterrupt("runner exited")
        if lock is not None and not lock.acquire(blocking=True, timeout=30):
            raise RunnerError(f"notebook lock {job['lock']} is held by another process")
        import logging

        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
        print(f"[runner] notebook {job['input']}", file=sys.stderr)
        print(f"[runner] parameters {json.dumps(_clean_json(job['parameters']), sort_keys=True)}", file=sys.stderr)
        print(f"[runner] kernel {job['kernel']}; cwd {job['cwd']}; CUDA_VISIBLE_DEVICES="
              f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}", file=sys.stderr, flush=True)
        import papermill as pm

        pm.execute_notebook(
            job["input"],
            job["output"],
            parameters=job["parameters"],
            kernel_name=job["kernel"],
            language=job.get("language"),
            cwd=job["cwd"],
            progress_bar=False,
            log_output=True,
            request_save_on_cell_execute=True,
            # nbclient's timeout trait is an int
            execution_timeout=None if job.get("cell_timeout") is None else max(1, math.ceil(job["cell_timeout"])),
            start_timeout=job.get("start_timeout", 120),
        )
    except KeyboardInterrupt:
        status = "interrupted"
        sig = interrupted["signal"]
        name = signal.Signals(sig).name if sig else "SIGINT"
        why = " (run_all stopped, or exited without stopping this worker)" if sig == signal.SIGTERM else ""
        error = {"ename": "Interrupted", "evalue": f"run stopped by {name}{why}",
                 "cell_index": None, "exec_count": None, "traceback": ""}
    except BaseException as exc:  # noqa: BLE001 - every failure is recorded, never re-raised
        if interrupted["signal"] is not None:
            status = "interrupted"
            error = {"ename": "Interrupted", "evalue": f"run stopped ({type(exc).__name__}: {exc})",
                     "cell_index": None, "exec_count": None, "traceback": ""}
        else:
            status, error = "failed", _error_dict(exc)
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        _kill_children()  # a kernel left behind (normally nbclient has shut it down)
    end = time.time()
    record.update({
        "status": status,
        "end": _utc_now(),
        "duration_s": round(end - t0, 3),
        "error": error,
    })
    rp = Path(job["output_dir"]) / "results.json"
    record["results"] = "results.json" if rp.is_file() else None
    _atomic_write_json(Path(job["run_json"]), record)
    if error:
        print(f"[runner] {status}: {error['ename']}: {error['evalue']}", file=sys.stderr)
        if error.get("traceback"):
            print(error["traceback"], file=sys.stderr)
    else:
        print(f"[runner] completed in {end - t0:.1f} s", file=sys.stderr)
    sys.stderr.flush()
    if lock is not None:
        lock.release()
    return {"completed": 0, "failed": 1}.get(status, EXIT_SIGINT)


def _watch_parent(parent_pid: int) -> None:
    """Portable backstop for PR_SET_PDEATHSIG (Linux only): a daemon thread that sends this
    worker SIGTERM once its runner has gone (the worker is then re-parented)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except OSError:
            pass

    threading.Thread(target=watch, name="qhelpers-runner-parent-watch", daemon=True).start()


def _preexec_worker() -> None:  # pragma: no cover - runs in the child
    os.setsid()  # own session: a terminal's Ctrl-C reaches the runner, which stops workers itself
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: SIGTERM when the runner dies
    except Exception:
        pass


# --------------------------------------------------------------------------- orchestration


@dataclass
class _Running:
    plan: Plan
    index: int
    proc: subprocess.Popen
    slot: int
    gpu: str | None
    started: float
    log_fh: Any
    stop_sent: float | None = None


class Runner:
    """One invocation: plans, schedules workers, writes run.json / summaries."""

    def __init__(self, args: argparse.Namespace, plans: list[Plan], out_dir: Path, profile: str,
                 notes: list[str], golden: bool):
        self.args = args
        self.plans = plans
        self.out_dir = out_dir
        self.profile = profile
        self.notes = notes
        self.golden = golden
        self.total = len(plans)
        self.workers = max(1, getattr(args, "workers", 1))
        self.stop_signal: int | None = None
        self.outcomes: dict[str, str] = {}
        self.log_path = out_dir / "runner.log"
        self.meta = {"profile": profile, "kernel": args.kernel}

    # ---- output
    def say(self, line: str, err: bool = False) -> None:
        print(line, file=sys.stderr if err else sys.stdout, flush=True)
        try:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(f"{_utc_now()} {line}\n")
        except OSError:
            pass

    def summary(self, state: str) -> None:
        write_summary(self.out_dir, {**self.meta, "state": state}, [p.stem for p in self.plans])

    # ---- per notebook
    def nb_dir(self, stem: str) -> Path:
        return self.out_dir / stem

    def output_dir_param(self, stem: str) -> str:
        return f"{GOLDEN_OUTPUT_PREFIX}/{stem}" if self.golden else str(self.nb_dir(stem))

    def cwd_for(self, stem: str) -> Path:
        if not self.golden:
            return self.nb_dir(stem)
        cwd = self.out_dir / ".cwd" / stem
        cwd.mkdir(parents=True, exist_ok=True)
        link = cwd / GOLDEN_OUTPUT_PREFIX
        if not link.is_symlink():
            if link.exists():
                shutil.rmtree(link)
            os.symlink(os.path.join("..", ".."), link)  # .cwd/<stem>/nbval_out -> the run folder
        return cwd

    def hashes(self, plan: Plan) -> tuple[str, str]:
        return parameters_hash(_hashable_parameters(plan.parameters, self.golden)), notebook_code_hash(plan.path)

    def resume_decision(self, plan: Plan) -> tuple[bool, str]:
        rec = _load_record(self.nb_dir(plan.stem))
        if rec is None:
            return False, "not run yet"
        phash, nhash = self.hashes(plan)
        if rec.get("status") != "completed":
            return False, f"previous status {rec.get('status')}"
        if rec.get("parameters_hash") != phash:
            return False, "parameters changed"
        if rec.get("notebook_sha256") != nhash:
            return False, "notebook code changed"
        return True, "completed earlier with the same parameters"

    def prepare_dir(self, stem: str) -> None:
        d = self.nb_dir(stem)
        if d.exists():
            if not (d / "run.json").is_file() and any(d.iterdir()):
                raise RunnerError(
                    f"{d} exists and was not written by the runner (no run.json); move it away or use another --out"
                )
            shutil.rmtree(d)
        d.mkdir(parents=True)

    def start(self, plan: Plan, index: int, slot: int, gpu: str | None) -> _Running:
        stem = plan.stem
        lock = _Lock(self.out_dir / ".locks" / f"{stem}.lock")
        if not lock.acquire(blocking=True, timeout=_LOCK_WAIT_S,
                            on_wait=lambda: self.say(f"  waiting for a previous worker of {stem} to exit ..."),
                            cancel=lambda: self.stop_signal is not None):
            if self.stop_signal is not None:
                raise RunnerError(f"{stem}: not started ({signal.Signals(self.stop_signal).name} received)")
            raise RunnerError(f"{stem}: its lock is still held after {_LOCK_WAIT_S:.0f} s by another process")
        try:
            self.prepare_dir(stem)
            d = self.nb_dir(stem)
            params = {**plan.parameters, "OUTPUT_DIR": self.output_dir_param(stem)}
            phash, nhash = self.hashes(plan)
            defaults = {}
            for name, prm in (plan.defined or {}).items():
                defaults[name] = prm.default if prm.literal else f"<expr: {prm.source}>"
            record = {
                "notebook": stem,
                "input": str(plan.path),
                "status": "running",
                "profile": self.profile,
                "kernel": self.args.kernel,
                "parameters": params,
                "parameters_hash": phash,
                "notebook_sha256": nhash,
                "defaults": defaults,
                "output_notebook": f"{stem}.ipynb",
                "output_dir": str(d),
                "log": "log.txt",
                "cuda_visible_devices": gpu if gpu is not None else os.environ.get("CUDA_VISIBLE_DEVICES"),
                "start": _utc_now(),
                "end": None,
                "duration_s": None,
                "error": None,
                "results": None,
                "runner": {"pid": os.getpid(), "argv": sys.argv[1:], "host": os.uname().nodename if hasattr(os, "uname") else ""},
            }
            _atomic_write_json(d / "run.json", record)
            cwd = self.cwd_for(stem)
            job = {
                "input": str(plan.path),
                "output": str(d / f"{stem}.ipynb"),
                "output_dir": str(d),
                "parameters": params,
                "kernel": self.args.kernel,
                "language": None if _notebook_has_language(plan.path) else "python",
                "cwd": str(cwd),
                "cell_timeout": self.args.cell_timeout,
                "run_json": str(d / "run.json"),
                "lock": str(lock.path),
                "record": record,
                "parent_pid": os.getpid(),
            }
            job_path = self.out_dir / ".jobs" / f"{stem}.json"
            _atomic_write_json(job_path, job)
            log_fh = open(d / "log.txt", "ab")
            threads = cpu_threads_per_worker(self.workers) if gpu is None else None
            env = _kernel_env(self.profile, gpu, threads)
            proc = subprocess.Popen(
                [sys.executable, "-m", "qhelpers.runner.cli", "--worker", str(job_path)],
                cwd=str(cwd), env=env, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT,
                preexec_fn=_preexec_worker if os.name == "posix" else None,
            )
        finally:
            lock.release()  # the worker takes it (and holds it until it has written run.json)
        gpu_note = f" on GPU {gpu}" if gpu is not None else ""
        model = params.get("MODEL") or (plan.defined or {}).get("MODEL", Param("", "", "", False)).default
        model_note = f", model {model}" if model else ""
        self.say(f"[{index}/{self.total}] {stem} ... started (profile {self.profile}{model_note}{gpu_note})")
        return _Running(plan, index, proc, slot, gpu, time.time(), log_fh)

    def finish(self, run: _Running, forced_status: str | None = None) -> str:
        run.log_fh.close()
        stem = run.plan.stem
        d = self.nb_dir(stem)
        rec = _load_record(d) or {"notebook": stem}
        rc = run.proc.returncode
        if rec.get("status") == "running" or forced_status:
            # the worker died before recording its end: record it here
            status = forced_status or ("interrupted" if self.stop_signal else "failed")
            rec.update({
                "status": status,
                "end": _utc_now(),
                "duration_s": round(time.time() - run.started, 3),
                "error": rec.get("error") or {
                    "ename": "Interrupted" if status == "interrupted" else "WorkerDied",
                    "evalue": f"worker exited with code {rc} before finishing (see log.txt)",
                    "cell_index": None, "exec_count": None, "traceback": "",
                },
                "results": "results.json" if (d / "results.json").is_file() else None,
            })
            _atomic_write_json(d / "run.json", rec)
        status = str(rec.get("status"))
        self.outcomes[stem] = status
        dur = fmt_duration(rec.get("duration_s") if rec.get("duration_s") is not None else time.time() - run.started)
        prefix = f"[{run.index}/{self.total}] {stem} ..."
        if status == "completed":
            results, err = _load_results(d)
            what = verdict_counts([h for h in (results or {}).get("hypotheses") or [] if isinstance(h, Mapping)]) \
                if results else (err or "no results.json")
            self.say(f"{prefix} done in {dur} ({what})")
        elif status == "failed":
            self.say(f"{prefix} FAILED after {dur}: {_error_text(rec, short=True)} (see {d / 'log.txt'})")
        else:
            self.say(f"{prefix} {status} after {dur}")
        return status

    # ---- main loop
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        else:  # a second Ctrl-C: stop waiting politely
            self._hurry = True

    def run(self) -> int:
        self._hurry = False
        old_int = signal.signal(signal.SIGINT, self._on_signal)
        old_term = signal.signal(signal.SIGTERM, self._on_signal)
        try:
            return self._run()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)

    def _run(self) -> int:
        args = self.args
        for note in self.notes:
            self.say(note)
        queue: list[tuple[int, Plan]] = []
        for i, plan in enumerate(self.plans, 1):
            for note in plan.notes:
                self.say(note)
            if args.resume:
                skip, why = self.resume_decision(plan)
                if skip:
                    self.outcomes[plan.stem] = "completed"
                    self.say(f"[{i}/{self.total}] {plan.stem} ... skipped ({why})")
                    continue
                if why != "not run yet":
                    self.say(f"[{i}/{self.total}] {plan.stem} ... will re-run ({why})")
            queue.append((i, plan))
        self.summary("running")

        workers = self.workers
        gpus: list[str] = []
        if workers > 1 and min(workers, len(queue)) > 1 and args.device != "cpu":
            gpus = visible_gpus()
            if len(gpus) > 1:
                self.say(f"{len(gpus)} GPUs visible ({','.join(gpus)}): each worker gets one through CUDA_VISIBLE_DEVICES")
            else:
                gpus = []
        running: list[_Running] = []
        while (queue or running) and self.stop_signal is None:
            busy = {r.slot for r in running}
            while queue and len(running) < workers and self.stop_signal is None:
                slot = min(s for s in range(workers) if s not in busy)
                busy.add(slot)
                i, plan = queue.pop(0)
                gpu = gpus[slot % len(gpus)] if gpus else None
                try:
                    running.append(self.start(plan, i, slot, gpu))
                except RunnerError as exc:
                    self.say(f"[{i}/{self.total}] {plan.stem} ... FAILED to start: {exc}", err=True)
                    self.outcomes[plan.stem] = "failed"
                self.summary("running")
            for r in list(running):
                if r.proc.poll() is not None:
                    running.remove(r)
                    self.finish(r)
                    self.summary("running" if (queue or running) else "finished")
            time.sleep(0.1)

        if self.stop_signal is not None:
            name = signal.Signals(self.stop_signal).name
            self.say(f"{name} received: stopping {len(running)} running notebook(s) ...", err=True)
            for r in running:
                try:  # the worker turns it into KeyboardInterrupt, records "interrupted", stops its kernel
                    os.kill(r.proc.pid, self.stop_signal)
                except OSError:
                    pass
                r.stop_sent = time.time()
            while running:
                for r in list(running):
                    if r.proc.poll() is None and (self._hurry or time.time() - (r.stop_sent or 0) > _INTERRUPT_GRACE_S):
                        for pid in _child_pids(r.proc.pid):
                            try:
                                os.kill(pid, signal.SIGKILL)
                            except OSError:
                                pass
                        r.proc.kill()
                        r.proc.wait()
                    if r.proc.poll() is not None:
                        running.remove(r)
                        rec = _load_record(self.nb_dir(r.plan.stem)) or {}
                        forced = "interrupted" if rec.get("status") in (None, "running") else None
                        self.finish(r, forced_status=forced)
                time.sleep(0.1)
            for i, plan in queue:
                self.say(f"[{i}/{self.total}] {plan.stem} ... not started")
            self.summary(f"interrupted by {name}")
            self.say(f"summary: {self.out_dir / 'summary.md'}")
            return EXIT_SIGINT if self.stop_signal == signal.SIGINT else EXIT_SIGTERM

        self.summary("finished")
        if args.write_goldens:
            self.write_goldens(Path(args.write_goldens))
        failed = [s for s, st in self.outcomes.items() if st != "completed"]
        done = sum(1 for st in self.outcomes.values() if st == "completed")
        self.say(
            f"finished: {done} completed, {len(failed)} not completed"
            + (f" ({', '.join(failed)})" if failed else "")
            + f"; summary: {self.out_dir / 'summary.md'}"
        )
        return EXIT_FAILED if failed else EXIT_OK

    def write_goldens(self, dest: Path) -> None:
        if self.profile != "ci":
            self.say(f"note: goldens are normally written with --profile ci (this run used {self.profile})")
        dest.mkdir(parents=True, exist_ok=True)
        for plan in self.plans:
            if self.outcomes.get(plan.stem) != "completed":
                self.say(f"golden: {plan.stem} not written (status {self.outcomes.get(plan.stem)})")
                continue
            src = self.nb_dir(plan.stem) / f"{plan.stem}.ipynb"
            rec = _load_record(self.nb_dir(plan.stem)) or {}
            outdir = (rec.get("parameters") or {}).get("OUTPUT_DIR", "")
            if Path(str(outdir)).is_absolute():
                self.say(f"golden: {plan.stem} not written: it ran with an absolute OUTPUT_DIR "
                         "(re-run it in this folder with --write-goldens)", err=True)
                self.outcomes[plan.stem] = "failed"
                continue
            _atomic_write_text(dest / f"{plan.stem}.ipynb", src.read_text(encoding="utf-8"))
            self.say(f"golden: {dest / (plan.stem + '.ipynb')}")


# --------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit 2 through main(), not sys.exit
        raise RunnerError(f"{message}\n(run with --help for the options)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="run_all.py",
        description="Run the qhelpers experiment notebooks headless with papermill and summarise their verdicts.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  python run_all.py --list\n"
            "  python run_all.py                          # every notebook, profile quick\n"
            "  python run_all.py --profile ci --only exp003_kurtosis\n"
            "  python run_all.py --model gpt2 -p LANGS '[en, sw]' -p N_TEXTS 8 --device cuda\n"
            "  python run_all.py --resume runs/20250101T120000Z\n"
            "  python run_all.py --profile ci --write-goldens tests/goldens\n"
            "\n"
            "exit codes: 0 all completed, 1 some notebook failed, 2 usage or configuration error,\n"
            "130 interrupted (SIGINT), 143 terminated (SIGTERM).\n"
            "output: <out>/<stem>/{<stem>.ipynb,results.json,log.txt,run.json}, <out>/summary.md, <out>/index.html"
        ),
    )
    p.add_argument("--list", action="store_true", help="list the notebooks with their purpose and exit")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these notebooks (file stems)")
    p.add_argument("--profile", default=None,
                   help=f"parameter profile from the profiles file: ci, quick, full (default {DEFAULT_PROFILE}, "
                        "or on --resume the profile that folder was run with)")
    p.add_argument("--model", metavar="SPEC", help="set MODEL in every notebook that defines it")
    p.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="set a parameter (repeatable); VALUE is parsed as YAML: 4, 0.5, '[en, sw]', null, true")
    p.add_argument("--device", choices=("cpu", "cuda"), help="set DEVICE in every notebook that defines it")
    p.add_argument("--kernel", default=DEFAULT_KERNEL, help=f"Jupyter kernel name (default {DEFAULT_KERNEL})")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/<UTC timestamp>)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR: skip notebooks completed there with the same parameters")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="notebooks run in parallel (default 1); with several GPUs each worker gets one")
    p.add_argument("--cell-timeout", type=float, default=None, metavar="SECONDS",
                   help="fail a notebook whose cell runs longer than this (default: no limit)")
    p.add_argument("--write-goldens", metavar="DIR",
                   help="copy each completed executed notebook to DIR/<stem>.ipynb for nbval "
                        f"(runs with OUTPUT_DIR={GOLDEN_OUTPUT_PREFIX}/<stem>; normally with --profile ci)")
    p.add_argument("--notebooks-dir", default=str(DEFAULT_NOTEBOOKS_DIR), metavar="DIR",
                   help="folder of the notebooks (default: the repository's notebooks/)")
    p.add_argument("--profiles", metavar="FILE", default=None,
                   help="profiles file (default: <notebooks-dir>/profiles.yaml)")
    return p


def _new_run_dir(base: Path) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for k in range(1, 1000):
        d = base / (stamp if k == 1 else f"{stamp}-{k}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RunnerError(f"cannot create a run folder under {base}")


def _list(notebooks: Sequence[Path]) -> int:
    if not notebooks:
        print("(no notebooks)")
        return EXIT_OK
    width = max(len(p.stem) for p in notebooks)
    for p in notebooks:
        try:
            purpose = notebook_purpose(p)
        except Exception as exc:  # an unreadable notebook still gets listed
            purpose = f"(unreadable: {exc})"
        print(f"{p.stem.ljust(width)}  {purpose}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The run_all.py command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])
    try:
        return _main(argv)
    except RunnerError as exc:
        print(f"run_all.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    nb_dir = Path(args.notebooks_dir).resolve()
    notebooks = discover_notebooks(nb_dir)
    if args.list:
        return _list(select_notebooks(notebooks, args.only))
    if not notebooks:
        raise RunnerError(f"no notebooks (*.ipynb) in {nb_dir}")
    selected = select_notebooks(notebooks, args.only)
    if args.workers < 1:
        raise RunnerError("--workers must be at least 1")
    if args.cell_timeout is not None and args.cell_timeout <= 0:
        raise RunnerError("--cell-timeout must be positive (seconds)")

    # run folder
    if args.resume and args.out and Path(args.resume).resolve() != Path(args.out).resolve():
        raise RunnerError("--resume DIR is the run folder itself; do not pass a different --out")
    if args.resume:
        out_dir = Path(args.resume).resolve()
        if not out_dir.is_dir():
            raise RunnerError(f"--resume {args.resume}: no such run folder")
    else:
        out_dir = None

    profile = args.profile
    prior = {}
    if out_dir is not None and (out_dir / "run_config.json").is_file():
        try:
            prior = _read_json(out_dir / "run_config.json")
        except (OSError, ValueError):
            prior = {}
    if profile is None:
        profile = prior.get("profile") or DEFAULT_PROFILE
    profiles_path = Path(args.profiles) if args.profiles else nb_dir / "profiles.yaml"
    if args.profiles and not profiles_path.is_file():
        raise RunnerError(f"profiles file {profiles_path} not found")
    profiles = load_profiles(profiles_path)

    overrides: list[tuple[str, Any]] = []
    if args.model is not None:
        overrides.append(("MODEL", args.model))
    if args.device is not None:
        overrides.append(("DEVICE", args.device))
    for name, value in args.param:
        if not name.isidentifier():
            raise RunnerError(f"-p {name}: a parameter name must be a Python identifier")
        overrides.append((name, parse_value(value)))

    defined = {p.stem: notebook_parameters(p) for p in selected}
    plans, notes = plan_parameters(selected, defined, profiles, profile, overrides, profiles_path)
    check_kernel(args.kernel)

    if out_dir is None:
        if args.out:
            out_dir = Path(args.out).resolve()
            out_dir.mkdir(parents=True, exist_ok=True)
        else:
            out_dir = _new_run_dir(Path("runs").resolve())
    folder_lock = _Lock(out_dir / ".runner.lock")
    if not folder_lock.acquire(blocking=False):
        raise RunnerError(f"another run_all.py is running in {out_dir}; wait for it or use another --out")
    try:
        if prior.get("profile") and prior["profile"] != profile:
            print(f"note: {out_dir} was run with profile {prior['profile']}; this run uses {profile}", file=sys.stderr)
        golden = bool(args.write_goldens)
        config = {
            "profile": profile,
            "kernel": args.kernel,
            "notebooks_dir": str(nb_dir),
            "profiles": str(profiles_path),
            "argv": argv,
            "created": prior.get("created") or _utc_now(),
            "updated": _utc_now(),
            "golden": golden,
        }
        _atomic_write_json(out_dir / "run_config.json", config)
        runner = Runner(args, plans, out_dir, profile, notes, golden)
        n = len(plans)
        runner.say(f"run folder {out_dir} (profile {profile}, kernel {args.kernel}, "
                   f"{n} notebook{'' if n == 1 else 's'})")
        return runner.run()
    finally:
        folder_lock.release()


if __name__ == "__main__":
    sys.exit(main())

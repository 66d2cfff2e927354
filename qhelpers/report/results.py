"""Recording an experiment: hypotheses with computed verdicts, the environment, and an
atomically written ``results.json``.

``results.json`` keys: experiment_id, parameters, environment, model, metrics, hypotheses
(each with exactly id, statement, criterion, value, ci_low, ci_high, verdict, n, notes),
figures (paths relative to the results folder), created (UTC ISO time).

JSON has no NaN or infinity: :func:`to_jsonable` writes every non-finite float as ``null``
(an undefined estimate's value, for instance); read ``null`` back as "not available".
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata as _md
from pathlib import Path, PurePath
from typing import Any, Iterable, Mapping, Sequence

from qhelpers import stats as _stats
from qhelpers.util.atomic import atomic_write_text
from qhelpers.util.errors import ConfigError, MeasurementError

__all__ = [
    "Hypothesis",
    "HYPOTHESIS_KEYS",
    "RESULTS_KEYS",
    "environment_info",
    "git_info",
    "to_jsonable",
    "atomic_write_text",
    "atomic_write_json",
    "write_results",
    "read_results",
    "print_verdicts",
]

HYPOTHESIS_KEYS: tuple[str, ...] = (
    "id", "statement", "criterion", "value", "ci_low", "ci_high", "verdict", "n", "notes",
)
RESULTS_KEYS: tuple[str, ...] = (
    "experiment_id", "parameters", "environment", "model", "metrics", "hypotheses", "figures", "created",
)
_VERDICTS = (_stats.SUPPORTED, _stats.NOT_SUPPORTED, _stats.INCONCLUSIVE)


# --------------------------------------------------------------------------- Hypothesis


@dataclass(frozen=True)
class Hypothesis:
    """One tested hypothesis. Build it with :meth:`evaluate` so the verdict is computed by
    :func:`qhelpers.stats.verdict` from the estimate's interval, never written by hand."""

    id: str
    statement: str
    criterion: str
    value: float
    ci_low: float
    ci_high: float
    verdict: str
    n: int
    notes: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in _VERDICTS:
            raise ConfigError(
                f"verdict must be one of {list(_VERDICTS)}, got {self.verdict!r}; "
                "use Hypothesis.evaluate(...) to compute it from an estimate"
            )
        if not str(self.id):
            raise ConfigError("a hypothesis needs a non-empty id, e.g. 'H5'")

    @classmethod
    def evaluate(
        cls,
        id: str,
        statement: str,
        estimate: "_stats.Estimate | Mapping[str, Any]",
        threshold: float,
        direction: str = ">",
        abs_value: bool = False,
        notes: str = "",
        quantity: str | None = None,
        criterion: str | None = None,
    ) -> "Hypothesis":
        """Judge ``estimate`` (an :class:`~qhelpers.stats.Estimate` or the dict of
        :func:`~qhelpers.stats.correlation`) against ``threshold``.

        ``quantity`` names the estimate in the generated criterion (default "value", or "r"
        for a correlation); ``criterion`` replaces the generated text. An undefined
        estimate's reason, and a correlation's p-values, are appended to ``notes``.
        """
        verdict = _stats.verdict(estimate, threshold, direction, abs_value=abs_value)
        extra: list[str] = []
        if isinstance(estimate, _stats.Estimate):
            value, lo, hi, n, level = estimate.value, estimate.ci_low, estimate.ci_high, estimate.n, estimate.level
            if not estimate.defined:
                extra.append(f"undefined: {estimate.reason}")
            q = quantity or "value"
        elif isinstance(estimate, Mapping):
            is_corr = "r" in estimate
            value = estimate.get("r") if is_corr else estimate.get("value")
            lo, hi = estimate.get("ci_low"), estimate.get("ci_high")
            n = estimate.get("n", 0)
            level = float(estimate.get("level", 0.95))
            if estimate.get("defined", True) is False:
                extra.append(f"undefined: {estimate.get('reason')}")
            if is_corr and estimate.get("p_perm") is not None:
                exact = "exact" if estimate.get("perm_exact") else "Monte Carlo"
                extra.append(
                    f"{estimate.get('method', '')} r; p_perm={float(estimate['p_perm']):.3g} ({exact}), "
                    f"p_parametric={float(estimate.get('p_parametric', math.nan)):.3g}"
                )
            q = quantity or ("r" if is_corr else "value")
        else:
            raise ConfigError(
                f"estimate must be a stats.Estimate or a correlation dict, got {type(estimate).__name__}"
            )
        if criterion is None:
            shown = f"|{q}|" if abs_value else q
            side = "above" if direction == ">" else "below"
            criterion = (
                f"{shown} {direction} {threshold:g}: SUPPORTED if the whole {level:.0%} CI is {side} "
                f"{threshold:g}, NOT_SUPPORTED if it is wholly on the other side, else INCONCLUSIVE"
            )
        all_notes = "; ".join([s for s in [notes, *extra] if s])
        f = lambda v: math.nan if v is None else float(v)  # noqa: E731
        return cls(str(id), str(statement), criterion, f(value), f(lo), f(hi), verdict, int(n or 0), all_notes)

    def sentence(self) -> str:
        """The verdict in one plain sentence, for a notebook's conclusion."""
        if math.isfinite(self.value):
            shown = f"observed {self.value:.4g}"
            if math.isfinite(self.ci_low) and math.isfinite(self.ci_high):
                shown += f" (95% CI {self.ci_low:.4g} to {self.ci_high:.4g})"
        else:
            shown = "the estimate is undefined"
        meaning = {
            "SUPPORTED": "the data support it",
            "NOT_SUPPORTED": "the data contradict it",
            "INCONCLUSIVE": "the data cannot decide it",
        }[self.verdict]
        text = f"{self.id} ({self.statement}): {self.verdict}: {meaning}; {shown}, n = {self.n}."
        return text + (f" Notes: {self.notes}." if self.notes else "")

    def to_dict(self) -> dict[str, Any]:
        """The results.json form: exactly :data:`HYPOTHESIS_KEYS`, NaN kept (to_jsonable maps it to null)."""
        return {k: getattr(self, k) for k in HYPOTHESIS_KEYS}


# --------------------------------------------------------------------------- environment


def _find_git_dir(start: Path) -> Path | None:
    for d in [start, *start.parents]:
        g = d / ".git"
        if g.is_dir():
            return g
        if g.is_file():  # worktree or submodule: "gitdir: <path>"
            try:
                text = g.read_text(encoding="utf-8").strip()
            except OSError:
                return None
            if text.startswith("gitdir:"):
                p = Path(text[len("gitdir:"):].strip())
                return p if p.is_absolute() else (d / p).resolve()
            return None
    return None


def _read_commit(git_dir: Path) -> tuple[str | None, str | None]:
    """(commit sha, branch or None) read from the files of ``git_dir``, without running git."""
    try:
        head = (git_dir / "HEAD").read_text(encoding="utf-8").strip()
    except OSError:
        return None, None
    if not head.startswith("ref:"):
        return (head if len(head) >= 40 else None), None
    ref = head[4:].strip()
    branch = ref.rsplit("/", 1)[-1] if ref.startswith("refs/heads/") else None
    common = git_dir
    cd = git_dir / "commondir"
    if cd.is_file():
        try:
            p = Path(cd.read_text(encoding="utf-8").strip())
            common = p if p.is_absolute() else (git_dir / p).resolve()
        except OSError:
            pass
    for base in dict.fromkeys([git_dir, common]):
        f = base / ref
        if f.is_file():
            try:
                return f.read_text(encoding="utf-8").strip(), branch
            except OSError:
                pass
        packed = base / "packed-refs"
        if packed.is_file():
            try:
                for line in packed.read_text(encoding="utf-8").splitlines():
                    parts = line.split()
                    if len(parts) == 2 and parts[1] == ref and not line.startswith(("#", "^")):
                        return parts[0], branch
            except OSError:
                pass
    return None, branch  # a branch with no commit yet


def _git_dirty(work_tree: Path) -> bool | None:
    """True/False if ``git status`` can tell, else None. Runs git with optional locks off
    (``--no-optional-locks``), so it never takes ``index.lock`` from a concurrent commit."""
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(work_tree), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=False,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return bool(out.stdout.strip())


def git_info(path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """``{"commit", "branch", "dirty", "root"}`` of the git checkout containing ``path``
    (default: this package's folder, then the working directory), or None outside a
    checkout. ``dirty`` is None when git itself is unavailable."""
    starts = [Path(path)] if path is not None else [Path(__file__).resolve().parent, Path.cwd()]
    for start in starts:
        start = start.resolve()
        git_dir = _find_git_dir(start if start.is_dir() else start.parent)
        if git_dir is None:
            continue
        commit, branch = _read_commit(git_dir)
        root = git_dir.parent if git_dir.name == ".git" else None
        for d in [start, *start.parents]:
            if (d / ".git").exists():
                root = d
                break
        return {
            "commit": commit,
            "branch": branch,
            "dirty": _git_dirty(root) if root is not None else None,
            "root": str(root) if root is not None else None,
        }
    return None


def _pkg_version(name: str) -> str | None:
    try:
        return _md.version(name)
    except _md.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "cuda": False}
    try:
        import torch
    except Exception:  # torch absent or broken: still report the CPU
        return info
    try:
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda"] = True
            info["cuda_version"] = torch.version.cuda
            gpus = []
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                gpus.append({
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 2),
                })
            info["gpus"] = gpus
    except Exception as exc:  # a broken driver must not stop a results file
        info["cuda_error"] = f"{type(exc).__name__}: {exc}"
    return info


def environment_info(repo_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Python, platform, package versions, device and git state; never fails without a GPU.

    Package versions come from the installed distributions' metadata (None when not
    installed); ``qhelpers`` is ``qhelpers.__version__`` or "unknown".
    """
    try:
        import qhelpers

        qv = getattr(qhelpers, "__version__", None) or "unknown"
    except Exception:
        qv = "unknown"
    packages = {
        name: _pkg_version(name)
        for name in ("torch", "transformers", "numpy", "scipy", "pandas", "matplotlib", "bitsandbytes")
    }
    packages["qhelpers"] = str(qv)
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": packages,
        "device": _device_info(),
        "git": git_info(repo_path),
        "timestamp": _utc_now(),
    }


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- JSON


def to_jsonable(obj: Any, _path: str = "$") -> Any:
    """Convert ``obj`` into plain JSON types, recursively.

    numpy scalars and arrays -> Python numbers / lists; DataFrame -> list of records;
    Series -> dict; Index -> list; dataclasses -> dict of fields; Path -> str; torch dtype /
    device -> str ("torch.float16", "cpu"); tensors -> lists; datetimes -> ISO strings;
    sets -> sorted lists; mapping keys -> str. Non-finite floats (NaN, +-inf), pandas NA and
    NaT -> None, because JSON has no NaN. Anything else raises ConfigError naming where it is.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, PurePath):
        return str(obj)
    pd = sys.modules.get("pandas")
    if pd is not None and (obj is pd.NaT or obj is pd.NA):
        return None
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.bool_):
            return bool(obj)
        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            return to_jsonable(float(obj), _path)
        if isinstance(obj, np.ndarray):
            return to_jsonable(obj.tolist(), _path)
        if isinstance(obj, np.generic):
            return to_jsonable(obj.item(), _path)
    if pd is not None:
        if isinstance(obj, pd.DataFrame):
            return [to_jsonable(r, f"{_path}[{i}]") for i, r in enumerate(obj.to_dict(orient="records"))]
        if isinstance(obj, pd.Series):
            return {str(k): to_jsonable(v, f"{_path}[{k!r}]") for k, v in obj.items()}
        if isinstance(obj, pd.Index):
            return to_jsonable(list(obj), _path)
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(obj, (torch.dtype, torch.device)):
            return str(obj)
        if isinstance(obj, torch.Tensor):
            return to_jsonable(obj.detach().cpu().tolist(), _path)
        if isinstance(obj, torch.Size):
            return [int(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name), f"{_path}.{f.name}") for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, f"{_path}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        items = [to_jsonable(v, f"{_path}{{}}") for v in obj]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{_path}[{i}]") for i, v in enumerate(obj)]
    raise ConfigError(
        f"cannot write the value at {_path} (type {type(obj).__module__}.{type(obj).__qualname__}) "
        "to JSON; convert it to a number, string, list or dict first"
    )


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Serialise ``obj`` with :func:`to_jsonable` (NaN -> null) FIRST, then write atomically,
    so an unserialisable object leaves any existing file untouched."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text)


# --------------------------------------------------------------------------- results.json


def seed_everything(seed: int) -> None:
    """Fix Python's, NumPy's and torch's random generators (CPU and CUDA)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def write_results(
    out_dir: str | os.PathLike,
    experiment_id: str,
    parameters: Mapping[str, Any],
    metrics: Mapping[str, Any],
    hypotheses: Sequence[Hypothesis],
    figures: Iterable[str] = (),
    model_metadata: Mapping[str, Any] | None = None,
    environment: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/results.json`` atomically and return its path.

    ``figures`` are paths relative to ``out_dir`` (as returned by
    :func:`qhelpers.report.plots.save_figure`); each must exist. ``environment`` defaults to
    :func:`environment_info`.
    """
    out_dir = Path(out_dir)
    if not str(experiment_id):
        raise ConfigError("experiment_id must be a non-empty string, e.g. 'exp005_layer_ablation'")
    if not isinstance(parameters, Mapping) or not isinstance(metrics, Mapping):
        raise ConfigError("parameters and metrics must be dicts")
    hyps = list(hypotheses)
    for h in hyps:
        if not isinstance(h, Hypothesis):
            raise ConfigError(
                f"hypotheses must be Hypothesis objects (built with Hypothesis.evaluate), got {type(h).__name__}"
            )
    ids = [h.id for h in hyps]
    dups = sorted({i for i in ids if ids.count(i) > 1})
    if dups:
        raise ConfigError(f"hypothesis ids {dups} appear more than once; give each hypothesis its own id")
    figs = []
    for f in figures:
        p = Path(f)
        full = p if p.is_absolute() else out_dir / p
        if not full.is_file():
            raise ConfigError(
                f"figure {str(f)!r} not found at {full}; save it with plots.save_figure(fig, out_dir, name) "
                "and pass the path it returns (relative to out_dir)"
            )
        figs.append(p.as_posix())
    doc = {
        "experiment_id": str(experiment_id),
        "parameters": parameters,
        "environment": environment_info() if environment is None else environment,
        "model": model_metadata,
        "metrics": metrics,
        "hypotheses": [h.to_dict() for h in hyps],
        "figures": figs,
        "created": _utc_now(),
    }
    return atomic_write_json(out_dir / "results.json", doc)


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """Load a results.json (``path`` may be the file or its folder) and check its keys."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise ConfigError(f"no results file at {p}; pass the folder given to write_results or the file itself")
    with open(p, encoding="utf-8") as fh:
        doc = json.load(fh)
    missing = [k for k in RESULTS_KEYS if k not in doc]
    if missing:
        raise MeasurementError(f"{p} lacks keys {missing}; it was not written by write_results")
    for h in doc["hypotheses"]:
        if set(h) != set(HYPOTHESIS_KEYS):
            raise MeasurementError(
                f"{p}: hypothesis {h.get('id')!r} has keys {sorted(h)}, expected {list(HYPOTHESIS_KEYS)}"
            )
    return doc


def _fmt(v: Any) -> str:
    if v is None:
        return "nan"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{f:.4g}" if math.isfinite(f) else "nan"


def print_verdicts(hypotheses: Iterable[Hypothesis | Mapping[str, Any]], file: Any = None) -> str:
    """Print (and return) an aligned table: id, verdict, value [CI], n, criterion."""
    rows = []
    for h in hypotheses:
        d = h.to_dict() if isinstance(h, Hypothesis) else dict(h)
        rows.append((
            str(d["id"]),
            str(d["verdict"]),
            f"{_fmt(d['value'])} [{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}]",
            str(d.get("n", "")),
            str(d.get("criterion", "")),
        ))
    head = ("id", "verdict", "value [CI]", "n", "criterion")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = []
    for r in [head, *rows]:
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
    text = "\n".join(line.rstrip() for line in lines)
    print(text, file=file if file is not None else sys.stdout)
    return text

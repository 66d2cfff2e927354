"""Recording an experiment: hypotheses with computed verdicts, the environment, and an
atomically written ``results.json``.

``results.json`` keys: experiment_id, parameters, environment, model, metrics, hypotheses
(each with exactly :data:`HYPOTHESIS_KEYS`: id, statement, criterion, value, ci_low, ci_high,
verdict, n, notes, primary, family, kind, min_effect, threshold, direction, premise, raw_verdict,
adjusted), figures (paths relative to the results folder), created (UTC ISO time).

Verdicts a reviewer would accept: every notebook declares exactly one primary hypothesis (the
seed's); the others are grouped in families and Holm-adjusted within each
(:func:`adjust_families`; ``verdict`` is the adjusted one, ``raw_verdict`` the unadjusted);
sanity checks (true by construction) are kept apart; a hypothesis may state a minimum effect of
practical size and a premise (:meth:`Hypothesis.evaluate`); two analyses of one question decide
only when they agree (:func:`agreeing`).

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
from dataclasses import dataclass, field
from importlib import metadata as _md
from pathlib import Path, PurePath
from typing import Any, Iterable, Mapping, Sequence

from qhelpers.report.html import HYPOTHESIS_DEFAULTS, with_defaults
from qhelpers.stats import multiplicity as _multiplicity
from qhelpers.stats import verdicts as _verdicts
from qhelpers.stats.bootstrap import Estimate
from qhelpers.util.atomic import atomic_write_text
from qhelpers.util.errors import ConfigError, MeasurementError

__all__ = [
    "Hypothesis",
    "HYPOTHESIS_KEYS",
    "LEGACY_HYPOTHESIS_KEYS",
    "KINDS",
    "PRIMARY_FAMILY",
    "adjust_families",
    "agreeing",
    "ordered",
    "RESULTS_KEYS",
    "environment_info",
    "gemm_signature",
    "git_info",
    "to_jsonable",
    "atomic_write_text",
    "atomic_write_json",
    "write_results",
    "read_results",
    "print_verdicts",
]

LEGACY_HYPOTHESIS_KEYS: tuple[str, ...] = (
    "id", "statement", "criterion", "value", "ci_low", "ci_high", "verdict", "n", "notes",
)
"""The keys of a hypothesis in results.json files written before multiplicity and premises."""

HYPOTHESIS_KEYS: tuple[str, ...] = LEGACY_HYPOTHESIS_KEYS + tuple(HYPOTHESIS_DEFAULTS)
"""The keys of a hypothesis in results.json, in order (:meth:`Hypothesis.to_dict`)."""

RESULTS_KEYS: tuple[str, ...] = (
    "experiment_id", "parameters", "environment", "model", "metrics", "hypotheses", "figures", "created",
)
_VERDICTS = (_verdicts.SUPPORTED, _verdicts.NOT_SUPPORTED, _verdicts.INCONCLUSIVE)

KINDS: tuple[str, ...] = ("finding", "sanity check")
"""``finding``: a claim the data could have contradicted. ``sanity check``: true by construction or
nearly so (e.g. one more full-precision layer is closer to full precision); reported apart, never
counted as a finding, never adjusted."""

PRIMARY_FAMILY = "primary"
"""The family of a notebook's one primary hypothesis."""


# --------------------------------------------------------------------------- Hypothesis


@dataclass(frozen=True)
class Hypothesis:
    """One tested hypothesis. Build it with :meth:`evaluate` so the verdict is computed by
    :func:`qhelpers.stats.verdicts.verdict` from the estimate's interval, never written by hand.

    ``verdict`` is the verdict to report: after :func:`adjust_families` the multiplicity-adjusted
    one, with the unadjusted one in ``raw_verdict`` and the adjustment in ``adjusted``
    (``{method, family_size, p_raw, p_adjusted, p_contra_raw, p_contra_adjusted, verdict}``).
    ``p_support``/``p_contra`` (the one-sided p-values of
    :func:`qhelpers.stats.verdicts.support_p_values`) and ``level`` are kept for the adjustment
    and are not written to results.json (``adjusted`` carries them).
    """

    id: str
    statement: str
    criterion: str
    value: float
    ci_low: float
    ci_high: float
    verdict: str
    n: int
    notes: str = ""
    primary: bool = False
    family: str = "secondary"
    kind: str = "finding"
    min_effect: float = 0.0
    threshold: float = math.nan
    direction: str = ">"
    premise: Mapping[str, Any] | None = field(default=None, hash=False)
    raw_verdict: str | None = None
    adjusted: Mapping[str, Any] | None = field(default=None, hash=False)
    p_support: float = math.nan
    p_contra: float = math.nan
    level: float = 0.95

    def __post_init__(self) -> None:
        if self.verdict not in _VERDICTS:
            raise ConfigError(
                f"verdict must be one of {list(_VERDICTS)}, got {self.verdict!r}; "
                "use Hypothesis.evaluate(...) to compute it from an estimate"
            )
        if not str(self.id):
            raise ConfigError("a hypothesis needs a non-empty id, e.g. 'H5'")
        if self.raw_verdict is None:
            object.__setattr__(self, "raw_verdict", self.verdict)
        elif self.raw_verdict not in _VERDICTS:
            raise ConfigError(f"raw_verdict must be one of {list(_VERDICTS)}, got {self.raw_verdict!r}")
        if self.kind not in KINDS:
            raise ConfigError(
                f"kind must be one of {list(KINDS)}, got {self.kind!r}: 'sanity check' for a claim true by "
                "construction (reported apart, not adjusted), else 'finding'"
            )
        if not str(self.family):
            raise ConfigError("family must be a non-empty name, e.g. 'secondary' or 'layers'")
        if self.primary:
            if self.kind != "finding":
                raise ConfigError(f"{self.id}: the primary hypothesis must be a finding, not a {self.kind}")
            if self.family != PRIMARY_FAMILY:
                raise ConfigError(
                    f"{self.id}: the primary hypothesis has family {PRIMARY_FAMILY!r}, got {self.family!r}; "
                    "leave family out when primary=True"
                )
        elif self.family == PRIMARY_FAMILY:
            raise ConfigError(
                f"{self.id}: family {PRIMARY_FAMILY!r} is reserved for the one primary hypothesis; pass "
                "primary=True for it, or name another family"
            )
        if self.direction not in (">", "<"):
            raise ConfigError(f"direction must be '>' or '<', got {self.direction!r}")

    @classmethod
    def evaluate(
        cls,
        id: str,
        statement: str,
        estimate: "Estimate | Mapping[str, Any]",
        threshold: float,
        direction: str = ">",
        abs_value: bool = False,
        notes: str = "",
        quantity: str | None = None,
        criterion: str | None = None,
        *,
        family: str = "secondary",
        primary: bool = False,
        kind: str = "finding",
        min_effect: float = 0.0,
        premise: "Hypothesis | None" = None,
    ) -> "Hypothesis":
        """Judge ``estimate`` (an :class:`~qhelpers.stats.bootstrap.Estimate` or the dict of
        :func:`~qhelpers.stats.correlation`) against ``threshold``.

        ``quantity`` names the estimate in the generated criterion (default "value", or "r"
        for a correlation); ``criterion`` replaces the generated text. An undefined
        estimate's reason, too few texts, a failed premise and a correlation's p-values are
        appended to ``notes``.

        ``primary``: the notebook's one pre-declared hypothesis (family "primary"; write_results
        needs exactly one). ``family``: the group of related hypotheses adjusted together by
        :func:`adjust_families` (Holm). ``kind``: "finding", or "sanity check" for a claim true by
        construction (reported apart, not adjusted). ``min_effect``: the smallest effect of practical
        size, in the estimate's units; SUPPORTED needs the interval to clear
        ``threshold + min_effect`` (``threshold - min_effect`` for "<"). ``premise``: a hypothesis
        this one presupposes (e.g. "LR languages lose more", D > 0); unless its verdict is
        SUPPORTED this one is INCONCLUSIVE with the reason "premise not met (<id>: value [lo, hi])".
        """
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        if primary and family not in ("secondary", PRIMARY_FAMILY):
            raise ConfigError(
                f"{id}: primary=True puts the hypothesis in family {PRIMARY_FAMILY!r}; do not also pass "
                f"family={family!r}"
            )
        if premise is not None and not isinstance(premise, Hypothesis):
            raise ConfigError(
                f"premise must be a Hypothesis (built with Hypothesis.evaluate), got {type(premise).__name__}"
            )
        verdict, reason = _verdicts.verdict_with_reason(estimate, threshold, direction, abs_value, min_effect=min_effect)
        p_support, p_contra = _verdicts.support_p_values(estimate, threshold, direction, abs_value, min_effect=min_effect)
        extra: list[str] = [reason] if reason else []
        if isinstance(estimate, Estimate):
            value, lo, hi, n, level = estimate.value, estimate.ci_low, estimate.ci_high, estimate.n, estimate.level
            q = quantity or "value"
        elif isinstance(estimate, Mapping):
            is_corr = "r" in estimate
            value = estimate.get("r") if is_corr else estimate.get("value")
            lo, hi = estimate.get("ci_low"), estimate.get("ci_high")
            n = estimate.get("n", 0)
            level = float(estimate.get("level", 0.95) or 0.95)
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
        premise_record = None
        if premise is not None:
            premise_record = {
                "id": premise.id, "statement": premise.statement, "verdict": premise.verdict,
                "value": premise.value, "ci_low": premise.ci_low, "ci_high": premise.ci_high, "n": premise.n,
            }
            if premise.verdict != _verdicts.SUPPORTED:
                verdict = _verdicts.INCONCLUSIVE
                extra.insert(0, f"premise not met ({premise.id}: {_fmt(premise.value)} "
                                f"[{_fmt(premise.ci_low)}, {_fmt(premise.ci_high)}], {premise.verdict})")
        if reason or (premise_record is not None and premise_record["verdict"] != _verdicts.SUPPORTED):
            # not tested (too few texts, undefined, premise not met): its p-values must not lower
            # the Holm multipliers of the rest of its family; NaN counts as p = 1
            p_support = p_contra = math.nan
        if criterion is None:
            criterion = _criterion(q, threshold, direction, abs_value, min_effect, level)
        all_notes = "; ".join([s for s in [notes, *extra] if s])
        f = lambda v: math.nan if v is None else float(v)  # noqa: E731
        return cls(
            str(id), str(statement), criterion, f(value), f(lo), f(hi), verdict, int(n or 0), all_notes,
            primary=bool(primary), family=PRIMARY_FAMILY if primary else str(family), kind=kind,
            min_effect=float(min_effect), threshold=float(threshold), direction=direction,
            premise=premise_record, raw_verdict=verdict, adjusted=None,
            p_support=float(p_support), p_contra=float(p_contra), level=float(level),
        )

    @property
    def is_sanity_check(self) -> bool:
        """Whether this record is a sanity check (true by construction), not a finding."""
        return self.kind == "sanity check"

    def sentence(self) -> str:
        """The verdict in one plain sentence, for a notebook's conclusion: the (adjusted) verdict,
        the estimate, n, then the raw verdict and the adjustment, a failed premise, the minimum
        effect, and whether it is the primary hypothesis or a sanity check."""
        if math.isfinite(self.value):
            shown = f"observed {self.value:.4g}"
            if math.isfinite(self.ci_low) and math.isfinite(self.ci_high):
                shown += f" ({self.level:.0%} CI {self.ci_low:.4g} to {self.ci_high:.4g})"
        else:
            shown = "the estimate is undefined"
        meaning = {
            "SUPPORTED": "the data support it",
            "NOT_SUPPORTED": "the data contradict it",
            "INCONCLUSIVE": "the data cannot decide it",
        }[self.verdict]
        label = {True: " [primary]", False: ""}[self.primary] + (" [sanity check]" if self.is_sanity_check else "")
        text = f"{self.id}{label} ({self.statement}): {self.verdict}: {meaning}; {shown}, n = {self.n}."
        if self.min_effect:
            text += f" Minimum effect of practical size: {self.min_effect:g}."
        adj = self.adjusted or {}
        size = adj.get("family_size")
        p_known = adj.get("p_raw") is not None and math.isfinite(float(adj["p_raw"]))
        if size and int(size) > 1 and not p_known:
            text += f" One of {size} in family '{self.family}'; not tested, so not adjusted (see the notes)."
        elif size and int(size) > 1:
            p_raw, p_adj = _fmt(adj.get("p_raw"), 3), _fmt(adj.get("p_adjusted"), 3)
            text += (f" Adjusted ({adj.get('method', 'holm').capitalize()}) within family '{self.family}' of "
                     f"{size}: one-sided p = {p_raw} -> {p_adj}")
            if self.raw_verdict != self.verdict:
                text += f"; the unadjusted verdict {self.raw_verdict} does not survive the adjustment."
            else:
                text += "; the unadjusted verdict is the same."
        if self.is_sanity_check:
            text += " A sanity check (true by construction or nearly so): not counted as a finding."
        if self.premise and self.premise.get("verdict") != _verdicts.SUPPORTED:
            text += f" Its premise {self.premise.get('id')} ({self.premise.get('statement')}) is not met."
        return text + (f" Notes: {self.notes}." if self.notes else "")

    def to_dict(self) -> dict[str, Any]:
        """The results.json form: exactly :data:`HYPOTHESIS_KEYS`, NaN kept (to_jsonable maps it to null)."""
        out = {k: getattr(self, k) for k in HYPOTHESIS_KEYS}
        out["premise"] = dict(self.premise) if self.premise is not None else None
        out["adjusted"] = dict(self.adjusted) if self.adjusted is not None else None
        return out


def _criterion(q: str, threshold: float, direction: str, abs_value: bool, min_effect: float, level: float) -> str:
    shown = f"|{q}|" if abs_value else q
    side = "above" if direction == ">" else "below"
    b = _verdicts.boundary(threshold, direction, min_effect)
    if min_effect:
        head = (f"{shown} {direction} {threshold:g} by at least {min_effect:g} (practical size): SUPPORTED if the "
                f"whole {level:.0%} CI is {side} {b:g}, NOT_SUPPORTED if it is wholly on the other side of {b:g}")
    else:
        head = (f"{shown} {direction} {threshold:g}: SUPPORTED if the whole {level:.0%} CI is {side} "
                f"{threshold:g}, NOT_SUPPORTED if it is wholly on the other side")
    return head + f", else INCONCLUSIVE (also with n < {_verdicts.MIN_UNITS})"


def adjust_families(hypotheses: Iterable[Hypothesis], method: str = "holm") -> list[Hypothesis]:
    """The hypotheses (same order) with multiplicity adjustment within each family.

    Findings are grouped by ``family``; within each, the two one-sided p-values of every
    hypothesis are Holm-adjusted and the verdict becomes the adjusted one
    (:func:`qhelpers.stats.multiplicity.adjust_verdicts`: never more decisive than the raw verdict,
    which stays in ``raw_verdict``; a family of one is unchanged). Sanity checks are not adjusted
    (``adjusted`` None). Idempotent: it always starts from ``raw_verdict``.
    """
    hyps = list(hypotheses)
    for h in hyps:
        if not isinstance(h, Hypothesis):
            raise ConfigError(
                f"adjust_families needs Hypothesis objects (built with Hypothesis.evaluate), got {type(h).__name__}"
            )
    out: list[Hypothesis] = list(hyps)
    families: dict[str, list[int]] = {}
    for i, h in enumerate(hyps):
        if h.is_sanity_check:
            out[i] = dataclasses.replace(h, verdict=h.raw_verdict, adjusted=None)
        else:
            families.setdefault(h.family, []).append(i)
    for family, idx in families.items():
        levels = {hyps[i].level for i in idx}
        if len(levels) > 1:
            raise ConfigError(
                f"family {family!r} mixes confidence levels {sorted(levels)}; use one level per family"
            )
        adjusted = _multiplicity.adjust_verdicts(
            [hyps[i].raw_verdict for i in idx], [hyps[i].p_support for i in idx], [hyps[i].p_contra for i in idx],
            level=levels.pop(), method=method,
        )
        for i, a in zip(idx, adjusted):
            out[i] = dataclasses.replace(hyps[i], verdict=a.verdict, adjusted=a.to_dict())
    return out


def agreeing(
    first: Hypothesis,
    second: Hypothesis,
    id: str | None = None,
    statement: str | None = None,
    **changes: Any,
) -> Hypothesis:
    """One hypothesis decided by two analyses of the same question (e.g. with and without
    massive-activation tokens): ``first``'s record with its verdict kept only when ``second``'s
    raw verdict agrees; otherwise INCONCLUSIVE with the note "the two analyses disagree
    (<first id>: V1, value [lo, hi]; <second id>: V2, value [lo, hi])". The value and interval
    shown are ``first``'s; both are in the note. ``id``/``statement`` (default: ``first``'s) and
    ``changes`` (e.g. ``primary=True``, ``family=...``) set fields of the result; adjust it
    afterwards with :func:`adjust_families` (its p-values are the less favourable of the two when
    they agree, NaN, i.e. not tested, when they do not).
    """
    for h in (first, second):
        if not isinstance(h, Hypothesis):
            raise ConfigError(f"agreeing needs two Hypothesis objects, got {type(h).__name__}")
    v1, v2 = first.raw_verdict, second.raw_verdict
    agree = v1 == v2
    verdict = v1 if agree else _verdicts.INCONCLUSIVE
    both = (f"{first.id}: {v1}, {_fmt(first.value)} [{_fmt(first.ci_low)}, {_fmt(first.ci_high)}]; "
            f"{second.id}: {v2}, {_fmt(second.value)} [{_fmt(second.ci_low)}, {_fmt(second.ci_high)}]")
    if not agree:
        note = f"the two analyses disagree ({both})"
    elif verdict == _verdicts.INCONCLUSIVE:
        note = f"neither of the two analyses decides ({both})"
    else:
        note = f"decided by two analyses that agree ({both})"
    # p-values: the less favourable of the two when they agree; when they disagree the question is
    # not decided, so it must not lower the Holm multipliers of its family (NaN counts as p = 1)
    worst = lambda a, b: max(a, b) if agree else math.nan  # noqa: E731
    fields = {
        "id": str(id if id is not None else first.id),
        "statement": str(statement if statement is not None else first.statement),
        "verdict": verdict,
        "raw_verdict": verdict,
        "adjusted": None,
        "notes": "; ".join(s for s in (first.notes, note) if s),
        "criterion": f"{first.criterion}; decided only when {second.id} (the same criterion) agrees",
        "p_support": worst(first.p_support, second.p_support),
        "p_contra": worst(first.p_contra, second.p_contra),
        "n": min(first.n, second.n),
    }
    if "primary" in changes and changes["primary"] and "family" not in changes:
        changes["family"] = PRIMARY_FAMILY
    fields.update(changes)
    return dataclasses.replace(first, **fields)


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


def gemm_signature(offset: int = 0) -> str:
    """sha1 of a fixed float32 CPU GEMM (seed-0 ``randn(300, 777) @ randn(777, 513)``) at this process's
    thread count. Machines with the same digest run the same GEMM code path (MKL's branch and thread
    split), so their float32 results can agree bit for bit; another digest means they round otherwise.
    ``offset``: elements by which the left operand's storage is shifted off its aligned start."""
    import hashlib

    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 777, generator=gen), torch.randn(777, 513, generator=gen)
    if offset:
        shifted = torch.empty(a.numel() + offset)[offset:].view(300, 777)
        a = shifted.copy_(a)
    return hashlib.sha1((a @ b).numpy().tobytes()).hexdigest()


def _device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "cuda": False}
    try:
        import torch
    except Exception:  # torch absent or broken: still report the CPU
        return info
    try:
        info["torch_threads"] = torch.get_num_threads()
        # the kernels' instruction set (ATen's, and MKL's reproducibility branch when pinned): CPUs of
        # another set round float sums differently (qhelpers.runner.environment.PINNED_NUMERICS)
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        if os.environ.get("MKL_CBWR"):
            info["mkl_cbwr"] = os.environ["MKL_CBWR"]
        info["gemm_sha1"] = gemm_signature()
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
        return {
            f.name: to_jsonable(getattr(obj, f.name), f"{_path}.{f.name}")
            for f in dataclasses.fields(obj)
            if f.metadata.get("serialize", True)  # e.g. an Estimate's bootstrap distribution
        }
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

    The hypotheses must include exactly one with ``primary=True`` (else ConfigError); they are
    adjusted within their families first (:func:`adjust_families`, idempotent), so the verdicts
    written are the adjusted ones, with ``raw_verdict`` and ``adjusted`` beside them.

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
    primaries = [h.id for h in hyps if h.primary]
    if len(primaries) != 1:
        got = "none" if not primaries else f"{len(primaries)} ({', '.join(primaries)})"
        raise ConfigError(
            f"exactly one hypothesis must be primary (the notebook's pre-declared main claim, the seed's "
            f"hypothesis), got {got}; pass primary=True to Hypothesis.evaluate for that one and give the others "
            f"a family (family='...')"
        )
    hyps = adjust_families(hyps)
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
    """Load a results.json (``path`` may be the file or its folder) and check its keys.

    Hypotheses written before multiplicity and premises (only :data:`LEGACY_HYPOTHESIS_KEYS`) are
    read with the defaults of :data:`~qhelpers.report.html.HYPOTHESIS_DEFAULTS` (not primary,
    family "secondary", a finding, raw verdict = verdict, not adjusted)."""
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
    hyps = []
    for h in doc["hypotheses"]:
        keys = set(h) if isinstance(h, Mapping) else set()
        if not (set(LEGACY_HYPOTHESIS_KEYS) <= keys <= set(HYPOTHESIS_KEYS)):
            raise MeasurementError(
                f"{p}: hypothesis {h.get('id') if isinstance(h, Mapping) else h!r} has keys {sorted(keys)}, "
                f"expected {list(HYPOTHESIS_KEYS)} (or, from an older version, {list(LEGACY_HYPOTHESIS_KEYS)})"
            )
        hyps.append(with_defaults(h))
    doc["hypotheses"] = hyps
    return doc


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "nan"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{f:.{digits}g}" if math.isfinite(f) else "nan"


def ordered(hypotheses: Iterable[Hypothesis | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The hypotheses as results.json dicts (old ones with defaults), in reading order: the primary
    first, then the findings family by family (families in order of first appearance), then the
    sanity checks."""
    rows = [with_defaults(h.to_dict() if isinstance(h, Hypothesis) else h) for h in hypotheses]
    families = list(dict.fromkeys(str(d["family"]) for d in rows))

    def key(item: tuple[int, dict[str, Any]]) -> tuple[int, int, int]:
        i, d = item
        group = 0 if d["primary"] else 2 if d["kind"] == "sanity check" else 1
        return group, families.index(str(d["family"])) if group == 1 else 0, i

    return [d for _, d in sorted(enumerate(rows), key=key)]


def print_verdicts(hypotheses: Iterable[Hypothesis | Mapping[str, Any]], file: Any = None) -> str:
    """Print (and return) an aligned table: id, family (``primary``, a family name, or ``sanity
    check``), verdict (adjusted), raw verdict, value [CI], n, criterion; the primary first, then the
    families, then the sanity checks. Hypothesis objects are adjusted first (:func:`adjust_families`)."""
    hyps = list(hypotheses)
    if hyps and all(isinstance(h, Hypothesis) for h in hyps):
        hyps = adjust_families(hyps)
    rows = []
    for d in ordered(hyps):
        group = "sanity check" if d["kind"] == "sanity check" else str(d["family"])
        rows.append((
            str(d["id"]),
            group,
            str(d["verdict"]),
            str(d.get("raw_verdict") or d["verdict"]),
            f"{_fmt(d['value'])} [{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}]",
            str(d.get("n", "")),
            str(d.get("criterion", "")),
        ))
    head = ("id", "family", "verdict", "raw verdict", "value [CI]", "n", "criterion")
    k = len(head) - 1
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(k)]
    lines = []
    for r in [head, *rows]:
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(k)) + "  " + r[k])
    text = "\n".join(line.rstrip() for line in lines)
    print(text, file=file if file is not None else sys.stdout)
    return text

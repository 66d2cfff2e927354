"""A notebook's records in the run folder: ``<stem>/run.json`` (written by the supervisor and the
worker) and ``<stem>/results.json`` (written by the notebook), read and written as plain JSON.

``run.json`` holds ``status`` (one of :data:`STATUSES`), the injected ``parameters``, their hash,
the notebook's code hash, times, ``error`` (:func:`error_record`) and, once completed, the sha256 of
its results.json: "completed" means a results.json that parses and still has that hash
(:func:`completion_problem`).

A notebook folder that is re-run is never deleted: it is moved aside to ``<stem>.prev-<n>``
(:func:`move_aside`)."""
from __future__ import annotations

import datetime as _dt
import glob
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

from qhelpers.report.html import with_defaults  # stdlib only: no heavy imports
from qhelpers.util.atomic import atomic_write_text

STATUSES = ("pending", "running", "completed", "failed", "interrupted")


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (_dt.date, _dt.datetime)):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    return repr(obj)


def clean_json(obj: Any) -> Any:
    """Plain JSON types; non-finite floats -> None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return _json_default(obj)


def atomic_write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` (through :func:`clean_json`) as indented JSON, atomically."""
    text = json.dumps(clean_json(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def read_json(path: Path) -> Any:
    """The JSON document in ``path``."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def load_record(nb_dir: Path) -> dict[str, Any] | None:
    """``nb_dir/run.json``, or None when there is none; an unreadable one reads as failed."""
    rj = nb_dir / "run.json"
    if not rj.is_file():
        return None
    try:
        rec = read_json(rj)
    except (OSError, ValueError) as exc:
        return {"notebook": nb_dir.name, "status": "failed", "error": {"ename": "RunnerError", "evalue": f"unreadable run.json: {exc}"}}
    return rec if isinstance(rec, dict) else None


def load_results(nb_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(results.json of nb_dir, None)``, ``(None, why it is unusable)``, or ``(None, None)`` when absent."""
    p = nb_dir / "results.json"
    if not p.is_file():
        return None, None
    try:
        doc = read_json(p)
    except (OSError, ValueError) as exc:
        return None, f"results.json unreadable: {exc}"
    if not isinstance(doc, dict):
        return None, "results.json is not an object"
    return doc, None


def results_digest(nb_dir: Path) -> tuple[str | None, str | None]:
    """``(sha256 of nb_dir/results.json, None)`` when it holds a JSON object, else ``(None, why not)``."""
    p = nb_dir / "results.json"
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return None, "results.json missing"
    except OSError as exc:
        return None, f"results.json unreadable: {exc}"
    try:
        doc = json.loads(data.decode("utf-8"))
    except ValueError as exc:
        return None, f"results.json unreadable: {exc}"
    if not isinstance(doc, dict):
        return None, "results.json is not an object"
    return hashlib.sha256(data).hexdigest(), None


def completion_problem(nb_dir: Path, record: Mapping[str, Any] | None) -> str | None:
    """None when ``record`` (the notebook's run.json) says completed and ``nb_dir/results.json``
    parses and has the sha256 recorded at completion; else what is wrong, in a few words."""
    if not record or record.get("status") != "completed":
        return f"previous status {(record or {}).get('status', 'unknown')}"
    digest, problem = results_digest(nb_dir)
    if problem:
        return problem
    recorded = record.get("results_sha256")
    if not recorded:
        return "no results hash recorded (run by an older run_all.py)"
    if recorded != digest:
        return "results.json changed since it was recorded (sha256 differs)"
    return None


PREV_SUFFIX = re.compile(r"^(?P<stem>.+)\.prev-(?P<n>[0-9]+)$")


def is_moved_aside(name: str) -> bool:
    """Whether a folder name is an earlier result moved aside (``<stem>.prev-<n>``)."""
    return PREV_SUFFIX.match(name) is not None


def moved_aside_folders(out_dir: Path, stem: str) -> list[Path]:
    """``out_dir/<stem>.prev-<n>`` folders, oldest (lowest n) first."""
    found = []
    for d in Path(out_dir).glob(f"{glob.escape(stem)}.prev-*"):
        m = PREV_SUFFIX.match(d.name)
        if m and m["stem"] == stem and d.is_dir():
            found.append((int(m["n"]), d))
    return [d for _, d in sorted(found)]


def move_aside(nb_dir: Path) -> Path:
    """Rename ``nb_dir`` to the next free ``<stem>.prev-<n>`` beside it and return the new path
    (an OSError, such as a folder that cannot be renamed, propagates)."""
    taken = [int(PREV_SUFFIX.match(d.name)["n"]) for d in moved_aside_folders(nb_dir.parent, nb_dir.name)]
    n = max(taken, default=0) + 1
    while True:
        target = nb_dir.with_name(f"{nb_dir.name}.prev-{n}")
        if not os.path.lexists(target):
            break
        n += 1
    os.rename(nb_dir, target)
    return target


def hypotheses_of(results: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The hypothesis entries of a results.json document (entries that are not objects skipped),
    each with the keys of ``report.html.HYPOTHESIS_DEFAULTS`` filled in, so that a results.json
    written before multiplicity and premises reads as one with no primary, family "secondary"."""
    return [with_defaults(h) for h in (results or {}).get("hypotheses") or [] if isinstance(h, Mapping)]


def error_record(ename: str, evalue: str, traceback: str = "", cell_index: int | None = None,
                 exec_count: int | None = None) -> dict[str, Any]:
    """The ``error`` entry of run.json."""
    return {"ename": ename, "evalue": evalue, "cell_index": cell_index, "exec_count": exec_count,
            "traceback": traceback}


def mark_finished(record: dict[str, Any], status: str, duration_s: float, error: Mapping[str, Any] | None,
                  output_dir: Path) -> dict[str, Any]:
    """Record a notebook's end in its run.json ``record`` (in place; also returned).

    A notebook that ran to its end counts as completed only with a results.json that parses:
    its sha256 is recorded (``results_sha256``); without one the status is failed."""
    digest = None
    if status == "completed":
        digest, problem = results_digest(output_dir)
        if problem:
            status = "failed"
            error = error_record("ResultsMissing", f"the notebook ran to its end but {problem}; "
                                 "a completed notebook must write results.json into OUTPUT_DIR")
    record.update({
        "status": status,
        "end": utc_now(),
        "duration_s": round(duration_s, 3),
        "error": error,
        "results": "results.json" if (output_dir / "results.json").is_file() else None,
        "results_sha256": digest,
    })
    return record

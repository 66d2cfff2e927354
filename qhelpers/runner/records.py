"""A notebook's records in the run folder: ``<stem>/run.json`` (written by the supervisor and the
worker) and ``<stem>/results.json`` (written by the notebook), read and written as plain JSON.

``run.json`` holds ``status`` (one of :data:`STATUSES`), the injected ``parameters``, their hash,
the notebook's code hash, times and ``error`` (:func:`error_record`)."""
from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any, Mapping

from qhelpers.util.atomic import atomic_write_text  # stdlib only: no heavy imports

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


def hypotheses_of(results: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    """The hypothesis entries of a results.json document (entries that are not objects skipped)."""
    return [h for h in (results or {}).get("hypotheses") or [] if isinstance(h, Mapping)]


def error_record(ename: str, evalue: str, traceback: str = "", cell_index: int | None = None,
                 exec_count: int | None = None) -> dict[str, Any]:
    """The ``error`` entry of run.json."""
    return {"ename": ename, "evalue": evalue, "cell_index": cell_index, "exec_count": exec_count,
            "traceback": traceback}


def mark_finished(record: dict[str, Any], status: str, duration_s: float, error: Mapping[str, Any] | None,
                  output_dir: Path) -> dict[str, Any]:
    """Record a notebook's end in its run.json ``record`` (in place; also returned)."""
    record.update({
        "status": status,
        "end": utc_now(),
        "duration_s": round(duration_s, 3),
        "error": error,
        "results": "results.json" if (output_dir / "results.json").is_file() else None,
    })
    return record

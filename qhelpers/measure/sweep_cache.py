"""An on-disk cache of sweep scores, so several notebooks can share one expensive sweep.

The theory notebooks all need the same per-layer criticality sweep (``n_layers + 2``
configurations). :func:`cached_sweep` runs :func:`qhelpers.measure.sweep.run_sweep` once and stores
its per-text scores under a key that covers everything the scores depend on:

* the model: its spec, device, dtype and a fingerprint of every parameter (name, shape,
  float64 sum and sum of squares), so a changed checkpoint behind the same spec misses;
* the texts: every (language, id, text) of the corpus;
* the configurations (``Variant.to_dict``) and the measurement settings;
* the torch and transformers versions.

Values are stored as JSON with 17 significant digits, so a cache hit returns scores
bit-identical to the run that wrote them. Files are written atomically, with the sha256 of
their content: an entry that does not parse or does not match its hash (a damaged disk, a
hand edit, an entry from an older qhelpers) is reported, computed again and replaced. A
process that finds another computing the same key (a lock file beside the entry) waits for
its result rather than computing it twice.
Default folder: ``$QHELPERS_SWEEP_CACHE``, else ``$QHELPERS_CACHE/sweeps`` when that variable is set,
else ``~/.cache/qhelpers/sweeps``; ``cache=False`` turns caching off, a path chooses the folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch

from qhelpers.measure.scoring import MeasureConfig
from qhelpers.measure.sweep import SweepResult, as_variants, run_sweep
from qhelpers.quant.engine import Variant
from qhelpers.util.atomic import atomic_write_text
from qhelpers.util.cache import SWEEP_CACHE_ENV, cache_lock, qhelpers_cache_dir

__all__ = ["cached_sweep", "sweep_key", "default_sweep_cache"]

_FORMAT = 2  # 2: least-padding batches (measure.length_batches); scores differ from 1 in the last bits


def default_sweep_cache() -> Path:
    """``$QHELPERS_SWEEP_CACHE``, else ``$QHELPERS_CACHE/sweeps``, else ``~/.cache/qhelpers/sweeps``."""
    own = os.environ.get(SWEEP_CACHE_ENV)
    return Path(own).expanduser() if own else qhelpers_cache_dir("sweeps")


def _model_fingerprint(model: torch.nn.Module) -> list[Any]:
    out = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = p.detach().to(torch.float64)
            out.append([name, list(p.shape), repr(float(x.sum())), repr(float((x * x).sum()))])
    return out


def sweep_key(loaded: Any, corpus: Any, variants: Mapping[str, Variant], measure: MeasureConfig) -> str:
    """SHA-256 over everything the sweep's scores depend on (see the module docstring)."""
    import transformers

    h = hashlib.sha256()
    head = {
        "format": _FORMAT,
        "spec": loaded.spec,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "variants": {k: v.to_dict() for k, v in variants.items()},
        "measure": dataclasses.asdict(measure),
        "weights": _model_fingerprint(loaded.model),
    }
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for lang, text_id, text in corpus.items():
        h.update(json.dumps([lang, text_id, text]).encode())
    return h.hexdigest()


def _checksum(doc: Mapping[str, Any]) -> str:
    """sha256 of an entry's content (canonical JSON: a float reads back as the same float)."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _encode(result: SweepResult) -> str:
    doc = {
        "format": _FORMAT,
        "scores": result.scores.to_dict(orient="split"),
        "overhead": result.overhead.to_dict(orient="split"),
        "seconds": result.seconds,
        "baseline": result.baseline,
        "run_order": result.run_order,
        "prefix_stats": result.prefix_stats,
    }
    doc = json.loads(json.dumps(doc, default=str))  # the content exactly as it will read back
    return json.dumps({**doc, "sha256": _checksum(doc)})


def _decode(text: str, variants: dict[str, Variant]) -> SweepResult:
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    recorded = doc.pop("sha256", None)
    if recorded is None:
        raise ValueError("no sha256 recorded (written by an older qhelpers)")
    if recorded != _checksum(doc):
        raise ValueError("content does not match its sha256")
    frame = lambda d: pd.DataFrame(d["data"], index=d["index"], columns=d["columns"])  # noqa: E731
    return SweepResult(
        scores=frame(doc["scores"]),
        variants=variants,
        overhead=frame(doc["overhead"]),
        seconds=doc["seconds"],
        baseline=doc["baseline"],
        run_order=doc["run_order"],
        prefix_stats=doc["prefix_stats"],
    )


def cached_sweep(
    loaded: Any,
    corpus: Any,
    variants: Sequence[Variant] | Mapping[str, Any],
    measure: MeasureConfig = MeasureConfig(),
    *,
    cache: bool | str | os.PathLike = True,
    progress: bool = True,
    baseline: str = "fp",
) -> tuple[SweepResult, bool]:
    """``run_sweep`` with an on-disk cache; returns ``(result, hit)``.

    ``hit`` says whether the scores came from the cache. ``result.variants`` always holds the
    caller's variants (with the baseline first, as ``run_sweep`` orders them).
    """
    ordered = as_variants(variants)
    if baseline not in ordered:
        ordered = {baseline: Variant(baseline), **ordered}
    if cache is False or cache is None:
        return run_sweep(loaded, corpus, ordered, measure, progress=progress, baseline=baseline), False
    folder = default_sweep_cache() if cache is True else Path(cache).expanduser()
    path = folder / f"{sweep_key(loaded, corpus, ordered, measure)}.json"
    hit = _read(path, ordered)
    if hit is not None:
        return hit, True
    # One process computes a key at a time; the others wait for its file instead of
    # computing the same sweep beside it (notebooks run with run_all.py --workers N).
    lock = path.with_suffix(".lock")
    with cache_lock(lock, f"another process is computing this sweep; waiting for it ({lock})"):
        hit = _read(path, ordered)
        if hit is not None:
            return hit, True
        result = run_sweep(loaded, corpus, ordered, measure, progress=progress, baseline=baseline)
        atomic_write_text(path, _encode(result))
    return result, False


def _read(path: Path, variants: dict[str, Variant]) -> SweepResult | None:
    """The cached result in ``path``; None when there is none, or when it is damaged (reported:
    the caller computes it again and replaces the entry)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        print(f"sweep cache entry {path} is unreadable ({exc}); computing the sweep again", flush=True)
        return None
    try:
        return _decode(text, variants)
    except (ValueError, KeyError, TypeError) as exc:
        print(f"sweep cache entry {path} is damaged ({exc}); computing the sweep again and replacing it", flush=True)
        return None

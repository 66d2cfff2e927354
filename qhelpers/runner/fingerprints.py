"""What a notebook's results depend on besides its parameters and its own code, fingerprinted
without importing the numeric stack: the qhelpers package (every file of it, hashed), its version
and git commit, and the files of the model a notebook loads.

A completed result whose qhelpers hash or model fingerprint differs from the current one is
*stale*: ``--resume`` re-runs it (or keeps it, marked stale, with ``--keep-stale``)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from qhelpers.util.cache import models_cache_root  # stdlib only

PACKAGE_ROOT = Path(__file__).resolve().parents[1]

#: Keys of a converted model's qhelpers_meta.json that say nothing about its weights.
_VOLATILE_META = ("created", "conversion_seconds")


def _tree_files(root: Path) -> list[Path]:
    """Files under ``root`` (sorted; hidden entries and ``__pycache__`` left out)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and not f.endswith(".pyc")]
    return out


@lru_cache(maxsize=4)
def qhelpers_code_hash(root: Path = PACKAGE_ROOT) -> str:
    """sha256 over every file of the qhelpers package (code and data: path and content)."""
    digest = hashlib.sha256()
    for path in _tree_files(root):
        digest.update(path.relative_to(root).as_posix().encode("utf-8") + b"\x00")
        try:
            digest.update(path.read_bytes())
        except OSError:
            digest.update(b"<unreadable>")
        digest.update(b"\x00")
    return digest.hexdigest()


def qhelpers_version() -> str:
    """The installed qhelpers version (the package's ``__version__``)."""
    import qhelpers

    return str(getattr(qhelpers, "__version__", "unknown"))


def git_state(root: Path = PACKAGE_ROOT.parent) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout holding qhelpers."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _folder_fingerprint(folder: Path) -> str:
    """sha256 over the names, sizes and modification times of a folder's files."""
    digest = hashlib.sha256()
    for path in _tree_files(folder):
        try:
            st = path.stat()
        except OSError:
            continue
        digest.update(f"{path.relative_to(folder).as_posix()}\x00{st.st_size}\x00{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "huggingface") / "hub"


def model_fingerprint(spec: Any) -> str | None:
    """A short string that changes when the files behind model ``spec`` change (None: no spec).

    ``tiny:<arch>``: the spec itself (tiny models are built by qhelpers' code, hashed separately);
    ``embedded:<name>``: the converted cache's metadata (GGUF sha256, package, file hashes);
    a local folder: its files' names, sizes and modification times; a hub id: the commit of the
    local Hugging Face cache. Computed when a notebook completes, so a model converted or
    downloaded by that notebook is fingerprinted as it was used."""
    if not isinstance(spec, str) or not spec.strip():
        return None
    spec = spec.strip()
    prefix, _, rest = spec.partition(":")
    if prefix == "tiny":
        return spec
    if prefix == "embedded":
        name = rest.strip().lower()
        meta_path = models_cache_root(None) / name / "qhelpers_meta.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return f"embedded:{name} (not converted)"
        if not isinstance(meta, dict):
            return f"embedded:{name} (unreadable cache metadata)"
        kept = {k: v for k, v in meta.items() if k not in _VOLATILE_META}
        text = json.dumps(kept, sort_keys=True, default=str)
        return f"embedded:{name} {hashlib.sha256(text.encode()).hexdigest()[:16]}"
    path = Path(spec).expanduser()
    if path.is_dir():
        return f"folder {_folder_fingerprint(path)[:16]}"
    refs = _hub_cache_dir() / ("models--" + spec.replace("/", "--")) / "refs" / "main"
    try:
        return f"hub:{spec}@{refs.read_text(encoding='utf-8').strip()}"
    except OSError:
        return f"hub:{spec} (not in the local cache)"

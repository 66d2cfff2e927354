"""Fast re-verification of converted models in the cache.

A converted embedded model (``qhelpers_meta.json`` plus its safetensors, see
:func:`qhelpers.models.loading.convert_embedded`) lists every file's size and sha256, and every
load used to hash all of them again: about 0.5 s for SmolLM2 and 1 s for Gemma-3 here, paid by
every notebook. After one full check, :func:`verify_converted` records each file's ``stat``
identity (device, inode, size, modification and change times) in a stamp,
``.qhelpers_verified.json`` in the model's folder (hidden, so folder fingerprints ignore it);
while every file still has that identity, later loads skip the hashing. Any write to a file
changes its change time (``ctime``, which ``os.utime`` cannot set back), so a file altered after
the check is hashed again and a damaged one still raises.

"Racy" files (git's term): a file written within :data:`RACY_SECONDS` of the check could be
written again within the file system's timestamp granularity without changing its times, so
such a check is not recorded and the next load hashes again.

``QHELPERS_FULL_VERIFY=1`` ignores stamps (every load hashes every file, as before).
Standard library only.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from qhelpers.util.atomic import atomic_write_text
from qhelpers.util.cache import file_sha256

#: Environment variable: "1" makes every load hash every file of a converted model.
FULL_VERIFY_ENV = "QHELPERS_FULL_VERIFY"

#: The stamp file inside a converted model's folder.
STAMP_FILE = ".qhelpers_verified.json"

#: A file modified less than this many seconds before a check is not stamped (FAT and some
#: network file systems keep times to 2 s).
RACY_SECONDS = 3.0

_STAMP_FORMAT = 1


def full_verify_requested() -> bool:
    """Whether ``$QHELPERS_FULL_VERIFY`` asks for a full hash check on every load."""
    return os.environ.get(FULL_VERIFY_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _meta_digest(folder: Path, meta_file: str) -> str:
    return file_sha256(folder / meta_file)


def stamp_is_valid(folder: str | os.PathLike, files: list[str], meta_file: str) -> bool:
    """Whether ``folder``'s stamp covers the current metadata file and every file of ``files``
    with its current identity."""
    folder = Path(folder)
    try:
        stamp = json.loads((folder / STAMP_FILE).read_text(encoding="utf-8"))
        if not isinstance(stamp, dict) or stamp.get("format") != _STAMP_FORMAT:
            return False
        if stamp.get("meta_sha256") != _meta_digest(folder, meta_file):
            return False
        recorded = stamp.get("files")
        if not isinstance(recorded, dict) or set(recorded) != set(files):
            return False
        return all(recorded[name] == _identity(folder / name) for name in files)
    except (OSError, ValueError, TypeError):
        return False


def write_stamp(folder: str | os.PathLike, files: list[str], meta_file: str) -> bool:
    """Record that ``files`` (and the metadata file as it is now) were just checked in full.

    Returns whether the stamp was written: not when a file is racy (modified within
    :data:`RACY_SECONDS`) or the folder is not writable (a read-only shared cache simply hashes
    on every load)."""
    folder = Path(folder)
    try:
        # The file system's own clock, not time.time(): a network file system's server may differ.
        probe = folder / f".qhelpers_clock.{os.getpid()}"
        probe.touch()
        try:
            now_ns = probe.stat().st_mtime_ns
        finally:
            probe.unlink()
        identities = {name: _identity(folder / name) for name in files}
        newest = max((max(ident[3], ident[4]) for ident in identities.values()), default=0)
        if now_ns - newest < RACY_SECONDS * 1e9:
            return False
        stamp = {
            "format": _STAMP_FORMAT,
            "meta_sha256": _meta_digest(folder, meta_file),
            "files": identities,
            "checked": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_text(folder / STAMP_FILE, json.dumps(stamp, indent=1))
    except OSError:
        return False
    return True


def verify_converted(
    folder: str | os.PathLike,
    meta: dict[str, Any],
    meta_file: str,
    full_check: Callable[[Path, dict[str, Any]], None],
) -> bool:
    """Check a converted model's files: skipped when the stamp shows them unchanged since a full
    check, else ``full_check(folder, meta)`` (which raises on damage) and a new stamp.

    Returns whether the full check ran."""
    folder = Path(folder)
    files = meta.get("files")
    names = sorted(files) if isinstance(files, dict) else []
    if names and not full_verify_requested() and stamp_is_valid(folder, names, meta_file):
        return False
    full_check(folder, meta)
    if names and not full_verify_requested():
        write_stamp(folder, names, meta_file)
    return True

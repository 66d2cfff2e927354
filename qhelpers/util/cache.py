"""Where qhelpers caches converted models, sweeps and adapter zoos, and the lock that keeps two
processes from building the same cache entry at once (standard library only)."""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from collections.abc import Iterator


#: Environment variable naming the folder that holds converted embedded models.
CACHE_ENV = "QHELPERS_CACHE"
#: Environment variable naming a folder for the sweep cache alone (the test run and ``run_all.py
#: --write-goldens`` point it at a fresh one, so that goldens never hold scores computed earlier under
#: another numeric environment; read by :func:`qhelpers.measure.sweep_cache.default_sweep_cache`).
SWEEP_CACHE_ENV = "QHELPERS_SWEEP_CACHE"

def qhelpers_cache_dir(kind: str) -> Path:
    """The folder for cached artefacts of one ``kind`` (``sweeps``, ``lora_zoos``, ...):
    ``$QHELPERS_CACHE/<kind>`` when that variable is set, else ``~/.cache/qhelpers/<kind>``."""
    env = os.environ.get(CACHE_ENV)
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "qhelpers") / kind


def models_cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "qhelpers" / "models"


@contextlib.contextmanager
def cache_lock(path: str | os.PathLike, wait_message: str | None = None, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive advisory lock on ``path``, a lock file or a folder (POSIX ``flock``,
    released if the holder dies) for the duration; yields whether it is held. A blocking lock that is busy prints
    ``wait_message`` (if given) once and waits; ``blocking=False`` yields False at once instead.
    Where ``fcntl`` is missing (Windows) nothing is locked and it yields False."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield False
        return
    lock = Path(path)
    if lock.is_dir():
        fd = os.open(lock, os.O_RDONLY)  # a folder is locked through its own descriptor: no lock file
    else:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                yield False
                return
            if wait_message:
                print(wait_message, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's content (read in 1 MiB blocks), as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

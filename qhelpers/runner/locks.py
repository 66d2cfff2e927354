"""Exclusive file locks: ``<run>/.runner.lock`` refuses two runners in the same folder, and
``<run>/.locks/<stem>.lock`` keeps a resumed run from touching a notebook folder that a dying
worker of a killed run still holds."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

try:  # POSIX only; without it the runner works but does not lock folders
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class FileLock:
    """An exclusive ``flock`` on ``path`` (no-op without fcntl)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fh: Any = None

    def acquire(self, blocking: bool = False, timeout: float | None = None,
                on_wait: Callable[[], object] | None = None, cancel: Callable[[], bool] | None = None) -> bool:
        """Take the lock; True once held. Without ``blocking`` one try; else poll until ``timeout``
        (seconds) or until ``cancel()`` is true, calling ``on_wait()`` once when the first try fails."""
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
        """Let the lock go (nothing when it is not held)."""
        if self.fh is not None:
            try:
                fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            finally:
                self.fh.close()
                self.fh = None

"""Process plumbing shared by the supervisor and its workers: each worker runs in its own session
and gets SIGTERM when the runner dies (``PR_SET_PDEATHSIG``, with a watching thread as backstop);
a process's descendants (a notebook's kernel) can be killed outright."""
from __future__ import annotations

import os
import signal
import time


def child_pids(pid: int) -> list[int]:
    """The pids of ``pid``'s descendants (psutil), else of its children (/proc), else none."""
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


def kill_descendants(pid: int) -> None:
    """SIGKILL every descendant of ``pid`` (those already gone are skipped)."""
    for child in child_pids(pid):
        try:
            os.kill(child, signal.SIGKILL)
        except OSError:
            pass


def watch_parent(parent_pid: int) -> None:
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


def preexec_worker() -> None:  # pragma: no cover - runs in the child
    """``preexec_fn`` of a worker: its own session, and SIGTERM when the runner dies."""
    os.setsid()  # own session: a terminal's Ctrl-C reaches the runner, which stops workers itself
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: SIGTERM when the runner dies
    except Exception:
        pass

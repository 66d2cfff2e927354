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


def descendant_identities(pid: int) -> set[tuple[int, float]]:
    """``(pid, start time)`` of ``pid``'s descendants (psutil; empty without it). The start time
    tells a process from a later one that reuses its pid."""
    try:
        import psutil

        return {(c.pid, c.create_time()) for c in psutil.Process(pid).children(recursive=True)}
    except Exception:
        return set()


def kill_identified(processes: set[tuple[int, float]]) -> list[int]:
    """SIGKILL each ``(pid, start time)`` still running as that same process; returns the pids
    killed. Used for a kernel whose worker died without shutting it down: the kernel runs in its
    own session and would otherwise go on writing into the notebook's folder."""
    killed = []
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return killed
    for pid, started in processes:
        if not is_running((pid, started)):
            continue
        try:
            psutil.Process(pid).kill()
            killed.append(pid)
        except Exception:
            continue
    return killed


def process_identity(pid: int) -> tuple[int, float] | None:
    """``(pid, start time)`` of a running process (psutil), or None when it is gone: with
    :func:`is_running`, tells the process from a later one that reuses its pid."""
    try:
        import psutil

        return (pid, psutil.Process(pid).create_time())
    except Exception:
        return None


def is_running(identity: tuple[int, float]) -> bool:
    """Whether the process of :func:`process_identity` is still that same, not yet reaped or
    zombie, process."""
    try:
        import psutil

        proc = psutil.Process(identity[0])
        return abs(proc.create_time() - identity[1]) < 1e-3 and proc.status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


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
    """``preexec_fn`` of a worker: its own session (a terminal's Ctrl-C reaches the runner, which
    stops the workers itself)."""
    os.setsid()


def signal_on_parent_death(signum: int = signal.SIGTERM) -> None:
    """Ask Linux to send this process ``signum`` when its parent dies (``PR_SET_PDEATHSIG``;
    nothing elsewhere). A worker calls it once its handler for ``signum`` is installed: set in
    ``preexec_fn`` instead, the signal could arrive during interpreter start-up and end the
    worker before it records its notebook."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signum, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass

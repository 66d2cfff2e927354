"""A worker: the subprocess that executes one notebook with papermill, as described by a job file
that the supervisor writes, and records its end in the notebook's run.json.

SIGINT or SIGTERM (from the supervisor, or from the kernel when the runner dies) interrupts the
notebook: it is recorded ``interrupted`` and its kernel is shut down. Run as
``python -m qhelpers.runner.worker JOB.json``."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from qhelpers.runner.errors import EXIT_NOT_STARTED, EXIT_RECORD_FAILED, EXIT_SIGINT, RunnerError
from qhelpers.runner.fingerprints import model_fingerprint
from qhelpers.runner.locks import FileLock
from qhelpers.runner.processes import kill_descendants, signal_on_parent_death, watch_parent
from qhelpers.runner.warm import kernel_alive, shutdown_kernel, start_warm_kernel, warm_up_code
from qhelpers.runner.records import (
    atomic_write_json,
    clean_json,
    error_record,
    mark_finished,
)
from qhelpers.util.cache import SWEEP_CACHE_ENV

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _error_dict(exc: BaseException) -> dict[str, Any]:
    """run.json's ``error`` for a failed notebook: the failing cell's error, or the worker's own."""
    try:
        from papermill.exceptions import PapermillExecutionError
    except Exception:  # pragma: no cover
        PapermillExecutionError = ()  # type: ignore[assignment]
    if PapermillExecutionError and isinstance(exc, PapermillExecutionError):
        tb = _strip_ansi("\n".join(exc.traceback or []))
        return error_record(exc.ename, _strip_ansi(str(exc.evalue)), "\n".join(tb.splitlines()[-30:]),
                            cell_index=exc.cell_index, exec_count=exc.exec_count)
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return error_record(type(exc).__name__, _strip_ansi(str(exc)) or repr(exc), "\n".join(tb.splitlines()[-30:]))


def worker_main(job_path: str) -> int:
    """Execute one notebook as described by the job file; write its final run.json.
    Exit 0 completed, 1 failed, 130 interrupted (SIGINT/SIGTERM, or the runner died)."""
    began = time.time()
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    interrupted: dict[str, Any] = {"signal": None, "armed": False}

    def on_signal(signum: int, frame: Any) -> None:
        if interrupted["signal"] is None:
            interrupted["signal"] = signum
            if interrupted["armed"]:  # only inside the try below, where it is recorded
                raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # a parent may hand down a mask that blocks them (a Ray worker does): the stop would never arrive
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal_on_parent_death(signal.SIGTERM)
    parent = job.get("parent_pid")
    if parent and os.getppid() != parent:
        interrupted["signal"] = signal.SIGTERM  # the runner died before PDEATHSIG was set up
    elif parent:
        watch_parent(parent)

    if job.get("sweep_cache"):  # the kernel inherits it (qhelpers.measure.sweep_cache)
        os.environ[SWEEP_CACHE_ENV] = job["sweep_cache"]
    status, error = "completed", None
    lock = FileLock(Path(job["lock"])) if job.get("lock") else None
    ahead = bool(job.get("ahead"))
    km, warm = None, None
    held = False
    t0 = time.time()
    try:
        interrupted["armed"] = True
        if job.get("warm") and interrupted["signal"] is None:
            km, warm = _warm_kernel(job)
        waited = time.time()
        # the supervisor holds the lock until it has recorded this notebook as running; a job
        # started ahead waits until a running notebook ends
        if lock is not None and not lock.acquire(blocking=True, timeout=None if ahead else 30):
            raise RunnerError(f"notebook lock {job['lock']} is held by another process")
        held = True
        t0 = time.time()
        if parent and os.getppid() != parent:
            interrupted["signal"] = signal.SIGTERM  # the runner died while this worker waited
        if interrupted["signal"] is not None:
            raise KeyboardInterrupt("runner exited")
        if ahead:  # the supervisor rewrote the job when it started it (its record's start time)
            job = json.loads(Path(job_path).read_text(encoding="utf-8"))
        if km is not None and not kernel_alive(km):  # it died while waiting: papermill starts a fresh one
            shutdown_kernel(km)
            km = None
            warm["error"] = "the warm kernel died before its notebook started"
        if warm is not None:
            if ahead:
                warm["waited_s"] = round(t0 - waited, 3)
            # the part of the warm-up the notebook waited for: from its start (its worker's, or
            # the supervisor starting a worker that was started ahead) until the kernel was ready
            warm["exposed_s"] = round(max(0.0, t0 - float(job.get("promoted_at") or began)), 3)
        import logging

        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
        print(f"[runner] notebook {job['input']}", file=sys.stderr)
        print(f"[runner] parameters {json.dumps(clean_json(job['parameters']), sort_keys=True)}", file=sys.stderr)
        print(f"[runner] kernel {job['kernel']}; cwd {job['cwd']}; CUDA_VISIBLE_DEVICES="
              f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}", file=sys.stderr, flush=True)
        import papermill as pm

        extra = {"km": km} if km is not None else {}

        pm.execute_notebook(
            job["input"],
            job["output"],
            parameters=job["parameters"],
            kernel_name=job["kernel"],
            language=job.get("language"),
            cwd=job["cwd"],
            progress_bar=False,
            log_output=True,
            request_save_on_cell_execute=True,
            # nbclient's timeout trait is an int
            execution_timeout=None if job.get("cell_timeout") is None else max(1, math.ceil(job["cell_timeout"])),
            start_timeout=job.get("start_timeout", 120),
            **extra,
        )
        interrupted["armed"] = False
    except KeyboardInterrupt:
        interrupted["armed"] = False
        status = "interrupted"
        sig = interrupted["signal"]
        name = signal.Signals(sig).name if sig else "SIGINT"
        why = " (run_all stopped, or exited without stopping this worker)" if sig == signal.SIGTERM else ""
        error = error_record("Interrupted", f"run stopped by {name}{why}")
    except BaseException as exc:
        interrupted["armed"] = False
        if interrupted["signal"] is not None:
            status = "interrupted"
            error = error_record("Interrupted", f"run stopped ({type(exc).__name__}: {exc})")
        else:
            status, error = "failed", _error_dict(exc)
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        if km is not None:  # papermill does not shut down a kernel it was handed
            shutdown_kernel(km)
        kill_descendants(os.getpid())  # a kernel left behind (normally nbclient has shut it down)
    if ahead and not held:  # stopped before the supervisor started it: nothing to record
        print("[runner] stopped before it started; nothing recorded", file=sys.stderr, flush=True)
        return EXIT_NOT_STARTED
    record = dict(job["record"])
    if warm is not None:
        record["warm_kernel"] = warm
    end = time.time()
    mark_finished(record, status, end - t0, error, Path(job["output_dir"]))
    if record["status"] == "completed":
        record["model_fingerprint"] = model_fingerprint(job.get("model"))
    status, error = record["status"], record["error"]
    code = {"completed": 0, "failed": 1}.get(status, EXIT_SIGINT)
    code = _record_end(job, record, code)
    error = record["error"]
    if error:
        print(f"[runner] {status}: {error['ename']}: {error['evalue']}", file=sys.stderr)
        if error.get("traceback"):
            print(error["traceback"], file=sys.stderr)
    else:
        print(f"[runner] completed in {end - t0:.1f} s", file=sys.stderr)
    sys.stderr.flush()
    if parent and status == "interrupted" and os.getppid() != parent:
        _rewrite_summary(job)  # run_all.py is gone: nobody else will say this notebook stopped
    if lock is not None:
        lock.release()
    return code


def _warm_kernel(job: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """Start the job's kernel and warm it up (:mod:`qhelpers.runner.warm`); ``(None, why)`` when the
    kernel could not be started that way (papermill then starts one as usual)."""
    spec = job["warm"]
    code = warm_up_code(spec.get("imports") or [], spec.get("model"), spec.get("device"), spec.get("dtype"))
    try:
        km, info = start_warm_kernel(job["kernel"], job["cwd"], code, float(job.get("start_timeout", 120)))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - a cold start still works
        print(f"[runner] warm kernel not started ({type(exc).__name__}: {exc}); papermill starts one",
              file=sys.stderr, flush=True)
        return None, {"error": f"{type(exc).__name__}: {exc}"}
    if info.get("error"):  # the warm-up itself raised: its state is unknown, so papermill starts a fresh kernel
        shutdown_kernel(km)
        print(f"[runner] warm-up failed ({info['error']}); papermill starts a fresh kernel", file=sys.stderr, flush=True)
        return None, info
    steps = ", ".join(f"{k.removesuffix('_s')} {v} s" for k, v in (info.get("steps") or {}).items() if k != "total_s")
    print(f"[runner] kernel warm: started in {info.get('kernel_s')} s, warm-up {info.get('warm_s')} s"
          + (f" ({steps})" if steps else "")
          + (f" (warm-up error: {info['error']})" if info.get("error") else "")
          + (f" (skipped: {info['step_errors']})" if info.get("step_errors") else ""), file=sys.stderr, flush=True)
    return km, info


def _record_end(job: dict[str, Any], record: dict[str, Any], code: int) -> int:
    """Write the final ``record`` to the supervisor's report file (``job["result"]``) and to
    run.json. When run.json cannot be written the notebook is failed (a completed result must
    have its hash on disk): the report says why and the exit code is EXIT_RECORD_FAILED."""
    result = Path(job["result"]) if job.get("result") else None

    def report() -> None:
        if result is not None:
            try:
                atomic_write_json(result, record)
            except OSError as exc:
                print(f"[runner] cannot write {result}: {exc}", file=sys.stderr)

    report()
    try:
        atomic_write_json(Path(job["run_json"]), record)
        return code
    except OSError as exc:
        record["status"] = "failed"
        record["error"] = error_record("RecordWriteError", f"cannot write {job['run_json']}: "
                                       f"{type(exc).__name__}: {exc}")
        report()
        return EXIT_RECORD_FAILED


def _rewrite_summary(job: dict[str, Any]) -> None:
    """Rewrite the run's summary after run_all.py died (best effort)."""
    info = job.get("summary") or {}
    if not info.get("out_dir"):
        return
    try:
        from qhelpers.runner.summary import write_summary

        write_summary(Path(info["out_dir"]), {**(info.get("meta") or {}), "state": "interrupted: run_all.py exited"},
                      info.get("stems") or [])
    except Exception as exc:
        print(f"[runner] cannot rewrite the summary: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))

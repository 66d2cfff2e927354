"""Where a notebook job runs: the scheduler interface of the supervisor and its ``local`` backend.

The supervisor (:mod:`qhelpers.runner.supervise`) prepares a job (its folder, its "running"
record, the job description the worker reads) and hands it to a backend, which starts it and
returns an :class:`Execution`: something that can be polled for its end, asked to stop and, if
need be, killed. Whatever the backend, the job is the same: ``python -m qhelpers.runner.worker
JOB`` executing the notebook with papermill and recording its end. When the execution has ended,
the notebook's folder and the worker's report (``.jobs/<stem>.result.json``) are on the driver's
disk, and the supervisor records the end exactly as for any other backend.

- ``local`` (default): a worker subprocess on this machine, at most ``--workers`` at a time, one
  GPU each through ``CUDA_VISIBLE_DEVICES`` when there are several;
- ``ray`` (:mod:`qhelpers.runner.ray_backend`): each job a Ray task on a local instance or an
  existing cluster, with fractional GPUs (``--per-gpu K``) and CPU requests; the files come
  back to the driver as bytes."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

from qhelpers.runner.processes import (
    descendant_identities,
    kill_descendants,
    kill_identified,
    preexec_worker,
)

KERNEL_POLL_S = 1.0
#: Exit codes of a worker that recorded its own end (completed, failed, interrupted).
RECORDED_EXITS = (0, 1, 130)


class Execution(Protocol):
    """A started notebook job, as the supervisor sees it."""

    placement: str  # where it runs, for the progress line ("on GPU 1", "on 10.0.0.2, GPU 0")
    started: bool  # running rather than waiting in a queue (the Ray backend's)

    def poll(self) -> int | None:
        """The job's exit code once it has ended (its files are then on the driver's disk), else None."""

    def events(self) -> list[str]:
        """Progress lines since the last call (a queued job started, a dead worker retried)."""

    def stop(self, signum: int) -> None:
        """Ask the job to stop: the worker records it interrupted and shuts its kernel down."""

    def kill(self) -> None:
        """Stop the job now (after :meth:`stop`'s grace time)."""

    def cleanup(self) -> list[int]:
        """After the end: kill what the worker left behind; returns the pids killed."""

    def death(self) -> str:
        """Why the job ended without a record of its own (e.g. its worker died), for run.json."""


class Backend(Protocol):
    """Where the supervisor's jobs run (``local`` or ``ray``)."""

    name: str

    def open(self, say: Any, n_jobs: int) -> None:
        """Get ready for ``n_jobs`` jobs (e.g. start or join Ray); ``say`` prints a progress line."""

    def close(self) -> None:
        """Release what :meth:`open` took."""

    def tick(self) -> None:
        """Periodic bookkeeping of the main loop (e.g. collect the tasks' start reports)."""

    def launch(self, launch: "JobLaunch", gpu: str | None) -> Execution:
        """Start one prepared job (``gpu``: the local backend's GPU for it, else None)."""


@dataclass
class JobLaunch:
    """What a backend needs to start one prepared job."""

    stem: str
    job: dict[str, Any]  # the job description (qhelpers.runner.worker), paths on the driver
    job_path: Path
    cwd: Path
    log_path: Path
    env: dict[str, str]  # the kernel environment on the driver (local backend)
    profile: str
    gpu_job: bool


class LocalExecution:
    """A worker subprocess on this machine."""

    def __init__(self, launch: JobLaunch, gpu: str | None):
        self.placement = f"on GPU {gpu}" if gpu is not None else ""
        self.started = True
        self.log_fh = open(launch.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qhelpers.runner.worker", str(launch.job_path)],
                cwd=str(launch.cwd), env=launch.env, stdin=subprocess.DEVNULL, stdout=self.log_fh,
                stderr=subprocess.STDOUT, preexec_fn=preexec_worker if os.name == "posix" else None,
            )
        except BaseException:
            self.log_fh.close()
            raise
        self.kernels: set[tuple[int, float]] = set()
        self.polled = 0.0

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is None:  # remember the worker's descendants (its kernel), to kill them if it dies
            now = time.monotonic()
            if now - self.polled >= KERNEL_POLL_S:
                self.polled = now
                self.kernels |= descendant_identities(self.proc.pid)
        else:
            self._close_log()
        return rc

    def events(self) -> list[str]:
        return []

    def stop(self, signum: int) -> None:
        try:  # the worker turns it into KeyboardInterrupt, records "interrupted", stops its kernel
            os.kill(self.proc.pid, signum)
        except OSError:
            pass

    def kill(self) -> None:
        kill_descendants(self.proc.pid)
        self.proc.kill()
        self.proc.wait()
        self._close_log()

    def cleanup(self) -> list[int]:
        self._close_log()
        return kill_identified(self.kernels) if self.proc.returncode not in RECORDED_EXITS else []

    def death(self) -> str:
        return f"worker exited with code {self.proc.returncode} before finishing (see log.txt)"

    def _close_log(self) -> None:
        try:
            self.log_fh.close()
        except OSError:
            pass


class LocalBackend:
    """Worker subprocesses on this machine (``--backend local``, the default)."""

    name = "local"

    def open(self, say: Any, n_jobs: int) -> None:
        pass

    def close(self) -> None:
        pass

    def tick(self) -> None:
        pass

    def launch(self, launch: JobLaunch, gpu: str | None) -> LocalExecution:
        return LocalExecution(launch, gpu)


def is_gpu_job(parameters: Mapping[str, Any], defined_device: Any, cluster_gpus: float) -> bool:
    """Whether a notebook job runs on a GPU: its DEVICE (injected, else its default) is
    ``cuda``/``cuda:N``, or is None/``auto`` ("cuda if available") and the cluster has GPUs."""
    device = parameters.get("DEVICE", defined_device)
    if isinstance(device, str) and device.startswith("cuda"):
        return True
    return device in (None, "auto") and cluster_gpus > 0


def job_resources(gpu_job: bool, per_gpu: int, cpus_per_job: int | None, cluster_cpus: float,
                  cluster_gpus: float, n_jobs: int, node_cpus: float | None = None) -> dict[str, float]:
    """The Ray resources one job requests: ``num_gpus = 1/per_gpu`` for a GPU job (so ``per_gpu``
    kernels share a GPU) and ``num_cpus`` = its BLAS threads.

    Threads, unless ``cpus_per_job`` is given: a GPU job gets the cluster's CPUs shared among the
    kernels the GPUs hold at once (``cpus / (gpus * per_gpu)``); a CPU job gets the CPUs shared among
    the jobs (as ``--workers N`` shares them locally). Never more than one node has (``node_cpus``),
    never less than 1."""
    if per_gpu < 1:
        raise ValueError("per_gpu must be >= 1")
    if cpus_per_job is not None:
        cpus = float(cpus_per_job)
    elif gpu_job and cluster_gpus > 0:
        cpus = cluster_cpus // (cluster_gpus * per_gpu)
    else:
        cpus = cluster_cpus // max(1, n_jobs)
    if node_cpus:
        cpus = min(cpus, node_cpus)
    cpus = max(1.0, cpus)
    return {"num_cpus": cpus, "num_gpus": round(1.0 / per_gpu, 4) if gpu_job else 0.0}

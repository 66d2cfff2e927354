"""``--backend ray``: each notebook job a Ray task, on a local Ray instance or an existing cluster.

Why Ray: papermill has no scheduler, and the suite x models x settings outgrows one machine; Ray
is the maintained scheduler of Python work on GPU clusters (fractional GPUs, CPU requests, custom
resources, worker-death detection), so this module only maps a job onto it.

- Placement: a GPU job (:func:`qhelpers.runner.backends.is_gpu_job`) requests ``num_gpus = 1/K``
  (``--per-gpu K``: K kernels share a GPU; Ray sets the task's ``CUDA_VISIBLE_DEVICES``), every
  job requests its BLAS threads as ``num_cpus`` (:func:`qhelpers.runner.backends.job_resources`).
- The task (:func:`execute_job`) runs the same worker as the local backend
  (``python -m qhelpers.runner.worker``) in a temporary folder of its node, then returns the
  notebook's folder as bytes: a cluster shares no file system. The driver writes the files into
  the run folder (each atomically, the worker's report last) and records the end as for a local job.
- Code: with ``--address`` the qhelpers package travels to the cluster as a Ray ``py_modules``
  entry (unless ``--no-ship-code``; the notebooks travel with each job); each task checks that its
  qhelpers code hash is the driver's and fails with a clear error otherwise.
- Failures: a job whose Ray worker or node dies is submitted once more (``attempt`` 2, said in the
  log and recorded in run.json's ``placement``); a second death fails it. A notebook that fails is
  not retried. Nothing completed is touched.
- Stopping: Ctrl-C raises a flag in a small actor (:class:`RunControl`) that every running task
  polls; the task sends its worker the signal, which records the notebook interrupted and shuts its
  kernel down, and the task returns what the notebook wrote. Queued tasks are cancelled; a task that
  does not return within the grace time is force-cancelled.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from qhelpers.runner.backends import JobLaunch, job_resources
from qhelpers.runner.environment import REPO_ROOT, kernel_env
from qhelpers.runner.errors import RunnerError
from qhelpers.runner.goldens import golden_cwd
from qhelpers.runner.processes import (
    is_running,
    kill_descendants,
    preexec_worker,
    process_identity,
)
from qhelpers.runner.records import atomic_write_json, error_record, mark_finished
from qhelpers.util.atomic import atomic_write

RAY_REQUIREMENT = "ray==2.60.0"
MAX_ATTEMPTS = 2  # a job whose worker died runs once more
STOP_POLL_S = 1.0
REMOTE_GRACE_S = 20.0  # the task's wait for its worker after a stop (the driver waits 30 s)
#: What the package's copy on a cluster leaves out (gitignore syntax).
SHIP_EXCLUDES = ["**/__pycache__/", "*.pyc"]
#: In each task's temporary folder: ``[pid, start time]`` of the task and of its worker, so that a later
#: task on the node removes the folder of one whose Ray worker was killed (its ``finally`` never ran).
TASK_OWNERS_FILE = ".qhelpers_owners.json"


class RunControl:
    """The run's control actor: the stop flag the tasks poll and the start reports the driver shows."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.started: dict[str, dict[str, Any]] = {}

    def stop(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum

    def stop_signal(self) -> int | None:
        return self.signum

    def report(self, key: str, info: dict[str, Any]) -> None:
        self.started[key] = info

    def reports(self) -> dict[str, dict[str, Any]]:
        return dict(self.started)


def _key(stem: str, attempt: int) -> str:
    return f"{stem}#{attempt}"


def _rebase(path: str, out_dir: str, root: Path) -> Path:
    rel = os.path.relpath(path, out_dir)
    if rel == ".." or rel.startswith(".." + os.sep) or os.path.isabs(rel):
        raise RunnerError(f"job path {path} is outside the run folder {out_dir}")
    return root / rel


def remote_job(job: dict[str, Any], out_dir: str, root: Path, notebook: bytes) -> dict[str, Any]:
    """The job description with every run-folder path moved under ``root`` (the task's folder on
    its node), the notebook's bytes written there, and no lock (the driver is the only writer)."""
    stem = Path(job["output"]).stem
    source = root / ".input" / Path(job["input"]).name
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(notebook)
    out = dict(job)
    for key in ("output", "output_dir", "run_json", "result"):
        out[key] = str(_rebase(job[key], out_dir, root))
    cwd = _rebase(job["cwd"], out_dir, root)
    if cwd == root / ".cwd" / stem:  # golden mode: a relative OUTPUT_DIR through the nbval_out link
        golden_cwd(root, stem)
    cwd.mkdir(parents=True, exist_ok=True)
    out["cwd"] = str(cwd)
    params = dict(job["parameters"])
    if os.path.isabs(str(params.get("OUTPUT_DIR", ""))):
        params["OUTPUT_DIR"] = str(_rebase(params["OUTPUT_DIR"], out_dir, root))
    out.update(input=str(source), parameters=params, lock=None, parent_pid=os.getpid(), summary=None)
    Path(out["output_dir"]).mkdir(parents=True, exist_ok=True)
    Path(out["result"]).parent.mkdir(parents=True, exist_ok=True)
    return out


def collect_files(root: Path, stem: str) -> dict[str, bytes]:
    """The notebook's folder and the worker's report under ``root``, as ``{relative path: bytes}``
    (plain files only)."""
    files: dict[str, bytes] = {}
    folder = root / stem
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                files[path.relative_to(root).as_posix()] = path.read_bytes()
    report = root / ".jobs" / f"{stem}.result.json"
    if report.is_file():
        files[report.relative_to(root).as_posix()] = report.read_bytes()
    return files


def sweep_dead_task_folders(tmp: Path | None = None) -> list[Path]:
    """Remove this node's temporary job folders (``qhelpers-*`` holding :data:`TASK_OWNERS_FILE`)
    whose task and worker have all ended; returns them. A folder without the file, or with one of
    its processes still running, is left alone. What such a folder holds was never sent to the
    driver: its job was submitted again, and that attempt's files are the ones kept."""
    removed = []
    for folder in sorted(Path(tmp or tempfile.gettempdir()).glob("qhelpers-*")):
        try:
            owners = json.loads((folder / TASK_OWNERS_FILE).read_text())
            identities = [(int(pid), float(started)) for pid, started in owners]
        except (OSError, ValueError, TypeError):
            continue
        if identities and not any(is_running(i) for i in identities):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _write_owners(root: Path, pids: list[int]) -> None:
    identities = [i for i in (process_identity(pid) for pid in pids) if i is not None]
    atomic_write_json(root / TASK_OWNERS_FILE, [list(i) for i in identities])


def execute_job(job: dict[str, Any], notebook: bytes, out_dir: str, attempt: int, code_hash: str, profile: str,
                threads: int | None, control: Any) -> dict[str, Any]:
    """The Ray task of one notebook job: run the worker in a temporary folder of this node, then
    return ``{"returncode", "files", "node"}`` (``files``: :func:`collect_files`)."""
    import ray

    from qhelpers.runner.fingerprints import qhelpers_code_hash

    stem = Path(job["output"]).stem
    node = ray.util.get_node_ip_address()
    sweep_dead_task_folders()
    root = Path(tempfile.mkdtemp(prefix=f"qhelpers-{stem}-"))
    try:
        _write_owners(root, [os.getpid()])
        rjob = remote_job(job, out_dir, root, notebook)
        record = rjob["record"] = dict(job["record"])
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        record["cuda_visible_devices"] = gpus
        assigned = ray.get_runtime_context().get_assigned_resources()
        record["placement"] = {"backend": "ray", "node": node, "attempt": attempt, "cuda_visible_devices": gpus,
                               "num_gpus": assigned.get("GPU", 0.0), "num_cpus": assigned.get("CPU", 0.0),
                               "threads": threads, "task_pid": os.getpid()}
        here = qhelpers_code_hash()
        if code_hash and here != code_hash:
            mark_finished(record, "failed", 0.0, error_record(
                "CodeMismatch", f"node {node} runs qhelpers code {here[:12]} but the driver has {code_hash[:12]}: "
                "install the driver's commit there, or let run_all.py ship the code (--address without "
                "--no-ship-code)"), Path(rjob["output_dir"]))
            atomic_write_json(Path(rjob["result"]), record)
            return {"returncode": 1, "files": collect_files(root, stem), "node": node}
        job_path = root / ".jobs" / f"{stem}.json"
        atomic_write_json(job_path, rjob)
        control.report.remote(_key(stem, attempt), {"node": node, "cuda_visible_devices": gpus, "threads": threads})
        env = kernel_env(profile, None, threads, bool(job.get("pin_numerics")))
        with open(Path(rjob["output_dir"]) / "log.txt", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "qhelpers.runner.worker", str(job_path)],
                                    cwd=rjob["cwd"], env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, preexec_fn=preexec_worker)
            _write_owners(root, [os.getpid(), proc.pid])
            _supervise(proc, control)
        return {"returncode": proc.returncode, "files": collect_files(root, stem), "node": node}
    finally:
        shutil.rmtree(root, ignore_errors=True)
        sweep_dead_task_folders()


def _supervise(proc: subprocess.Popen, control: Any) -> None:
    """Wait for the worker; on the run's stop flag send it the signal, and kill it after the grace time."""
    import ray

    sent_at: float | None = None
    checked = 0.0
    while proc.poll() is None:
        now = time.monotonic()
        if sent_at is None and now - checked >= STOP_POLL_S:
            checked = now
            try:
                signum = ray.get(control.stop_signal.remote(), timeout=10)
            except Exception:  # the driver (and its actor) is gone: stop as the local worker would
                signum = signal.SIGTERM
            if signum:
                sent_at = now
                try:
                    os.kill(proc.pid, signum)
                except OSError:
                    pass
        if sent_at is not None and now - sent_at > REMOTE_GRACE_S:
            kill_descendants(proc.pid)
            proc.kill()
        time.sleep(0.1)


class RayExecution:
    """A job submitted to Ray, as the supervisor sees it (see :class:`qhelpers.runner.backends.Execution`)."""

    def __init__(self, backend: "RayBackend", launch: JobLaunch, submit: Callable[[int], Any]):
        self.backend = backend
        self.launch = launch
        self.submit = submit
        self.attempt = 1
        self.ref = submit(1)
        self.started = False
        self.stopping = False
        self.killed = False
        self.returncode: int | None = None
        self.why: str | None = None
        self.placement = ""
        self._events: list[str] = []

    def on_started(self, info: dict[str, Any]) -> None:
        self.started = True
        gpu = f", GPU {info['cuda_visible_devices']}" if self.launch.gpu_job else ""
        self.placement = f"on {info.get('node')}{gpu}"
        again = f" (attempt {self.attempt})" if self.attempt > 1 else ""
        self._events.append(f"running {self.placement}, {info.get('threads')} thread(s){again}")

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        import ray

        ready, _ = ray.wait([self.ref], timeout=0)
        if not ready:
            return None
        try:
            out = ray.get(self.ref)
        except ray.exceptions.TaskCancelledError:
            self.returncode, self.why = 130, "its Ray task was cancelled (run stopped)"
        except ray.exceptions.RayTaskError as exc:  # raised by execute_job itself: not retried
            self.returncode, self.why = 1, f"its Ray task raised {_first_line(exc)}"
        except ray.exceptions.RayError as exc:  # the worker process or its node died
            what = f"{type(exc).__name__}: {_first_line(exc)}"
            if self.attempt < MAX_ATTEMPTS and not self.stopping:
                self.attempt += 1
                self._events.append(f"its Ray worker died ({what}); submitted once more (attempt {self.attempt})")
                self.started = False
                self.placement = ""
                self.ref = self.submit(self.attempt)
                return None
            self.returncode = -9
            self.why = f"its Ray worker died on attempt {self.attempt} of {MAX_ATTEMPTS} ({what})"
        else:
            try:
                self.backend.materialize(self.launch, out["files"])
                self.returncode = int(out["returncode"])
            except OSError as exc:
                self.returncode, self.why = 1, f"its files could not be written on the driver: {exc}"
        return self.returncode

    def events(self) -> list[str]:
        out, self._events = self._events, []
        return out

    def stop(self, signum: int) -> None:
        import ray

        self.stopping = True
        self.backend.request_stop(signum)
        if not self.started:  # still queued: it never starts
            ray.cancel(self.ref)

    def kill(self) -> None:
        import ray

        if not self.killed:
            self.killed = True
            ray.cancel(self.ref, force=True)

    def cleanup(self) -> list[int]:
        return []

    def death(self) -> str:
        return self.why or f"its worker exited with code {self.returncode} before finishing (see log.txt)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1][:300] if text else type(exc).__name__


class RayBackend:
    """Jobs as Ray tasks (``--backend ray``)."""

    name = "ray"

    def __init__(self, out_dir: Path, code_hash: str, address: str | None = None, per_gpu: int = 1,
                 cpus_per_job: int | None = None, local_cpus: int | None = None, local_gpus: int | None = None,
                 ship_code: bool = True):
        self.out_dir = out_dir
        self.code_hash = code_hash
        self.address = address
        self.per_gpu = per_gpu
        self.cpus_per_job = cpus_per_job
        self.local_cpus = local_cpus
        self.local_gpus = local_gpus
        self.ship_code = ship_code
        self.cluster_cpus = 0.0
        self.cluster_gpus = 0.0
        self.node_cpus = 0.0
        self.executions: dict[str, RayExecution] = {}
        self.notebooks: dict[str, Any] = {}  # notebook path -> ObjectRef of its bytes
        self._stop_sent = False
        self._reports: Any = None
        self._seen: set[str] = set()
        self._started_ray = False
        self.n_jobs = 1

    def open(self, say: Callable[[str], None], n_jobs: int) -> None:
        ray = import_ray()
        self.n_jobs = n_jobs
        runtime_env = None
        if self.address and self.ship_code:
            runtime_env = {"py_modules": [str(REPO_ROOT / "qhelpers")], "excludes": SHIP_EXCLUDES}
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "namespace": "qhelpers-run-all"}
        if self.address is None:
            kwargs.update(num_cpus=self.local_cpus, num_gpus=self.local_gpus)
        try:
            ray.init(address=self.address, runtime_env=runtime_env, **kwargs)
        except Exception as exc:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
            raise RunnerError(f"cannot start or join {where}: {type(exc).__name__}: {exc}") from None
        self._started_ray = True
        resources = ray.cluster_resources()
        self.cluster_cpus = float(resources.get("CPU", 0.0))
        self.cluster_gpus = float(resources.get("GPU", 0.0))
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.node_cpus = max((float(n["Resources"].get("CPU", 0.0)) for n in nodes), default=self.cluster_cpus)
        self.control = ray.remote(num_cpus=0)(RunControl).remote()
        self.task = ray.remote(execute_job)
        where = f"cluster {self.address}" if self.address else "local Ray instance"
        shipped = " (qhelpers shipped to the cluster)" if runtime_env else ""
        say(f"Ray: {where}{shipped}: {len(nodes)} node(s), {self.cluster_cpus:g} CPUs, "
            f"{self.cluster_gpus:g} GPUs; {self.per_gpu} job(s) per GPU")

    def close(self) -> None:
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    def request_stop(self, signum: int) -> None:
        if not self._stop_sent:
            self._stop_sent = True
            self.control.stop.remote(signum)

    def tick(self) -> None:
        """Turn the tasks' start reports into progress events (polled without blocking)."""
        import ray

        if self._reports is None:
            self._reports = self.control.reports.remote()
            return
        ready, _ = ray.wait([self._reports], timeout=0)
        if not ready:
            return
        try:
            reports = ray.get(self._reports)
        except ray.exceptions.RayError:
            reports = {}
        self._reports = None
        for key, info in reports.items():
            if key in self._seen:
                continue
            stem, _, attempt = key.rpartition("#")
            run = self.executions.get(stem)
            if run is not None and run.attempt == int(attempt):
                self._seen.add(key)
                run.on_started(info)

    def resources(self, launch: JobLaunch, n_jobs: int) -> dict[str, float]:
        return job_resources(launch.gpu_job, self.per_gpu, self.cpus_per_job, self.cluster_cpus, self.cluster_gpus,
                             n_jobs, self.node_cpus)

    def launch(self, launch: JobLaunch, gpu: str | None) -> RayExecution:
        import ray

        path = launch.job["input"]
        if path not in self.notebooks:  # one copy in Ray's object store per notebook, whatever the grid
            self.notebooks[path] = ray.put(Path(path).read_bytes())
        notebook = self.notebooks[path]
        out_dir = str(self.out_dir)

        request = self.resources(launch, self.n_jobs)

        def submit(attempt: int) -> Any:
            options = {**request, "max_retries": 0}  # a dead worker's retry is ours (said and recorded)
            threads = int(options["num_cpus"])
            return self.task.options(**options).remote(launch.job, notebook, out_dir, attempt, self.code_hash,
                                                       launch.profile, threads, self.control)

        execution = RayExecution(self, launch, submit)
        self.executions[launch.stem] = execution
        return execution

    def materialize(self, launch: JobLaunch, files: dict[str, bytes]) -> None:
        """Write a finished task's files into the run folder: the notebook's folder (each file
        atomically; run.json is the supervisor's to write), then the worker's report."""
        stem = launch.stem
        report = f".jobs/{stem}.result.json"
        for rel in sorted(files, key=lambda r: r == report):
            parts = Path(rel).parts
            if ".." in parts or Path(rel).is_absolute() or not (parts[:1] == (stem,) or rel == report):
                continue  # only the notebook's own folder and report come back
            if rel == f"{stem}/run.json":
                continue
            data = files[rel]
            atomic_write(self.out_dir / rel, lambda fh, data=data: fh.write(data))


def import_ray() -> Any:
    """``ray``, or RunnerError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RunnerError(f"--backend ray needs Ray: pip install {RAY_REQUIREMENT}") from None
    return ray

"""The supervisor: runs the planned notebooks, each in its own worker subprocess and kernel, at
most ``--workers`` at a time, and keeps run.json, summary.md and index.html up to date.

Status and resume: ``run.json`` holds ``status`` (running / completed / failed / interrupted), the
injected ``parameters``, ``parameters_hash`` (sha256 of the injected parameters, OUTPUT_DIR reduced
to its mode), ``notebook_sha256`` (of the notebook's code cells), ``qhelpers_sha256`` (of the
qhelpers package), and once completed ``results_sha256`` and ``model_fingerprint``. ``--resume DIR``
skips a notebook whose run.json says completed, whose results.json still has its recorded hash and
whose parameters and code hashes are the same; a changed qhelpers hash or model fingerprint makes
the result *stale*: it runs again, or with ``--keep-stale`` it is kept and marked stale.

Nothing completed is deleted: a notebook that runs again has its earlier folder moved aside to
``<stem>.prev-<n>`` first (its new run.json names it under ``previous``, and the summary lists it).

Every failure stays with its notebook: one that fails, whose worker or kernel dies, or whose folder
cannot be written is recorded failed (in memory when its run.json cannot be written) and the others
go on; the exit code is then 1. An unexpected error of the supervisor itself stops the workers and
still writes every record and the summary. SIGINT (or SIGTERM) stops the workers, marks running
notebooks ``interrupted``, writes the summary and exits 130 (143 for SIGTERM). If run_all itself is
SIGKILLed, each worker gets SIGTERM from the kernel (``PR_SET_PDEATHSIG``), marks its notebook
interrupted, shuts its kernel down and rewrites the summary; ``--resume`` finishes the suite."""
from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from qhelpers.runner.backends import Backend, Execution, JobLaunch, LocalBackend, is_gpu_job
from qhelpers.runner.environment import cpu_threads_per_worker, kernel_env, visible_gpus
from qhelpers.runner.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    RunnerError,
)
from qhelpers.runner.fingerprints import model_fingerprint
from qhelpers.runner.goldens import golden_cwd, golden_output_dir, write_goldens
from qhelpers.runner.locks import FileLock
from qhelpers.runner.notebooks import notebook_code_hash, notebook_has_language
from qhelpers.runner.params import Param, parameters_hash
from qhelpers.runner.plan import Plan, costliest_first
from qhelpers.runner.records import (
    atomic_write_json,
    completion_problem,
    error_record,
    hypotheses_of,
    load_record,
    load_results,
    mark_finished,
    move_aside,
    read_json,
    utc_now,
)
from qhelpers.runner.warm import notebook_imports
from qhelpers.runner.summary import (
    error_text,
    fmt_duration,
    verdict_counts,
    write_summary,
)

INTERRUPT_GRACE_S = 30.0
LOCK_WAIT_S = 120.0


def _hashable_parameters(params: Mapping[str, Any], golden: bool) -> dict[str, Any]:
    out = dict(params)
    out["OUTPUT_DIR"] = "<golden>" if golden else "<run>"
    return out


def plan_value(plan: Plan, name: str) -> Any:
    """The value a notebook's parameter runs with: the injected value, else its literal default (else None)."""
    if name in plan.parameters:
        return plan.parameters[name]
    default = (plan.defined or {}).get(name)
    return default.default if default is not None and default.literal else None


def model_spec(plan: Plan) -> Any:
    """The MODEL a notebook runs with (:func:`plan_value`)."""
    return plan_value(plan, "MODEL")


@dataclass
class RunningNotebook:
    """A notebook whose job the supervisor has handed to its backend."""

    plan: Plan
    index: int
    execution: Execution
    slot: int
    gpu: str | None
    started: float
    result_path: Path
    stop_sent: float | None = None


@dataclass
class AheadStart:
    """A queued notebook whose worker was started ahead (``--start-ahead``): its kernel warms up
    while the worker waits for the notebook's lock, which the supervisor holds until a slot frees."""

    plan: Plan
    index: int
    execution: Execution
    lock: FileLock
    job: dict[str, Any]
    job_path: Path
    result_path: Path


class Runner:
    """One invocation: plans, schedules workers, writes run.json / summaries."""

    def __init__(self, args: argparse.Namespace, plans: list[Plan], out_dir: Path, profile: str,
                 notes: list[str], golden: bool, code_hash: str = "", backend: Backend | None = None):
        self.args = args
        self.plans = plans
        self.out_dir = out_dir
        self.profile = profile
        self.notes = notes
        self.golden = golden
        self.code_hash = code_hash
        self.backend = backend if backend is not None else LocalBackend()
        self.total = len(plans)
        self.workers = max(1, getattr(args, "workers", 1) or 1)
        self.stop_signal: int | None = None
        self.outcomes: dict[str, str] = {}
        self.records: dict[str, dict[str, Any]] = {}  # this invocation's view, kept when run.json cannot be written
        self.marks: dict[str, str] = {}  # stem -> "stale: ..." for results kept with --keep-stale
        self.prepared: set[str] = set()  # notebook folders this invocation emptied (moved aside) for a run
        self.running: list[RunningNotebook] = []
        self.ahead: list[AheadStart] = []
        self.start_ahead = max(0, int(getattr(args, "start_ahead", 0) or 0))
        self._hurry = False
        self.log_path = out_dir / "runner.log"
        self.meta = {"profile": profile, "kernel": args.kernel}
        self._summary_warned = False

    # ---- output
    def log(self, line: str) -> None:
        """Append ``line`` to runner.log (a log that cannot be written is skipped)."""
        try:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(f"{utc_now()} {line}\n")
        except OSError:
            pass

    def say(self, line: str, err: bool = False) -> None:
        """Print a progress line and log it."""
        print(line, file=sys.stderr if err else sys.stdout, flush=True)
        self.log(line)

    def summary(self, state: str) -> None:
        """Rewrite summary.md and index.html; a failure to write them is reported, never raised."""
        try:
            write_summary(self.out_dir, {**self.meta, "state": state}, [p.stem for p in self.plans],
                          records=self.records, marks=self.marks)
        except Exception as exc:  # the bookkeeping must go on
            if not self._summary_warned:
                self.say(f"warning: cannot write the summary in {self.out_dir}: {type(exc).__name__}: {exc}", err=True)
                self._summary_warned = True

    def write_record(self, stem: str, record: dict[str, Any]) -> str | None:
        """Write ``<stem>/run.json``; returns None, or why it could not be written (the record is
        then kept in memory for the summary)."""
        self.records[stem] = record
        try:
            atomic_write_json(self.nb_dir(stem) / "run.json", record)
            return None
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"

    # ---- per notebook
    def nb_dir(self, stem: str) -> Path:
        return self.out_dir / stem

    def output_dir_param(self, stem: str) -> str:
        return golden_output_dir(stem) if self.golden else str(self.nb_dir(stem))

    def cwd_for(self, stem: str) -> Path:
        return golden_cwd(self.out_dir, stem) if self.golden else self.nb_dir(stem)

    def hashes(self, plan: Plan) -> tuple[str, str]:
        return parameters_hash(_hashable_parameters(plan.parameters, self.golden)), notebook_code_hash(plan.path)

    def inputs_entry(self, plan: Plan) -> dict[str, Any]:
        """The manifest's entry for a notebook: its parameters and the hashes of its inputs."""
        phash, nhash = self.hashes(plan)
        inputs = f"{phash}:{nhash}:{self.code_hash}"
        return {"parameters": {**plan.parameters, "OUTPUT_DIR": self.output_dir_param(plan.stem)},
                "parameters_hash": phash, "notebook_sha256": nhash, "qhelpers_sha256": self.code_hash,
                "model": model_spec(plan), "inputs_sha256": hashlib.sha256(inputs.encode()).hexdigest()}

    def resume_decision(self, plan: Plan) -> tuple[bool, str]:
        """``(keep, why)`` for a notebook of the folder being resumed."""
        d = self.nb_dir(plan.stem)
        rec = load_record(d)
        if rec is None:
            return False, "not run yet" if not d.exists() else "no run.json"
        problem = completion_problem(d, rec)
        if problem:
            return False, problem
        phash, nhash = self.hashes(plan)
        if rec.get("parameters_hash") != phash:
            return False, "parameters changed"
        if rec.get("notebook_sha256") != nhash:
            return False, "notebook code changed"
        stale = []
        if rec.get("qhelpers_sha256") != self.code_hash:
            stale.append("qhelpers code changed")
        if rec.get("model_fingerprint") != model_fingerprint(model_spec(plan)):
            stale.append("model files changed")
        if stale:
            why = "stale: " + " and ".join(stale) + " since it ran"
            if getattr(self.args, "keep_stale", False):
                self.marks[plan.stem] = why
                return True, f"kept, {why} (--keep-stale)"
            return False, why
        return True, "completed earlier with the same inputs; results.json intact"

    def prepare_dir(self, stem: str) -> dict[str, Any] | None:
        """An empty folder for the notebook; an earlier non-empty one is moved aside (never deleted).
        Returns ``{"folder", "status"}`` of the folder moved aside, or None."""
        d = self.nb_dir(stem)
        moved = None
        if d.is_symlink() or (d.exists() and (not d.is_dir() or any(d.iterdir()))):
            old = load_record(d) if d.is_dir() else None
            target = move_aside(d)
            moved = {"folder": target.name, "status": (old or {}).get("status")}
            self.say(f"  {stem}: earlier folder kept as {target.name}")
        d.mkdir(parents=True, exist_ok=True)
        return moved

    def warm_spec(self, plan: Plan) -> dict[str, Any] | None:
        """What the worker warms its kernel up with (:mod:`qhelpers.runner.warm`): the notebook's
        imports, its model, device and dtype; None with ``--cold-kernels``."""
        if not getattr(self.args, "warm", False):
            return None
        try:
            imports = notebook_imports(plan.path)
        except Exception:  # an unreadable notebook fails in papermill, with its own message
            imports = []
        return {"imports": imports, "model": model_spec(plan), "device": plan_value(plan, "DEVICE"),
                "dtype": plan_value(plan, "DTYPE")}

    def start(self, plan: Plan, index: int, slot: int, gpu: str | None, why: str | None = None,
              ahead: bool = False) -> RunningNotebook | "AheadStart":
        """Prepare a notebook's folder and job and hand it to the backend. With ``ahead`` the worker
        starts (and warms its kernel) but the notebook is not yet running: the lock stays held and
        no running record is written until :meth:`promote`."""
        stem = plan.stem
        lock = FileLock(self.out_dir / ".locks" / f"{stem}.lock")
        if not lock.acquire(blocking=True, timeout=LOCK_WAIT_S,
                            on_wait=lambda: self.say(f"  waiting for a previous worker of {stem} to exit ..."),
                            cancel=lambda: self.stop_signal is not None):
            if self.stop_signal is not None:
                raise RunnerError(f"{stem}: not started ({signal.Signals(self.stop_signal).name} received)")
            raise RunnerError(f"{stem}: its lock is still held after {LOCK_WAIT_S:.0f} s by another process")
        release = True
        try:
            moved = self.prepare_dir(stem)
            self.prepared.add(stem)
            if moved is not None and why:
                moved["reason"] = why
            d = self.nb_dir(stem)
            params = {**plan.parameters, "OUTPUT_DIR": self.output_dir_param(stem)}
            phash, nhash = self.hashes(plan)
            defaults = {}
            for name, prm in (plan.defined or {}).items():
                defaults[name] = prm.default if prm.literal else f"<expr: {prm.source}>"
            record = {
                "notebook": stem,
                "input": str(plan.path),
                "status": "running",
                "profile": self.profile,
                "kernel": self.args.kernel,
                "parameters": params,
                "parameters_hash": phash,
                "notebook_sha256": nhash,
                "qhelpers_sha256": self.code_hash,
                "defaults": defaults,
                "output_notebook": f"{stem}.ipynb",
                "output_dir": str(d),
                "log": "log.txt",
                "cuda_visible_devices": gpu if gpu is not None else (
                    os.environ.get("CUDA_VISIBLE_DEVICES") if self.backend.name == "local" else None),
                "backend": self.backend.name,
                "start": utc_now(),
                "end": None,
                "duration_s": None,
                "error": None,
                "results": None,
                "previous": moved,
                "runner": {"pid": os.getpid(), "argv": sys.argv[1:], "host": os.uname().nodename if hasattr(os, "uname") else ""},
            }
            if plan.setting:
                record["job"] = {"notebook": plan.notebook, "setting": plan.setting}
            cwd = self.cwd_for(stem)
            jobs = self.out_dir / ".jobs"
            result_path = jobs / f"{stem}.result.json"
            result_path.unlink(missing_ok=True)
            job = {
                "input": str(plan.path),
                "output": str(d / f"{stem}.ipynb"),
                "output_dir": str(d),
                "parameters": params,
                "kernel": self.args.kernel,
                "language": None if notebook_has_language(plan.path) else "python",
                "cwd": str(cwd),
                "cell_timeout": self.args.cell_timeout,
                "run_json": str(d / "run.json"),
                "result": str(result_path),
                "lock": str(lock.path),
                "record": record,
                "model": model_spec(plan),
                "parent_pid": os.getpid(),
                "pin_numerics": bool(self.args.write_goldens),
                # goldens never hold sweeps another run (code, numeric environment) left in the cache
                "sweep_cache": str(self.out_dir / ".golden_sweeps") if self.args.write_goldens else None,
                "warm": self.warm_spec(plan),
                "ahead": ahead,
                "summary": {"out_dir": str(self.out_dir), "meta": self.meta, "stems": [p.stem for p in self.plans]},
            }
            job_path = jobs / f"{stem}.json"
            atomic_write_json(job_path, job)
            threads = cpu_threads_per_worker(self.workers) if gpu is None else None
            device_default = (plan.defined or {}).get("DEVICE")
            env = kernel_env(self.profile, gpu, threads, job["pin_numerics"])
            gpu_job = is_gpu_job(plan.parameters, device_default.default if device_default else None,
                                 getattr(self.backend, "cluster_gpus", 0.0))
            launch = JobLaunch(stem, job, job_path, cwd, d / "log.txt", env, self.profile, gpu_job)
            execution = self.backend.launch(launch, gpu)
            if ahead:
                release = False  # held until promote(): the worker waits for it with its kernel warm
                pid = getattr(getattr(execution, "proc", None), "pid", None)
                self.log(f"[{index}/{self.total}] {stem}: worker started ahead (pid {pid})")
                return AheadStart(plan, index, execution, lock, job, job_path, result_path)
            self._mark_running(stem, record, execution)
        finally:
            if release:
                lock.release()  # the worker takes it (and holds it until it has written run.json)
        return self._started(plan, index, execution, slot, gpu, params, result_path)

    def promote(self, pending: "AheadStart", slot: int) -> RunningNotebook:
        """Start a notebook whose worker was started ahead: its record's start time is now, the
        job is rewritten with it (the worker reads it again), run.json says running, and the lock
        is released so that the worker runs the notebook in its warm kernel."""
        record = pending.job["record"]
        record["start"] = utc_now()
        pending.job["promoted_at"] = time.time()
        try:
            atomic_write_json(pending.job_path, pending.job)
            self._mark_running(pending.plan.stem, record, pending.execution)
        finally:
            pending.lock.release()
        return self._started(pending.plan, pending.index, pending.execution, slot, None,
                             pending.job["parameters"], pending.result_path)

    def _mark_running(self, stem: str, record: dict[str, Any], execution: Execution) -> None:
        # "running" is written after the job exists (a runner killed before leaves no running
        # record) and before its worker may write (it waits for the notebook's lock)
        self.records[stem] = record
        try:
            atomic_write_json(self.nb_dir(stem) / "run.json", record)
        except BaseException:
            execution.kill()
            raise

    def _started(self, plan: Plan, index: int, execution: Execution, slot: int, gpu: str | None,
                 params: Mapping[str, Any], result_path: Path) -> RunningNotebook:
        where = f" {execution.placement}" if execution.started and execution.placement else ""
        model = params.get("MODEL") or (plan.defined or {}).get("MODEL", Param("", "", "", False)).default
        model_note = f", model {model}" if model else ""
        verb = "started" if execution.started else "queued"
        self.say(f"[{index}/{self.total}] {plan.stem} ... {verb} (profile {self.profile}{model_note}{where})")
        return RunningNotebook(plan, index, execution, slot, gpu, time.time(), result_path)

    def drop_ahead(self, signum: int) -> None:
        """Stop the workers started ahead (their notebooks never started: nothing is recorded, the
        job files are removed and the locks released)."""
        for pending in self.ahead:
            pending.execution.stop(signum)
        deadline = time.time() + INTERRUPT_GRACE_S
        for pending in self.ahead:
            while pending.execution.poll() is None and time.time() < deadline and not self._hurry:
                time.sleep(0.1)
            if pending.execution.poll() is None:
                pending.execution.kill()
            pending.execution.cleanup()
            pending.lock.release()
            pending.job_path.unlink(missing_ok=True)
            self.say(f"[{pending.index}/{self.total}] {pending.plan.stem} ... not started")
        self.ahead.clear()

    def start_failed(self, plan: Plan, index: int, exc: BaseException) -> None:
        """Record a notebook that could not be started (its folder unwritable, its lock held...)."""
        stem = plan.stem
        what = str(exc) if isinstance(exc, RunnerError) else f"{type(exc).__name__}: {exc}"
        prepared = stem in self.prepared
        fresh = {"notebook": stem, "input": str(plan.path), "profile": self.profile,
                 "parameters": plan.parameters, "start": utc_now()}
        rec = dict((self.records.get(stem) if prepared else None) or fresh)
        mark_finished(rec, "failed", 0.0, error_record("StartError", f"could not start: {what}"), self.nb_dir(stem))
        if prepared:
            unwritten = self.write_record(stem, rec)
        else:  # never write into a folder this run did not prepare (it may hold an earlier result)
            self.records[stem] = rec
            unwritten = "its folder was not prepared"
        self.outcomes[stem] = "failed"
        note = f" (run.json not written: {unwritten})" if unwritten else ""
        self.say(f"[{index}/{self.total}] {stem} ... FAILED to start: {what}{note}", err=True)

    def final_record(self, run: RunningNotebook) -> dict[str, Any] | None:
        """The worker's final record: its report in .jobs/ (written even when run.json cannot be),
        else run.json when it no longer says running; None when the worker recorded no end."""
        try:
            reported = read_json(run.result_path) if run.result_path.is_file() else None
        except (OSError, ValueError):
            reported = None
        if isinstance(reported, dict) and reported.get("status") not in (None, "running"):
            return reported
        rec = load_record(self.nb_dir(run.plan.stem))
        if rec is not None and rec.get("status") not in (None, "running"):
            return rec
        return None

    def finish(self, run: RunningNotebook, forced_status: str | None = None) -> str:
        """Record a worker's end: its own final record, or (when it died without one) ``forced_status``,
        else interrupted during a stop and failed otherwise. Returns the notebook's status."""
        stem = run.plan.stem
        d = self.nb_dir(stem)
        killed = run.execution.cleanup()
        rec = self.final_record(run)
        if rec is None:
            rec = dict(self.records.get(stem) or {"notebook": stem})
            status = forced_status or ("interrupted" if self.stop_signal else "failed")
            died = run.execution.death()
            if killed:
                died += f"; its kernel (pid {', '.join(map(str, killed))}) was killed"
            error = error_record("Interrupted" if status == "interrupted" else "WorkerDied", died)
            mark_finished(rec, status, time.time() - run.started, error, d)
        on_disk = load_record(d) or {}
        unwritten = None
        if on_disk.get("status") != rec.get("status") or on_disk.get("end") != rec.get("end"):
            unwritten = self.write_record(stem, rec)
        else:
            self.records[stem] = rec
        status = str(rec.get("status"))
        self.outcomes[stem] = status
        dur = fmt_duration(rec.get("duration_s") if rec.get("duration_s") is not None else time.time() - run.started)
        prefix = f"[{run.index}/{self.total}] {stem} ..."
        if status == "completed":
            results, err = load_results(d)
            what = verdict_counts(hypotheses_of(results)) if results else (err or "no results.json")
            self.say(f"{prefix} done in {dur} ({what})")
        elif status == "failed":
            self.say(f"{prefix} FAILED after {dur}: {error_text(rec, short=True)} (see {d / 'log.txt'})")
        else:
            self.say(f"{prefix} {status} after {dur}")
        if unwritten:
            self.say(f"  {stem}: its run.json could not be written ({unwritten}); the summary keeps its status",
                     err=True)
        return status

    # ---- main loop
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        else:  # a second Ctrl-C: stop waiting politely
            self._hurry = True

    def run(self) -> int:
        """Run every planned notebook; returns the exit code. Whatever happens, the running
        notebooks are stopped and recorded and the summary is written before it returns."""
        self._hurry = False
        old_int = signal.signal(signal.SIGINT, self._on_signal)
        old_term = signal.signal(signal.SIGTERM, self._on_signal)
        try:
            return self._run()
        except RunnerError as exc:  # e.g. the Ray cluster cannot be reached: nothing was started
            self.say(f"run_all.py: error: {exc}", err=True)
            self.stop_all(signal.SIGTERM, forced="failed")
            self.summary(f"stopped: {exc}")
            return EXIT_USAGE
        except Exception as exc:
            self.say(f"run_all.py: internal error: {type(exc).__name__}: {exc} (traceback in runner.log); "
                     "stopping the running notebooks", err=True)
            self.log(traceback.format_exc())
            self.stop_all(signal.SIGTERM, forced="failed")
            self.summary(f"stopped by an internal error: {type(exc).__name__}: {exc}")
            return EXIT_FAILED
        finally:
            self.backend.close()
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)

    def stop_all(self, signum: int, forced: str = "interrupted") -> None:
        """Stop every running worker (``signum``, then SIGKILL after the grace time) and record
        each; a worker that recorded no end of its own is recorded ``forced``."""
        for pending in self.ahead:
            pending.execution.stop(signum)
        for r in self.running:
            r.execution.stop(signum)
            r.stop_sent = time.time()
        while self.running:
            for r in list(self.running):
                if r.execution.poll() is None and (self._hurry or time.time() - (r.stop_sent or 0) > INTERRUPT_GRACE_S):
                    r.execution.kill()
                if r.execution.poll() is not None:
                    self.running.remove(r)
                    self.finish(r, forced_status=forced)
            time.sleep(0.1)
        self.drop_ahead(signum)

    def progress(self, queue: list[Any]) -> None:
        """``progress: 3 done, 2 running, 4 queued`` (on the Ray backend, where jobs wait in Ray's queue)."""
        if self.backend.name == "local":
            return
        started = sum(1 for r in self.running if r.execution.started)
        queued = len(queue) + len(self.running) - started
        self.say(f"progress: {len(self.outcomes)} done, {started} running, {queued} queued")

    def _run(self) -> int:
        args = self.args
        for note in self.notes:
            self.say(note)
        queue: list[tuple[int, Plan, str | None]] = []
        for i, plan in enumerate(self.plans, 1):
            for note in plan.notes:
                self.say(note)
            why = None
            if args.resume:
                keep, why = self.resume_decision(plan)
                if keep:
                    self.outcomes[plan.stem] = "completed"
                    self.say(f"[{i}/{self.total}] {plan.stem} ... skipped ({why})")
                    continue
                if why != "not run yet":
                    self.say(f"[{i}/{self.total}] {plan.stem} ... will re-run ({why})")
            elif self.nb_dir(plan.stem).exists():
                why = "run again with --out"
            queue.append((i, plan, why))
        if self.workers > 1:  # one worker runs them all anyway: keep the name order
            rank = {plan.stem: k for k, plan in enumerate(costliest_first([plan for _, plan, _ in queue]))}
            if list(rank) != [plan.stem for _, plan, _ in queue]:  # job folders (stems) are unique
                queue.sort(key=lambda item: rank[item[1].stem])
                self.say("start order, longest expected first (notebook metadata qhelpers.expected_s): "
                         + ", ".join(plan.stem for _, plan, _ in queue))
        self.summary(f"running (run_all.py pid {os.getpid()})")
        if queue:
            self.backend.open(self.say, len(queue))

        workers = self.workers
        gpus: list[str] = []
        if self.backend.name == "local" and workers > 1 and min(workers, len(queue)) > 1 and args.device != "cpu":
            gpus = visible_gpus()
            if len(gpus) > 1:
                self.say(f"{len(gpus)} GPUs visible ({','.join(gpus)}): each worker gets one through CUDA_VISIBLE_DEVICES")
            else:
                gpus = []
        running = self.running
        # a worker started ahead needs its environment now: not with one GPU per worker (its GPU is
        # the slot's that frees first), nor on the Ray backend (Ray queues the jobs itself)
        can_ahead = self.start_ahead > 0 and self.backend.name == "local" and not gpus
        while (queue or running or self.ahead) and self.stop_signal is None:
            busy = {r.slot for r in running}
            while (self.ahead or queue) and len(running) < workers and self.stop_signal is None:
                slot = min(s for s in range(workers) if s not in busy)
                busy.add(slot)
                if self.ahead:
                    pending = self.ahead.pop(0)
                    i, plan = pending.index, pending.plan
                else:
                    pending = None
                    i, plan, why = queue.pop(0)
                gpu = gpus[slot % len(gpus)] if gpus else None
                try:
                    running.append(self.promote(pending, slot) if pending else self.start(plan, i, slot, gpu, why))
                except (RunnerError, OSError) as exc:
                    busy.discard(slot)
                    self.start_failed(plan, i, exc)
                self.summary(f"running (run_all.py pid {os.getpid()})")
            while (can_ahead and queue and len(running) >= workers and len(self.ahead) < self.start_ahead
                   and self.stop_signal is None):
                i, plan, why = queue.pop(0)
                try:
                    self.ahead.append(self.start(plan, i, -1, None, why, ahead=True))
                except (RunnerError, OSError) as exc:
                    self.start_failed(plan, i, exc)
            self.backend.tick()
            for pending in self.ahead:
                pending.execution.poll()  # notes its kernel, to be killed should the worker die
            for r in list(running):
                rc = r.execution.poll()
                for line in r.execution.events():
                    self.say(f"  {r.plan.stem}: {line}")
                    self.progress(queue)
                if rc is not None:
                    running.remove(r)
                    self.finish(r)
                    self.progress(queue)
                    self.summary(f"running (run_all.py pid {os.getpid()})" if (queue or running or self.ahead)
                                 else "finished")
            time.sleep(0.1)

        if self.stop_signal is not None:
            name = signal.Signals(self.stop_signal).name
            self.say(f"{name} received: stopping {len(running)} running notebook(s) ...", err=True)
            self.stop_all(self.stop_signal)
            for i, plan, _ in queue:
                self.say(f"[{i}/{self.total}] {plan.stem} ... not started")
            self.summary(f"interrupted by {name}")
            self.say(f"summary: {self.out_dir / 'summary.md'}")
            return EXIT_SIGINT if self.stop_signal == signal.SIGINT else EXIT_SIGTERM

        self.summary("finished")
        if args.write_goldens:
            self.write_goldens(Path(args.write_goldens))
        failed = [s for s, st in self.outcomes.items() if st != "completed"]
        done = sum(1 for st in self.outcomes.values() if st == "completed")
        self.say(
            f"finished: {done} completed, {len(failed)} not completed"
            + (f" ({', '.join(failed)})" if failed else "")
            + f"; summary: {self.out_dir / 'summary.md'}"
        )
        return EXIT_FAILED if failed else EXIT_OK

    def write_goldens(self, dest: Path) -> None:
        """Copy the completed notebooks to ``dest`` (:func:`qhelpers.runner.goldens.write_goldens`)."""
        stems = [plan.stem for plan in self.plans]
        try:
            refused = write_goldens(self.out_dir, stems, self.outcomes, dest, self.profile, self.say)
        except OSError as exc:
            self.say(f"goldens not written to {dest}: {type(exc).__name__}: {exc}", err=True)
            refused = [s for s in stems if self.outcomes.get(s) == "completed"]
        for stem in refused:
            self.outcomes[stem] = "failed"

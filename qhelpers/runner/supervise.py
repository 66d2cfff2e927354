"""The supervisor: runs the planned notebooks, each in its own worker subprocess and kernel, at
most ``--workers`` at a time, and keeps run.json, summary.md and index.html up to date.

Status and resume: ``run.json`` holds ``status`` (running / completed / failed / interrupted), the
injected ``parameters``, ``parameters_hash`` (sha256 of the injected parameters, OUTPUT_DIR reduced
to its mode) and ``notebook_sha256`` (of the notebook's code cells). ``--resume DIR`` skips a
notebook whose run.json says completed with the same two hashes and re-runs the others (their
folder is emptied first, so no stale results.json survives a failed re-run).

A failing notebook does not stop the others; the exit code is then 1. SIGINT (or SIGTERM) stops
the workers, marks running notebooks ``interrupted``, writes the summary and exits 130 (143 for
SIGTERM). If run_all itself is SIGKILLed, each worker gets SIGTERM from the kernel
(``PR_SET_PDEATHSIG``), marks its notebook interrupted and shuts its kernel down; every completed
notebook's folder and the last summary stay valid, and ``--resume`` finishes the suite."""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from qhelpers.runner.environment import cpu_threads_per_worker, kernel_env, visible_gpus
from qhelpers.runner.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    RunnerError,
)
from qhelpers.runner.goldens import golden_cwd, golden_output_dir, write_goldens
from qhelpers.runner.locks import FileLock
from qhelpers.runner.notebooks import notebook_code_hash, notebook_has_language
from qhelpers.runner.params import Param, parameters_hash
from qhelpers.runner.plan import Plan
from qhelpers.runner.processes import kill_descendants, preexec_worker
from qhelpers.runner.records import (
    atomic_write_json,
    error_record,
    hypotheses_of,
    load_record,
    load_results,
    mark_finished,
    utc_now,
)
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


@dataclass
class RunningNotebook:
    """A notebook whose worker the supervisor has started."""

    plan: Plan
    index: int
    proc: subprocess.Popen
    slot: int
    gpu: str | None
    started: float
    log_fh: Any
    stop_sent: float | None = None


class Runner:
    """One invocation: plans, schedules workers, writes run.json / summaries."""

    def __init__(self, args: argparse.Namespace, plans: list[Plan], out_dir: Path, profile: str,
                 notes: list[str], golden: bool):
        self.args = args
        self.plans = plans
        self.out_dir = out_dir
        self.profile = profile
        self.notes = notes
        self.golden = golden
        self.total = len(plans)
        self.workers = max(1, getattr(args, "workers", 1))
        self.stop_signal: int | None = None
        self.outcomes: dict[str, str] = {}
        self.log_path = out_dir / "runner.log"
        self.meta = {"profile": profile, "kernel": args.kernel}

    # ---- output
    def say(self, line: str, err: bool = False) -> None:
        print(line, file=sys.stderr if err else sys.stdout, flush=True)
        try:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(f"{utc_now()} {line}\n")
        except OSError:
            pass

    def summary(self, state: str) -> None:
        write_summary(self.out_dir, {**self.meta, "state": state}, [p.stem for p in self.plans])

    # ---- per notebook
    def nb_dir(self, stem: str) -> Path:
        return self.out_dir / stem

    def output_dir_param(self, stem: str) -> str:
        return golden_output_dir(stem) if self.golden else str(self.nb_dir(stem))

    def cwd_for(self, stem: str) -> Path:
        return golden_cwd(self.out_dir, stem) if self.golden else self.nb_dir(stem)

    def hashes(self, plan: Plan) -> tuple[str, str]:
        return parameters_hash(_hashable_parameters(plan.parameters, self.golden)), notebook_code_hash(plan.path)

    def resume_decision(self, plan: Plan) -> tuple[bool, str]:
        rec = load_record(self.nb_dir(plan.stem))
        if rec is None:
            return False, "not run yet"
        phash, nhash = self.hashes(plan)
        if rec.get("status") != "completed":
            return False, f"previous status {rec.get('status')}"
        if rec.get("parameters_hash") != phash:
            return False, "parameters changed"
        if rec.get("notebook_sha256") != nhash:
            return False, "notebook code changed"
        return True, "completed earlier with the same parameters"

    def prepare_dir(self, stem: str) -> None:
        d = self.nb_dir(stem)
        if d.exists():
            if not (d / "run.json").is_file() and any(d.iterdir()):
                raise RunnerError(
                    f"{d} exists and was not written by the runner (no run.json); move it away or use another --out"
                )
            shutil.rmtree(d)
        d.mkdir(parents=True)

    def start(self, plan: Plan, index: int, slot: int, gpu: str | None) -> RunningNotebook:
        stem = plan.stem
        lock = FileLock(self.out_dir / ".locks" / f"{stem}.lock")
        if not lock.acquire(blocking=True, timeout=LOCK_WAIT_S,
                            on_wait=lambda: self.say(f"  waiting for a previous worker of {stem} to exit ..."),
                            cancel=lambda: self.stop_signal is not None):
            if self.stop_signal is not None:
                raise RunnerError(f"{stem}: not started ({signal.Signals(self.stop_signal).name} received)")
            raise RunnerError(f"{stem}: its lock is still held after {LOCK_WAIT_S:.0f} s by another process")
        try:
            self.prepare_dir(stem)
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
                "defaults": defaults,
                "output_notebook": f"{stem}.ipynb",
                "output_dir": str(d),
                "log": "log.txt",
                "cuda_visible_devices": gpu if gpu is not None else os.environ.get("CUDA_VISIBLE_DEVICES"),
                "start": utc_now(),
                "end": None,
                "duration_s": None,
                "error": None,
                "results": None,
                "runner": {"pid": os.getpid(), "argv": sys.argv[1:], "host": os.uname().nodename if hasattr(os, "uname") else ""},
            }
            atomic_write_json(d / "run.json", record)
            cwd = self.cwd_for(stem)
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
                "lock": str(lock.path),
                "record": record,
                "parent_pid": os.getpid(),
            }
            job_path = self.out_dir / ".jobs" / f"{stem}.json"
            atomic_write_json(job_path, job)
            log_fh = open(d / "log.txt", "ab")
            threads = cpu_threads_per_worker(self.workers) if gpu is None else None
            env = kernel_env(self.profile, gpu, threads)
            proc = subprocess.Popen(
                [sys.executable, "-m", "qhelpers.runner.worker", str(job_path)],
                cwd=str(cwd), env=env, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT,
                preexec_fn=preexec_worker if os.name == "posix" else None,
            )
        finally:
            lock.release()  # the worker takes it (and holds it until it has written run.json)
        gpu_note = f" on GPU {gpu}" if gpu is not None else ""
        model = params.get("MODEL") or (plan.defined or {}).get("MODEL", Param("", "", "", False)).default
        model_note = f", model {model}" if model else ""
        self.say(f"[{index}/{self.total}] {stem} ... started (profile {self.profile}{model_note}{gpu_note})")
        return RunningNotebook(plan, index, proc, slot, gpu, time.time(), log_fh)

    def finish(self, run: RunningNotebook, forced_status: str | None = None) -> str:
        run.log_fh.close()
        stem = run.plan.stem
        d = self.nb_dir(stem)
        rec = load_record(d) or {"notebook": stem}
        rc = run.proc.returncode
        if rec.get("status") == "running" or forced_status:
            # the worker died before recording its end: record it here
            status = forced_status or ("interrupted" if self.stop_signal else "failed")
            error = rec.get("error") or error_record(
                "Interrupted" if status == "interrupted" else "WorkerDied",
                f"worker exited with code {rc} before finishing (see log.txt)",
            )
            mark_finished(rec, status, time.time() - run.started, error, d)
            atomic_write_json(d / "run.json", rec)
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
        return status

    # ---- main loop
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        else:  # a second Ctrl-C: stop waiting politely
            self._hurry = True

    def run(self) -> int:
        self._hurry = False
        old_int = signal.signal(signal.SIGINT, self._on_signal)
        old_term = signal.signal(signal.SIGTERM, self._on_signal)
        try:
            return self._run()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)

    def _run(self) -> int:
        args = self.args
        for note in self.notes:
            self.say(note)
        queue: list[tuple[int, Plan]] = []
        for i, plan in enumerate(self.plans, 1):
            for note in plan.notes:
                self.say(note)
            if args.resume:
                skip, why = self.resume_decision(plan)
                if skip:
                    self.outcomes[plan.stem] = "completed"
                    self.say(f"[{i}/{self.total}] {plan.stem} ... skipped ({why})")
                    continue
                if why != "not run yet":
                    self.say(f"[{i}/{self.total}] {plan.stem} ... will re-run ({why})")
            queue.append((i, plan))
        self.summary("running")

        workers = self.workers
        gpus: list[str] = []
        if workers > 1 and min(workers, len(queue)) > 1 and args.device != "cpu":
            gpus = visible_gpus()
            if len(gpus) > 1:
                self.say(f"{len(gpus)} GPUs visible ({','.join(gpus)}): each worker gets one through CUDA_VISIBLE_DEVICES")
            else:
                gpus = []
        running: list[RunningNotebook] = []
        while (queue or running) and self.stop_signal is None:
            busy = {r.slot for r in running}
            while queue and len(running) < workers and self.stop_signal is None:
                slot = min(s for s in range(workers) if s not in busy)
                busy.add(slot)
                i, plan = queue.pop(0)
                gpu = gpus[slot % len(gpus)] if gpus else None
                try:
                    running.append(self.start(plan, i, slot, gpu))
                except RunnerError as exc:
                    self.say(f"[{i}/{self.total}] {plan.stem} ... FAILED to start: {exc}", err=True)
                    self.outcomes[plan.stem] = "failed"
                self.summary("running")
            for r in list(running):
                if r.proc.poll() is not None:
                    running.remove(r)
                    self.finish(r)
                    self.summary("running" if (queue or running) else "finished")
            time.sleep(0.1)

        if self.stop_signal is not None:
            name = signal.Signals(self.stop_signal).name
            self.say(f"{name} received: stopping {len(running)} running notebook(s) ...", err=True)
            for r in running:
                try:  # the worker turns it into KeyboardInterrupt, records "interrupted", stops its kernel
                    os.kill(r.proc.pid, self.stop_signal)
                except OSError:
                    pass
                r.stop_sent = time.time()
            while running:
                for r in list(running):
                    if r.proc.poll() is None and (self._hurry or time.time() - (r.stop_sent or 0) > INTERRUPT_GRACE_S):
                        kill_descendants(r.proc.pid)
                        r.proc.kill()
                        r.proc.wait()
                    if r.proc.poll() is not None:
                        running.remove(r)
                        rec = load_record(self.nb_dir(r.plan.stem)) or {}
                        forced = "interrupted" if rec.get("status") in (None, "running") else None
                        self.finish(r, forced_status=forced)
                time.sleep(0.1)
            for i, plan in queue:
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
        for stem in write_goldens(self.out_dir, stems, self.outcomes, dest, self.profile, self.say):
            self.outcomes[stem] = "failed"

"""Warm kernels (qhelpers.runner.warm, qhelpers.models.warmup) and workers started ahead (run_all.py --start-ahead): the
warm-up leaves no trace a notebook could see, a warm kernel is handed to papermill, and the
supervisor's ahead workers start in order, are recorded only once started and are dropped cleanly
on a stop."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from runner_support import needs_kernel, run_status, wait_for

from qhelpers.models import warmup
from qhelpers.runner import warm

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures" / "notebooks"
RUN_ALL = REPO / "run_all.py"




def _write_notebook(path: Path, *sources: str) -> Path:
    nb = new_notebook(cells=[new_code_cell(s) for s in sources])
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    return path


# ----------------------------------------------------------------------------- what is warmed


def test_notebook_imports_lists_top_level_imports_in_order_once(tmp_path):
    path = tmp_path / "nb.ipynb"
    nb = new_notebook(cells=[
        new_markdown_cell("import not_code"),
        new_code_cell("%matplotlib inline\n!echo hi\nimport numpy as np, json\nfrom qhelpers.report import plots, html"),
        new_code_cell("from qhelpers.report import plots, record\nfrom . import relative\nimport json\n"
                      "def f():\n    import inside_a_function\n"),
        new_code_cell("this is ( not python"),
        new_code_cell("from os.path import *"),
    ])
    nbformat.write(nb, str(path))
    assert warm.notebook_imports(path) == [
        ["numpy", []], ["json", []], ["qhelpers.report", ["plots", "html", "record"]], ["os.path", []]]


def test_warm_up_code_is_one_expression_that_binds_no_name():
    code = warm.warm_up_code([["json", []]], "tiny:llama", "cpu", "fp32")
    namespace: dict = {}
    calls = []
    real = warmup.warm_kernel
    try:
        warmup.warm_kernel = lambda **kw: calls.append(kw)  # type: ignore[assignment]
        exec(code, namespace)
    finally:
        warmup.warm_kernel = real
    assert calls == [{"imports": [["json", []]], "model": "tiny:llama", "device": "cpu", "dtype": "fp32"}]
    assert set(namespace) == {"__builtins__"}


# ----------------------------------------------------------------------------- no trace


def test_warm_kernel_restores_every_random_generator(tmp_path, monkeypatch):
    """A module that draws from Python's, NumPy's and torch's generators when imported: after the
    warm-up imported it, the draws are those without it."""
    (tmp_path / "draws_at_import.py").write_text(
        "import random, numpy, torch\nrandom.random(); numpy.random.rand(); torch.rand(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def draws() -> tuple:
        return random.random(), np.random.rand(), torch.rand(1).item()

    def seed() -> None:
        random.seed(7), np.random.seed(7), torch.manual_seed(7)

    seed()
    expected = draws()
    seed()
    out = warmup.warm_kernel([["draws_at_import", []], ["no_such_module_here", []], ["qhelpers.models", []]],
                             model="tiny:llama", device="cpu")
    assert "draws_at_import" in sys.modules  # it did run, and drew
    assert draws() == expected
    assert out["errors"].keys() == {"import no_such_module_here"}  # a failed step is skipped, not raised
    assert out["times"]["total_s"] >= out["times"]["imports_s"] >= 0 and out["times"]["model_s"] > 0
    seed()
    sys.modules.pop("draws_at_import")
    __import__("draws_at_import")
    assert draws() != expected  # the planted draws do move the generators


def test_a_model_that_fails_to_load_is_reported_not_raised():
    out = warmup.warm_kernel([["qhelpers", []]], model="embedded:no-such-model", device="cpu")
    assert "model" in out["errors"]


def test_a_notebook_without_the_numeric_stack_gets_only_its_own_imports():
    out = warmup.warm_kernel([["json", []]], model="tiny:llama", device="cpu")
    assert out["errors"] == {} and "model_s" not in out["times"]  # no model load for it


def _emit_warning() -> None:
    warnings.warn("shown once per location", UserWarning)


def test_reset_warn_once_shows_a_warning_again():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        _emit_warning()
        _emit_warning()
        assert len(caught) == 1  # the "default" action: once per location
        warmup.reset_warn_once()
        _emit_warning()
        assert len(caught) == 2


def test_reset_warn_once_forgets_transformers_warning_once():
    from transformers.utils import logging as tf_logging

    logger = tf_logging.get_logger("qhelpers.test_warm")
    tf_logging.warning_once(logger, "a transformers warning shown once")
    assert tf_logging.warning_once.cache_info().currsize > 0
    warmup.reset_warn_once()
    assert tf_logging.warning_once.cache_info().currsize == 0


@needs_kernel
def test_a_warm_kernel_runs_the_notebook_as_a_cold_one_would(tmp_path):
    """papermill on a warm kernel: the same outputs and execution counts as on a cold one, no name
    in the namespace, a transformers warning_once issued by the warm-up shown again by the notebook;
    only the imports already done tell them apart."""
    import papermill as pm

    nb = _write_notebook(
        tmp_path / "nb.ipynb",
        "import sys\nprint('warm' if 'transformers.modeling_utils' in sys.modules else 'cold')",
        "print(sorted(k for k in globals() if not k.startswith('_') and k not in ('In', 'Out', 'exit', 'quit', 'get_ipython', 'open')))",
        "from transformers.utils import logging\nlogging.get_logger('qhelpers.warm').warning_once('once per process')",
        "print(get_ipython().execution_count)",
    )
    pm.execute_notebook(str(nb), str(tmp_path / "cold.ipynb"), kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    # the warm-up itself issues the notebook's warning_once first: the notebook must still show it
    code = ("__import__('transformers.utils.logging', fromlist=['x']).get_logger('qhelpers.warm')"
            ".warning_once('once per process'); " + warm.warm_up_code(warm.notebook_imports(nb), None, "cpu", None))
    km, info = warm.start_warm_kernel("python3", str(tmp_path), code, 60)
    try:
        assert "error" not in info and info["warm_s"] > 0
        assert info["steps"]["imports_s"] > 0 and "step_errors" not in info  # read back from the kernel
        pm.execute_notebook(str(nb), str(tmp_path / "warm.ipynb"), kernel_name="python3", progress_bar=False,
                            cwd=str(tmp_path), km=km)
        assert km.has_kernel  # papermill leaves a kernel it was handed to its owner
    finally:
        warm.shutdown_kernel(km)

    def outputs(name: str) -> list:
        cells = nbformat.read(str(tmp_path / name), as_version=4).cells
        return [(c.execution_count, [(o.get("name"), o.get("text")) for o in c.outputs]) for c in cells]

    cold, hot = outputs("cold.ipynb"), outputs("warm.ipynb")
    assert cold[0][1] == [("stdout", "cold\n")] and hot[0][1] == [("stdout", "warm\n")]
    assert cold[1:] == hot[1:]
    assert "once per process" in str(hot[2][1]) and hot[3][1] == [("stdout", "4\n")]


# ----------------------------------------------------------------------------- started ahead


def _run_all(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUN_ALL), "--notebooks-dir", str(FIX), *args],
                          capture_output=True, text=True, timeout=timeout)


def _records(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/run.json")}


@pytest.mark.slow  # a runner process with real kernels; .ci/run runs it too
@needs_kernel
def test_workers_start_ahead_in_order_and_are_recorded_once_started(tmp_path):
    out = tmp_path / "run"
    done = _run_all("--out", str(out), "--start-ahead", "1", "-p", "SLEEP", "3")
    assert done.returncode == 1, done.stdout + done.stderr  # b_fail fails by design
    starts = [line.split(" ... ")[0] for line in done.stdout.splitlines() if line.endswith(")") and "... started" in line]
    assert starts == ["[1/3] a_ok", "[2/3] b_fail", "[3/3] c_sleep"]
    log = (out / "runner.log").read_text()
    assert "b_fail: worker started ahead" in log and "c_sleep: worker started ahead" in log
    assert "a_ok: worker started ahead" not in log  # a free slot: started at once
    recs = _records(out)
    for stem, rec in recs.items():
        kernel = rec["warm_kernel"]
        assert kernel["kernel_s"] > 0 and kernel["warm_s"] > 0 and "error" not in kernel, (stem, kernel)
        assert kernel["steps"]["total_s"] <= kernel["warm_s"], (stem, kernel)
        # the fixtures import neither qhelpers nor torch: their own imports only, no model, no torch
        assert "model_s" not in kernel["steps"], (stem, kernel)
        assert ("waited_s" in kernel) == (stem != "a_ok")
    # a notebook's record starts when it started, not when its worker was started ahead
    assert recs["a_ok"]["end"] <= recs["b_fail"]["start"] and recs["b_fail"]["end"] <= recs["c_sleep"]["start"]
    assert [recs[s]["status"] for s in ("a_ok", "b_fail", "c_sleep")] == ["completed", "failed", "completed"]


def test_start_ahead_defaults_to_one_per_worker_on_a_gpu_only(monkeypatch):
    from qhelpers.runner import cli
    from qhelpers.runner.manifest import RunCommand

    monkeypatch.setattr(cli, "visible_gpus", lambda: ["0"])
    assert cli.default_start_ahead(RunCommand(backend="local", device="cuda"), 8) == 8
    assert cli.default_start_ahead(RunCommand(backend="local", device=None), 3) == 3  # auto, a GPU visible
    assert cli.default_start_ahead(RunCommand(backend="local", device="cpu"), 2) == 0
    assert cli.default_start_ahead(RunCommand(backend="ray", device="cuda"), 8) == 0
    monkeypatch.setattr(cli, "visible_gpus", lambda: [])
    assert cli.default_start_ahead(RunCommand(backend="local", device="auto"), 2) == 0


@needs_kernel
def test_start_ahead_zero_and_cold_kernels_turn_it_off(tmp_path):
    out = tmp_path / "run"
    done = _run_all("--out", str(out), "--only", "a_ok", "c_sleep", "--start-ahead", "0", "--cold-kernels",
                    "-p", "SLEEP", "0.1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "started ahead" not in (out / "runner.log").read_text()
    assert all("warm_kernel" not in rec for rec in _records(out).values())
    manifest = json.loads((out / "run_config.json").read_text())
    assert manifest["resolved"]["start_ahead"] == 0 and manifest["resolved"]["warm"] is False
    bad = _run_all("--out", str(tmp_path / "bad"), "--start-ahead", "-1")
    assert bad.returncode == 2 and "--start-ahead must be 0 (off) or more" in bad.stderr


def _sleep_then_ok(tmp_path: Path) -> Path:
    """A notebooks folder: a_sleep (the c_sleep fixture) runs first, b_ok (a_ok) is queued after it."""
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    (nb_dir / "profiles.yaml").write_bytes((FIX / "profiles.yaml").read_bytes())
    (nb_dir / "a_sleep.ipynb").write_bytes((FIX / "c_sleep.ipynb").read_bytes())
    (nb_dir / "b_ok.ipynb").write_bytes((FIX / "a_ok.ipynb").read_bytes())
    return nb_dir


@pytest.mark.slow  # a runner process with real kernels; .ci/run runs it too
@needs_kernel
def test_a_stop_drops_the_worker_started_ahead_without_a_record(tmp_path):
    """SIGINT while a_sleep runs and b_ok's worker waits ahead: a_sleep is interrupted, b_ok is "not
    started" with no run.json and no job file, its worker and warm kernel are gone, and a resume
    runs it."""
    import psutil

    nb_dir, out = _sleep_then_ok(tmp_path), tmp_path / "run"

    def log_says(stem: str, text: str) -> bool:
        log = out / stem / "log.txt"
        return log.is_file() and text in log.read_text()

    proc = subprocess.Popen([sys.executable, str(RUN_ALL), "--notebooks-dir", str(nb_dir), "-p", "SLEEP", "60",
                             "--start-ahead", "1", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: log_says("a_sleep", "sleeping"), 90, "a_sleep to sleep")
        wait_for(lambda: log_says("b_ok", "kernel warm"), 90, "b_ok's kernel to be warm")
        ahead = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "b_ok.json" in " ".join(p.cmdline())]
        assert ahead, "b_ok's worker should be running ahead"
        family = ahead + ahead[0].children(recursive=True)
        assert run_status(out, "b_ok") is None
        proc.send_signal(signal.SIGINT)
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, text
    assert "[2/2] b_ok ... not started" in text
    assert run_status(out, "a_sleep") == "interrupted"
    assert not (out / "b_ok" / "run.json").exists() and not (out / ".jobs" / "b_ok.json").exists()
    deadline = time.time() + 10
    while time.time() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family):
        time.sleep(0.1)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family)
    resumed = subprocess.run([sys.executable, str(RUN_ALL), "--resume", str(out), "-p", "SLEEP", "0.1"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert run_status(out, "b_ok") == "completed" and run_status(out, "a_sleep") == "completed"


@needs_kernel
def test_a_warm_up_that_raises_falls_back_to_a_fresh_kernel(tmp_path):
    """A warm-up that raises outside its guarded steps (here: imports that are not a list) leaves the
    kernel in an unknown state: the worker shuts it down and papermill starts a fresh one."""
    import psutil

    from qhelpers.runner import worker

    job = {"kernel": "python3", "cwd": str(tmp_path), "start_timeout": 60,
           "warm": {"imports": 5, "model": None, "device": "cpu", "dtype": None}}
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    km, info = worker._warm_kernel(job)
    assert km is None and "TypeError" in info["error"]
    time.sleep(0.5)
    assert not [p for p in psutil.Process().children(recursive=True)
                if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow  # a runner process with real kernels; .ci/run runs it too
@needs_kernel
def test_a_warm_kernel_that_died_while_waiting_is_replaced(tmp_path):
    """b_ok's worker waits ahead with a warm kernel; its kernel is killed; when a_sleep ends, b_ok
    runs in a fresh kernel and completes, and run.json says what happened."""
    import psutil

    nb_dir, out = _sleep_then_ok(tmp_path), tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(RUN_ALL), "--notebooks-dir", str(nb_dir), "-p", "SLEEP", "25",
                             "--start-ahead", "1", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        log = out / "b_ok" / "log.txt"
        wait_for(lambda: log.is_file() and "kernel warm" in log.read_text(), 90, "b_ok's kernel to be warm")
        worker_proc = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                           if "b_ok.json" in " ".join(p.cmdline()))
        kernel = next(p for p in worker_proc.children(recursive=True) if "ipykernel" in " ".join(p.cmdline()))
        assert run_status(out, "a_sleep") == "running"
        kernel.kill()
        text, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, text
    rec = json.loads((out / "b_ok" / "run.json").read_text())
    assert rec["status"] == "completed"
    assert rec["warm_kernel"]["error"] == "the warm kernel died before its notebook started"

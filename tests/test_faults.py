"""Fault injection: run_all.py never loses or alters a completed result, and every failure stays
with its notebook and is named.

Each test breaks something on purpose: kill -9 of the runner (during a kernel's cell, right
after a notebook completed, right after a resume moved a folder aside), of a worker and of a
kernel; run.json, summary.md and a notebook folder that cannot be written; a truncated or edited
results.json; two runners on one folder; a run folder given the wrong options; damaged caches
(converted model, GGUF, sweep entry, LoRA adapter). Each asserts with sha256 hashes that every
completed results.json is still there, unchanged (in its folder or moved aside to
``<stem>.prev-<n>``), and that nothing is left "running" once the processes are gone.

The notebooks are the tiny fixtures of tests/test_runner.py (tests/fixtures/notebooks: plain
Python, no model), copied and varied per test; a completed run is made once and copied.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from model_support import fake_conversion
from runner_support import needs_kernel, run_status, wait_for

from qhelpers.runner.cli import main

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures" / "notebooks"
RUN_ALL = REPO / "run_all.py"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")




# --------------------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUN_ALL), *args], env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(RUN_ALL), *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _nb_args(nb_dir: Path) -> list[str]:
    return ["--notebooks-dir", str(nb_dir), "--profiles", str(nb_dir / "profiles.yaml")]


def _record(out: Path, folder: str) -> dict:
    return json.loads((out / folder / "run.json").read_text(encoding="utf-8"))


def completed_hashes(out: Path) -> dict[str, str]:
    """sha256 of results.json of every notebook folder (current or moved aside) that says completed."""
    found = {}
    for d in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if run_status(out, d.name) == "completed" and (d / "results.json").is_file():
            found[d.name] = hashlib.sha256((d / "results.json").read_bytes()).hexdigest()
    return found


def assert_nothing_lost(before: dict[str, str], out: Path) -> None:
    """Every completed results.json of ``before`` is still in ``out``, byte for byte: in its
    folder or in one of that notebook's ``.prev-<n>`` folders."""
    for folder, digest in before.items():
        stem = folder.split(".prev-")[0]
        places = [out / stem, *out.glob(f"{stem}.prev-*")]
        kept = {hashlib.sha256((p / "results.json").read_bytes()).hexdigest()
                for p in places if (p / "results.json").is_file()}
        assert digest in kept, f"the completed result of {folder} was lost or altered"


def assert_nothing_running(out: Path) -> None:
    """No run.json and no summary says running once runner and workers are gone."""
    for rj in out.glob("*/run.json"):
        assert json.loads(rj.read_text())["status"] != "running", rj
    summary = (out / "summary.md").read_text()
    assert "state: running" not in summary and "| running |" not in summary, summary


def _process_gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _worker_of(runner_pid: int, stem: str):
    import psutil

    for child in psutil.Process(runner_pid).children():
        cmd = " ".join(child.cmdline())
        if "qhelpers.runner.worker" in cmd and f"{stem}.json" in cmd:
            return child
    return None


def _kernel_of(worker) -> object | None:
    for child in worker.children(recursive=True):
        if "ipykernel" in " ".join(child.cmdline()):
            return child
    return None


def _notebooks(tmp: Path, copies: dict[str, str] | None = None, extra_cells: dict[str, str] | None = None) -> Path:
    """A notebooks folder: the fixtures, plus ``copies`` {new stem: fixture stem}, with
    ``extra_cells`` {stem: code} appended as a last code cell."""
    nb_dir = tmp / "notebooks"
    nb_dir.mkdir()
    shutil.copy(FIX / "profiles.yaml", nb_dir)
    sources = {p.stem: p.stem for p in FIX.glob("*.ipynb")} | (copies or {})
    for stem, source in sources.items():
        nb = json.loads((FIX / f"{source}.ipynb").read_text())
        if stem in (extra_cells or {}):
            nb["cells"].append({"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                                "source": extra_cells[stem]})
        (nb_dir / f"{stem}.ipynb").write_text(json.dumps(nb))
    return nb_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model folder for a_ok's MODEL (a_ok only records the name; the runner fingerprints the files)."""
    folder = tmp_path_factory.mktemp("model")
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, model_dir):
    """A completed run of a_ok and c_sleep, with --model <model_dir> -p N_BOOT 150 -p SLEEP 0.2;
    copy it before use (``run_copy``)."""
    out = tmp_path_factory.mktemp("done") / "run"
    proc = _run(*_nb_args(FIX), "--only", "a_ok", "c_sleep", "--model", str(model_dir), "-p", "N_BOOT", "150",
                "-p", "SLEEP", "0.2", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(completed_hashes(out)) == {"a_ok", "c_sleep"}
    return out


@pytest.fixture
def run_copy(done_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(done_run, out, symlinks=True)
    return out


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".runner.lock" not in p.name}


# --------------------------------------------------------------------------- 1-4: resume and run folders


@needs_kernel
def test_bare_resume_reapplies_only_and_overrides(run_copy):
    """Finding 1: a bare --resume re-applies the recorded --only and -p (not just the profile)."""
    before = completed_hashes(run_copy)
    proc = _run("--resume", str(run_copy))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "a_ok ... skipped" in proc.stdout and "c_sleep ... skipped" in proc.stdout
    assert not (run_copy / "b_fail").exists(), "--only was not re-applied"
    assert not list(run_copy.glob("*.prev-*"))
    assert completed_hashes(run_copy) == before
    manifest = json.loads((run_copy / "run_config.json").read_text())
    assert manifest["command"]["only"] == ["a_ok", "c_sleep"]
    assert manifest["command"]["params"] == [["N_BOOT", "150"], ["SLEEP", "0.2"]]
    assert len(manifest["history"]) == 2 and manifest["qhelpers"]["code_sha256"]
    entry = manifest["notebooks"]["a_ok"]
    assert entry["parameters"]["N_BOOT"] == 150 and len(entry["inputs_sha256"]) == 64


@needs_kernel
def test_a_bad_value_on_resume_touches_nothing(run_copy):
    """Finding 2: --resume DIR -p N_BOOT abc fails before anything is moved or written."""
    before = _tree_digest(run_copy)
    proc = _run("--resume", str(run_copy), "-p", "N_BOOT", "abc")
    assert proc.returncode == 2
    assert "N_BOOT expects a number like 100, got string 'abc'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _tree_digest(run_copy) == before


@pytest.mark.slow  # a runner process with real kernels; .ci/run runs it too
@needs_kernel
def test_out_on_an_earlier_run_moves_completed_folders_aside(run_copy):
    """Finding 3: --out <an earlier run> -p N_BOOT 9 re-runs a_ok but keeps the completed one."""
    before = completed_hashes(run_copy)
    proc = _run(*_nb_args(FIX), "--only", "a_ok", "-p", "N_BOOT", "9", "--out", str(run_copy))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "holds an earlier run" in proc.stdout and "a_ok: earlier folder kept as a_ok.prev-1" in proc.stdout
    assert completed_hashes(run_copy)["a_ok.prev-1"] == before["a_ok"]
    assert completed_hashes(run_copy)["c_sleep"] == before["c_sleep"]  # not selected: untouched
    assert_nothing_lost(before, run_copy)
    assert json.loads((run_copy / "a_ok" / "results.json").read_text())["parameters"]["N_BOOT"] == 9
    assert _record(run_copy, "a_ok")["previous"] == {"folder": "a_ok.prev-1", "status": "completed",
                                                     "reason": "run again with --out"}
    summary = (run_copy / "summary.md").read_text()
    assert "[a_ok.prev-1](a_ok.prev-1/) | completed | run again with --out" in summary
    assert "a_ok.prev-1" in (run_copy / "index.html").read_text()
    assert "| a_ok.prev-1 | completed" not in summary  # listed as kept, not as a notebook


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    """Finding 4: --out / --resume on a user's folder exit 2 and overwrite nothing."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.html").write_text("my page")
    (mine / "summary.md").write_text("my notes")
    before = _tree_digest(mine)
    no_kernel = ["--kernel", "no_such_kernel_qh"]  # were the folder accepted, nothing would run anyway
    assert main(["--notebooks-dir", str(FIX), "--out", str(mine), *no_kernel]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["--resume", str(mine), *no_kernel]) == 2
    err = capsys.readouterr().err
    assert "not a run folder (no run_config.json)" in err and len(err.strip().splitlines()) == 1
    assert _tree_digest(mine) == before and sorted(p.name for p in mine.iterdir()) == ["index.html", "summary.md"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--resume", str(empty), *no_kernel]) == 2  # an empty folder is not a run either
    assert "not a run folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- 5: failures contained, path errors


def test_bad_out_paths_exit_2_with_one_line(tmp_path):
    """Finding 5b: an existing file, a path under a file and an unwritable path are usage errors."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub", Path("/proc/qhelpers-no-such-run")):
        proc = _run(*_nb_args(FIX), "--only", "a_ok", "--out", str(out), timeout=60)
        assert proc.returncode == 2, (out, proc.stderr)
        assert proc.stderr.startswith("run_all.py: error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
    assert afile.read_text() == "x"


def _immutable_supported(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0 if shutil.which("chattr") else False
    if ok:
        subprocess.run(["chattr", "-i", str(probe)], check=True)
    return ok


@pytest.mark.slow  # a runner process with real kernels; .ci/run runs it too
@needs_kernel
def test_an_immutable_notebook_folder_fails_only_that_notebook(run_copy, tmp_path):
    """Finding 5a: a notebook folder that cannot be moved or written fails that notebook only:
    the others run, run.json and the summary are finished, no traceback, exit 1."""
    if not _immutable_supported(tmp_path):
        pytest.skip("chattr +i is not permitted here (needs root with CAP_LINUX_IMMUTABLE)")
    before = completed_hashes(run_copy)
    subprocess.run(["chattr", "+i", str(run_copy / "a_ok")], check=True)
    try:
        proc = _run("--resume", str(run_copy), "-p", "N_BOOT", "9", "-p", "SLEEP", "0.3")
    finally:
        subprocess.run(["chattr", "-i", str(run_copy / "a_ok")], check=True)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert "Traceback" not in text
    assert "a_ok ... FAILED to start" in text and "c_sleep ... done" in text
    assert run_status(run_copy, "c_sleep") == "completed"
    assert completed_hashes(run_copy)["a_ok"] == before["a_ok"]  # still there, untouched
    summary = (run_copy / "summary.md").read_text()
    assert "state: finished" in summary and "| a_ok | failed |" in summary and "StartError" in summary
    assert_nothing_lost(before, run_copy)
    assert_nothing_running(run_copy)


RUN_JSON_BREAKER = (
    "import pathlib, shutil\n"
    "rj = pathlib.Path(OUTPUT_DIR) / 'run.json'\n"
    "rj.unlink()\n"
    "rj.mkdir()  # the worker's final write of run.json now fails\n"
)


@pytest.mark.slow  # a runner process with real kernels; .ci/run runs it too (kept the default run under 15 min)
@needs_kernel
def test_write_failures_are_contained(run_copy, tmp_path):
    """Finding 5: run.json that cannot be written (worker) and summary.md that cannot be written
    (runner): the notebook is failed and named, the next one runs, the bookkeeping finishes."""
    nb_dir = _notebooks(tmp_path, copies={"w_breaks": "a_ok"}, extra_cells={"w_breaks": RUN_JSON_BREAKER})
    out = run_copy
    before = completed_hashes(out)
    (out / "summary.md").unlink()
    (out / "summary.md").mkdir()  # the runner cannot write its summary.md
    proc = _run("--resume", str(out), *_nb_args(nb_dir), "--only", "c_sleep", "w_breaks", "-p", "SLEEP", "0.1")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert "Traceback" not in text
    assert "warning: cannot write the summary" in text and text.count("cannot write the summary") == 1
    assert "w_breaks ... FAILED" in text and "RecordWriteError" in text
    assert "c_sleep ... done" in text and run_status(out, "c_sleep") == "completed"
    assert "finished: 1 completed, 1 not completed (w_breaks)" in text
    html = (out / "index.html").read_text()  # written although summary.md is not
    assert "RecordWriteError" in html and "state finished" in html
    assert "--notebooks-dir: " in text and "--only: a_ok c_sleep -> c_sleep w_breaks" in text  # printed changes
    assert_nothing_lost(before, out)


# --------------------------------------------------------------------------- 6: completed = intact results.json; stale


@pytest.mark.slow  # a runner process with real kernels; .ci/run runs it too (kept the default run under 15 min)
@needs_kernel
def test_resume_reruns_a_truncated_or_edited_results_json(run_copy):
    """Finding 6a: resume checks results.json against its recorded hash, not just run.json."""
    a_results, c_results = run_copy / "a_ok" / "results.json", run_copy / "c_sleep" / "results.json"
    a_results.write_bytes(a_results.read_bytes()[:40])  # truncated
    doc = json.loads(c_results.read_text())
    doc["hypotheses"][0]["verdict"] = "SUPPORTED"  # edited: still valid JSON
    c_results.write_text(json.dumps(doc))
    kept = {"a_ok": hashlib.sha256(a_results.read_bytes()).hexdigest(),
            "c_sleep": hashlib.sha256(c_results.read_bytes()).hexdigest()}
    summary_before = (run_copy / "summary.md").read_text()
    assert "| a_ok | completed |" in summary_before
    proc = _run("--resume", str(run_copy))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "a_ok ... will re-run (results.json unreadable" in proc.stdout
    assert "c_sleep ... will re-run (results.json changed since it was recorded" in proc.stdout
    for stem, digest in kept.items():  # the damaged files are kept aside, as they were
        assert hashlib.sha256((run_copy / f"{stem}.prev-1" / "results.json").read_bytes()).hexdigest() == digest
        assert run_status(run_copy, stem) == "completed"
        digest = hashlib.sha256((run_copy / stem / "results.json").read_bytes()).hexdigest()
        assert _record(run_copy, stem)["results_sha256"] == digest


def test_completion_problems_are_named(tmp_path):
    from qhelpers.runner.records import completion_problem, results_digest

    d = tmp_path / "nb"
    d.mkdir()
    rec = {"status": "completed", "results_sha256": "0" * 64}
    assert completion_problem(d, rec) == "results.json missing"
    (d / "results.json").write_text("[1, 2]")
    assert completion_problem(d, rec) == "results.json is not an object"
    (d / "results.json").write_text('{"a": 1}')
    assert "changed since it was recorded" in completion_problem(d, rec)
    assert completion_problem(d, {**rec, "results_sha256": results_digest(d)[0]}) is None
    assert completion_problem(d, {"status": "completed"}).startswith("no results hash recorded")
    assert completion_problem(d, {"status": "interrupted"}) == "previous status interrupted"


@pytest.mark.slow  # a runner process with real kernels; .ci/run runs it too (kept the default run under 15 min)
@needs_kernel
def test_changed_model_files_or_code_make_results_stale(run_copy, model_dir, monkeypatch, capsys):
    """Finding 6b: a changed model folder or qhelpers code marks a result stale: re-run on
    --resume, or kept and marked stale with --keep-stale."""
    out = run_copy
    before = completed_hashes(out)
    assert _record(out, "a_ok")["model_fingerprint"].startswith("folder ")
    new_file = model_dir / "weights.safetensors"
    new_file.write_bytes(b"new weights")
    try:
        # in-process, so that the qhelpers code hash can be changed too
        import qhelpers.runner.cli as cli

        assert main(["--resume", str(out), "--keep-stale"]) == 0
        printed = capsys.readouterr().out
        assert "a_ok ... skipped (kept, stale: model files changed since it ran (--keep-stale))" in printed
        assert "c_sleep ... skipped (completed earlier" in printed  # c_sleep has no MODEL
        summary = (out / "summary.md").read_text()
        assert "| a_ok | completed (stale: model files changed since it ran) |" in summary
        assert "stale: model files changed" in (out / "index.html").read_text()
        monkeypatch.setattr(cli, "qhelpers_code_hash", lambda: "another version of the code")
        assert main(["--resume", str(out), "--keep-stale"]) == 0
        assert "c_sleep ... skipped (kept, stale: qhelpers code changed since it ran" in capsys.readouterr().out
        assert completed_hashes(out) == before  # kept means kept

        monkeypatch.undo()
        proc = _run("--resume", str(out))  # without --keep-stale: a_ok runs again, its result kept aside
    finally:
        new_file.unlink()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "a_ok ... will re-run (stale: model files changed since it ran)" in proc.stdout
    assert "c_sleep ... skipped" in proc.stdout
    assert_nothing_lost(before, out)
    assert (out / "a_ok.prev-1").is_dir() and run_status(out, "a_ok") == "completed"


def test_keep_stale_needs_resume(capsys):
    assert main(["--notebooks-dir", str(FIX), "--keep-stale"]) == 2
    assert "--keep-stale applies to --resume" in capsys.readouterr().err


# --------------------------------------------------------------------------- kill -9 at several points


@pytest.mark.slow  # a runner process with real kernels; .ci/run runs it too (kept the default run under 15 min)
@needs_kernel
def test_kill_runner_right_after_a_notebook_completed(tmp_path):
    """kill -9 of run_all.py between notebooks, then while the next kernel sleeps: what completed
    stays, the orphaned worker records its notebook interrupted and rewrites the summary."""
    out = tmp_path / "run"
    proc = _start(*_nb_args(FIX), "--only", "a_ok", "c_sleep", "-p", "SLEEP", "30", "--out", str(out))
    try:
        wait_for(lambda: run_status(out, "a_ok") == "completed", 60, "a_ok to complete")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = completed_hashes(out)
    assert "a_ok" in before
    # c_sleep was not started, or its worker sees the runner gone and records it interrupted
    wait_for(lambda: run_status(out, "c_sleep") in (None, "interrupted"), 30, "c_sleep to stop")
    if run_status(out, "c_sleep") == "interrupted":
        wait_for(lambda: "interrupted: run_all.py exited" in (out / "summary.md").read_text(), 30, "the summary")
        assert_nothing_running(out)
    resumed = _run("--resume", str(out), "-p", "SLEEP", "0.1")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "a_ok ... skipped" in resumed.stdout and run_status(out, "c_sleep") == "completed"
    assert_nothing_lost(before, out)
    assert_nothing_running(out)


@pytest.mark.slow  # a runner process with real kernels; .ci/run runs it too
@needs_kernel
def test_kill_runner_after_a_resume_moved_a_folder_aside(run_copy):
    """kill -9 of run_all.py just after it moved a completed folder aside: the moved result is
    intact, and the next resume keeps it too."""
    before = completed_hashes(run_copy)
    proc = _start("--resume", str(run_copy), "-p", "SLEEP", "30")
    try:
        wait_for(lambda: (run_copy / "c_sleep.prev-1").is_dir(), 60, "c_sleep to be moved aside")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_nothing_lost(before, run_copy)
    wait_for(lambda: run_status(run_copy, "c_sleep") in (None, "interrupted"), 30, "c_sleep to stop")
    resumed = _run("--resume", str(run_copy), "-p", "SLEEP", "0.2")  # the original value again
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "a_ok ... skipped" in resumed.stdout
    assert_nothing_lost(before, run_copy)
    assert completed_hashes(run_copy)["c_sleep.prev-1"] == before["c_sleep"]
    assert_nothing_running(run_copy)


@needs_kernel
@pytest.mark.slow  # a runner process with real kernels; .ci/run runs it too (kept the default run under 15 min)
def test_kill_worker_and_kernel_fail_only_their_notebooks(tmp_path):
    """kill -9 of one notebook's worker (its kernel is then killed too) and of another's kernel:
    both are failed with the reason, the notebooks after them still run, exit 1."""
    import psutil

    nb_dir = _notebooks(tmp_path, copies={"d_sleep": "c_sleep", "z_ok": "a_ok"})
    out = tmp_path / "run"
    proc = _start(*_nb_args(nb_dir), "--only", "c_sleep", "d_sleep", "z_ok", "-p", "SLEEP", "30",
                  "--out", str(out))
    try:
        wait_for(lambda: "sleeping" in (out / "c_sleep" / "log.txt").read_text(), 60, "c_sleep to sleep")
        time.sleep(1.5)  # the runner notes each worker's kernel once a second
        worker = _worker_of(proc.pid, "c_sleep")
        kernel = _kernel_of(worker)
        assert worker is not None and kernel is not None
        worker.send_signal(signal.SIGKILL)
        wait_for(lambda: "sleeping" in (out / "d_sleep" / "log.txt").read_text(), 60, "d_sleep to sleep")
        wait_for(lambda: _process_gone(kernel.pid), 10, "c_sleep's orphaned kernel to be killed")
        d_kernel = _kernel_of(_worker_of(proc.pid, "d_sleep"))
        d_kernel.send_signal(signal.SIGKILL)
        text, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, text
    assert "Traceback" not in text
    c = _record(out, "c_sleep")
    assert c["status"] == "failed" and c["error"]["ename"] == "WorkerDied"
    d = _record(out, "d_sleep")
    assert d["status"] == "failed" and "Dead" in d["error"]["ename"] + d["error"]["evalue"]
    assert run_status(out, "z_ok") == "completed"
    assert "finished: 1 completed, 2 not completed (c_sleep, d_sleep)" in text
    assert not psutil.pid_exists(kernel.pid) or _process_gone(kernel.pid)
    assert_nothing_running(out)


@pytest.mark.slow  # a runner process with real kernels; .ci/run runs it too (kept the default run under 15 min)
@needs_kernel
def test_two_runners_on_one_folder(run_copy):
    """A second runner (--resume or --out) on a folder a runner is using exits 2 and writes nothing."""
    before = completed_hashes(run_copy)
    first = _start("--resume", str(run_copy), "-p", "SLEEP", "30")
    try:
        wait_for(lambda: (run_copy / "c_sleep.prev-1").is_dir()
                  and "sleeping" in (run_copy / "c_sleep" / "log.txt").read_text(), 60, "c_sleep to sleep")
        manifest = (run_copy / "run_config.json").read_bytes()
        for args in (["--resume", str(run_copy)], [*_nb_args(FIX), "--only", "a_ok", "--out", str(run_copy)]):
            second = _run(*args, timeout=60)
            assert second.returncode == 2 and "another run_all.py is running" in second.stderr, second.stderr
        assert (run_copy / "run_config.json").read_bytes() == manifest
        assert_nothing_lost(before, run_copy)
        first.send_signal(signal.SIGINT)
        text, _ = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, text
    assert_nothing_lost(before, run_copy)
    assert_nothing_running(run_copy)


# --------------------------------------------------------------------------- 7: caches


def _fake_conversion(root: Path, tiny_model) -> Path:
    """A converted-model cache folder for embedded:smollm2-135m holding a tiny model."""
    from qhelpers.models import loading

    folder, _ = fake_conversion(root, tiny_model)
    assert loading.embedded_cache_dir("smollm2-135m", root) == folder
    return folder


def test_damaged_converted_model_names_the_folder_to_delete(tmp_path, tiny_model):
    """Finding 7: a truncated or altered converted model fails with ModelLoadError naming the folder."""
    from qhelpers.models.loading import load_model
    from qhelpers.util.errors import ModelLoadError

    folder = _fake_conversion(tmp_path, tiny_model)
    assert load_model("embedded:smollm2-135m", device="cpu", cache_dir=tmp_path).n_layers == 4
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"damaged \(model.safetensors has .* bytes.*truncated") as info:
        load_model("embedded:smollm2-135m", device="cpu", cache_dir=tmp_path)
    assert f"rm -rf '{folder}'" in str(info.value)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ModelLoadError, match="does not match the sha256"):
        load_model("embedded:smollm2-135m", device="cpu", cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="damaged"):  # also when loaded as a folder
        load_model(str(folder), device="cpu")


def test_gguf_is_checked_against_the_sha256_it_was_tested_with(tmp_path, monkeypatch):
    """Finding 7: a damaged GGUF is named (with the reinstall command) before any conversion."""
    from qhelpers.models import loading
    from qhelpers.util.errors import ModelLoadError

    def truncated(key, info, workdir):
        workdir.mkdir(parents=True)
        path = workdir / info["gguf_file"]
        path.write_bytes(b"GGUF truncated")
        return path

    monkeypatch.setattr(loading, "_locate_gguf", truncated)
    with pytest.raises(ModelLoadError, match=r"is not the GGUF qhelpers was tested with.*--force-reinstall"):
        loading.convert_embedded("smollm2-135m", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_conversions_are_cleaned_on_the_next_start(tmp_path, tiny_model):
    """Finding 7: .partial-* folders of a killed conversion are removed by the next load, but
    not while another process holds the conversion lock (it may be converting right now)."""
    from qhelpers.models.loading import load_model
    from qhelpers.util.cache import cache_lock

    _fake_conversion(tmp_path, tiny_model)
    partial = tmp_path / ".smollm2-135m.partial-k1ll3d"
    (partial / "_gguf").mkdir(parents=True)
    (partial / "_gguf" / "half.gguf").write_bytes(b"\0" * 1024)
    with cache_lock(tmp_path):  # another process converting
        load_model("embedded:smollm2-135m", device="cpu", cache_dir=tmp_path)
        assert partial.is_dir()
    load_model("embedded:smollm2-135m", device="cpu", cache_dir=tmp_path)
    assert not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m"]


def test_damaged_sweep_cache_entry_is_recomputed(tmp_path, tiny_model, capsys):
    """Finding 7: a sweep cache entry whose content no longer matches its sha256 is reported and
    computed again; the scores are those of a fresh computation."""
    import pandas as pd

    from qhelpers.measure.criticality import criticality_variants
    from qhelpers.measure.sweep_cache import cached_sweep
    from qhelpers.text.corpora import load_corpus

    loaded = tiny_model("gpt2")
    corpus = load_corpus("udhr", langs=["en", "sw"], n_texts=2)
    variants = criticality_variants(loaded.n_layers, layers=[0])
    first, hit = cached_sweep(loaded, corpus, variants, cache=tmp_path, progress=False)
    assert not hit
    entry = next(tmp_path.glob("*.json"))
    doc = json.loads(entry.read_text())
    doc["scores"]["data"][0][-1] = 1.0  # a flipped number: still valid JSON
    entry.write_text(json.dumps(doc))
    again, hit = cached_sweep(loaded, corpus, variants, cache=tmp_path, progress=False)
    assert not hit and "is damaged (content does not match its sha256)" in capsys.readouterr().out
    pd.testing.assert_frame_equal(first.scores, again.scores, check_exact=True)
    entry.write_text(entry.read_text()[:100])  # truncated
    _, hit = cached_sweep(loaded, corpus, variants, cache=tmp_path, progress=False)
    assert not hit and "is damaged" in capsys.readouterr().out
    third, hit = cached_sweep(loaded, corpus, variants, cache=tmp_path, progress=False)
    assert hit
    pd.testing.assert_frame_equal(first.scores, third.scores, check_exact=True)


def test_damaged_zoo_adapter_is_named_and_rebuilt(tmp_path, tiny_model, capsys):
    """Finding 7: load_zoo names a damaged adapter's folder; build_zoo trains it again."""
    from qhelpers.experiments.lora import zoo as L
    from qhelpers.text.corpora import load_corpus

    loaded = tiny_model("gpt2")
    corpus = load_corpus("udhr", langs=["en", "he"], n_texts=4, seed=0)
    config = L.ZooConfig(langs=("en", "he"), adapters_per_lang=2, texts_per_adapter=2, steps=1, max_length=32)
    root = tmp_path / "zoo"
    zoo = L.build_zoo(loaded, corpus, root, config, progress=False)
    victim = zoo.adapters[0]
    weights = root / victim / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(L.ZooError, match=rf"adapter '{victim}'.*does not match the sha256.*Delete {root / victim}"):
        L.load_zoo(root)
    rebuilt = L.build_zoo(loaded, corpus, root, config, progress=False)
    assert f"adapter {victim} in {root} is damaged" in capsys.readouterr().out
    assert json.loads((root / "zoo.json").read_text())["last_build"]["trained"] == 1
    assert weights.read_bytes() == data  # deterministic training: the same adapter again
    assert rebuilt.adapters == zoo.adapters


# --------------------------------------------------------------------------- 8: every value checked first


def test_bad_values_fail_before_any_work(tmp_path, capsys):
    """Finding 8: empty LANGS, a group outside LANGS, a value of the wrong kind: exit 2 before
    anything is created, each named."""
    out = tmp_path / "out"
    cases = [
        (["-p", "LANGS", "[]"], "LANGS is empty"),
        (["-p", "LR_LANGS", "[he, xx]"], "LR_LANGS names xx, which is not in LANGS"),
        (["-p", "HR_LANGS", "[en, he]"], "he in both HR_LANGS and LR_LANGS"),
        (["-p", "BITS", "abc"], "BITS expects a number like 4, got string 'abc'"),
        (["-p", "N_TEXTS", "[1]"], "N_TEXTS expects a number"),
    ]
    for args, message in cases:
        # the checks come before the kernel's: an unknown kernel shows that no value got through
        assert main(["--only", "exp005_layer_ablation", *args, "--out", str(out), "--kernel", "no_such_kernel_qh"]) == 2
        err = capsys.readouterr().err
        assert message in err and "nothing was run" in err, err
    assert not out.exists()
    # the values the profiles set pass the same checks
    for profile in ("ci", "full"):
        assert main(["--only", "exp005_layer_ablation", "--profile", profile, "--kernel", "no_such_kernel_qh"]) == 2
        assert "kernel 'no_such_kernel_qh' not found" in capsys.readouterr().err


def test_library_values_are_checked_with_named_errors():
    """Finding 8: no raw IndexError / ValueError / UnicodeEncodeError from these inputs."""
    from qhelpers.quant import strategies
    from qhelpers.text.corpora import Corpus, load_corpus
    from qhelpers.util.errors import ConfigError, CorpusError

    with pytest.raises(CorpusError, match="language list is empty"):
        load_corpus("udhr", langs=[], n_texts=2)
    with pytest.raises(CorpusError, match=r"text 't1' in language 'sw' is not valid Unicode"):
        Corpus.from_texts("mine", {"sw": ["sawa", "bad \udcff byte"]})
    with pytest.raises(ConfigError, match=r"strategy 'mine': bits must be a whole number between 2 and 8, got 'abc'"):
        strategies.custom_variants({"mine": {"layers": [0], "bits": "abc"}})
    assert strategies.custom_variants({"mine": {"layers": [0], "bits": 3}})["mine"].quant.bits == 3

"""The scheduler interface and its Ray backend (qhelpers/runner/backends.py, ray_backend.py), and
grids over models and settings (runner/plan.py, the summary's cross-setting tables).

Pure parts (grid expansion, resource requests, path rebasing, the cross-setting table) are checked
against hand-made answers. The Ray parts run real Ray: a local instance with 2 CPUs for the ci
profile of two real notebooks (bit-identical to the local backend), and a Ray head started once
for the module (4 CPUs, 2 declared GPUs; joined with --address, so the qhelpers package is shipped to it) for placement, a killed worker, Ctrl-C and the grid tables."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qhelpers.runner import ray_backend
from qhelpers.runner.backends import is_gpu_job, job_resources
from qhelpers.runner.errors import RunnerError
from qhelpers.runner.params import Param
from qhelpers.runner.plan import Plan, expand_grid, job_folder
from qhelpers.runner.processes import process_identity
from qhelpers.runner.ray_backend import collect_files, remote_job
from qhelpers.runner.summary import grid_markdown, grid_tables
from tests.runner_support import wait_for

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "ray_notebooks"
RUN_ALL = [sys.executable, str(REPO / "run_all.py")]

ray = pytest.importorskip("ray")
# the test's own head and drivers share no token file: Ray's token authentication is off for them
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command of this Python, PATH or not


def _plan(stem: str, names: dict[str, object]) -> Plan:
    defined = {n: Param(n, v, repr(v), True) for n, v in names.items()}
    return Plan(stem, Path(f"/nb/{stem}.ipynb"), defined, {})


# ---------------------------------------------------------------- pure parts


def test_grid_expands_only_where_defined_and_names_folders():
    a = _plan("a", {"MODEL": "x", "BITS": 4})
    b = _plan("b", {"MODEL": "x"})
    c = _plan("c", {"N": 1})
    jobs, notes = expand_grid([a, b, c], [("MODEL", ["gpt2", "embedded:smollm2-135m"]), ("BITS", [3, 4])])
    assert [j.stem for j in jobs] == [
        "a--gpt2--BITS-3", "a--gpt2--BITS-4", "a--embedded_smollm2-135m--BITS-3", "a--embedded_smollm2-135m--BITS-4",
        "b--gpt2", "b--embedded_smollm2-135m", "c"]
    assert jobs[1].parameters == {"MODEL": "gpt2", "BITS": 4} and jobs[1].setting == {"MODEL": "gpt2", "BITS": 4}
    assert jobs[1].notebook == "a" and jobs[-1].setting == {} and jobs[-1] is c
    assert any("BITS applies only to a" in n for n in notes) and any("MODEL applies only to a, b" in n for n in notes)
    assert job_folder("t", {"MODEL": "org/model v2", "LANGS": ["en", "sw"]}) == "t--org_model_v2--LANGS-en-sw"


@pytest.mark.parametrize("axes, message", [
    ([("NOPE", [1, 2])], "no selected notebook defines it"),
    ([("BITS", [])], "non-empty list"),
    ([("BITS", [3, 3])], "repeated"),
    ([("BITS", [1]), ("BITS", [2])], "given twice"),
    ([("OUTPUT_DIR", ["x"])], "set by the runner"),
    ([("MODEL", ["a/b", "a_b"])], "both make the folder"),
])
def test_grid_errors_name_the_problem(axes, message):
    with pytest.raises(RunnerError, match=message):
        expand_grid([_plan("a", {"MODEL": "x", "BITS": 4})], axes)


def test_resources_share_gpus_and_cpus():
    # 16 CPUs, 1 GPU, 4 kernels per GPU: a quarter GPU and 4 threads each
    assert job_resources(True, 4, None, 16, 1, n_jobs=17) == {"num_cpus": 4.0, "num_gpus": 0.25}
    assert job_resources(True, 3, None, 16, 2, n_jobs=17)["num_gpus"] == 0.3333  # 3 x 0.3333 fit on one GPU
    # CPU jobs share the CPUs among them, at least 1 each, never more than a node has
    assert job_resources(False, 1, None, 2, 0, n_jobs=2) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert job_resources(False, 1, None, 2, 0, n_jobs=17)["num_cpus"] == 1.0
    assert job_resources(False, 1, None, 64, 0, n_jobs=2, node_cpus=16)["num_cpus"] == 16.0
    assert job_resources(True, 8, 3, 16, 1, n_jobs=4)["num_cpus"] == 3.0
    assert is_gpu_job({"DEVICE": "cuda:1"}, None, 0) and not is_gpu_job({"DEVICE": "cpu"}, None, 4)
    assert is_gpu_job({}, None, 2) and not is_gpu_job({}, None, 0) and not is_gpu_job({}, "cpu", 2)


def test_remote_job_moves_every_run_path_and_collects_the_folder(tmp_path):
    out = tmp_path / "run"
    job = {"input": "/repo/notebooks/nb.ipynb", "output": str(out / "nb" / "nb.ipynb"), "output_dir": str(out / "nb"),
           "run_json": str(out / "nb" / "run.json"), "result": str(out / ".jobs" / "nb.result.json"),
           "cwd": str(out / "nb"), "lock": str(out / ".locks" / "nb.lock"), "parent_pid": 1,
           "parameters": {"OUTPUT_DIR": str(out / "nb"), "N": 1}, "record": {}, "summary": {"out_dir": str(out)}}
    root = tmp_path / "node"
    rjob = remote_job(job, str(out), root, b"{notebook bytes}")
    assert rjob["output"] == str(root / "nb" / "nb.ipynb") and rjob["result"] == str(root / ".jobs" / "nb.result.json")
    assert rjob["parameters"] == {"OUTPUT_DIR": str(root / "nb"), "N": 1} and job["parameters"]["OUTPUT_DIR"] == str(out / "nb")
    assert rjob["lock"] is None and rjob["summary"] is None and rjob["parent_pid"] == os.getpid()
    assert Path(rjob["input"]).read_bytes() == b"{notebook bytes}"
    (root / "nb" / "results.json").write_text("{}")
    (root / "nb" / "figs").mkdir()
    (root / "nb" / "figs" / "a.svg").write_text("<svg/>")
    (root / ".jobs" / "nb.result.json").write_text('{"status": "completed"}')
    (root / "elsewhere.txt").write_text("not the notebook's")
    assert sorted(collect_files(root, "nb")) == [".jobs/nb.result.json", "nb/figs/a.svg", "nb/results.json"]
    with pytest.raises(RunnerError, match="outside the run folder"):
        remote_job({**job, "cwd": "/etc"}, str(out), tmp_path / "node2", b"")


def test_grid_table_sets_each_hypothesis_side_by_side():
    def row(stem, setting, value, verdict, status="completed"):
        h = {"id": "H1", "statement": "sw loses more", "value": value, "ci_low": value - 1, "ci_high": value + 1,
             "verdict": verdict}
        check = {"id": "S", "statement": "sanity", "kind": "sanity check", "verdict": "SUPPORTED"}
        return {"stem": stem, "record": {"status": status, "job": {"notebook": "nb", "setting": setting}},
                "hypotheses": [h, check] if status == "completed" else []}
    rows = [row("nb--gpt2", {"MODEL": "gpt2"}, 2.0, "SUPPORTED"),
            row("nb--opt", {"MODEL": "opt"}, 0.5, "INCONCLUSIVE"),
            row("nb--bloom", {"MODEL": "bloom"}, 0, "", status="failed"),
            {"stem": "other", "record": {"status": "completed"}, "hypotheses": []}]
    (table,) = grid_tables(rows)
    assert table["settings"] == ["gpt2", "opt", "bloom"] and [r["id"] for r in table["rows"]] == ["H1"]
    assert table["rows"][0]["agreement"] == "SUPPORTED in 1 of 3" and table["rows"][0]["cells"][2] is None
    text = "\n".join(grid_markdown(rows))
    assert "| H1 | sw loses more | 2 [1, 3] SUPPORTED | 0.5 [-0.5, 1.5] INCONCLUSIVE |  | SUPPORTED in 1 of 3 |" in text
    assert "bloom (failed)" in text and "sanity" not in text
    assert grid_markdown(rows[-1:]) == []


@pytest.mark.parametrize("args, message", [
    (["--per-gpu", "2"], "apply to --backend ray only"),
    (["--backend", "ray", "--address", "127.0.0.1:1", "--ray-cpus", "2"], "size a local Ray instance"),
    (["--model", "tiny:gpt2", "--models", "a", "b"], "exclude each other"),
    (["--grid", "N_TEXTS", "[1, 2]", "-p", "N_TEXTS", "3"], "both set it"),
    (["--grid", "N_TEXTS", "3"], "a YAML list"),
    (["--backend", "ray", "--per-gpu", "0"], "at least 1"),
])
def test_bad_backend_and_grid_options_exit_2_before_any_work(args, message, tmp_path, capsys):
    from qhelpers.runner.cli import main

    code = main(["--notebooks-dir", str(REPO / "tests" / "fixtures" / "notebooks"), "--only", "a_ok",
                 "--out", str(tmp_path / "run"), *args])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- real Ray


def _results(folder: Path) -> dict:
    """results.json without what differs between any two runs (creation time, git checkout)."""
    doc = json.loads((folder / "results.json").read_text())
    doc.pop("created", None)
    env = doc.get("environment") or {}
    env.pop("timestamp", None)
    env.pop("git", None)
    return doc


@pytest.mark.slow  # a runner process with real kernels; .ci/run runs it too
def test_ray_backend_runs_two_ci_notebooks_bit_identical_to_local(tmp_path):
    """The issue's CI command, on a local Ray instance with 2 CPUs, against the local backend
    with 2 workers (1 BLAS thread each on both), then --resume skipping both."""
    only = ["--profile", "ci", "--only", "t003_language_activation_variance", "t008_morphological_probing",
            "--device", "cpu"]
    local = subprocess.run(RUN_ALL + only + ["--workers", "2", "--out", str(tmp_path / "local")],
                           capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stdout + local.stderr
    remote = subprocess.run(RUN_ALL + only + ["--backend", "ray", "--ray-cpus", "2", "--out", str(tmp_path / "ray")],
                            capture_output=True, text=True, timeout=600)
    assert remote.returncode == 0, remote.stdout + remote.stderr
    assert "Ray: local Ray instance: 1 node(s), 2 CPUs" in remote.stdout
    for stem in ("t003_language_activation_variance", "t008_morphological_probing"):
        rec = json.loads((tmp_path / "ray" / stem / "run.json").read_text())
        assert rec["status"] == "completed" and rec["backend"] == "ray" and rec["placement"]["threads"] == 1
        a, b = _results(tmp_path / "local" / stem), _results(tmp_path / "ray" / stem)
        assert a["hypotheses"] and a == b
        assert sorted(p.name for p in (tmp_path / "ray" / stem).iterdir()) == \
            sorted(p.name for p in (tmp_path / "local" / stem).iterdir())
    again = subprocess.run(RUN_ALL + ["--resume", str(tmp_path / "ray")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("skipped (completed earlier") == 2, again.stdout
    assert "Ray:" not in again.stdout  # nothing to run: no Ray instance started


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head with 4 CPUs and 2 declared GPUs (none exists: Ray only hands out their ids)."""
    port = _free_port()
    temp = tmp_path_factory.mktemp("ray")
    start = subprocess.run(RAY_CLI + ["start", "--head", f"--port={port}", "--num-cpus=4", "--num-gpus=2",
                            "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                           capture_output=True, text=True, timeout=180, env=RAY_ENV)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run(RAY_CLI + ["stop", "--force"], capture_output=True, timeout=120, env=RAY_ENV)


def _ray_run(cluster: str, out: Path, *args: str) -> list[str]:
    """The run_all command line of a job on the module's cluster (run it with ``env=RAY_ENV``)."""
    return RUN_ALL + ["--backend", "ray", "--address", cluster, "--notebooks-dir", str(FIX), "--out", str(out), *args]


@pytest.mark.slow  # four kernels at once: ~1 min on 2 cores; the placement arithmetic is tested above
def test_gpu_jobs_share_the_declared_gpus_k_at_a_time_and_the_grid_table(cluster, tmp_path):
    # 4 jobs of half a GPU and 1 CPU each on 4 CPUs and 2 GPUs: the fixture's barrier holds each
    # until all 4 have started, so the run completes only if Ray placed them all at once
    res = subprocess.run(_ray_run(cluster, tmp_path / "run", "--only", "g_gpu", "--grid", "X", "[1, 2, 3, 4]",
                                  "--per-gpu", "2", "--cpus-per-job", "1", "-p", "BARRIER", "4",
                                  "-p", "BARRIER_DIR", str(tmp_path / "barrier")),
                         capture_output=True, text=True, timeout=300, env=RAY_ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "qhelpers shipped to the cluster" in res.stdout and "2 GPUs" in res.stdout
    per_gpu: dict[str, int] = {}
    for x in (1, 2, 3, 4):
        folder = tmp_path / "run" / f"g_gpu--X-{x}"
        rec = json.loads((folder / "run.json").read_text())
        doc = json.loads((folder / "results.json").read_text())
        assert rec["job"] == {"notebook": "g_gpu", "setting": {"X": x}} and doc["parameters"]["X"] == x
        gpu = rec["cuda_visible_devices"]
        assert gpu in ("0", "1") and doc["environment"]["CUDA_VISIBLE_DEVICES"] == gpu  # the kernel saw only it
        assert rec["placement"]["num_gpus"] == 0.5 and rec["placement"]["threads"] == 1
        per_gpu[gpu] = per_gpu.get(gpu, 0) + 1
    assert per_gpu == {"0": 2, "1": 2}  # two kernels on each GPU at once
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "## Across models and settings" in summary and "| X=1 | X=2 | X=3 | X=4 | holds |" in summary
    assert "SUPPORTED in 4 of 4" in summary
    assert 'id="grid"' in (tmp_path / "run" / "index.html").read_text()


@pytest.mark.slow  # a runner process with real kernels; .ci/run runs it too (kept the default run under 15 min)
def test_a_killed_ray_worker_is_retried_once_and_a_grid_over_two_models_is_tabled(cluster, tmp_path):
    """One run: a_ok over two models (the cross-model table) beside d_killme, whose Ray worker the
    test kills while a_ok's results are already completed."""
    psutil = pytest.importorskip("psutil")
    markers = tmp_path / "markers"
    out = tmp_path / "run"
    done_folders = ("a_ok--tiny_gpt2", "a_ok--tiny_llama")
    proc = subprocess.Popen(_ray_run(cluster, out, "--only", "a_ok", "d_killme", "--models", "tiny:gpt2", "tiny:llama",
                                     "-p", "MARKER_DIR", str(markers)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=RAY_ENV)
    try:
        wait_for(lambda: (markers / "attempt-1").is_file()
                 and all(json.loads((out / f / "run.json").read_text())["status"] == "completed" for f in done_folders),
                 180, "the first attempt of d_killme and a_ok's completion")
        done = {f: (out / f / "results.json").read_bytes() for f in done_folders}
        kernel = psutil.Process(int((markers / "attempt-1").read_text()))
        killed_root = next((p for p in (Path(kernel.cwd()), *Path(kernel.cwd()).parents)
                            if p.name.startswith("qhelpers-d_killme-")), None)
        assert killed_root is not None and (killed_root / ray_backend.TASK_OWNERS_FILE).is_file(), kernel.cwd()
        workers = [p for p in kernel.parents() if "execute_job" in " ".join(p.cmdline())]
        assert workers, [p.cmdline() for p in kernel.parents()]
        workers[0].kill()  # the Ray worker process running the job's task
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "its Ray worker died" in output and "submitted once more (attempt 2)" in output
    rec = json.loads((out / "d_killme" / "run.json").read_text())
    assert rec["status"] == "completed" and rec["placement"]["attempt"] == 2
    assert json.loads((out / "d_killme" / "results.json").read_text())["metrics"]["attempt"] == 2
    for folder, data in done.items():  # completed results untouched
        assert (out / folder / "results.json").read_bytes() == data
        assert json.loads((out / folder / "run.json").read_text())["status"] == "completed"
    # the grid: one folder per model, the cross-model table, d_killme (no MODEL) once
    assert "grid axis MODEL applies only to a_ok; d_killme run once" in output
    assert sorted(p.name for p in out.iterdir() if (p / "run.json").is_file()) == [*done_folders, "d_killme"]
    for model in ("gpt2", "llama"):
        doc = json.loads((out / f"a_ok--tiny_{model}" / "results.json").read_text())
        assert doc["parameters"]["MODEL"] == f"tiny:{model}"
    summary = (out / "summary.md").read_text()
    assert "### a_ok" in summary and "| id | statement | tiny:gpt2 | tiny:llama | holds |" in summary
    assert "SUPPORTED in 2 of 2" in summary and "### d_killme" not in summary
    # the killed task's temporary folder on the node: removed by the next task that starts or ends
    # there once the killed attempt's processes have gone (attempt 2's end may already have done it;
    # else the test sweeps, as the next task would)
    def swept() -> bool:
        ray_backend.sweep_dead_task_folders(killed_root.parent)
        return not killed_root.exists()

    wait_for(swept, 60, f"the killed attempt's temporary folder {killed_root} to be swept")


def test_sweep_removes_only_folders_whose_processes_all_ended(tmp_path):
    """Planted folders: a finished process's, a running one's, one finished and one running, one
    without the owners file, one with a broken file, and a folder that is not a task's."""
    pytest.importorskip("psutil")
    ended = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    ended_identity = list(process_identity(ended.pid))
    ended.wait()
    me = list(process_identity(os.getpid()))
    folders = {"qhelpers-a-dead": [ended_identity], "qhelpers-b-live": [me], "qhelpers-c-mixed": [ended_identity, me],
               "qhelpers-d-bare": None, "qhelpers-e-broken": "not json", "other-f-dead": [ended_identity]}
    for name, owners in folders.items():
        (tmp_path / name / "x").mkdir(parents=True)
        if owners is not None:
            text = owners if isinstance(owners, str) else json.dumps(owners)
            (tmp_path / name / ray_backend.TASK_OWNERS_FILE).write_text(text)
    assert ray_backend.sweep_dead_task_folders(tmp_path) == [tmp_path / "qhelpers-a-dead"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(folders) - {"qhelpers-a-dead"})
    reused = [os.getpid(), me[1] - 100.0]  # this pid, but another process's start time: a reused pid
    (tmp_path / "qhelpers-b-live" / ray_backend.TASK_OWNERS_FILE).write_text(json.dumps([reused]))
    assert ray_backend.sweep_dead_task_folders(tmp_path) == [tmp_path / "qhelpers-b-live"]


@pytest.mark.slow  # a runner process with real kernels; .ci/run runs it too (kept the default run under 15 min)
def test_ctrl_c_stops_the_ray_tasks_and_keeps_what_they_wrote(cluster, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_ray_run(cluster, out, "--only", "c_sleep", "-p", "SLEEP", "300"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=RAY_ENV)
    try:
        wait_for(lambda: "c_sleep: running on" in (out / "runner.log").read_text(), 120, "c_sleep running")
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    rec = json.loads((out / "c_sleep" / "run.json").read_text())
    assert rec["status"] == "interrupted" and "SIGINT" in rec["error"]["evalue"], rec["error"]
    # the worker on the node recorded the stop itself, and its log came back to the run folder
    assert "[runner] interrupted: Interrupted: run stopped by SIGINT" in (out / "c_sleep" / "log.txt").read_text()
    assert rec["duration_s"] < 100  # stopped, not slept through

"""Tests of the notebook runner (qhelpers/runner/, run_all.py) on tiny fixture notebooks.

tests/fixtures/notebooks/: a_ok (writes results.json with one hypothesis and a figure, plain
json), b_fail (raises ValueError), c_sleep (sleeps SLEEP seconds, writes two hypotheses).
Nothing here needs the qhelpers science modules, a model or a GPU; every run uses the
``python3`` Jupyter kernel.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runner_support import needs_kernel, run_status, wait_for

from qhelpers.runner.cli import main
from qhelpers.runner.environment import (
    cpu_threads_per_worker,
    PINNED_NUMERICS,
    kernel_env,
    pinned_numerics_env,
    visible_gpus,
)
from qhelpers.runner.errors import RunnerError
from qhelpers.runner.locks import FileLock
from qhelpers.runner.notebooks import notebook_expected_seconds, notebook_purpose
from qhelpers.runner.params import (
    notebook_parameters,
    parameters_hash,
    parse_parameters_source,
    parse_value,
)
from qhelpers.runner.plan import Plan, costliest_first, plan_parameters
from qhelpers.runner.profiles import load_profiles, profile_parameters
from qhelpers.runner.summary import fmt_duration, verdict_counts, write_summary

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures" / "notebooks"
PROFILES = FIX / "profiles.yaml"
RUN_ALL = REPO / "run_all.py"
BASE = ["--notebooks-dir", str(FIX), "--profiles", str(PROFILES)]
HTML_STATEMENT = "<script>alert('x')</script> & a|b"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")




def _cmd(*args: str) -> list[str]:
    return [sys.executable, str(RUN_ALL), *BASE, *args]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(extra)
    return env


def _run_json(out: Path, stem: str) -> dict:
    return json.loads((out / stem / "run.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- parameters cell


PARAMS_SRC = '''
%matplotlib inline
import os
MODEL = "gpt2"  # the embedded default
N: int = 4
A, B = 1, [2, 3]
DEVICE = "cuda" if os.environ.get("QH_GPU") else "cpu"
if True:
    LANGS = ["en", "sw"]
def helper():
    HIDDEN = 1
X = 1
X += 1
cfg = {}
cfg["k"] = 3
OUTPUT_DIR = None
'''


def test_parse_parameters_names_and_defaults():
    params = parse_parameters_source(PARAMS_SRC)
    assert list(params) == ["MODEL", "N", "A", "B", "DEVICE", "LANGS", "X", "cfg", "OUTPUT_DIR"]
    assert params["MODEL"].default == "gpt2" and params["MODEL"].literal
    assert params["N"].default == 4 and params["N"].annotation == "int"
    assert params["A"].default == 1 and params["B"].default == [2, 3]
    assert params["LANGS"].default == ["en", "sw"]
    assert not params["DEVICE"].literal and "if" in params["DEVICE"].source
    assert not params["X"].literal  # augmented after assignment: no single literal default
    assert params["OUTPUT_DIR"].default is None and params["OUTPUT_DIR"].literal
    assert "HIDDEN" not in params and "os" not in params


def test_parse_parameters_syntax_error_names_the_cell():
    with pytest.raises(RunnerError, match="cannot parse the parameters cell"):
        parse_parameters_source("MODEL = (")


def test_notebook_parameters_and_purpose_of_fixtures():
    a = notebook_parameters(FIX / "a_ok.ipynb")
    assert {"MODEL", "LANGS", "N_TEXTS", "N_BOOT", "SEED", "DEVICE", "STATEMENT", "OUTPUT_DIR"} <= set(a)
    assert a["LANGS"].default == ["en", "sw"]
    assert notebook_parameters(FIX / "c_sleep.ipynb")["SLEEP"].default == 3.0
    # metadata qhelpers.purpose wins; else the first markdown heading
    assert notebook_purpose(FIX / "a_ok.ipynb").startswith("Fixture: succeeds")
    assert notebook_purpose(FIX / "b_fail.ipynb") == "Fixture that raises"
    assert notebook_purpose(FIX / "c_sleep.ipynb") == "Fixture that sleeps"


def test_list_prints_each_notebook_with_its_purpose(capsys):
    assert main([*BASE, "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ["a_ok", "b_fail", "c_sleep"]
    assert "Fixture that raises" in lines[1]


# --------------------------------------------------------------------------- start order


def _with_expected(src: Path, dst: Path, expected: object) -> Path:
    """A copy of the fixture notebook ``src`` at ``dst`` whose metadata says ``qhelpers.expected_s``."""
    import nbformat

    nb = nbformat.read(str(src), as_version=4)
    nb.metadata.setdefault("qhelpers", {})["expected_s"] = expected
    nbformat.write(nb, str(dst))
    return dst


def test_expected_seconds_come_from_the_profile_entry_else_quick(tmp_path):
    nb = _with_expected(FIX / "c_sleep.ipynb", tmp_path / "c.ipynb", {"quick": 12, "full": 600.5})
    assert notebook_expected_seconds(nb, "full") == 600.5
    assert notebook_expected_seconds(nb, "quick") == 12.0
    assert notebook_expected_seconds(nb, "ci") == 12.0  # a profile it does not list: quick stands in
    only_full = _with_expected(FIX / "c_sleep.ipynb", tmp_path / "f.ipynb", {"full": 3})
    assert notebook_expected_seconds(only_full, "ci") is None
    assert notebook_expected_seconds(FIX / "a_ok.ipynb", "quick") is None  # no hint


@pytest.mark.parametrize("bad", [[1, 2], {"quick": "slow"}, {"quick": -1}, {"quick": True}, 5])
def test_a_malformed_expected_time_exits_2_before_anything_is_written(bad, tmp_path, capsys):
    nb_dir = tmp_path / "nbs"
    nb_dir.mkdir()
    _with_expected(FIX / "c_sleep.ipynb", nb_dir / "c_sleep.ipynb", bad)
    out = tmp_path / "run"
    assert main(["--notebooks-dir", str(nb_dir), "--profiles", str(PROFILES), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "c_sleep.ipynb: metadata qhelpers.expected_s must map profile names to seconds" in err
    assert not out.exists()


def _timed_plan(stem: str, expected: float | None) -> Plan:
    return Plan(stem, Path(f"{stem}.ipynb"), {}, {}, expected_s=expected)


def test_costliest_first_is_longest_first_with_the_mean_for_the_unknown_and_ties_in_name_order():
    plans = [_timed_plan("a", 10), _timed_plan("b", None), _timed_plan("c", 50), _timed_plan("d", 10), _timed_plan("e", 30)]
    # known mean (10 + 50 + 10 + 30) / 4 = 25 stands in for b
    assert [p.stem for p in costliest_first(plans)] == ["c", "e", "b", "a", "d"]
    unknown = [_timed_plan("x", None), _timed_plan("y", None)]
    assert [p.stem for p in costliest_first(unknown)] == ["x", "y"]


def test_shipped_notebooks_state_their_time_and_t001_computes_the_shared_sweep_before_its_readers():
    """Every notebook carries ``expected_s`` for the quick and full profiles, and under the quick profile
    t001 starts before the other notebooks that read the criticality sweep it computes and caches, so
    none of them holds a worker while waiting for it (measured on 2 cores in name order: t002 waited about
    350 s of a 1614 s suite; benchmarks/README.md)."""
    notebooks = sorted((REPO / "notebooks").glob("*.ipynb"))
    assert len(notebooks) >= 17
    plans = []
    for nb in notebooks:
        for profile in ("quick", "full"):
            assert notebook_expected_seconds(nb, profile) is not None, (nb.name, profile)
        plans.append(_timed_plan(nb.stem, notebook_expected_seconds(nb, "quick")))
    order = [p.stem for p in costliest_first(plans)]
    readers = [s for s in order if "layer_criticality" in (REPO / "notebooks" / "src" / f"{s}.py").read_text()]
    assert readers[0] == "t001_information_content" and len(readers) >= 4, readers
    assert order[0] == "t001_information_content"


@needs_kernel
def test_several_workers_start_the_longest_expected_notebook_first(tmp_path):
    nb_dir = tmp_path / "nbs"
    nb_dir.mkdir()
    _with_expected(FIX / "a_ok.ipynb", nb_dir / "a_ok.ipynb", {"quick": 1})
    _with_expected(FIX / "c_sleep.ipynb", nb_dir / "c_sleep.ipynb", {"quick": 30})
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(RUN_ALL), "--notebooks-dir", str(nb_dir), "--profiles", str(PROFILES), "--out", str(out),
         "--workers", "2", "-p", "SLEEP", "0.2"],
        env=_env(), capture_output=True, text=True, timeout=120)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "start order, longest expected first (notebook metadata qhelpers.expected_s): c_sleep, a_ok" in log
    # c_sleep keeps its place in the name order ([2/2]) but starts first
    assert log.index("[2/2] c_sleep ... started") < log.index("[1/2] a_ok ... started"), log


# --------------------------------------------------------------------------- values & profiles


@pytest.mark.parametrize("text, value", [
    ("4", 4), ("0.5", 0.5), ("1e-3", 0.001), ("-2E5", -200000.0), ("[en, sw]", ["en", "sw"]),
    ("null", None), ("true", True), ("tiny:gpt2", "tiny:gpt2"), ("'4'", "4"),
    ("{a: 1, b: [x]}", {"a": 1, "b": ["x"]}), ("2024-01-02", "2024-01-02"),
    ("__import__('os').system('false')", "__import__('os').system('false')"),
])
def test_parse_value_is_yaml_never_eval(text, value):
    assert parse_value(text) == value


def test_parse_value_bad_yaml():
    with pytest.raises(RunnerError, match="cannot parse value"):
        parse_value("[unclosed")


def _plan(profile="ci", overrides=(), stems=("a_ok", "b_fail", "c_sleep")):
    nbs = [FIX / f"{s}.ipynb" for s in stems]
    defined = {p.stem: notebook_parameters(p) for p in nbs}
    profiles = load_profiles(PROFILES)
    plans, notes = plan_parameters(nbs, defined, profiles, profile, overrides, PROFILES)
    return {p.stem: p.parameters for p in plans}, notes


def test_profile_all_applies_only_where_defined_and_notebook_entries_win():
    params, notes = _plan("ci")
    # _all: N_TEXTS 1, N_BOOT 10; a_ok: MODEL tiny:fixture; entry for an absent notebook ignored
    assert params["a_ok"] == {"N_TEXTS": 1, "N_BOOT": 10, "MODEL": "tiny:fixture"}
    assert params["b_fail"] == {}  # defines neither N_TEXTS nor N_BOOT
    assert params["c_sleep"] == {"N_TEXTS": 1}
    assert notes == []
    assert _plan("full")[0]["a_ok"] == {"N_TEXTS": None}
    assert _plan("quick")[0] == {"a_ok": {}, "b_fail": {}, "c_sleep": {}}


def test_profile_errors(tmp_path):
    with pytest.raises(RunnerError, match=r"sets NOT_A_PARAM for b_fail.*defines: MESSAGE, MODEL, OUTPUT_DIR"):
        _plan("bad")
    with pytest.raises(RunnerError, match="unknown profile 'nope'.*available profiles: bad, ci, full, quick"):
        _plan("nope")
    p = tmp_path / "p.yaml"
    p.write_text("ci:\n  _all: {OUTPUT_DIR: x}\n")
    with pytest.raises(RunnerError, match="runner always sets"):
        load_profiles(p)
    p.write_text("ci: [1, 2]\n")
    with pytest.raises(RunnerError, match="must be a mapping"):
        load_profiles(p)
    p.write_text("quick:\nci:\n  a_ok:\n")
    assert load_profiles(p) == {"quick": {}, "ci": {"a_ok": {}}}
    assert load_profiles(tmp_path / "missing.yaml") == {}
    # quick needs no file: the notebooks' own defaults
    assert profile_parameters({}, "quick", "a_ok", {"MODEL"}) == {}


def test_repo_profiles_file_has_the_three_profiles():
    profiles = load_profiles(REPO / "notebooks" / "profiles.yaml")
    assert set(profiles) >= {"ci", "quick", "full"}
    assert profiles["quick"] == {}
    assert profiles["ci"]["_all"]["N_TEXTS"] == 4 and profiles["ci"]["_all"]["N_BOOT"] == 200
    assert profiles["ci"]["exp003_kurtosis"]["MODEL"] == "tiny:bloom"
    assert profiles["full"]["_all"] == {"N_TEXTS": None, "N_BOOT": 2000}
    defined = {"MODEL", "N_TEXTS", "N_BOOT"}
    assert profile_parameters(profiles, "ci", "exp003_kurtosis", defined)["MODEL"] == "tiny:bloom"
    assert profile_parameters(profiles, "ci", "exp005_layer_ablation", defined)["MODEL"] == "tiny:gpt2"


def test_cli_overrides_precedence_and_partial_names():
    params, notes = _plan("ci", [("MODEL", "m1"), ("MODEL", "m2"), ("SLEEP", 0.5), ("N_BOOT", 7)])
    assert params["a_ok"]["MODEL"] == "m2" and params["b_fail"]["MODEL"] == "m2"
    assert "MODEL" not in params["c_sleep"]
    assert params["c_sleep"] == {"N_TEXTS": 1, "SLEEP": 0.5}
    assert params["a_ok"]["N_BOOT"] == 7
    joined = "\n".join(notes)
    assert "SLEEP is applied only to c_sleep; not defined in a_ok, b_fail" in joined
    assert "N_BOOT is applied only to a_ok" in joined


def test_unknown_parameter_exits_2_listing_parameters(capsys, tmp_path):
    rc = main([*BASE, "--out", str(tmp_path / "o"), "-p", "NOT_DEFINED", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown parameter 'NOT_DEFINED'" in err
    assert "a_ok: MODEL, LANGS, N_TEXTS" in err and "c_sleep: SLEEP, N_TEXTS, OUTPUT_DIR" in err
    assert not (tmp_path / "o").exists()
    # a name only one selected notebook lacks is an error when that notebook is all that runs
    assert main([*BASE, "--only", "b_fail", "-p", "SLEEP", "1"]) == 2
    assert "b_fail: MODEL, MESSAGE, OUTPUT_DIR" in capsys.readouterr().err
    assert main([*BASE, "--device", "cuda", "--only", "c_sleep"]) == 2  # DEVICE not defined there
    capsys.readouterr()
    assert main([*BASE, "-p", "OUTPUT_DIR", "x"]) == 2
    assert "set by the runner" in capsys.readouterr().err


def test_unknown_only_exits_2_listing_notebooks(capsys):
    assert main([*BASE, "--only", "a_ok", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown notebook(s) nope" in err
    assert all(f"  {s}" in err for s in ("a_ok", "b_fail", "c_sleep"))


def test_missing_kernel_message(capsys, tmp_path):
    rc = main([*BASE, "--kernel", "no_such_kernel_qh", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "kernel 'no_such_kernel_qh' not found" in err
    assert "python -m ipykernel install --user --name no_such_kernel_qh" in err
    assert not (tmp_path / "o").exists()


def test_bad_profile_entry_exits_2(capsys):
    assert main([*BASE, "--profile", "bad"]) == 2
    assert "NOT_A_PARAM" in capsys.readouterr().err


def test_parameters_hash_ignores_key_order():
    h1 = parameters_hash({"A": 1, "B": [1, 2], "C": None})
    assert h1 == parameters_hash({"C": None, "B": [1, 2], "A": 1})
    assert h1 != parameters_hash({"A": 1, "B": [2, 1], "C": None})


def test_visible_gpus():
    assert visible_gpus({}, torch_count=2) == ["0", "1"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, torch_count=2) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3,5"}, torch_count=None) == ["2", "3", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, torch_count=None) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,2"}, torch_count=None) == ["1"]
    assert visible_gpus({}, torch_count=None) == []
    assert visible_gpus({}, torch_count=0) == []


def test_second_runner_in_the_same_folder_is_refused(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    lock = FileLock(out / ".runner.lock")
    assert lock.acquire()
    try:
        assert main([*BASE, "--only", "a_ok", "--out", str(out)]) == 2
        assert "another run_all.py is running" in capsys.readouterr().err
    finally:
        lock.release()


# --------------------------------------------------------------------------- summary rendering


def _fake_run(out: Path) -> None:
    ok = out / "nb_one"
    ok.mkdir(parents=True)
    (ok / "run.json").write_text(json.dumps({"notebook": "nb_one", "status": "completed", "duration_s": 41.2,
                                             "parameters": {"MODEL": "m<1>"}}))
    (ok / "nb_one.ipynb").write_text("{}")
    (ok / "fig a.png").write_bytes(b"")
    hyps = [
        {"id": "H<1>", "statement": HTML_STATEMENT, "criterion": "x > \"0\"", "value": 0.5, "ci_low": 0.1,
         "ci_high": 0.9, "verdict": "SUPPORTED", "n": 10, "notes": ""},
        {"id": "H2", "statement": "multi\nline", "criterion": "", "value": None, "ci_low": None, "ci_high": None,
         "verdict": "INCONCLUSIVE", "n": 0, "notes": ""},
    ]
    (ok / "results.json").write_text(json.dumps({"experiment_id": "nb_one", "model": {"spec": "tiny:<gpt2>"},
                                                 "hypotheses": hyps, "figures": ["fig a.png"]}))
    bad = out / "nb_two"
    bad.mkdir()
    (bad / "run.json").write_text(json.dumps({"notebook": "nb_two", "status": "failed", "duration_s": 1.0,
                                              "error": {"ename": "ValueError", "evalue": "bad <b>thing</b>",
                                                        "exec_count": 3}}))


def test_summary_escapes_html_and_lists_every_hypothesis(tmp_path):
    out = tmp_path / "run"
    _fake_run(out)
    rows = write_summary(out, {"profile": "ci", "kernel": "python3", "state": "finished"}, ["nb_one", "nb_three"])
    assert [r["stem"] for r in rows] == ["nb_one", "nb_three", "nb_two"]
    page = (out / "index.html").read_text(encoding="utf-8")
    md = (out / "summary.md").read_text(encoding="utf-8")
    # self-contained and escaped
    external = page.replace('src="data:image/png;base64,', "")  # figures are embedded, nothing is fetched
    assert "<script" not in page and "<link" not in page and "src=" not in external and "http" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; a|b" in page
    assert "H&lt;1&gt;" in page and "tiny:&lt;gpt2&gt;" in page
    assert "bad &lt;b&gt;thing&lt;/b&gt;" in page and "ValueError" in page
    assert 'href="nb_one/fig%20a.png"' in page and 'href="nb_one/nb_one.ipynb"' in page
    assert "0.5 [0.1, 0.9]" in page and "n/a" in page
    assert "pending" in page  # nb_three: selected, not started
    # markdown: one table row per hypothesis, pipes and tags neutralised
    assert "&lt;script>alert('x')&lt;/script> & a\\|b" in md
    assert "| nb_one | H2 | multi line |" in md
    assert "| nb_two | failed | 1.0 s |" in md and "ValueError: bad &lt;b>thing&lt;/b> (In [3])" in md
    assert "41 s" in md and "2 hypotheses: 1 SUPPORTED, 1 INCONCLUSIVE" in md


def test_progress_helpers():
    assert fmt_duration(3.21) == "3.2 s" and fmt_duration(41.4) == "41 s"
    assert fmt_duration(125) == "2 min 05 s"
    assert verdict_counts([{"verdict": "INCONCLUSIVE"}, {"verdict": "SUPPORTED"}]) == \
        "2 hypotheses: 1 SUPPORTED, 1 INCONCLUSIVE"
    assert verdict_counts([]) == "no hypotheses"


# --------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """Two runs at once into different folders:
    A: the whole fixture suite, profile ci, goldens written, SLEEP only for c_sleep;
    B: a_ok + c_sleep with 2 workers and a fake torch that reports 2 GPUs."""
    base = tmp_path_factory.mktemp("suite")
    fake = base / "fake_torch"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(
        "class cuda:\n    @staticmethod\n    def device_count():\n        return 2\n")
    out_a, out_b, goldens = base / "A", base / "B", base / "goldens"
    pa = subprocess.Popen(
        _cmd("--profile", "ci", "--out", str(out_a), "--write-goldens", str(goldens),
             "-p", "SLEEP", "0.2", "-p", "STATEMENT", json.dumps(HTML_STATEMENT)),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pb = subprocess.Popen(
        _cmd("--only", "a_ok", "c_sleep", "--out", str(out_b), "--workers", "2",
             "-p", "SLEEP", "1", "-p", "STATEMENT", "run B"),
        env=_env(PYTHONPATH=str(fake)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out_text_a, _ = pa.communicate(timeout=120)
    out_text_b, _ = pb.communicate(timeout=120)
    return {"A": out_a, "B": out_b, "goldens": goldens, "rc_a": pa.returncode, "rc_b": pb.returncode,
            "log_a": out_text_a, "log_b": out_text_b}


@needs_kernel
def test_failure_is_isolated(suite):
    out, log = suite["A"], suite["log_a"]
    assert suite["rc_a"] == 1, log
    assert run_status(out, "a_ok") == "completed" and run_status(out, "c_sleep") == "completed"
    rec = _run_json(out, "b_fail")
    assert rec["status"] == "failed"
    assert rec["error"]["ename"] == "ValueError" and rec["error"]["evalue"] == "boom <fail> & co"
    assert (out / "b_fail" / "b_fail.ipynb").is_file()  # partial executed notebook kept
    assert "boom" in (out / "b_fail" / "log.txt").read_text()
    assert "[2/3] b_fail ... FAILED" in log and "ValueError: boom <fail> & co" in log
    assert "[3/3] c_sleep ... done in" in log and "(2 hypotheses: 1 NOT_SUPPORTED, 1 INCONCLUSIVE)" in log
    assert "[1/3] a_ok ... done in" in log and "(1 hypothesis: 1 SUPPORTED)" in log
    assert "SLEEP is applied only to c_sleep" in log


@needs_kernel
def test_run_folder_layout_parameters_and_kernel_env(suite):
    out = suite["A"]
    nb_dir = out / "a_ok"
    for name in ("a_ok.ipynb", "results.json", "fig1.svg", "log.txt", "run.json"):
        assert (nb_dir / name).is_file(), name
    rec = _run_json(out, "a_ok")
    assert rec["status"] == "completed" and rec["profile"] == "ci" and rec["kernel"] == "python3"
    assert rec["parameters"] == {"N_TEXTS": 1, "N_BOOT": 10, "MODEL": "tiny:fixture",
                                 "STATEMENT": HTML_STATEMENT, "OUTPUT_DIR": "nbval_out/a_ok"}
    assert len(rec["parameters_hash"]) == 64 and rec["duration_s"] > 0 and rec["start"] and rec["end"]
    res = json.loads((nb_dir / "results.json").read_text())
    assert res["parameters"]["MODEL"] == "tiny:fixture" and res["parameters"]["N_TEXTS"] == 1
    assert res["environment"]["QHELPERS_PROFILE"] == "ci"
    assert res["environment"]["MPLBACKEND"] == "module://matplotlib_inline.backend_inline" and res["environment"]["PYTHONHASHSEED"] == "0"
    assert (out / "summary.md").is_file() and (out / "index.html").is_file()


@needs_kernel
def test_summary_of_a_real_run_lists_hypotheses_and_errors(suite):
    out = suite["A"]
    md = (out / "summary.md").read_text()
    page = (out / "index.html").read_text()
    for hid in ("H1", "S1", "S2"):
        assert f"| {hid} |" in md and f"<td>{hid}</td>" in page
    assert "&lt;script&gt;" in page and "<script" not in page
    assert "ValueError: boom &lt;fail&gt; &amp; co" in page
    assert "ValueError: boom &lt;fail> & co" in md
    assert 'href="a_ok/a_ok.ipynb"' in page and 'href="a_ok/fig1.svg"' in page
    assert "state finished" in page


@needs_kernel
def test_goldens_use_relative_output_dir_and_rerun_under_nbval(suite):
    g = suite["goldens"]
    assert sorted(p.name for p in g.glob("*.ipynb")) == ["a_ok.ipynb", "c_sleep.ipynb"]  # failed: none
    nb = json.loads((g / "a_ok.ipynb").read_text())
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected and 'OUTPUT_DIR = "nbval_out/a_ok"' in "".join(injected[0]["source"])
    # goldens are computed with pinned instruction sets; a plain run is not
    assert json.loads((suite["A"] / ".jobs" / "a_ok.json").read_text())["pin_numerics"] is True
    assert json.loads((suite["B"] / ".jobs" / "a_ok.json").read_text())["pin_numerics"] is False
    # ... and with a sweep cache of their own run, never one an earlier run left behind
    assert json.loads((suite["A"] / ".jobs" / "a_ok.json").read_text())["sweep_cache"] == str(suite["A"] / ".golden_sweeps")
    assert json.loads((suite["B"] / ".jobs" / "a_ok.json").read_text())["sweep_cache"] is None
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "-q", "-p", "no:cacheprovider", "--rootdir", str(g),
         str(g / "a_ok.ipynb")],
        cwd=g, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (g / "nbval_out" / "a_ok" / "results.json").is_file()


@needs_kernel
def test_concurrent_runs_and_one_gpu_per_worker(suite):
    out = suite["B"]
    assert suite["rc_b"] == 0, suite["log_b"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["a_ok", "c_sleep", "index.html", "run_config.json", "runner.log", "summary.md"]
    a = json.loads((out / "a_ok" / "results.json").read_text())
    assert a["hypotheses"][0]["statement"] == "run B"
    a_other = json.loads((suite["A"] / "a_ok" / "results.json").read_text())
    assert a_other["hypotheses"][0]["statement"] == HTML_STATEMENT
    gpus = {a["environment"]["CUDA_VISIBLE_DEVICES"],
            json.loads((out / "c_sleep" / "results.json").read_text())["environment"]["CUDA_VISIBLE_DEVICES"]}
    assert gpus == {"0", "1"}, suite["log_b"]
    assert _run_json(out, "a_ok")["parameters"]["OUTPUT_DIR"] == str(out.resolve() / "a_ok")


@pytest.mark.slow  # a runner process with real kernels; .ci/run runs it too
@needs_kernel
def test_resume_after_sigkill_keeps_completed_results(tmp_path):
    out = tmp_path / "killed"
    args = ("--only", "a_ok", "c_sleep", "--out", str(out), "-p", "SLEEP", "30")
    proc = subprocess.Popen(_cmd(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: run_status(out, "a_ok") == "completed", 60, "a_ok to complete")
        wait_for(lambda: run_status(out, "c_sleep") == "running", 30, "c_sleep to start")
        time.sleep(1.0)  # c_sleep's kernel is now sleeping in its cell
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    results = out / "a_ok" / "results.json"
    mtime, run_json = results.stat().st_mtime_ns, (out / "a_ok" / "run.json").read_text()
    assert "a_ok" in (out / "summary.md").read_text()  # the summary written after a_ok survived
    # the orphaned worker notices the runner's death and records its notebook as interrupted
    wait_for(lambda: run_status(out, "c_sleep") == "interrupted", 30, "c_sleep marked interrupted")

    resumed = subprocess.run(_cmd("--only", "a_ok", "c_sleep", "--resume", str(out), "-p", "SLEEP", "0.2"),
                             env=_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "a_ok ... skipped" in resumed.stdout
    assert "c_sleep ... will re-run (previous status interrupted)" in resumed.stdout
    assert results.stat().st_mtime_ns == mtime
    assert (out / "a_ok" / "run.json").read_text() == run_json
    assert run_status(out, "c_sleep") == "completed"
    assert json.loads((out / "c_sleep" / "results.json").read_text())["parameters"]["SLEEP"] == 0.2
    summary = (out / "summary.md").read_text()
    assert "| S1 |" in summary and "| H1 |" in summary and "2 completed" in summary

    # a changed parameter re-runs exactly the notebooks it reaches; --cell-timeout fails a cell
    again = subprocess.run(_cmd("--only", "a_ok", "c_sleep", "--resume", str(out), "-p", "SLEEP", "30",
                                "--cell-timeout", "1"),
                           env=_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 1, again.stdout + again.stderr
    assert "a_ok ... skipped" in again.stdout and "c_sleep ... will re-run (parameters changed)" in again.stdout
    assert "c_sleep ... FAILED" in again.stdout
    rec = _run_json(out, "c_sleep")
    assert rec["status"] == "failed" and "Timeout" in rec["error"]["ename"] + rec["error"]["evalue"]
    assert rec["duration_s"] < 20
    assert results.stat().st_mtime_ns == mtime


@pytest.mark.slow  # a runner process with real kernels; .ci/run runs it too (kept the default run under 15 min)
@needs_kernel
def test_sigint_marks_interrupted_and_exits_130(tmp_path):
    out = tmp_path / "int"
    proc = subprocess.Popen(_cmd("--only", "c_sleep", "--out", str(out), "-p", "SLEEP", "60"),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: "sleeping" in (out / "c_sleep" / "log.txt").read_text(), 60, "the cell to start sleeping")
        proc.send_signal(signal.SIGINT)
        text, _ = proc.communicate(timeout=45)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, text
    rec = _run_json(out, "c_sleep")
    assert rec["status"] == "interrupted" and "SIGINT" in rec["error"]["evalue"]
    assert rec["duration_s"] < 45
    assert (out / "c_sleep" / "c_sleep.ipynb").is_file()
    assert "| c_sleep | interrupted |" in (out / "summary.md").read_text()
    assert "interrupted by SIGINT" in (out / "index.html").read_text()


def test_cpu_workers_share_the_cores_and_the_users_setting_wins(monkeypatch):
    assert cpu_threads_per_worker(1, cpu_count=16) is None
    assert cpu_threads_per_worker(2, cpu_count=2) == 1
    assert cpu_threads_per_worker(3, cpu_count=16) == 5
    assert cpu_threads_per_worker(4, cpu_count=2) == 1
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "7")
    env = kernel_env("quick", None, threads=1)
    assert env["OMP_NUM_THREADS"] == "1" and env["OPENBLAS_NUM_THREADS"] == "1"
    assert env["MKL_NUM_THREADS"] == "7"
    assert "OMP_NUM_THREADS" not in kernel_env("quick", None, threads=None)


AVX2_CPU = "processor\t: 0\nflags\t\t: fpu sse2 avx fma avx2 avx512f\n"
ARM_CPU = "processor\t: 0\nFeatures\t: fp asimd evtstrm\n"


def test_pinned_numerics_only_where_the_cpu_has_avx2():
    assert pinned_numerics_env(AVX2_CPU) == PINNED_NUMERICS
    assert pinned_numerics_env(ARM_CPU) == {}
    assert pinned_numerics_env("flags\t: sse2 avx\n") == {}  # no AVX2: ATen would refuse the pin


@pytest.mark.skipif(not pinned_numerics_env(), reason="this CPU has no AVX2")
def test_pinned_numerics_reach_torch_in_the_kernel(monkeypatch):
    """The variables kernel_env pins are the ones torch, MKL and numpy read: ATen reports AVX2
    kernels, a float32 GEMM gives other bits than the unpinned one (MKL's COMPATIBLE branch, not
    the CPU's own), the same bits for a misaligned copy of its input, and numpy dispatches no
    AVX-512 loop."""
    for name in PINNED_NUMERICS:
        monkeypatch.delenv(name, raising=False)
    pinned = kernel_env("ci", None, pin_numerics=True)
    assert all(pinned[k] == v for k, v in PINNED_NUMERICS.items())
    assert not set(PINNED_NUMERICS) & set(kernel_env("ci", None))
    probe = ("from numpy._core._multiarray_umath import __cpu_features__ as f; "
             "from qhelpers.report.results import environment_info, gemm_signature; d = environment_info()['device']; "
             "print(d['cpu_capability'], d['gemm_sha1'], gemm_signature(offset=1), bool(f.get('X86_V4')))")
    plain = {k: v for k, v in os.environ.items() if k not in PINNED_NUMERICS}

    def run(env):
        return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                              check=True).stdout.split()

    cap, gemm, misaligned, avx512_numpy = run(pinned)
    assert (cap, avx512_numpy) == ("AVX2", "False")
    assert gemm == misaligned
    assert gemm != run(plain)[1], "MKL_CBWR=COMPATIBLE did not reach MKL: its GEMM gave the CPU's own bits"


# --------------------------------------------------------------------------- the run manifest


def test_resume_merges_the_recorded_command_and_lists_each_change():
    from qhelpers.runner.manifest import RunCommand, merge_on_resume

    recorded = RunCommand(profile="ci", only=["a_ok", "c_sleep"], params=[["N_BOOT", "150"], ["SLEEP", "1"]])
    same, changes = merge_on_resume(recorded, RunCommand())
    assert same == recorded and changes == []
    merged, changes = merge_on_resume(recorded, RunCommand(only=["a_ok"], params=[["SLEEP", "2"], ["SEED", "3"]],
                                                           workers=2))
    assert merged.only == ["a_ok"] and merged.profile == "ci" and merged.workers == 2
    assert merged.params == [["N_BOOT", "150"], ["SLEEP", "2"], ["SEED", "3"]]
    assert changes == ["--only: a_ok c_sleep -> a_ok", "--workers: (not set) -> 2", "-p SLEEP: 1 -> 2",
                       "-p SEED: (not set) -> 3"]
    assert recorded.params == [["N_BOOT", "150"], ["SLEEP", "1"]]  # the recorded command is not changed


def test_a_manifest_of_an_older_runner_is_read_from_its_argv():
    from qhelpers.runner.cli import parse_recorded_argv
    from qhelpers.runner.manifest import recorded_command

    old = {"profile": "ci", "argv": ["--only", "a_ok", "-p", "N_BOOT", "7", "--out", "somewhere"]}
    cmd = recorded_command(old, parse_recorded_argv)
    assert cmd.profile == "ci" and cmd.only == ["a_ok"] and cmd.params == [["N_BOOT", "7"]]
    with pytest.raises(RunnerError, match="records no command"):
        recorded_command({"profile": "ci"}, parse_recorded_argv)

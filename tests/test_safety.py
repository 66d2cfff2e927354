"""Safety: no remote code, no arbitrary unpickling, no shell, parameters never run as code.

Two kinds of test: real attacks on the loader (a model folder that ships its own modelling
code, a ``.bin`` whose pickle runs a command), each of which would leave a marker file if it
succeeded; and a scan of every Python source we ship (the package, run_all.py, scripts/, the
notebooks' sources in notebooks/src/ and benchmarks/) for calls that could reopen those doors,
including a command line handed to a shell (``shell=True``, ``os.system``, ``os.popen``).
Parameters as YAML, never code, are tested in tests/test_runner.py.
"""
from __future__ import annotations

import ast
import json
import pathlib

import pytest
import torch

from qhelpers.models.loading import load_model
from qhelpers.util.errors import ModelLoadError

REPO = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "qhelpers").rglob("*.py"), REPO / "run_all.py", *(REPO / "scripts").glob("*.py"),
                  *(REPO / "notebooks" / "src").glob("*.py"), *(REPO / "benchmarks").rglob("*.py")])


class _RunsACommand:
    """Unpickling this object touches ``marker`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _saved_folder(tmp_path: pathlib.Path, tiny_model) -> pathlib.Path:
    src = tiny_model("gpt2")
    folder = tmp_path / "model"
    src.model.save_pretrained(folder)
    src.tokenizer.save_pretrained(folder)
    return folder


def test_remote_code_in_a_model_folder_is_never_run(tmp_path, tiny_model):
    folder = _saved_folder(tmp_path, tiny_model)
    marker = tmp_path / "remote_code_ran"
    (folder / "evil_modeling.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import GPT2LMHeadModel\nclass EvilLM(GPT2LMHeadModel):\n    pass\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil_modeling.EvilLM"}
    (folder / "config.json").write_text(json.dumps(config))
    try:
        lm = load_model(str(folder), device="cpu")
    except ModelLoadError:
        lm = None  # refusing is as safe as ignoring the auto_map
    assert not marker.exists(), "the folder's own modelling code was imported"
    if lm is not None:
        assert type(lm.model).__name__ == "GPT2LMHeadModel"


def test_malicious_pickle_in_bin_weights_is_refused(tmp_path, tiny_model):
    folder = _saved_folder(tmp_path, tiny_model)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "pickle_ran"
    state = dict(tiny_model("gpt2").model.state_dict())
    state["payload"] = _RunsACommand(marker)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="objects other than tensors.*safetensors"):
        load_model(str(folder), device="cpu")
    assert not marker.exists(), "a pickle in the checkpoint ran code"


# ----------------------------------------------------------------------------- source scan


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    if isinstance(func, ast.Name):
        return func.id
    return "?"


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _where(path: pathlib.Path, node: ast.stmt | ast.expr) -> str:
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return f"{shown}:{node.lineno}"


FORBIDDEN_CALLS = {"pickle.load", "pickle.loads", "marshal.loads", "eval", "exec", "yaml.load", "yaml.unsafe_load",
                   # a command line run by a shell: quoting mistakes become code
                   "os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
                   "asyncio.create_subprocess_shell"}
AUTO_LOADERS = ("AutoModelForCausalLM.from_pretrained", "AutoModelForCausalLM.from_config",
                "AutoTokenizer.from_pretrained", "AutoConfig.from_pretrained")


def _is_const(value: ast.expr | None, const: object) -> bool:
    return isinstance(value, ast.Constant) and value.value is const


def violations(path: pathlib.Path) -> list[str]:
    """Every call in ``path`` that could run foreign code, one line each."""
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name, where = _name(node.func), _where(path, node)
            remote = _keyword(node, "trust_remote_code")
            # A pass-through parameter is allowed; its default is checked below.
            if remote is not None and not (_is_const(remote, False) or
                                           (isinstance(remote, ast.Name) and remote.id == "trust_remote_code")):
                found.append(f"{where} trust_remote_code is not False")
            if name.endswith(AUTO_LOADERS) and remote is None:
                found.append(f"{where} {name} without an explicit trust_remote_code=False")
            if name == "torch.load" and not _is_const(_keyword(node, "weights_only"), True):
                found.append(f"{where} torch.load without weights_only=True")
            shell = _keyword(node, "shell")
            if shell is not None and not _is_const(shell, False):
                found.append(f"{where} {name} with shell={ast.unparse(shell)}")
            if name in FORBIDDEN_CALLS:
                found.append(f"{where} {name}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            positional = node.args.posonlyargs + node.args.args
            defaults = [None] * (len(positional) - len(node.args.defaults)) + node.args.defaults
            for arg, default in zip(positional + node.args.kwonlyargs, defaults + node.args.kw_defaults):
                if arg.arg == "trust_remote_code" and not _is_const(default, False):
                    found.append(f"{_where(path, node)} {node.name} does not default trust_remote_code to False")
    return found


def test_the_scan_sees_the_package():
    names = {p.name for p in SOURCES}
    assert {"loading.py", "zoo.py", "bnb.py", "run_all.py"} <= names


def test_package_source_has_no_door_to_foreign_code():
    found = [v for path in SOURCES for v in violations(path)]
    assert not found, "\n".join(found)


def test_the_scan_flags_each_kind_of_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch, pickle, yaml\n"
        "torch.load('x')\n"
        "torch.load('x', weights_only=False)\n"
        "pickle.loads(b'')\n"
        "eval('1')\n"
        "yaml.load('a')\n"
        "AutoModelForCausalLM.from_pretrained('x', trust_remote_code=True)\n"
        "AutoTokenizer.from_pretrained('x')\n"
        "def f(trust_remote_code=True):\n    pass\n"
    )
    found = violations(bad)
    assert len(found) == 8, found
    assert violations(REPO / "qhelpers" / "models" / "loading.py") == []


def test_the_scan_covers_notebook_sources_benchmarks_and_the_shell(tmp_path):
    names = {p.relative_to(REPO).as_posix() for p in SOURCES}
    assert "notebooks/src/exp003_kurtosis.py" in names and "benchmarks/sweep_benchmark.py" in names
    bad = tmp_path / "shell.py"
    bad.write_text(
        "import os, subprocess, asyncio\n"
        "subprocess.run('ls ' + path, shell=True)\n"
        "subprocess.Popen(cmd, shell=flag)\n"
        "os.system('rm -rf ' + folder)\n"
        "os.popen('ls')\n"
        "subprocess.getoutput('ls')\n"
        "subprocess.run(['ls', path], shell=False)\n"
        "subprocess.run(['ls', path])\n"
    )
    found = violations(bad)
    assert len(found) == 5, found
    assert any("shell=True" in v for v in found) and any("os.system" in v for v in found)


def _pin_colab():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pin_colab", REPO / "scripts" / "pin_colab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_colab_install_cells_pin_the_tested_code():
    """A notebook on Colab installs the qhelpers tag of this version and pinned packages, from the
    one setting [tool.qhelpers.colab] in pyproject.toml (python scripts/pin_colab.py applies it)."""
    pins = _pin_colab()
    setting = pins.colab_setting(REPO)
    assert setting["qhelpers"].endswith("@v" + __import__("qhelpers").__version__)
    lines = {}
    for path in sorted((REPO / "notebooks" / "src").glob("*.py")) + sorted((REPO / "notebooks").glob("*.ipynb")):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".ipynb":
            text = "\n".join("".join(c["source"]) for c in json.loads(text)["cells"] if c["cell_type"] == "code")
        found = [line for line in text.splitlines() if pins.requirements_of(line) is not None]
        assert found, f"{path.name}: no Colab install line"
        lines[path] = found
    for path, found in lines.items():
        for line in found:
            requirements = pins.requirements_of(line)
            assert setting["qhelpers"] in requirements, f"{path.name}: qhelpers not pinned: {line.strip()}"
            unpinned = [r for r in requirements if "==" not in r and not r.startswith("qhelpers @ ")]
            assert not unpinned, f"{path.name}: unpinned {unpinned}"
    exp003 = pins.requirements_of(lines[REPO / "notebooks" / "src" / "exp003_kurtosis.py"][0])
    assert f"bitsandbytes=={setting['pins']['bitsandbytes']}" in exp003
    assert pins.stale_sources(REPO) == []

"""The layout's rules: the import-linter contracts in pyproject.toml hold, no module uses another
module's ``_private`` names, and every layer's ``__init__.py`` says what the layer holds."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from importlinter.application.output import console as importlinter_console
from importlinter.cli import EXIT_STATUS_SUCCESS, lint_imports

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "qhelpers"
SCANNED_GLOBS = ("qhelpers/**/*.py", "notebooks/src/*.py", "scripts/*.py", "benchmarks/*.py", "run_all.py")


# --- import-linter contracts -------------------------------------------------------------------

def lint_imports_report(config: Path) -> tuple[bool, str]:
    """Run import-linter in-process on the contracts in ``config``: (all kept, its report)."""
    with importlinter_console.capture() as captured:
        exit_status = lint_imports(config_filename=str(config), no_cache=True, no_logo=True)
    return exit_status == EXIT_STATUS_SUCCESS, captured.get()


def test_import_linter_contracts_are_kept(monkeypatch):
    monkeypatch.chdir(REPO)  # import-linter finds the package through the working directory
    kept, report = lint_imports_report(REPO / "pyproject.toml")
    assert kept, f"import-linter contracts broken:\n{report}"


def test_import_linter_reports_a_broken_contract(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    config = tmp_path / "planted.toml"
    config.write_text(
        '[tool.importlinter]\nroot_packages = ["qhelpers"]\ninclude_external_packages = true\n\n'
        '[[tool.importlinter.contracts]]\nname = "planted: util imports no torch"\ntype = "forbidden"\n'
        'source_modules = ["qhelpers.util"]\nforbidden_modules = ["torch"]\n',
        encoding="utf-8",
    )
    kept, report = lint_imports_report(config)
    assert not kept
    assert "planted: util imports no torch BROKEN" in report and "qhelpers.util.threads -> torch" in report, report


# --- no use of another module's private names ------------------------------------------------------

@dataclass(frozen=True)
class PrivateUse:
    """One place where a file uses a ``_private`` name of a qhelpers module."""

    path: Path
    line: int
    what: str

    def __str__(self) -> str:
        try:
            shown = self.path.relative_to(REPO)
        except ValueError:
            shown = self.path
        return f"{shown}:{self.line}: {self.what}"


def is_private(name: str) -> bool:
    """``_x`` is private; dunder names such as ``__version__`` are not."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def is_qhelpers_module(dotted: str, root: Path = REPO) -> bool:
    """Whether ``dotted`` names a module or package of qhelpers (looked up on disk, nothing imported)."""
    if dotted != "qhelpers" and not dotted.startswith("qhelpers."):
        return False
    base = root.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def module_name_of(path: Path, root: Path = REPO) -> str | None:
    """The dotted name of a file inside qhelpers (for relative imports), else None."""
    try:
        parts = list(path.resolve().relative_to(root).with_suffix("").parts)
    except ValueError:
        return None
    if not parts or parts[0] != "qhelpers":
        return None
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def absolute_from(node: ast.ImportFrom, path: Path) -> str | None:
    """The module an ``ImportFrom`` imports from, with relative imports resolved."""
    if node.level == 0:
        return node.module
    own = module_name_of(path)
    if own is None:
        return None
    package = own.split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def private_uses(path: Path) -> list[PrivateUse]:
    """Every import of a qhelpers module's ``_private`` name in ``path``, and every access
    ``m._x`` / ``getattr(m, "_x")`` where ``m`` is bound to a qhelpers module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    own_module = module_name_of(path)
    found: list[PrivateUse] = []
    module_names: dict[str, str] = {}  # local name -> qhelpers module it is bound to

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not is_qhelpers_module(alias.name):
                    continue
                if alias.asname:
                    module_names[alias.asname] = alias.name
                else:
                    module_names[alias.name.split(".")[0]] = "qhelpers"
                if any(is_private(part) for part in alias.name.split(".")):
                    found.append(PrivateUse(path, node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            source = absolute_from(node, path)
            if source is None or not is_qhelpers_module(source):
                continue
            if any(is_private(part) for part in source.split(".")) and source != own_module:
                found.append(PrivateUse(path, node.lineno, f"from {source} import ..."))
            for alias in node.names:
                if is_private(alias.name) and source != own_module:
                    found.append(PrivateUse(path, node.lineno, f"from {source} import {alias.name}"))
                if is_qhelpers_module(f"{source}.{alias.name}"):
                    module_names[alias.asname or alias.name] = f"{source}.{alias.name}"

    def bound_module(expr: ast.expr) -> str | None:
        if isinstance(expr, ast.Name):
            return module_names.get(expr.id)
        if isinstance(expr, ast.Attribute):
            parent = bound_module(expr.value)
            if parent is not None and is_qhelpers_module(f"{parent}.{expr.attr}"):
                return f"{parent}.{expr.attr}"
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            module = bound_module(node.value)
            if module is not None and module != own_module:
                found.append(PrivateUse(path, node.lineno, f"{module}.{node.attr}"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and is_private(node.args[1].value)
        ):
            module = bound_module(node.args[0])
            if module is not None and module != own_module:
                found.append(PrivateUse(path, node.lineno, f"{node.func.id}({module}, {node.args[1].value!r})"))
    return sorted(found, key=lambda use: use.line)


def scanned_files() -> list[Path]:
    files = {path for pattern in SCANNED_GLOBS for path in REPO.glob(pattern)}
    return sorted(path for path in files if "__pycache__" not in path.parts)


def test_no_module_uses_another_modules_private_names():
    files = scanned_files()
    assert len(files) > 40, "the scan found too few files: has the layout moved?"
    violations = [use for path in files for use in private_uses(path)]
    assert not violations, "private names used across modules:\n" + "\n".join(map(str, violations))


def test_private_name_scan_catches_a_planted_violation(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import qhelpers\n"
        "import qhelpers.stats.bootstrap as boot\n"
        "import qhelpers.text.corpora\n"
        "from qhelpers.stats import bootstrap, scores as sc\n"
        "from qhelpers.stats.bootstrap import Estimate, _hidden\n"       # line 5: private import
        "boot._helper()\n"                                               # line 6
        "sc._table\n"                                                    # line 7
        "qhelpers.text.corpora._LANGS\n"                                 # line 8
        "getattr(bootstrap, '_cached')\n"                                # line 9
        "Estimate._private_attribute_of_a_class_is_not_a_module_name\n"
        "boot.__name__, qhelpers.__version__, boot.percentile_interval\n"
        "other = object(); other._fine\n",
        encoding="utf-8",
    )
    uses = private_uses(planted)
    assert [use.line for use in uses] == [5, 6, 7, 8, 9], "\n".join(map(str, uses))
    assert "from qhelpers.stats.bootstrap import _hidden" in uses[0].what
    assert uses[3].what == "qhelpers.text.corpora._LANGS"


# --- every layer says what it holds --------------------------------------------------------------

def package_folders() -> list[Path]:
    return sorted(
        folder
        for folder in [PACKAGE, *PACKAGE.rglob("*")]
        if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py"))
    )


def test_every_package_folder_has_an_init_with_a_docstring():
    folders = package_folders()
    assert {folder.name for folder in folders} >= {"util", "stats", "models", "text", "quant", "measure", "report",
                                                   "experiments", "lora", "runner"}
    missing = []
    for folder in folders:
        init = folder / "__init__.py"
        if not init.is_file():
            missing.append(f"{folder.relative_to(REPO)}: no __init__.py")
            continue
        docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        if len(docstring) < 40 or "TODO" in docstring:
            missing.append(f"{init.relative_to(REPO)}: docstring {docstring!r} does not say what the layer holds")
    assert not missing, "\n".join(missing)


def test_every_module_has_a_docstring():
    placeholders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if not docstring or docstring.startswith("TODO"):
            placeholders.append(str(path.relative_to(REPO)))
    assert not placeholders, "modules without a real docstring:\n" + "\n".join(placeholders)

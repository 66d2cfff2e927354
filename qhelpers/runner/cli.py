"""The ``run_all.py`` command line: options, the checks made before anything runs (notebooks,
profile, parameters, kernel), the run folder with its lock and run_config.json, then the
supervisor (:class:`qhelpers.runner.supervise.Runner`). ``main`` returns the exit code."""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path
from typing import Any, Sequence

from qhelpers.runner.environment import REPO_ROOT, check_kernel
from qhelpers.runner.errors import EXIT_OK, EXIT_USAGE, RunnerError
from qhelpers.runner.goldens import GOLDEN_OUTPUT_PREFIX
from qhelpers.runner.locks import FileLock
from qhelpers.runner.notebooks import (
    discover_notebooks,
    notebook_purpose,
    select_notebooks,
)
from qhelpers.runner.params import notebook_parameters, parse_value
from qhelpers.runner.plan import plan_parameters
from qhelpers.runner.profiles import DEFAULT_PROFILE, load_profiles
from qhelpers.runner.records import atomic_write_json, read_json, utc_now
from qhelpers.runner.supervise import Runner
from qhelpers.runner.worker import worker_main

DEFAULT_NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
DEFAULT_KERNEL = "python3"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit 2 through main(), not sys.exit
        raise RunnerError(f"{message}\n(run with --help for the options)")


def build_parser() -> argparse.ArgumentParser:
    """run_all.py's options (a usage error raises RunnerError instead of exiting)."""
    p = _Parser(
        prog="run_all.py",
        description="Run the qhelpers experiment notebooks headless with papermill and summarise their verdicts.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  python run_all.py --list\n"
            "  python run_all.py                          # every notebook, profile quick\n"
            "  python run_all.py --profile ci --only exp003_kurtosis\n"
            "  python run_all.py --model gpt2 -p LANGS '[en, sw]' -p N_TEXTS 8 --device cuda\n"
            "  python run_all.py --resume runs/20250101T120000Z\n"
            "  python run_all.py --profile ci --write-goldens tests/goldens\n"
            "\n"
            "exit codes: 0 all completed, 1 some notebook failed, 2 usage or configuration error,\n"
            "130 interrupted (SIGINT), 143 terminated (SIGTERM).\n"
            "output: <out>/<stem>/{<stem>.ipynb,results.json,log.txt,run.json}, <out>/summary.md, <out>/index.html"
        ),
    )
    p.add_argument("--list", action="store_true", help="list the notebooks with their purpose and exit")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these notebooks (file stems)")
    p.add_argument("--profile", default=None,
                   help=f"parameter profile from the profiles file: ci, quick, full (default {DEFAULT_PROFILE}, "
                        "or on --resume the profile that folder was run with)")
    p.add_argument("--model", metavar="SPEC", help="set MODEL in every notebook that defines it")
    p.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="set a parameter (repeatable); VALUE is parsed as YAML: 4, 0.5, '[en, sw]', null, true")
    p.add_argument("--device", choices=("cpu", "cuda"), help="set DEVICE in every notebook that defines it")
    p.add_argument("--kernel", default=DEFAULT_KERNEL, help=f"Jupyter kernel name (default {DEFAULT_KERNEL})")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/<UTC timestamp>)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR: skip notebooks completed there with the same parameters")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="notebooks run in parallel (default 1); with several GPUs each worker gets one")
    p.add_argument("--cell-timeout", type=float, default=None, metavar="SECONDS",
                   help="fail a notebook whose cell runs longer than this (default: no limit)")
    p.add_argument("--write-goldens", metavar="DIR",
                   help="copy each completed executed notebook to DIR/<stem>.ipynb for nbval "
                        f"(runs with OUTPUT_DIR={GOLDEN_OUTPUT_PREFIX}/<stem>; normally with --profile ci)")
    p.add_argument("--notebooks-dir", default=str(DEFAULT_NOTEBOOKS_DIR), metavar="DIR",
                   help="folder of the notebooks (default: the repository's notebooks/)")
    p.add_argument("--profiles", metavar="FILE", default=None,
                   help="profiles file (default: <notebooks-dir>/profiles.yaml)")
    return p


def _new_run_dir(base: Path) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for k in range(1, 1000):
        d = base / (stamp if k == 1 else f"{stamp}-{k}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RunnerError(f"cannot create a run folder under {base}")


def _list(notebooks: Sequence[Path]) -> int:
    if not notebooks:
        print("(no notebooks)")
        return EXIT_OK
    width = max(len(p.stem) for p in notebooks)
    for p in notebooks:
        try:
            purpose = notebook_purpose(p)
        except Exception as exc:  # an unreadable notebook still gets listed
            purpose = f"(unreadable: {exc})"
        print(f"{p.stem.ljust(width)}  {purpose}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The run_all.py command line; returns the exit code. ``--worker JOB`` as the first
    argument runs one worker (:func:`qhelpers.runner.worker.worker_main`) instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])
    try:
        return _main(argv)
    except RunnerError as exc:
        print(f"run_all.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    nb_dir = Path(args.notebooks_dir).resolve()
    notebooks = discover_notebooks(nb_dir)
    if args.list:
        return _list(select_notebooks(notebooks, args.only))
    if not notebooks:
        raise RunnerError(f"no notebooks (*.ipynb) in {nb_dir}")
    selected = select_notebooks(notebooks, args.only)
    if args.workers < 1:
        raise RunnerError("--workers must be at least 1")
    if args.cell_timeout is not None and args.cell_timeout <= 0:
        raise RunnerError("--cell-timeout must be positive (seconds)")

    # run folder
    if args.resume and args.out and Path(args.resume).resolve() != Path(args.out).resolve():
        raise RunnerError("--resume DIR is the run folder itself; do not pass a different --out")
    if args.resume:
        out_dir = Path(args.resume).resolve()
        if not out_dir.is_dir():
            raise RunnerError(f"--resume {args.resume}: no such run folder")
    else:
        out_dir = None

    profile = args.profile
    prior = {}
    if out_dir is not None and (out_dir / "run_config.json").is_file():
        try:
            prior = read_json(out_dir / "run_config.json")
        except (OSError, ValueError):
            prior = {}
    if profile is None:
        profile = prior.get("profile") or DEFAULT_PROFILE
    profiles_path = Path(args.profiles) if args.profiles else nb_dir / "profiles.yaml"
    if args.profiles and not profiles_path.is_file():
        raise RunnerError(f"profiles file {profiles_path} not found")
    profiles = load_profiles(profiles_path)

    overrides: list[tuple[str, Any]] = []
    if args.model is not None:
        overrides.append(("MODEL", args.model))
    if args.device is not None:
        overrides.append(("DEVICE", args.device))
    for name, value in args.param:
        if not name.isidentifier():
            raise RunnerError(f"-p {name}: a parameter name must be a Python identifier")
        overrides.append((name, parse_value(value)))

    defined = {p.stem: notebook_parameters(p) for p in selected}
    plans, notes = plan_parameters(selected, defined, profiles, profile, overrides, profiles_path)
    check_kernel(args.kernel)

    if out_dir is None:
        if args.out:
            out_dir = Path(args.out).resolve()
            out_dir.mkdir(parents=True, exist_ok=True)
        else:
            out_dir = _new_run_dir(Path("runs").resolve())
    folder_lock = FileLock(out_dir / ".runner.lock")
    if not folder_lock.acquire(blocking=False):
        raise RunnerError(f"another run_all.py is running in {out_dir}; wait for it or use another --out")
    try:
        if prior.get("profile") and prior["profile"] != profile:
            print(f"note: {out_dir} was run with profile {prior['profile']}; this run uses {profile}", file=sys.stderr)
        golden = bool(args.write_goldens)
        config = {
            "profile": profile,
            "kernel": args.kernel,
            "notebooks_dir": str(nb_dir),
            "profiles": str(profiles_path),
            "argv": argv,
            "created": prior.get("created") or utc_now(),
            "updated": utc_now(),
            "golden": golden,
        }
        atomic_write_json(out_dir / "run_config.json", config)
        runner = Runner(args, plans, out_dir, profile, notes, golden)
        n = len(plans)
        runner.say(f"run folder {out_dir} (profile {profile}, kernel {args.kernel}, "
                   f"{n} notebook{'' if n == 1 else 's'})")
        return runner.run()
    finally:
        folder_lock.release()


if __name__ == "__main__":
    sys.exit(main())

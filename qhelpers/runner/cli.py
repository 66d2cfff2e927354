"""The ``run_all.py`` command line: options, the checks made before anything runs (notebooks,
profile, parameters, kernel), the run folder with its lock and run_config.json, then the
supervisor (:class:`qhelpers.runner.supervise.Runner`). ``main`` returns the exit code."""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from qhelpers.runner.checks import check_plans
from qhelpers.runner.environment import REPO_ROOT, check_kernel, visible_gpus
from qhelpers.runner.errors import EXIT_OK, EXIT_USAGE, RunnerError
from qhelpers.runner.fingerprints import git_state, qhelpers_code_hash, qhelpers_version
from qhelpers.runner.goldens import GOLDEN_OUTPUT_PREFIX
from qhelpers.runner.locks import FileLock
from qhelpers.runner.manifest import (
    MANIFEST,
    RunCommand,
    is_empty_for_a_run,
    manifest_document,
    merge_on_resume,
    read_manifest,
    recorded_command,
)
from qhelpers.runner.notebooks import (
    discover_notebooks,
    notebook_expected_seconds,
    notebook_purpose,
    select_notebooks,
)
from qhelpers.runner.params import notebook_parameters, parse_value
from qhelpers.runner.plan import expand_grid, plan_parameters
from qhelpers.runner.ray_backend import RAY_REQUIREMENT, RayBackend, import_ray
from qhelpers.runner.profiles import DEFAULT_PROFILE, load_profiles
from qhelpers.runner.records import atomic_write_json, utc_now
from qhelpers.runner.supervise import Runner
from qhelpers.runner.worker import worker_main

DEFAULT_NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
DEFAULT_KERNEL = "python3"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit 2 through main(), not sys.exit
        raise RunnerError(f"{message} (run with --help for the options)")


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
            "  python run_all.py --resume runs/20250101T120000Z          # same options as that run\n"
            "  python run_all.py --resume runs/20250101T120000Z -p N_BOOT 500   # one option changed\n"
            "  python run_all.py --profile ci --write-goldens tests/goldens\n"
            "  python run_all.py --models gpt2 facebook/opt-125m --grid BITS '[3, 4]' --only t002_relative_error\n"
            "  python run_all.py --backend ray --per-gpu 4 --device cuda          # a local Ray instance\n"
            "  python run_all.py --backend ray --address HEAD_IP:6379 --per-gpu 4 # an existing Ray cluster\n"
            "\n"
            "exit codes: 0 all completed, 1 some notebook failed, 2 usage or configuration error,\n"
            "130 interrupted (SIGINT), 143 terminated (SIGTERM).\n"
            "output: <out>/<stem>/{<stem>.ipynb,results.json,log.txt,run.json}, <out>/summary.md, <out>/index.html,\n"
            "<out>/run_config.json (the command, re-applied by --resume); a re-run notebook's earlier folder is\n"
            "kept as <out>/<stem>.prev-<n>."
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
    p.add_argument("--kernel", default=None, help=f"Jupyter kernel name (default {DEFAULT_KERNEL})")
    p.add_argument("--out", metavar="DIR",
                   help="run folder (default runs/<UTC timestamp>): a new or empty folder, or an earlier run "
                        "(every selected notebook runs again; its earlier folder is kept as <stem>.prev-<n>)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR with the options recorded in its run_config.json (options given "
                        "here replace those, and each change is printed): notebooks completed there with the same "
                        "inputs and an intact results.json are skipped, the others run again")
    p.add_argument("--keep-stale", action="store_true",
                   help="with --resume: keep completed results whose qhelpers code or model files changed since "
                        "(marked stale in the summary) instead of running them again")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="notebooks run in parallel (default 1); with several GPUs each worker gets one")
    p.add_argument("--start-ahead", type=int, default=None, metavar="N",
                   help="local backend, one GPU or none: start the workers of the next N queued notebooks while "
                        "the running ones work, so their kernels are warm when a slot frees (default: --workers on a GPU, "
                        "0 on the CPU, where the warm-ups would only take cores from the running notebooks)")
    p.add_argument("--cold-kernels", dest="warm", action="store_false", default=None,
                   help="let papermill start each kernel, with no warm-up (the notebook's imports, a throw-away "
                        "load of its model and the CUDA context are then paid inside the notebook)")
    p.add_argument("--cell-timeout", type=float, default=None, metavar="SECONDS",
                   help="fail a notebook whose cell runs longer than this (default: no limit)")
    p.add_argument("--write-goldens", metavar="DIR",
                   help="copy each completed executed notebook to DIR/<stem>.ipynb for nbval "
                        f"(runs with OUTPUT_DIR={GOLDEN_OUTPUT_PREFIX}/<stem>; normally with --profile ci)")
    p.add_argument("--notebooks-dir", default=None, metavar="DIR",
                   help="folder of the notebooks (default: the repository's notebooks/)")
    p.add_argument("--profiles", metavar="FILE", default=None,
                   help="profiles file (default: <notebooks-dir>/profiles.yaml)")
    g = p.add_argument_group("grids: one job per combination, each in its own folder <stem>--<value>...")
    g.add_argument("--models", nargs="+", metavar="SPEC",
                   help="run every notebook that defines MODEL once per model (instead of --model); the summary "
                        "sets each hypothesis side by side across models")
    g.add_argument("--grid", nargs=2, action="append", default=None, metavar=("NAME", "VALUES"),
                   help="run once per value of a parameter (repeatable; VALUES a YAML list, e.g. '[2, 3, 4]')")
    r = p.add_argument_group("where the jobs run")
    r.add_argument("--backend", choices=("local", "ray"), default=None,
                   help="local: worker processes on this machine (default); ray: Ray tasks on a local Ray instance "
                        f"or, with --address, an existing cluster (pip install {RAY_REQUIREMENT})")
    r.add_argument("--address", metavar="ADDR",
                   help="with --backend ray: join this cluster (e.g. HEAD_IP:6379 from `ray start --head`)")
    r.add_argument("--per-gpu", type=int, default=None, metavar="K",
                   help="with --backend ray: K notebooks share each GPU (num_gpus = 1/K; default 1)")
    r.add_argument("--cpus-per-job", type=int, default=None, metavar="N",
                   help="with --backend ray: CPUs (BLAS threads) each job requests (default: the CPUs shared among "
                        "the jobs the GPUs hold at once, or among the CPU jobs)")
    r.add_argument("--ray-cpus", type=int, default=None, metavar="N",
                   help="with --backend ray and no --address: CPUs of the local Ray instance (default: all)")
    r.add_argument("--ray-gpus", type=int, default=None, metavar="N",
                   help="with --backend ray and no --address: GPUs the local Ray instance declares (default: those "
                        "it detects)")
    r.add_argument("--no-ship-code", dest="ship_code", action="store_false", default=None,
                   help="with --address: do not send this repository to the cluster (its nodes have the same "
                        "qhelpers installed; each task checks the code hash)")
    return p


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


def default_start_ahead(resolved: RunCommand, workers: int) -> int:
    """``--start-ahead`` when not given: one warm kernel waiting per worker when the notebooks run on a
    GPU (their kernels then leave CPU cores idle for the next ones' warm-ups), none on the CPU, where
    a warm-up ahead only takes cores from the running notebooks (measured on 2 cores: +4.5 %), and none
    on the Ray backend (Ray queues the jobs itself)."""
    if resolved.backend != "local":
        return 0
    device = str(resolved.device or "auto")
    on_gpu = device.startswith("cuda") or (device == "auto" and bool(visible_gpus()))
    return workers if on_gpu else 0


def command_from_args(args: argparse.Namespace) -> RunCommand:
    """The options given on the command line (None where not given), paths made absolute."""
    def absolute(path: str | None) -> str | None:
        return None if path is None else str(Path(path).expanduser().resolve())

    return RunCommand(
        profile=args.profile,
        only=list(args.only) if args.only else None,
        params=[[name, value] for name, value in args.param],
        model=args.model,
        device=args.device,
        kernel=args.kernel,
        cell_timeout=args.cell_timeout,
        workers=args.workers,
        notebooks_dir=absolute(args.notebooks_dir),
        profiles=absolute(args.profiles),
        write_goldens=absolute(args.write_goldens),
        models=list(args.models) if args.models else None,
        grid=[[name, values] for name, values in args.grid] if args.grid else None,
        backend=args.backend,
        address=args.address,
        per_gpu=args.per_gpu,
        cpus_per_job=args.cpus_per_job,
        ray_cpus=args.ray_cpus,
        ray_gpus=args.ray_gpus,
        ship_code=args.ship_code,
        start_ahead=args.start_ahead,
        warm=args.warm,
    )


def parse_recorded_argv(argv: Sequence[str]) -> RunCommand:
    """A format-1 manifest's argv read as a command (its --out/--resume ignored)."""
    return command_from_args(build_parser().parse_args(list(argv)))


def _path_error(what: str, path: Path, exc: OSError) -> RunnerError:
    reason = exc.strerror or type(exc).__name__
    return RunnerError(f"{what} {path}: {reason}; choose a folder you can write to")


def _check_out_dir(path: Path) -> bool:
    """Check that ``--out path`` may be used; returns whether it is an earlier run."""
    if path.exists() and not path.is_dir():
        raise RunnerError(f"--out {path} is an existing file, not a folder; give a folder path")
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise RunnerError(f"--out {path}: {parent} is a file, not a folder")
        return False
    if is_empty_for_a_run(path):
        return False
    if read_manifest(path) is None:
        raise RunnerError(
            f"--out {path} is a non-empty folder that is not a run folder (no {MANIFEST}); nothing was written. "
            "Give a new or empty folder, or --resume an earlier run"
        )
    return True


def _make_run_dir(path: Path | None) -> Path:
    """Create the run folder (default ``runs/<UTC timestamp>``); a path error raises RunnerError."""
    if path is not None:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise _path_error("cannot write the run folder", path, exc) from None
        return path
    base = Path("runs").resolve()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    try:
        base.mkdir(parents=True, exist_ok=True)
        for k in range(1, 1000):
            d = base / (stamp if k == 1 else f"{stamp}-{k}")
            try:
                d.mkdir()
                return d
            except FileExistsError:
                continue
    except OSError as exc:
        raise _path_error("cannot create a run folder under", base, exc) from None
    raise RunnerError(f"cannot create a run folder under {base}")


def _check_backend_options(resolved: RunCommand) -> None:
    """Options that only make sense with the Ray backend, or only without --address; Ray importable."""
    ray_only = {"--address": resolved.address, "--cpus-per-job": resolved.cpus_per_job,
                "--ray-cpus": resolved.ray_cpus, "--ray-gpus": resolved.ray_gpus,
                "--per-gpu": resolved.per_gpu if resolved.per_gpu != 1 else None}
    if resolved.backend != "ray":
        given = [flag for flag, value in ray_only.items() if value is not None]
        if given:
            raise RunnerError(f"{', '.join(given)} apply to --backend ray only (the local backend runs --workers N "
                              "processes, one GPU each when there are several)")
        return
    for flag, value in (("--per-gpu", resolved.per_gpu), ("--cpus-per-job", resolved.cpus_per_job),
                        ("--ray-cpus", resolved.ray_cpus), ("--ray-gpus", resolved.ray_gpus)):
        if value is not None and value < (0 if flag == "--ray-gpus" else 1):
            raise RunnerError(f"{flag} must be at least {0 if flag == '--ray-gpus' else 1}")
    if resolved.address and (resolved.ray_cpus is not None or resolved.ray_gpus is not None):
        raise RunnerError("--ray-cpus/--ray-gpus size a local Ray instance; a cluster joined with --address has "
                          "its own resources (set them with `ray start --num-cpus/--num-gpus`)")
    import_ray()


def _grid_axes(resolved: RunCommand, overridden: set[str]) -> list[tuple[str, list[Any]]]:
    """The grid axes: MODEL from --models, then each --grid NAME VALUES (a YAML list)."""
    axes: list[tuple[str, list[Any]]] = []
    if resolved.models:
        axes.append(("MODEL", list(resolved.models)))
    for name, text in resolved.grid or []:
        if not name.isidentifier():
            raise RunnerError(f"--grid {name}: a parameter name must be a Python identifier")
        if name in overridden or (name == "MODEL" and resolved.models):
            raise RunnerError(f"--grid {name} and -p/--model{'s' if name == 'MODEL' else ''} {name} both set it; "
                              "give its values once, as the grid")
        values = parse_value(text)
        if not isinstance(values, list):
            raise RunnerError(f"--grid {name} {text}: give a YAML list of values, e.g. '[2, 3, 4]'")
        axes.append((name, values))
    return axes


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
    except OSError as exc:  # a path that cannot be read or written before the run starts
        print(f"run_all.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    given = command_from_args(args)
    if args.list:
        nb_dir = Path(given.notebooks_dir or DEFAULT_NOTEBOOKS_DIR)
        return _list(select_notebooks(discover_notebooks(nb_dir), given.only))

    # the run folder and the command: --resume re-applies the recorded one
    previous: dict[str, Any] | None = None
    changes: list[str] = []
    earlier_run = False
    if args.resume and args.out and Path(args.resume).resolve() != Path(args.out).resolve():
        raise RunnerError("--resume DIR is the run folder itself; do not pass a different --out")
    if args.keep_stale and not args.resume:
        raise RunnerError("--keep-stale applies to --resume DIR only")
    if args.resume:
        out_dir: Path | None = Path(args.resume).expanduser().resolve()
        if not out_dir.is_dir():
            raise RunnerError(f"--resume {args.resume}: no such run folder")
        previous = read_manifest(out_dir)
        if previous is None:
            raise RunnerError(
                f"--resume {args.resume}: not a run folder (no {MANIFEST}); nothing was written. "
                "Give the folder of an earlier run_all.py run"
            )
        command, changes = merge_on_resume(recorded_command(previous, parse_recorded_argv), given)
    else:
        out_dir = Path(args.out).expanduser().resolve() if args.out else None
        if out_dir is not None:
            try:
                earlier_run = _check_out_dir(out_dir)
            except OSError as exc:
                raise _path_error("cannot use --out", out_dir, exc) from None
        command = given
    # the manifest records the options given (and the profile); defaults fill the rest
    command.profile = command.profile or DEFAULT_PROFILE
    resolved = command.with_defaults(kernel=DEFAULT_KERNEL, notebooks_dir=str(DEFAULT_NOTEBOOKS_DIR), backend="local",
                                     per_gpu=1, ship_code=True, warm=True)
    _check_backend_options(resolved)

    # everything is checked before anything is written
    nb_dir = Path(resolved.notebooks_dir)
    notebooks = discover_notebooks(nb_dir)
    if not notebooks:
        raise RunnerError(f"no notebooks (*.ipynb) in {nb_dir}")
    selected = select_notebooks(notebooks, resolved.only)
    if resolved.workers is not None and resolved.workers < 1:
        raise RunnerError("--workers must be at least 1")
    if resolved.start_ahead is not None and resolved.start_ahead < 0:
        raise RunnerError("--start-ahead must be 0 (off) or more")
    if resolved.cell_timeout is not None and resolved.cell_timeout <= 0:
        raise RunnerError("--cell-timeout must be positive (seconds)")
    profiles_path = Path(resolved.profiles) if resolved.profiles else nb_dir / "profiles.yaml"
    if resolved.profiles and not profiles_path.is_file():
        raise RunnerError(f"profiles file {profiles_path} not found")
    profiles = load_profiles(profiles_path)
    overrides: list[tuple[str, Any]] = []
    if resolved.model is not None and resolved.models:
        raise RunnerError("--model and --models exclude each other: --models runs each notebook once per model")
    if resolved.model is not None:
        overrides.append(("MODEL", resolved.model))
    if resolved.device is not None:
        if resolved.device not in ("cpu", "cuda"):
            raise RunnerError(f"--device {resolved.device}: use cpu or cuda")
        overrides.append(("DEVICE", resolved.device))
    for name, text in resolved.params:
        if not name.isidentifier():
            raise RunnerError(f"-p {name}: a parameter name must be a Python identifier")
        overrides.append((name, parse_value(text)))
    defined = {p.stem: notebook_parameters(p) for p in selected}
    plans, notes = plan_parameters(selected, defined, profiles, resolved.profile, overrides, profiles_path)
    axes = _grid_axes(resolved, {name for name, _ in overrides})
    if axes:
        plans, grid_notes = expand_grid(plans, axes)
        notes += grid_notes
    check_plans(plans)
    expected = {p.stem: notebook_expected_seconds(p, resolved.profile) for p in selected}  # once per notebook
    for plan in plans:
        plan.expected_s = expected[plan.notebook]
    check_kernel(resolved.kernel)

    out_dir = _make_run_dir(out_dir)
    folder_lock = FileLock(out_dir / ".runner.lock")
    try:
        locked = folder_lock.acquire(blocking=False)
    except OSError as exc:
        raise _path_error("cannot lock the run folder", out_dir, exc) from None
    if not locked:
        raise RunnerError(f"another run_all.py is running in {out_dir}; wait for it or use another --out")
    try:
        if not args.resume and not earlier_run and not is_empty_for_a_run(out_dir):
            raise RunnerError(f"--out {out_dir} was filled by another process meanwhile; nothing was written")
        code_hash = qhelpers_code_hash()
        qhelpers_info = {"version": qhelpers_version(), **git_state(), "code_sha256": code_hash}
        golden = bool(resolved.write_goldens)
        backend = None
        if resolved.backend == "ray":
            backend = RayBackend(out_dir, code_hash, resolved.address, resolved.per_gpu, resolved.cpus_per_job,
                                 resolved.ray_cpus, resolved.ray_gpus, bool(resolved.ship_code))
        # the Ray backend hands every job to Ray at once (Ray queues them by their resources)
        workers = resolved.workers or (len(plans) if resolved.backend == "ray" else 1)
        resolved.workers = workers
        if resolved.start_ahead is None:
            resolved.start_ahead = default_start_ahead(resolved, workers)
        run_args = argparse.Namespace(
            kernel=resolved.kernel, workers=workers, device=resolved.device,
            cell_timeout=resolved.cell_timeout, write_goldens=resolved.write_goldens,
            resume=bool(args.resume), keep_stale=args.keep_stale, start_ahead=resolved.start_ahead,
            warm=bool(resolved.warm))
        runner = Runner(run_args, plans, out_dir, resolved.profile, notes, golden, code_hash, backend)
        entries = {plan.stem: runner.inputs_entry(plan) for plan in plans}
        document = manifest_document(previous or read_manifest(out_dir), command, resolved, argv, changes,
                                     qhelpers_info, entries, utc_now())
        try:
            atomic_write_json(out_dir / MANIFEST, document)
        except OSError as exc:
            raise _path_error("cannot write the manifest in", out_dir, exc) from None
        n = len(plans)
        runner.say(f"run folder {out_dir} (profile {resolved.profile}, kernel {resolved.kernel}, "
                   f"{n} notebook{'' if n == 1 else 's'})")
        for line in changes:
            runner.say(f"resume: option changed on the command line: {line}")
        if earlier_run:
            runner.say(f"note: {out_dir} holds an earlier run; every selected notebook runs again and the folder "
                       "it had is kept as <stem>.prev-<n> (--resume skips completed notebooks instead)")
        return runner.run()
    finally:
        folder_lock.release()


if __name__ == "__main__":
    sys.exit(main())

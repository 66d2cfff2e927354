"""Time the notebook suite as a user runs it: ``run_all.py`` with the given options, its wall time,
each notebook's duration and status, and the GPUs' utilisation sampled by ``nvidia-smi`` meanwhile.

    python benchmarks/suite_benchmark.py --label local --out $OUT/suite_local.json -- --device cuda -p DTYPE fp16
    python benchmarks/suite_benchmark.py --label ray-k4 --out $OUT/suite_ray_k4.json -- --backend ray --per-gpu 4 --device cuda

Everything after ``--`` goes to run_all.py (``--out`` is set here: a fresh folder under the output's).
The JSON records the device name, date, commit, the command, ``wall_s``, ``completed``/``failed``, the
notebooks' durations (``notebook_s``), their sum (the serial time the run overlapped) and
``gpu_util_mean_pct``/``gpu_util_busy_pct`` (mean utilisation, share of samples above 0) and
``gpu_mem_max_mib`` per GPU, and each notebook's fixed cost (``fixed_s``, :func:`fixed_cost`): the work
every notebook does before its experiment starts. Speed targets are read from these files, never asserted
in tests."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class GpuSampler:
    """``nvidia-smi`` utilisation and memory of every GPU, every ``period`` seconds, in a thread."""

    def __init__(self, period: float = 0.5):
        self.period = period
        self.samples: list[list[tuple[float, float]]] = []
        self.names: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _query(self, fields: str) -> list[str]:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
        return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []

    def start(self) -> None:
        if shutil.which("nvidia-smi") is None:
            return
        self.names = self._query("name")

        def run() -> None:
            while not self._stop.is_set():
                rows = []
                for line in self._query("utilization.gpu,memory.used"):
                    util, mem = (float(x) for x in line.split(","))
                    rows.append((util, mem))
                if rows:
                    self.samples.append(rows)
                self._stop.wait(self.period)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        per_gpu = []
        for g in range(len(self.names)):
            utils = [s[g][0] for s in self.samples if len(s) > g]
            mems = [s[g][1] for s in self.samples if len(s) > g]
            per_gpu.append({
                "name": self.names[g],
                "gpu_util_mean_pct": round(sum(utils) / len(utils), 1) if utils else None,
                "gpu_util_busy_pct": round(100 * sum(u > 0 for u in utils) / len(utils), 1) if utils else None,
                "gpu_mem_max_mib": max(mems) if mems else None,
            })
        return {"gpus": per_gpu, "samples": len(self.samples)}


def fixed_cost(notebook: Path, duration_s: float, warm_kernel: dict | None = None) -> dict:
    """What one executed notebook spent before its experiment, from papermill's per-cell durations:
    ``outside_cells_s`` (the run's duration less every cell's: kernel start, papermill, writing the
    notebook) and ``setup_cells_s`` (the cells up to and including the first that calls
    ``load_model(``: imports, parameters, loading the model and texts; without such a cell, up to the
    first that imports qhelpers). With a warm kernel (run.json's ``warm_kernel``), ``exposed_warm_s``
    is the part of its start and warm-up the notebook waited for (none when its worker was started
    ahead and was ready in time) and ``hidden_warm_s`` the rest. ``fixed_s`` = outside + setup +
    exposed warm-up, ``work_s`` the rest of the duration; ``slowest_cells``: the three longest cells
    (index among the code cells, seconds, last line)."""
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    durations = [float((c.get("metadata", {}).get("papermill", {}) or {}).get("duration") or 0.0) for c in cells]
    sources = ["".join(c["source"]) for c in cells]
    end = next((i for i, src in enumerate(sources) if "load_model(" in src), None)
    if end is None:
        end = next((i for i, src in enumerate(sources) if "from qhelpers" in src or "import qhelpers" in src), -1)
    outside = duration_s - sum(durations)
    setup = sum(durations[: end + 1])
    def last_line(i: int) -> str:
        lines = sources[i].strip().splitlines()
        return lines[-1][:80] if lines else ""

    slowest = sorted(range(len(cells)), key=lambda i: -durations[i])[:3]
    warm = warm_kernel or {}
    exposed = float(warm.get("exposed_s") or 0.0)
    hidden = max(0.0, float(warm.get("kernel_s") or 0.0) + float(warm.get("warm_s") or 0.0) - exposed)
    return {"outside_cells_s": round(outside, 2), "setup_cells_s": round(setup, 2),
            "exposed_warm_s": round(exposed, 2), "hidden_warm_s": round(hidden, 2),
            "fixed_s": round(outside + setup + exposed, 2), "work_s": round(duration_s - outside - setup, 2),
            "setup_until": last_line(end) if end >= 0 else None,
            "slowest_cells": [[i, round(durations[i], 2), last_line(i)] for i in slowest]}


def _is_quick_suite(run_all_args: list[str]) -> bool:
    """Whether run_all.py ran every notebook under the quick profile (its default)."""
    args = list(run_all_args)
    profile = args[args.index("--profile") + 1] if "--profile" in args[:-1] else "quick"
    return profile == "quick" and "--only" not in args


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, run_all_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", required=True, help="name of this configuration in the JSON")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")
    args = p.parse_args(own)
    out = Path(args.out)
    run_dir = out.with_suffix("").with_name(out.stem + "-run")
    sampler = GpuSampler()
    sampler.start()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "run_all.py"), *run_all_args, "--out", str(run_dir)],
                          cwd=REPO, text=True)
    wall = time.perf_counter() - t0
    gpus = sampler.stop()
    notebooks = {}
    for rj in sorted(run_dir.glob("*/run.json")):
        rec = json.loads(rj.read_text())
        notebooks[rj.parent.name] = {"status": rec.get("status"), "duration_s": rec.get("duration_s"),
                                     "cuda_visible_devices": rec.get("cuda_visible_devices")}
        executed = rj.parent / f"{rj.parent.name}.ipynb"
        if rec.get("status") == "completed" and executed.is_file():
            notebooks[rj.parent.name]["fixed"] = fixed_cost(executed, float(rec["duration_s"]),
                                                            rec.get("warm_kernel"))
    durations = [n["duration_s"] for n in notebooks.values() if n["duration_s"] is not None]
    fixed = {k: n["fixed"] for k, n in notebooks.items() if "fixed" in n}
    doc = {
        "benchmark": "suite",
        "label": args.label,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit or git_commit(),
        "run_all_args": run_all_args,
        "exit_code": proc.returncode,
        "wall_s": round(wall, 1),
        # issue 15's name for the wall time of the whole quick suite (every notebook, quick profile)
        **({"quick_suite_s": round(wall, 1)} if _is_quick_suite(run_all_args) else {}),
        "completed": sum(n["status"] == "completed" for n in notebooks.values()),
        "failed": sorted(k for k, n in notebooks.items() if n["status"] != "completed"),
        "notebook_s_sum": round(sum(durations), 1),
        "notebook_s": {k: n["duration_s"] for k, n in notebooks.items()},
        "cuda_visible_devices": {k: n["cuda_visible_devices"] for k, n in notebooks.items()},
        "fixed_s": {k: f["fixed_s"] for k, f in fixed.items()},
        "fixed_s_mean": round(sum(f["fixed_s"] for f in fixed.values()) / len(fixed), 2) if fixed else None,
        "fixed_s_max": max((f["fixed_s"] for f in fixed.values()), default=None),
        "fixed_parts": fixed,
        **gpus,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("label", "wall_s", "completed", "failed", "notebook_s_sum", "fixed_s_mean")}
                     | {"gpus": gpus["gpus"]}))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())

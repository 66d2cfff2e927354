"""What one auto-round calibration costs (the prepare step of ``AutoRoundMethod``, e.g. ``awq:4``
calibrated on one language): wall seconds per device, and where the time goes (cProfile, the
functions with the most own time). ``calibration_language``'s full profile runs 8 of these.

    python benchmarks/autoround_benchmark.py --devices cpu
    python benchmarks/autoround_benchmark.py --devices cpu,cuda --dtype fp16 --out $OUT/autoround.json

Each device runs the same calibration on the same loaded model; with two devices the JSON also
records how far their dequantized weights lie apart (the search may pick other scales)."""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import time
from pathlib import Path

from qhelpers.models.loading import load_model
from qhelpers.quant.autoround import run_autoround
from qhelpers.report.results import environment_info
from qhelpers.text.calibration import calibration_texts


def main(argv: list[str] | None = None) -> dict:
    """Run the calibrations, print each device's time and profile; returns (and writes) the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--dtype", default=None, help="the loaded model's dtype (fp16 on a GPU, as the suite runs it)")
    parser.add_argument("--model-device", default=None, help="where the model is loaded (default: cuda if present)")
    parser.add_argument("--devices", default="cpu", help="comma-separated auto-round devices: cpu, cuda, cuda:N")
    parser.add_argument("--algorithm", default="awq")
    parser.add_argument("--calibration", default="en")
    parser.add_argument("--top", type=int, default=15, help="functions listed per device")
    parser.add_argument("--commit", default=None, help="the git commit, where the working tree has no history")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    frozen_at_start = gc.get_freeze_count()  # objects frozen before qhelpers ran (a host's start-up may freeze)

    loaded = load_model(args.model, device=args.model_device, dtype=args.dtype)  # None: cuda if available
    texts = calibration_texts(args.calibration, tokenizer=loaded.tokenizer)
    # versions, CPU, threads and GPUs: in the environment record
    result: dict = {"model": args.model, "dtype": str(next(loaded.model.parameters()).dtype),
                    "algorithm": args.algorithm, "calibration": args.calibration,
                    "gc_frozen_at_start": frozen_at_start, "environment": environment_info(), "runs": {}}
    if args.commit:
        result["environment"]["git"] = {"commit": args.commit, "source": "--commit"}
    weights = {}
    for device in args.devices.split(","):
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        weights[device] = run_autoround(loaded.model, loaded.tokenizer, texts, algorithm=args.algorithm, device=device)
        profile.disable()
        seconds = time.perf_counter() - start
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.top)
        lines = text.getvalue().splitlines()
        table = [line for line in lines[next(i for i, line in enumerate(lines) if "ncalls" in line):] if line.strip()]
        result["runs"][device] = {"seconds": round(seconds, 2), "profile_top": table}
        print(f"{device}: {seconds:.1f} s")
        print("\n".join(result["runs"][device]["profile_top"]))
    if len(weights) > 1:
        first, *others = weights
        for other in others:
            diffs = [float((weights[first][n].weight.float() - weights[other][n].weight.float()).abs().max())
                     for n in weights[first]]
            result[f"max_abs_weight_diff_{first}_vs_{other}"] = max(diffs)
            print(f"max |w_{first} - w_{other}|: {max(diffs):.3g}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

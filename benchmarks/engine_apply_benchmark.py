"""What switching configuration costs a resident :class:`~qhelpers.quant.engine.QuantEngine`: the time
of ``apply`` + ``restore`` per variant and the aten operations ``apply`` dispatches (on a GPU, nearly
each one is a kernel launch), with the engine keeping dequantized tensors (``dense_fraction``, the
default) and without (``--dense-fraction 0``, the engine before 2026-12-05).

    python benchmarks/engine_apply_benchmark.py --model embedded:smollm2-135m --device cpu
    python benchmarks/engine_apply_benchmark.py --device cuda --dtype fp16 --out $OUT/engine_apply.json

The variants are ``sweep_benchmark.py``'s (full precision, all quantized, one protected layer each);
every variant is applied once untimed (quantization, first dequantization), then ``--repeats`` rounds
are timed. The sweep's per-configuration overhead is in ``sweep_benchmark.py``'s ``over_%`` column."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_benchmark import load, make_variants, pick_layers  # noqa: E402

from qhelpers.quant.engine import QuantEngine  # noqa: E402
from qhelpers.quant.quantizers import QuantConfig  # noqa: E402


class DispatchCount(TorchDispatchMode):
    """Counts the aten operations run under it, views (``detach``) apart."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            self.views += 1
        else:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def measure(engine: QuantEngine, variants: dict, repeats: int, device: torch.device) -> dict[str, Any]:
    """Median and max ms of apply + restore per variant, and the operations one warm apply dispatches."""
    for variant in variants.values():  # quantize, dequantize once (kept where the budget allows)
        with engine.applied(variant):
            pass
    times = []
    for _ in range(repeats):
        for variant in variants.values():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            engine.apply(variant)
            engine.restore()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    ops, views = [], []
    for variant in variants.values():
        count = DispatchCount()
        with count:
            engine.apply(variant)
        engine.restore()
        ops.append(count.ops)
        views.append(count.views)
    return {
        "apply_restore_ms_median": 1e3 * statistics.median(times),
        "apply_restore_ms_max": 1e3 * max(times),
        "ops_per_apply_max": max(ops),
        "views_per_apply_max": max(views),
        "dense_bytes": engine.dense_bytes,
        "counters": dict(engine.counters),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--layers", default="n:12", help="protected-layer variants, as sweep_benchmark.py's")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds over every variant")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    loaded = load(args.model, args.device, args.dtype)
    quant = QuantConfig(method="int", bits=4, symmetric=True, granularity="channel", clipping="absmax")
    variants = make_variants(loaded.n_layers, pick_layers(args.layers, loaded.n_layers), quant)
    result: dict[str, Any] = {
        "model": args.model,
        "device": str(loaded.device),
        "device_name": torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else "cpu",
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "variants": len(variants),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for label, fraction in (("dense_kept", 1.0), ("dense_off", 0.0)):
        engine = QuantEngine(loaded, resident=True, dense_fraction=fraction)
        result[label] = measure(engine, variants, args.repeats, loaded.device)
        del engine
    for label in ("dense_off", "dense_kept"):
        row = result[label]
        print(f"{label:10s} apply+restore {row['apply_restore_ms_median']:8.2f} ms median, "
              f"{row['apply_restore_ms_max']:8.2f} max; ops per apply {row['ops_per_apply_max']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

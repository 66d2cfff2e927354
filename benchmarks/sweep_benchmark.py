#!/usr/bin/env python3
"""Time one quantization sweep two ways, in one process, on the same tokens.

    python benchmarks/sweep_benchmark.py --model embedded:smollm2-135m --device cpu
    python benchmarks/sweep_benchmark.py --model gpt2-small-random --device cuda
    python benchmarks/sweep_benchmark.py --model opt-125m-random --device cuda --out opt.json

The sweep: the full-precision baseline, all decoder linear weights quantized (per-channel
symmetric INT-b, default 4), and each single decoder layer protected (``--layers`` picks a
subset), over the 7 UDHR languages (``--n-texts`` paragraphs each).

Ways (see benchmarks/README.md):

* ``seed``: the seeds' style. Restore the whole state dict from an in-memory clone
  (``model.load_state_dict(clone)``), re-quantize every in-scope tensor with
  :func:`qhelpers.quant.quantizers.fake_quantize` written into the parameters, then one forward pass
  per text (``model(ids, labels=ids)``, batch 1).
* ``engine``: :func:`qhelpers.measure.sweep.run_sweep` with its default, fresh
  :class:`~qhelpers.quant.engine.QuantEngine` (streaming on CPU, resident on CUDA), prefix caching off.
* ``engine+prefix``: the same with prefix caching on.
* ``engine+compile``: ``engine`` on a Scorer with ``MeasureConfig(compile=True)`` (each decoder
  layer's forward under ``torch.compile``, and the loss; ``--compile-shapes``: dynamic sizes on the
  eager path's batches, or static shapes on batches padded to buckets; compiled by a warm-up pass
  before it is timed, compile time reported apart as ``compile_s``). Default on
  CUDA only. ``run_sweep`` gives a compiled scorer a resident engine (on the CPU when the RAM allows):
  a streaming engine's hooks inside the layers would make them run eagerly.
* ``engine+prefix+compile``: the same with prefix caching on (its hooks sit on the decoder layers,
  outside their compiled graphs).
* ``engine+damage``, ``engine+prefix+damage``: the same two, also measuring the damage card
  (per-token KL to the full model over the full vocabulary, top-1 agreement, KL histogram;
  :meth:`qhelpers.measure.scoring.Scorer.score` with ``damage=``). ``damage/plain`` in the
  output is its cost over the plain sweep (issue target: <= 1.3x on CPU).

Reference lines:

* ``floor``: the forward-pass floor, plain full-precision forward passes over the same texts
  in the same batches as the engine (``Scorer.score_nll()`` with no engine), times the number
  of configurations: the median of timed passes taken before, between and after the ways
  (``--floor-repeats``), so that it sees the machine's load as the ways did.
* ``floor-b1``: the same for the seeds' batch-1 forward passes (one timed pass).
* ``floor-compile``: the forward-pass floor of ``engine+compile``: compiled full-precision passes in
  its bucketed batches, times the configurations: the median of ``--floor-repeats // 2`` passes
  right after compiling and of one pass beside each later sample of ``floor``.
* ``hf-floor``: a plain Hugging Face forward, ``model(input_ids, attention_mask).logits`` (full
  logits, the model's own attention implementation, SDPA in transformers 5) over the engine's
  padded batches, times the configurations: what the card does at the same batch shapes without
  any qhelpers code. ``hf-floor-compile``: the same under ``torch.compile`` over the bucketed
  batches of ``engine+compile`` (with it only). Their ``mfu_with_head_pct`` is reported at the top
  level as ``floor_mfu_with_head_pct`` / ``floor_compiled_mfu_with_head_pct``.

Printed per way: wall and CPU seconds, overhead above the floor, peak memory, the speed ratio
seed / way, and the largest absolute difference of the per-(configuration, language) mean NLL
per token against the seed way. Memory on CPU is the peak RSS increase over the RSS of the
loaded model (a psutil sampling thread, 2 ms), also as a multiple of the model's fp32 size;
on CUDA ``torch.cuda.max_memory_allocated`` (reset per way) above the memory allocated before
it. On CUDA also model FLOP utilisation (MFU):

    useful FLOPs per configuration = 2 * N * T + sum over sequences 2 * L * S * (S + 1) * d_attn

``N`` = non-embedding parameters (decoder layers + final norm; token/position embeddings and
the LM head are excluded, as in Kaplan et al. 2020), ``T`` = tokens fed (padding excluded),
``L`` = decoder layers, ``S`` = a sequence's length, ``d_attn`` = heads x head dim; the second
term is causal attention (QK^T and AV over the S(S+1)/2 unmasked pairs, 2 FLOPs per MAC).
``mfu_with_head_pct`` adds the LM head, ``2 * d * V * T`` (``d`` hidden size, ``V`` vocabulary; all
fed tokens, as a plain forward computes them; ~21 % of SmolLM2's forward FLOPs).
MFU = configurations x useful FLOPs / wall time / peak, with the peak from ``--peak-tflops``
(defaults: dense fp16/bf16 989 TFLOP/s for H100 SXM and H200, 756 for H100 PCIe). With prefix
caching the same useful FLOPs are counted (work skipped by reuse still counts as done).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qhelpers.measure.scoring import MeasureConfig, Scorer, corpus_scorer  # noqa: E402
from qhelpers.measure.sweep import run_sweep  # noqa: E402
from qhelpers.models.archs import decoder_layers, get_arch, get_module  # noqa: E402
from qhelpers.models.loaded import LoadedModel  # noqa: E402
from qhelpers.models.loading import (
    gpt2_tokenizer,
    load_model,
    resolve_device,
    resolve_dtype,
)
from qhelpers.quant.engine import Variant  # noqa: E402
from qhelpers.quant.protection import ProtectionSpec, resolve_plan  # noqa: E402
from qhelpers.quant.quantizers import QuantConfig, fake_quantize  # noqa: E402
from qhelpers.text.corpora import SEED_LANGS, load_corpus  # noqa: E402
from qhelpers.text.encoding import pad_batch  # noqa: E402

#: Randomly initialised models of real architectures and sizes (no download: configs only,
#: with the packaged GPT-2 tokenizer). Config values are those of the hub checkpoints.
RANDOM_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    # openai-community/gpt2: 124M parameters
    "gpt2-small-random": (
        "gpt2",
        dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
             bos_token_id=50256, eos_token_id=50256, pad_token_id=50256),
    ),
    # facebook/opt-125m: 125M parameters (vocabulary 50272, 2048 positions)
    "opt-125m-random": (
        "opt",
        dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
             max_position_embeddings=2048, word_embed_proj_dim=768, do_layer_norm_before=True,
             bos_token_id=50256, eos_token_id=50256, pad_token_id=50256),
    ),
}

#: Dense fp16/bf16 tensor-core peaks (TFLOP/s), matched against the device name in order.
PEAK_TFLOPS: list[tuple[tuple[str, ...], float]] = [
    (("H100", "PCIE"), 756.0),
    (("H100",), 989.0),
    (("H200",), 989.0),
    (("A100",), 312.0),
]

WAYS = ("seed", "engine", "engine+prefix", "engine+compile", "engine+prefix+compile", "engine+damage",
        "engine+prefix+damage")
#: Ways on the compiled Scorer (MeasureConfig(compile=True)).
COMPILE_WAYS = ("engine+compile", "engine+prefix+compile")
#: Ways run by default on CPU (compiling the floors' shapes costs minutes on 2 cores).
CPU_DEFAULT_WAYS = tuple(w for w in WAYS if w not in COMPILE_WAYS)
#: Ways that also measure the damage card (KL to the full model, top-1 agreement, KL histogram).
DAMAGE_WAYS = ("engine+damage", "engine+prefix+damage")


# ----------------------------------------------------------------------------- setup


def load(spec: str, device: str | None, dtype: str | None, seed: int = 0) -> LoadedModel:
    if spec not in RANDOM_MODELS:
        return load_model(spec, device=device, dtype=dtype)
    from transformers import AutoConfig, AutoModelForCausalLM

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model_type, kwargs = RANDOM_MODELS[spec]
    config = AutoConfig.for_model(model_type, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    if dt != torch.float32:
        model = model.to(dt)
    model.to(dev).eval().requires_grad_(False)
    context = getattr(config, "n_positions", None) or config.max_position_embeddings
    tokenizer = gpt2_tokenizer(model_max_length=context)
    return LoadedModel(
        model=model, tokenizer=tokenizer, spec=spec, arch=get_arch(model), device=dev, dtype=dt,
        metadata={"source": "random", "seed": seed, "random_init": True},
    )


def pick_layers(arg: str | None, n_layers: int) -> list[int]:
    """``None``/``all``: every layer; ``0,5,9``: those; ``every:3``: 0, 3, 6 ...;
    ``n:12``: 12 layers spread evenly (first and last included)."""
    if arg is None or arg == "all":
        return list(range(n_layers))
    if arg.startswith("every:"):
        return list(range(0, n_layers, int(arg.split(":")[1])))
    if arg.startswith("n:"):
        k = min(int(arg.split(":")[1]), n_layers)
        return sorted({round(i * (n_layers - 1) / max(k - 1, 1)) for i in range(k)})
    layers = sorted({int(x) % n_layers for x in arg.split(",") if x.strip()})
    return layers


def make_variants(n_layers: int, layers: list[int], quant: QuantConfig) -> dict[str, Variant]:
    variants = {"fp": Variant("fp"), "all_quantized": Variant("all_quantized", quant)}
    for i in layers:
        variants[f"protect_L{i}"] = Variant(f"protect_L{i}", quant, ProtectionSpec(layers=(i,)))
    return variants


# ----------------------------------------------------------------------------- measurement


class MemoryProbe:
    """Peak memory during a block: RSS sampled by a thread (CPU) or the CUDA allocator peak."""

    def __init__(self, device: torch.device, base: int, interval: float = 0.002) -> None:
        self.device, self.base, self.interval = device, base, interval
        self.peak = 0

    @staticmethod
    def rss() -> int:
        import psutil

        return psutil.Process().memory_info().rss

    def __enter__(self) -> "MemoryProbe":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._stop = threading.Event()
        self.peak = self.rss()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, self.rss())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def increase(self) -> int:
        return max(0, self.peak - self.base)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        try:  # give freed heap pages back to the OS so that RSS peaks of later ways are comparable
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, process CPU seconds)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - wall, time.process_time() - cpu


# ----------------------------------------------------------------------------- the ways


def seed_way(loaded: LoadedModel, scorer: Scorer, variants: dict[str, Variant]) -> pd.DataFrame:
    """The seeds' loop: restore from a clone, fake-quantize into the parameters, batch-1 forwards."""
    model = loaded.model
    device = scorer.device
    windows = [w for batch in scorer.batches for w in batch]
    clone = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    rows = []
    try:
        with torch.no_grad():
            for name, variant in variants.items():
                model.load_state_dict(clone)
                if not variant.is_baseline:
                    plan = resolve_plan(model, variant.protect, variant.scope)
                    for pname, tplan in plan.tensors.items():
                        param = params[pname]
                        keep = tplan.exclude_mask(param.data)
                        quantized = fake_quantize(param.data, variant.quant, out_dim=tplan.out_dim, exclude=keep)
                        if keep is not None:
                            quantized = torch.where(keep, param.data, quantized)
                        param.copy_(quantized)
                nll = np.zeros(len(scorer.texts))
                for window in windows:
                    ids = torch.tensor([window.ids], device=device)
                    labels = ids.clone()
                    labels[:, : window.first_target] = -100
                    loss = model(ids, labels=labels).loss
                    nll[window.row] += float(loss) * (len(window.ids) - window.first_target)
                frame = pd.DataFrame(scorer.keys)
                frame["nll"] = nll
                frame["n_tokens"] = scorer.n_tokens
                frame["config"] = name
                rows.append(frame)
    finally:
        model.load_state_dict(clone)
        del clone
    return pd.concat(rows, ignore_index=True)


def engine_way(loaded: LoadedModel, scorer: Scorer, variants: dict[str, Variant], prefix: bool, damage: bool):
    engine = None  # run_sweep's default: streaming on CPU, resident on CUDA when memory allows
    return run_sweep(loaded, None, variants, MeasureConfig(damage=damage), engine=engine, scorer=scorer,
                     progress=False, prefix_cache=prefix)


def hf_batches(scorer: Scorer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The scorer's batches as padded (input_ids, attention_mask) on its device; bucketed shapes
    for a scorer compiling static shapes (as its own forward pads them)."""
    from qhelpers.measure.compiled import pad_to_shape, padded_shape

    out = []
    for batch in scorer.batches:
        ids, mask = pad_batch([w.ids for w in batch], scorer.pad_id)
        if scorer.compiled is not None and not scorer.compiled.dynamic:
            shape = padded_shape([len(w.ids) for w in batch], scorer.config.batch_tokens, scorer.config.max_batch,
                                 scorer.config.max_length)
            ids, mask = pad_to_shape(ids, mask, shape, scorer.pad_id)
        out.append((ids.to(scorer.device), mask.to(scorer.device)))
    return out


def hf_floor_pass(forward: Callable[..., Any], batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """A plain HF forward (full logits) of every batch."""
    with torch.no_grad():
        for ids, mask in batches:
            _ = forward(input_ids=ids, attention_mask=mask, use_cache=False).logits


def floor_pass(scorer: Scorer) -> None:
    scorer.score_nll()


def floor_b1_pass(loaded: LoadedModel, scorer: Scorer) -> None:
    with torch.no_grad():
        for batch in scorer.batches:
            for window in batch:
                ids = torch.tensor([window.ids], device=scorer.device)
                labels = ids.clone()
                labels[:, : window.first_target] = -100
                float(loaded.model(ids, labels=labels).loss)


def per_language_nll(scores: pd.DataFrame) -> pd.Series:
    grouped = scores.groupby(["config", "lang"])[["nll", "n_tokens"]].sum()
    return grouped["nll"] / grouped["n_tokens"]


# ----------------------------------------------------------------------------- FLOPs


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def useful_flops(loaded: LoadedModel, scorer: Scorer) -> dict[str, float]:
    model, arch = loaded.model, loaded.arch
    layers = decoder_layers(model, arch)
    non_embedding = sum(p.numel() for p in layers.parameters())
    non_embedding += sum(p.numel() for p in get_module(model, arch.final_norm).parameters())
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    d_attn = heads * head_dim
    lengths = [len(w.ids) for batch in scorer.batches for w in batch]
    tokens = sum(lengths)
    attention = sum(2 * len(layers) * s * (s + 1) * d_attn for s in lengths)
    head = model.get_output_embeddings().weight
    head_flops = 2.0 * head.shape[0] * head.shape[1] * tokens
    return {
        "non_embedding_params": non_embedding,
        "tokens": tokens,
        "dense_flops": 2.0 * non_embedding * tokens,
        "attention_flops": float(attention),
        "head_flops": head_flops,
        "flops_per_config": 2.0 * non_embedding * tokens + attention,
        "flops_per_config_with_head": 2.0 * non_embedding * tokens + attention + head_flops,
    }


def default_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for keys, value in PEAK_TFLOPS:
        if all(k in name for k in keys):
            return value
    return None


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m",
                        help="a load_model spec (embedded:smollm2-135m, tiny:gpt2 ...) or one of: " + ", ".join(RANDOM_MODELS))
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--n-texts", type=int, default=3, help="UDHR paragraphs per language (at most 50)")
    parser.add_argument("--langs", default="seed",
                        help="UDHR languages: seed (the seeds' 7, default), all (61), or a comma-separated list")
    parser.add_argument("--layers", default=None,
                        help="protected-layer variants: all (default), '0,5,9', 'every:3' or 'n:12' (12 spread evenly)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=None, help="tokens per window (default: the model's context, <= 1024)")
    parser.add_argument("--truncate", action="store_true", help="cut texts at --max-length instead of sliding windows")
    parser.add_argument("--batch-tokens", type=int, default=None, help="Scorer token budget (default: 2048 on CPU, from free memory on CUDA)")
    parser.add_argument("--floor-repeats", type=int, default=4,
                        help="timed full-precision passes for the floor, spread before, between and after the ways (median)")
    parser.add_argument("--ways", default=None,
                        help="comma-separated subset of: " + ", ".join(WAYS) + " (default: all on CUDA, all but "
                        "the compiled ways on CPU)")
    parser.add_argument("--compile-shapes", default="dynamic", choices=["dynamic", "static"],
                        help="MeasureConfig.compile_shapes of the compiled ways and the compiled floors (default dynamic)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="Scorer texts per batch (default: MeasureConfig's, 64 on CPU, no cap on CUDA)")
    parser.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD, if any)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU dense fp16/bf16 peak for MFU (default from the device name)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="write the table and details as JSON here")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.ways is None:
        cuda = resolve_device(args.device).type == "cuda"
        args.ways = ",".join(WAYS if cuda else CPU_DEFAULT_WAYS)
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = set(ways) - set(WAYS)
    if unknown:
        raise SystemExit(f"unknown ways {sorted(unknown)}; choose from {', '.join(WAYS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    loaded = load(args.model, args.device, args.dtype)
    device = loaded.device
    langs = {"seed": SEED_LANGS, "all": None}.get(args.langs, [x.strip() for x in args.langs.split(",") if x.strip()])
    corpus = load_corpus("udhr", langs=langs, n_texts=args.n_texts)
    measure = MeasureConfig(max_length=args.max_length, truncate=args.truncate, batch_tokens=args.batch_tokens,
                            max_batch=args.max_batch)
    scorer = corpus_scorer(loaded, corpus, measure)
    compiled_scorer = None
    if any(way in COMPILE_WAYS for way in ways):
        compiled_scorer = corpus_scorer(loaded, corpus, replace(measure, compile=True,
                                                                compile_shapes=args.compile_shapes))
    n_layers = loaded.n_layers
    layers = pick_layers(args.layers, n_layers)
    quant = QuantConfig(method="int", bits=args.bits, symmetric=True, granularity="channel", clipping="absmax")
    variants = make_variants(n_layers, layers, quant)
    n_configs = len(variants)
    fp32_bytes = loaded.fp32_bytes
    release_memory(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
    else:
        base = MemoryProbe.rss()

    header = {
        "model": args.model,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": args.commit or git_commit(),
        "attn_implementation": getattr(loaded.model.config, "_attn_implementation", None),
        "langs": len(corpus.langs) if hasattr(corpus, "langs") else None,
        "description": loaded.describe(),
        "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "n_layers": n_layers,
        "params": loaded.n_params,
        "fp32_model_mb": fp32_bytes / 2**20,
        "texts": len(scorer.texts),
        "tokens_per_config": scorer.total_tokens,
        "batches": [len(b) for b in scorer.batches],
        "batch_tokens": scorer.config.batch_tokens,
        "compile_shapes": args.compile_shapes if compiled_scorer is not None else None,
        "max_batch": scorer.config.max_batch,
        "padded_tokens_per_config": sum(max(len(w.ids) for w in b) * len(b) for b in scorer.batches),
        "max_length": scorer.config.max_length,
        "configs": n_configs,
        "protected_layers": layers,
        "quant": quant.label,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_before": load_before,
        "base_memory_mb": base / 2**20,
    }
    print("sweep benchmark")
    for key, value in header.items():
        print(f"  {key:18s} {value}")

    rows: dict[str, dict[str, Any]] = {}

    def record(name: str, fn: Callable[[], Any], repeats: int = 1, scale: float = 1.0) -> Any:
        times, cpus, result = [], [], None
        release_memory(device)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        with MemoryProbe(device, base) as probe:
            for _ in range(repeats):
                result, wall, cpu = timed(device, fn)
                times.append(wall)
                cpus.append(cpu)
        rows[name] = {
            "wall_s": statistics.median(times) * scale,
            "cpu_s": statistics.median(cpus) * scale,
            "measured_wall_s": times,
            "measured_cpu_s": cpus,
            "peak_mem_mb": probe.increase / 2**20,
            "peak_mem_x_fp32": probe.increase / fp32_bytes,
            "loadavg_1min": [load, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
        }
        if device.type == "cuda":
            rows[name]["peak_allocated_total_x_fp32"] = probe.peak / fp32_bytes
        print(f"  ran {name:14s} {rows[name]['wall_s']:9.2f} s", flush=True)
        return result

    # The floor: plain fp passes in the engine's batches, sampled before, between and after
    # the ways (so that it sees the same machine load), median x configurations.
    floor_samples: list[tuple[float, float]] = []
    floor_peak = [0]

    def sample_floor(count: int) -> None:
        for _ in range(count):
            release_memory(device)
            with MemoryProbe(device, base) as probe:
                _, wall, cpu = timed(device, lambda: floor_pass(scorer))
            floor_samples.append((wall, cpu))
            floor_peak[0] = max(floor_peak[0], probe.increase)
            if "floor-compile" in rows:  # once compiled, its floor too: not only right after compiling
                release_memory(device)
                _, wall, cpu = timed(device, lambda: floor_pass(compiled_scorer))
                rows["floor-compile"]["measured_wall_s"].append(wall)
                rows["floor-compile"]["measured_cpu_s"].append(cpu)

    floor_pass(scorer)  # warm-up (allocator, kernels, lazily installed hooks); not timed
    per_gap = max(1, args.floor_repeats // (len(ways) + 1))
    sample_floor(per_gap)
    if "seed" in ways:
        if device.type == "cuda":
            floor_b1_pass(loaded, scorer)  # warm-up: kernels for every sequence length
        record("floor-b1", lambda: floor_b1_pass(loaded, scorer), repeats=1, scale=n_configs)
    # plain HF forwards at the engine's batch shapes: what the card does without qhelpers code
    batches = hf_batches(scorer)
    hf_floor_pass(loaded.model, batches)  # warm-up
    record("hf-floor", lambda: hf_floor_pass(loaded.model, batches), repeats=max(1, args.floor_repeats // 2),
           scale=n_configs)
    del batches
    compile_s: dict[str, float] = {}
    if compiled_scorer is not None:
        # compile every bucketed shape once (timed apart), then the compiled floor
        floor_pass(compiled_scorer)
        compile_s["floor-compile"] = compiled_scorer.compile_seconds
        record("floor-compile", lambda: floor_pass(compiled_scorer), repeats=max(1, args.floor_repeats // 2),
               scale=n_configs)
        batches = hf_batches(compiled_scorer)
        hf_compiled = torch.compile(loaded.model, dynamic=args.compile_shapes == "dynamic")
        with torch._dynamo.config.patch(recompile_limit=64):
            _, compile_s["hf-floor-compile"], _ = timed(device, lambda: hf_floor_pass(hf_compiled, batches))
            record("hf-floor-compile", lambda: hf_floor_pass(hf_compiled, batches),
                   repeats=max(1, args.floor_repeats // 2), scale=n_configs)
        del batches, hf_compiled

    per_lang: dict[str, pd.Series] = {}
    prefix_stats: dict[str, Any] = {}
    for way in ways:
        if way == "seed":
            scores = record(way, lambda: seed_way(loaded, scorer, variants))
        elif way in COMPILE_WAYS:
            before, seconds = dict(compiled_scorer.compiled.calls), compiled_scorer.compile_seconds
            result = record(way, lambda: engine_way(loaded, compiled_scorer, variants, prefix="prefix" in way,
                                                    damage=False))
            scores = result.scores
            rows[way]["config_s"] = result.seconds
            rows[way]["compiled_calls"] = {k: v - before[k] for k, v in compiled_scorer.compiled.calls.items()}
            # shapes first seen here (none expected: the floor compiled them) count as compile time too
            compile_s[way] = compiled_scorer.compile_seconds - seconds
            if "prefix" in way:
                rows[way]["prefix_stats"] = result.prefix_stats
        else:
            result = record(way, lambda: engine_way(loaded, scorer, variants, prefix="prefix" in way,
                                                    damage=way in DAMAGE_WAYS))
            scores = result.scores
            rows[way]["config_s"] = result.seconds
            if way == "engine+prefix":
                prefix_stats = result.prefix_stats
                rows[way]["run_order"] = result.run_order
        per_lang[way] = per_language_nll(scores)
        sample_floor(per_gap)
    if "floor-compile" in rows:  # the median of every sample, those between the ways included
        row = rows["floor-compile"]
        row["wall_s"] = statistics.median(row["measured_wall_s"]) * n_configs
        row["cpu_s"] = statistics.median(row["measured_cpu_s"]) * n_configs
    rows = {
        "floor": {
            "wall_s": statistics.median(w for w, _ in floor_samples) * n_configs,
            "cpu_s": statistics.median(c for _, c in floor_samples) * n_configs,
            "measured_wall_s": [w for w, _ in floor_samples],
            "measured_cpu_s": [c for _, c in floor_samples],
            "peak_mem_mb": floor_peak[0] / 2**20,
            "peak_mem_x_fp32": floor_peak[0] / fp32_bytes,
        },
        **rows,
    }
    print(f"  floor samples (s per pass): {[round(w, 2) for w, _ in floor_samples]}")
    if "floor-compile" in rows:
        print(f"  compiled floor samples (s per pass): {[round(w, 2) for w in rows['floor-compile']['measured_wall_s']]}")

    floor = rows["floor"]["wall_s"]
    reference = "seed" if "seed" in per_lang else (ways[0] if ways else None)
    flops = useful_flops(loaded, scorer)
    peak_tflops = args.peak_tflops if args.peak_tflops is not None else default_peak_tflops(device)
    for name, row in rows.items():
        row["overhead_vs_floor_pct"] = 100.0 * (row["wall_s"] / floor - 1.0)
        if "seed" in rows and name in ways:
            row["speedup_seed_over_way"] = rows["seed"]["wall_s"] / row["wall_s"]
        if name in per_lang and reference is not None:
            diff = (per_lang[name] - per_lang[reference]).abs().max()
            row["max_abs_diff_lang_nll_vs_" + reference] = float(diff)
        row["tokens_per_s"] = n_configs * flops["tokens"] / row["wall_s"]
        if name in compile_s:
            row["compile_s"] = compile_s[name]
        if peak_tflops:
            row["mfu_pct"] = 100.0 * n_configs * flops["flops_per_config"] / row["wall_s"] / (peak_tflops * 1e12)
            row["mfu_with_head_pct"] = (
                100.0 * n_configs * flops["flops_per_config_with_head"] / row["wall_s"] / (peak_tflops * 1e12)
            )
    for plain, damage in (("engine", "engine+damage"), ("engine+prefix", "engine+prefix+damage")):
        if plain in rows and damage in rows:
            rows[damage]["damage_over_plain"] = rows[damage]["wall_s"] / rows[plain]["wall_s"]
    if "engine" in per_lang and "engine+prefix" in per_lang:
        rows["engine+prefix"]["max_abs_diff_lang_nll_vs_engine"] = float(
            (per_lang["engine+prefix"] - per_lang["engine"]).abs().max()
        )

    # ------------------------------------------------------------------ print
    print()
    mem_label = "peak_alloc_MB" if device.type == "cuda" else "peak_rss+_MB"
    cols = f"{'way':22s} {'wall_s':>9s} {'cpu_s':>9s} {'floor_s':>9s} {'over_%':>8s} {mem_label:>13s} {'x_fp32':>7s} {'seed/way':>9s} {'max|dNLL|':>10s} {'tok/s':>10s}"
    if peak_tflops:
        cols += f" {'MFU_%':>7s} {'MFU+h_%':>7s}"
    print(cols)
    print("-" * len(cols))
    for name, row in rows.items():
        diff = row.get("max_abs_diff_lang_nll_vs_" + str(reference))
        line = (
            f"{name:22s} {row['wall_s']:9.2f} {row['cpu_s']:9.2f} {floor:9.2f} {row['overhead_vs_floor_pct']:8.1f} "
            f"{row['peak_mem_mb']:13.1f} {row['peak_mem_x_fp32']:7.3f} "
            f"{row.get('speedup_seed_over_way', float('nan')):9.2f} "
            f"{diff if diff is not None else float('nan'):10.2e} {row['tokens_per_s']:10.0f}"
        )
        if peak_tflops:
            line += f" {row.get('mfu_pct', float('nan')):7.2f} {row.get('mfu_with_head_pct', float('nan')):7.2f}"
        print(line)
    print()
    print(f"  floor      = median of {len(rows['floor']['measured_wall_s'])} plain fp passes in the engine's batches "
          "(taken before, between and after the ways) x configurations; floor-b1 = one batch-1 pass x configurations")
    print(f"  max|dNLL|  = max over (config, language) of |mean NLL per token - the {reference} way's|")
    if "engine+prefix" in rows and "engine" in per_lang:
        print(f"  engine+prefix vs engine: max|dNLL| = {rows['engine+prefix']['max_abs_diff_lang_nll_vs_engine']:.2e}")
    for way in DAMAGE_WAYS:
        if "damage_over_plain" in rows.get(way, {}):
            print(f"  {way}: damage card costs {rows[way]['damage_over_plain']:.2f}x the plain sweep")
    if prefix_stats:
        run = prefix_stats.get("layers_run", 0)
        skipped = prefix_stats.get("layers_skipped", 0)
        print(
            f"  prefix cache: {skipped} of {run + skipped} layer-batch passes reused "
            f"({100 * skipped / max(1, run + skipped):.1f} %), peak {prefix_stats.get('peak_bytes', 0) / 2**20:.1f} MB "
            f"of a {prefix_stats.get('budget_bytes', 0) / 2**20:.1f} MB budget"
        )
    if compile_s:
        print("  compile s (calls that compiled: a new shape, or a recompilation): "
              + ", ".join(f"{k} {v:.1f}" for k, v in compile_s.items()))
    for way in COMPILE_WAYS:
        recompiled = rows.get(way, {}).get("compiled_calls", {}).get("recompiled", 0)
        if recompiled:
            print(f"  WARNING {way} recompiled known shapes {recompiled} times ({compile_s.get(way, 0):.1f} s "
                  "of its wall time): a guard failed when the engine swapped weights (TORCH_LOGS=recompiles says which)")
    if peak_tflops:
        print(
            f"  useful FLOPs per config = 2*N*T + attention = 2*{flops['non_embedding_params']}*{flops['tokens']} "
            f"+ {flops['attention_flops']:.3e} = {flops['flops_per_config']:.3e}; with the LM head "
            f"{flops['flops_per_config_with_head']:.3e}; peak {peak_tflops} TFLOP/s"
        )

    targets = {}
    if "engine" in rows and "seed" in rows:
        best = min(rows[w]["wall_s"] for w in ("engine", "engine+prefix") if w in rows)
        targets["engine >= 2x faster than seed"] = rows["seed"]["wall_s"] / best >= 2.0
    if "engine" in rows:
        targets["engine overhead <= 10 % (prefix off)"] = rows["engine"]["overhead_vs_floor_pct"] <= 10.0
    if "engine+prefix" in rows:
        targets["engine+prefix below the floor"] = rows["engine+prefix"]["wall_s"] < floor
    if "floor-compile" in rows and "mfu_with_head_pct" in rows["floor-compile"]:  # issue 15's GPU targets
        if args.langs == "all":  # the MFU target is the full corpus's (the seed languages fill 3 small batches)
            targets["compiled floor >= 20 % MFU with the LM head (full corpus)"] = (
                rows["floor-compile"]["mfu_with_head_pct"] >= 20.0)
        if "engine+compile" in rows:
            targets["engine+compile within 10 % of the compiled floor"] = (
                rows["engine+compile"]["wall_s"] <= 1.1 * rows["floor-compile"]["wall_s"])
        if "engine+prefix+compile" in rows:
            targets["engine+prefix+compile below the compiled floor"] = (
                rows["engine+prefix+compile"]["wall_s"] < rows["floor-compile"]["wall_s"])
    if "seed" in rows and device.type == "cuda":
        best = min(rows[w]["wall_s"] for w in rows if w.startswith("engine"))
        targets["seed / best engine way >= 100x (GPU)"] = rows["seed"]["wall_s"] / best >= 100.0
    for way in DAMAGE_WAYS:
        if "damage_over_plain" in rows.get(way, {}) and device.type == "cpu":
            targets[f"{way} <= 1.3x the plain sweep"] = rows[way]["damage_over_plain"] <= 1.3
    for way in ("engine", "engine+prefix"):
        if way in rows and device.type == "cpu":  # the memory target is a CPU one
            targets[f"{way} peak RSS increase <= 1.5x fp32 model"] = rows[way]["peak_mem_x_fp32"] <= 1.5
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"  load average before {load_before} after {load_after} ({os.cpu_count()} CPUs)")
    print()
    for key, ok in targets.items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {key}")

    summary: dict[str, Any] = {}
    for key, name in (("floor_mfu_with_head_pct", "hf-floor"), ("floor_compiled_mfu_with_head_pct", "hf-floor-compile")):
        if name in rows and "mfu_with_head_pct" in rows[name]:
            summary[key] = rows[name]["mfu_with_head_pct"]
    for name in ("floor", "floor-compile", "engine", "engine+prefix", "engine+compile", "engine+prefix+compile"):
        if name in rows and "hf-floor" in rows:
            summary[f"{name}_over_hf_floor_time"] = rows[name]["wall_s"] / rows["hf-floor"]["wall_s"]
    for way in COMPILE_WAYS:
        if way in rows and "hf-floor-compile" in rows:
            summary[f"{way}_over_hf_floor_compile_time"] = rows[way]["wall_s"] / rows["hf-floor-compile"]["wall_s"]
        if way in rows and "floor-compile" in rows:
            summary[f"{way}_overhead_vs_floor_compile_pct"] = 100.0 * (
                rows[way]["wall_s"] / rows["floor-compile"]["wall_s"] - 1.0)
    if summary:
        print()
        for key, value in summary.items():
            print(f"  {key:48s} {value:.3f}")

    report = {
        "header": header,
        **summary,
        "rows": rows,
        "flops": flops,
        "peak_tflops": peak_tflops,
        "prefix_stats": prefix_stats,
        "targets": targets,
        "loadavg_after": load_after,
        "per_language_nll": {way: {f"{c}|{l}": float(v) for (c, l), v in s.items()} for way, s in per_lang.items()},
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        print(f"  wrote {args.out}")
    return report


if __name__ == "__main__":
    main()

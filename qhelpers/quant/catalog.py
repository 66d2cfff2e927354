"""Every quantization method by name: one table, and the spec strings notebooks take as parameters.

Spec grammar (``parse_method``)::

    rtn:<bits>[:g<group>]        round-to-nearest INT, per output channel (or groups of input features)
    nf4 | fp4                    bitsandbytes' 4-bit formats (simulated bit-exactly)
    hqq:<bits>[:g<group>]        HQQ (calibration-free), default group 64
    gguf:<preset>                llama.cpp mixture preset (Q4_K_M, Q3_K_M, Q2_K, Q8_0...) with
                                 llama-quantize's per-tensor rules
    gguf:<type>[:pure]           one GGML type for every matrix (Q4_K, IQ4_NL...), like
                                 ``llama-quantize --pure``; ``:pure`` where the type is also a preset
                                 name (``gguf:Q4_0:pure``)
    awq:<bits>[:g<group>]        AWQ through auto-round (calibrated), default group 128
    signround:<bits>[:g<group>]  SignRound through auto-round (calibrated), default group 128

``calibration`` (``"en"``, a language code, ``"mix"`` or ``None``) applies to the methods that use
text: AWQ and SignRound need it, GGUF uses it for an importance matrix when given.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Any, Callable

from qhelpers.quant.methods import WeightMethod
from qhelpers.quant.quantizers import QuantConfig
from qhelpers.util.errors import ConfigError

__all__ = ["MethodEntry", "CATALOG", "parse_method", "method_family", "catalog_table"]


@dataclass(frozen=True)
class MethodEntry:
    """One method family: how its spec is built, which library implements it, whether it
    calibrates on text."""

    family: str
    description: str
    library: str                 # distribution name (for its version)
    calibration: str             # "no", "yes" or "optional (importance matrix)"
    build: Callable[[list[str], str | None], Any]
    example: str


def _bits_group(args: list[str], spec: str, default_group: int | None) -> tuple[int, int | None]:
    if not args:
        raise ConfigError(f"method {spec!r} needs a bit width, e.g. {spec.split(':')[0]}:4")
    try:
        bits = int(args[0])
    except ValueError as exc:
        raise ConfigError(f"bit width {args[0]!r} of method {spec!r} is not an integer") from exc
    group = default_group
    for extra in args[1:]:
        if extra.startswith("g") and extra[1:].isdigit():
            group = int(extra[1:])
        else:
            raise ConfigError(f"unknown option {extra!r} in method {spec!r}; the only option is g<group size>, e.g. g64")
    return bits, group


def _rtn(args: list[str], calibration: str | None) -> QuantConfig:
    bits, group = _bits_group(args, "rtn:" + ":".join(args), None)
    if group is None:
        return QuantConfig(method="int", bits=bits, symmetric=True, granularity="channel")
    return QuantConfig(method="int", bits=bits, symmetric=True, granularity="group", group_size=group)


def _blockwise(method: str) -> Callable[[list[str], str | None], QuantConfig]:
    def build(args: list[str], calibration: str | None) -> QuantConfig:
        if args:
            raise ConfigError(f"{method} takes no options (it is 4-bit, blocks of 64), got {':'.join([method, *args])!r}")
        return QuantConfig(method=method)
    return build


def _hqq(args: list[str], calibration: str | None) -> WeightMethod:
    bits, group = _bits_group(args, "hqq:" + ":".join(args), 64)
    return importlib.import_module("qhelpers.quant.hqq").HQQMethod(bits=bits, group_size=group)


def _gguf(args: list[str], calibration: str | None) -> WeightMethod:
    gguf = importlib.import_module("qhelpers.quant.gguf")
    pure = len(args) == 2 and args[1].lower() == "pure"
    if len(args) != 1 and not pure:
        raise ConfigError(f"gguf takes one GGML type or llama.cpp preset (and optionally ':pure'), e.g. gguf:Q4_K_M, "
                          f"gguf:Q4_K or gguf:Q4_0:pure, got {args}")
    name = args[0].upper()
    if name in gguf.PRESETS and not pure:
        return gguf.GGUFPreset(preset=name, calibration=calibration)
    return gguf.GGUFType(qtype=name, calibration=calibration)


def _autoround(algorithm: str) -> Callable[[list[str], str | None], WeightMethod]:
    def build(args: list[str], calibration: str | None) -> WeightMethod:
        bits, group = _bits_group(args, f"{algorithm}:" + ":".join(args), 128)
        module = importlib.import_module("qhelpers.quant.autoround")
        return module.AutoRoundMethod(algorithm=algorithm, bits=bits, group_size=group, calibration=calibration or "en")
    return build


#: The method families, in the order tables list them.
CATALOG: dict[str, MethodEntry] = {
    "rtn": MethodEntry("rtn", "round-to-nearest INT, symmetric, per channel or group", "torch", "no", _rtn, "rtn:4"),
    "nf4": MethodEntry("nf4", "bitsandbytes NF4, blocks of 64 (simulated bit-exactly)", "bitsandbytes", "no",
                       _blockwise("nf4"), "nf4"),
    "fp4": MethodEntry("fp4", "bitsandbytes FP4, blocks of 64 (simulated bit-exactly)", "bitsandbytes", "no",
                       _blockwise("fp4"), "fp4"),
    "hqq": MethodEntry("hqq", "Half-Quadratic Quantization (optimised zero and scale per group)", "hqq", "no", _hqq,
                       "hqq:4:g64"),
    "gguf": MethodEntry("gguf", "llama.cpp GGML types and mixture presets with llama-quantize's rules", "libgguf",
                        "optional (importance matrix)", _gguf, "gguf:Q4_K_M"),
    "awq": MethodEntry("awq", "Activation-aware Weight Quantization", "auto-round", "yes", _autoround("awq"), "awq:4"),
    "signround": MethodEntry("signround", "SignRound (signed-gradient rounding), auto-round's default", "auto-round",
                             "yes", _autoround("signround"), "signround:4"),
}


def method_family(spec: str) -> str:
    """The family of a spec (``"gguf:Q4_K_M"`` -> ``"gguf"``)."""
    family = str(spec).strip().split(":")[0].lower()
    if family not in CATALOG:
        hint = " (GPTQ: no maintained GPTQ runs beside torch 2.13 / transformers 5.25 on CPU; see the README)" \
            if family == "gptq" else ""
        raise ConfigError(f"unknown quantization method {spec!r}{hint}; families: {', '.join(CATALOG)} "
                          f"(e.g. {', '.join(e.example for e in CATALOG.values())})")
    return family


def parse_method(spec: str, calibration: str | None = None) -> QuantConfig | WeightMethod:
    """The method a spec string names (grammar in the module docstring). ``calibration``: the
    calibration set for methods that use text (None = English for AWQ/SignRound, no importance
    matrix for GGUF)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"a method spec must be a non-empty string such as 'gguf:Q4_K_M', got {spec!r}")
    family = method_family(spec)
    args = [a for a in spec.strip().split(":")[1:]]
    if calibration in ("none", ""):
        calibration = None
    return CATALOG[family].build(args, calibration)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def catalog_table() -> list[dict[str, str]]:
    """One row per method family: family, description, library and installed version, calibration."""
    return [{"family": e.family, "description": e.description, "library": e.library, "version": _version(e.library),
             "calibration": e.calibration, "example": e.example} for e in CATALOG.values()]

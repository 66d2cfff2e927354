"""Protection strategies as data: the seeds' configuration sets and selection rules.

Each function returns an ordered ``{name: Variant}`` mapping that :func:`qhelpers.sweep.run_sweep`
runs. Protocols:

``seed``
    the seeds' protocol: per-tensor symmetric absmax INT-b on every parameter whose name
    contains ``weight`` (research notes, section 2);
``sound``
    per-channel symmetric INT-b on the linear weights of the decoder blocks.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .engine import Variant
from .errors import ConfigError
from .protection import ProtectionSpec
from .quant import QuantConfig

PROTOCOLS = ("seed", "sound")


def protocol_settings(protocol: str, bits: int = 4) -> tuple[QuantConfig, str]:
    """(quantizer, scope) of a protocol."""
    if protocol == "seed":
        return QuantConfig(method="int", bits=bits, symmetric=True, granularity="tensor", clipping="absmax"), "seed"
    if protocol == "sound":
        return QuantConfig(method="int", bits=bits, symmetric=True, granularity="channel", clipping="absmax"), "linear"
    raise ConfigError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")


def make_variants(
    specs: Mapping[str, Any], quant: QuantConfig, scope: str, extra_protect: Sequence[str] = ()
) -> dict[str, Variant]:
    """Variants from ``{name: protection}``; protection may be a ProtectionSpec, a dict or a
    list of name substrings (the seeds' form). ``extra_protect`` components are added to every
    variant (e.g. the globals that seed 000 never quantized)."""
    out: dict[str, Variant] = {}
    for name, protect in specs.items():
        spec = ProtectionSpec.from_any(protect)
        if extra_protect:
            spec = ProtectionSpec(
                layers=spec.layers,
                components=tuple(dict.fromkeys(spec.components + tuple(extra_protect))),
                patterns=spec.patterns,
                magnitude_fraction=spec.magnitude_fraction,
                random_fraction=spec.random_fraction,
                seed=spec.seed,
            )
        out[name] = Variant(name, quant, spec, scope)
    return out


def exp005_layer_sets(n_layers: int) -> dict[str, dict[str, Any]]:
    """Seed 000's eight configurations as {name: {description, quantized layers}}."""
    if n_layers < 2:
        raise ConfigError(f"EXP-005 needs at least 2 decoder layers, the model has {n_layers}")
    half = n_layers // 2
    last = n_layers - 1
    return {
        "fp16_baseline": {"description": "full precision (no quantization)", "quantized": []},
        "all_quantized": {"description": "all layers quantized", "quantized": list(range(n_layers))},
        "first_protected": {"description": "layer 0 protected", "quantized": list(range(1, n_layers))},
        "last_protected": {"description": "last layer protected", "quantized": list(range(last))},
        "gateway_protected": {"description": "first + last layers protected", "quantized": list(range(1, last))},
        "middle_protected": {"description": "middle layers protected (first/last quantized)", "quantized": [0, last]},
        "first_half_protected": {"description": "first half protected", "quantized": list(range(half, n_layers))},
        "second_half_protected": {"description": "second half protected", "quantized": list(range(half))},
    }


def exp005_variants(n_layers: int, protocol: str = "sound", bits: int = 4) -> dict[str, Variant]:
    """Seed 000's configurations; the baseline is named ``fp``.

    Under the seed protocol only decoder-layer weights are quantized (embeddings, final norm
    and lm_head stay in full precision, as in seed 000's ``quantize_selective``).
    """
    quant, scope = protocol_settings(protocol, bits)
    specs: dict[str, Any] = {}
    for name, entry in exp005_layer_sets(n_layers).items():
        if name == "fp16_baseline":
            continue
        protected = sorted(set(range(n_layers)) - set(entry["quantized"]))
        specs[name] = ProtectionSpec(layers=tuple(protected))
    extra = ("outside_layers",) if protocol == "seed" else ()
    return make_variants(specs, quant, scope, extra_protect=extra)


def index_strategies(n_layers: int, has_biases: bool = True, layer_sweep: Sequence[str] = ("layer", "mlp", "attn")) -> dict[str, ProtectionSpec]:
    """The strategy set of seed 002 (experiment index), generalised to any depth.

    Names follow the index: per-layer sweeps ``L{i}``, ``L{i}.mlp``, ``L{i}.attn``;
    ``L0+L{last}`` and its parts; layer-0 components; biases and norms; embeddings;
    even vs odd layers.
    """
    last = n_layers - 1
    specs: dict[str, ProtectionSpec] = {"none": ProtectionSpec()}
    for i in range(n_layers):
        if "layer" in layer_sweep:
            specs[f"L{i}"] = ProtectionSpec(layers=(i,))
        if "mlp" in layer_sweep:
            specs[f"L{i}.mlp"] = ProtectionSpec(components=(f"L{i}.mlp",))
        if "attn" in layer_sweep:
            specs[f"L{i}.attn"] = ProtectionSpec(components=(f"L{i}.attn",))
    specs.update(
        {
            f"L0+L{last}": ProtectionSpec(layers=(0, last)),
            "L0.qkv": ProtectionSpec(components=("L0.attn_qkv",)),
            "L0.attn_out": ProtectionSpec(components=("L0.attn_out",)),
            "L0.mlp_in": ProtectionSpec(components=("L0.mlp_in",)),
            "L0.mlp_out": ProtectionSpec(components=("L0.mlp_out",)),
            "L0.norm": ProtectionSpec(components=("L0.norm",)),
            f"L0+L{last}+final_norm": ProtectionSpec(layers=(0, last), components=("final_norm",)),
            f"L0+L{last}+all_norms": ProtectionSpec(layers=(0, last), components=("norm", "final_norm")),
            "embed_tokens": ProtectionSpec(components=("embed_tokens",)),
            "all_norms": ProtectionSpec(components=("norm", "final_norm")),
            "even_layers": ProtectionSpec(layers=tuple(range(0, n_layers, 2))),
            "odd_layers": ProtectionSpec(layers=tuple(range(1, n_layers, 2))),
        }
    )
    if has_biases:
        specs[f"L0+L{last}+biases"] = ProtectionSpec(layers=(0, last), components=("bias",))
        specs[f"L0+L{last}+final_norm+biases"] = ProtectionSpec(layers=(0, last), components=("final_norm", "bias"))
    return specs


def equal_overhead_controls(fraction: float, seed: int = 0) -> dict[str, ProtectionSpec]:
    """Random and magnitude-based element protection at a given fraction (seed 002, exp055/056)."""
    return {
        f"random_{fraction:.1%}": ProtectionSpec(random_fraction=fraction, seed=seed),
        f"magnitude_{fraction:.1%}": ProtectionSpec(magnitude_fraction=fraction),
    }


def random_layers(n_layers: int, k: int, seed: int = 0, exclude: Sequence[int] = ()) -> tuple[int, ...]:
    """``k`` distinct random layer indices (fixed seed), a control for chosen layers."""
    pool = [i for i in range(n_layers) if i not in set(exclude)]
    if not 0 < k <= len(pool):
        raise ConfigError(f"cannot pick {k} random layers out of {len(pool)}")
    rng = np.random.default_rng(seed)
    return tuple(sorted(int(i) for i in rng.choice(pool, size=k, replace=False)))


def top_layers_by(values: Mapping[int, float], k: int, largest: bool = True) -> tuple[int, ...]:
    """The ``k`` layers with the largest (or smallest) value, e.g. weight variance (seed 002, exp057)."""
    if not 0 < k <= len(values):
        raise ConfigError(f"k must be between 1 and {len(values)}, got {k}")
    order = sorted(values, key=lambda i: (-values[i] if largest else values[i], i))
    return tuple(sorted(order[:k]))

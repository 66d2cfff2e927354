"""Protection strategies as data: the seeds' configuration sets and selection rules.

Each function returns an ordered ``{name: Variant}`` mapping that :func:`qhelpers.measure.sweep.run_sweep`
runs. Protocols:

``seed``
    the seeds' protocol: per-tensor symmetric absmax INT-b on every parameter whose name
    contains ``weight`` (research notes, section 2);
``sound``
    per-channel symmetric INT-b on the linear weights of the decoder blocks.

Seed 000 (EXP-005): :func:`exp005_layer_sets`, :func:`exp005_variants`. Seed 002 (the
experiment index, notebook ``protection_strategies``): :func:`index_variants` (structural
strategies in groups), :func:`equal_overhead_variants` (random / magnitude / random-layer
controls), :func:`layer_set_variant`, :func:`precision_variants`, :func:`custom_variants`
(the notebook's ``STRATEGIES``), with :func:`sweep_layers`, :func:`wide_scope` and
:func:`qhelpers.measure.scoring.protocol_measure` (how texts are measured under each protocol).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from qhelpers.quant.engine import Variant
from qhelpers.quant.protection import ProtectionSpec
from qhelpers.quant.quantizers import QuantConfig
from qhelpers.util.errors import ConfigError

PROTOCOLS = ("seed", "sound")
LAYER_SWEEPS = ("layer", "mlp", "attn")


def protocol_settings(protocol: str, bits: int = 4) -> tuple[QuantConfig, str]:
    """(quantizer, scope) of a protocol."""
    if protocol == "seed":
        return QuantConfig(method="int", bits=bits, symmetric=True, granularity="tensor", clipping="absmax"), "seed"
    if protocol == "sound":
        return QuantConfig(method="int", bits=bits, symmetric=True, granularity="channel", clipping="absmax"), "linear"
    raise ConfigError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")


def wide_scope(protocol: str) -> str:
    """The scope in which norms and embeddings are quantized too: the seeds' own scope under
    ``seed`` (every ``weight``), ``all`` under ``sound`` (its ``linear`` scope leaves norms
    and embeddings in full precision, so protecting them would be a no-op)."""
    return protocol_settings(protocol)[1] if protocol == "seed" else "all"


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


# ----------------------------------------------------------------------------- seed 002 study


def sweep_layers(n_layers: int, max_layers: int | None = None) -> tuple[int, ...]:
    """Layers visited by a per-layer sweep: every layer, or at most ``max_layers`` evenly
    spaced ones, the first and the last always included."""
    if n_layers < 1:
        raise ConfigError(f"the model needs at least one decoder layer, got {n_layers}")
    if max_layers is None or max_layers >= n_layers:
        return tuple(range(n_layers))
    if max_layers < 2:
        raise ConfigError(f"max_layers must be None or >= 2 (first and last layer), got {max_layers}")
    return tuple(sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, int(max_layers))}))


def _prefixed(scope: str, protocol_scope: str, name: str) -> str:
    return name if scope == protocol_scope else f"{scope}:{name}"


def index_variants(
    n_layers: int,
    protocol: str = "sound",
    bits: int = 4,
    *,
    has_biases: bool = True,
    layer_sweep: Sequence[str] = ("layer",),
    layers: Sequence[int] | None = None,
    detail: str = "quick",
) -> dict[str, dict[str, Variant]]:
    """Seed 002's structural strategies as ``{group: {name: Variant}}`` (names unique overall).

    Groups: ``all quantized`` (``none``); ``per-layer`` (``L{i}``, ``L{i}.mlp``, ``L{i}.attn``
    for the ``layer_sweep`` kinds and ``layers``, default every layer); ``gateway`` (``L0``,
    ``L{last}`` when the sweep lacks them, ``L0+L{last}``); ``layer-0 components``;
    ``norms, biases, embeddings``; ``even/odd``.

    Norm and embedding strategies run in :func:`wide_scope` (a name prefix ``"<scope>:"``
    marks a scope other than the protocol's); bias strategies run in scope ``all`` (biases
    quantized, seed exp039) and only when ``has_biases``. ``detail="quick"`` keeps the
    strategies the study's hypotheses need; ``"full"`` adds the finer layer-0 components and
    the index's norm/bias combinations of its Pareto table.
    """
    if detail not in ("quick", "full"):
        raise ConfigError(f"detail must be 'quick' or 'full', got {detail!r}")
    unknown = sorted(set(layer_sweep) - set(LAYER_SWEEPS))
    if unknown:
        raise ConfigError(f"unknown layer_sweep kinds {unknown}; valid: {', '.join(LAYER_SWEEPS)}")
    quant, scope = protocol_settings(protocol, bits)
    wide = wide_scope(protocol)
    last = n_layers - 1
    layers = tuple(range(n_layers)) if layers is None else tuple(int(i) for i in layers)
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"sweep layers {bad} are outside 0..{last}")
    gate = f"L0+L{last}"

    groups: dict[str, dict[str, Variant]] = {}
    seen: set[str] = set()

    def add(group: str, name: str, spec: ProtectionSpec, in_scope: str = scope) -> None:
        name = _prefixed(in_scope, scope, name)
        if name not in seen:
            seen.add(name)
            groups.setdefault(group, {})[name] = Variant(name, quant, spec, in_scope)

    add("all quantized", "none", ProtectionSpec())
    for i in layers:
        if "layer" in layer_sweep:
            add("per-layer", f"L{i}", ProtectionSpec(layers=(i,)))
        if "mlp" in layer_sweep:
            add("per-layer", f"L{i}.mlp", ProtectionSpec(components=(f"L{i}.mlp",)))
        if "attn" in layer_sweep:
            add("per-layer", f"L{i}.attn", ProtectionSpec(components=(f"L{i}.attn",)))
    add("gateway", "L0", ProtectionSpec(layers=(0,)))
    add("gateway", f"L{last}", ProtectionSpec(layers=(last,)))
    add("gateway", gate, ProtectionSpec(layers=(0, last)))
    add("layer-0 components", "L0.attn", ProtectionSpec(components=("L0.attn",)))
    add("layer-0 components", "L0.mlp", ProtectionSpec(components=("L0.mlp",)))
    if detail == "full":
        for part in ("attn_qkv", "attn_out", "mlp_in", "mlp_out"):
            add("layer-0 components", f"L0.{part}", ProtectionSpec(components=(f"L0.{part}",)))
    extras = "norms, biases, embeddings"
    add(extras, "none", ProtectionSpec(), wide)
    add(extras, "all_norms", ProtectionSpec(components=("norm", "final_norm")), wide)
    add(extras, "embed_tokens", ProtectionSpec(components=("embed_tokens",)), wide)
    if detail == "full":
        add(extras, "L0.norm", ProtectionSpec(components=("L0.norm",)), wide)
        add(extras, f"{gate}+final_norm", ProtectionSpec(layers=(0, last), components=("final_norm",)), wide)
        add(extras, f"{gate}+all_norms", ProtectionSpec(layers=(0, last), components=("norm", "final_norm")), wide)
    if has_biases:
        add(extras, "none", ProtectionSpec(), "all")
        add(extras, "biases", ProtectionSpec(components=("bias",)), "all")
        if detail == "full":
            add(extras, f"{gate}+final_norm+biases", ProtectionSpec(layers=(0, last), components=("final_norm", "bias")), "all")
    add("even/odd", "even_layers", ProtectionSpec(layers=tuple(range(0, n_layers, 2))))
    if n_layers > 1:
        add("even/odd", "odd_layers", ProtectionSpec(layers=tuple(range(1, n_layers, 2))))
    return groups


def equal_overhead_variants(
    fraction: float,
    n_layers: int,
    protocol: str = "sound",
    bits: int = 4,
    *,
    k: int = 2,
    draws: int = 1,
    seed: int = 0,
    exclude: Sequence[int] = (),
) -> dict[str, Variant]:
    """Controls at a given overhead (seed 002, exp055/056): ``random_elements`` and
    ``magnitude_elements`` keep ``fraction`` of the elements of every quantized tensor (random,
    or the largest by magnitude), so the scope keeps the same share in full precision as the
    strategy they control for (pass its ``QuantPlan.scope_kept_fraction``); ``random_layers_<j>``
    protects ``k`` random layers (draw ``j`` uses seed ``seed + j``; ``exclude`` keeps layers out
    of the pool, e.g. the controlled ones)."""
    quant, scope = protocol_settings(protocol, bits)
    out = {
        "random_elements": Variant("random_elements", quant, ProtectionSpec(random_fraction=float(fraction), seed=seed), scope),
        "magnitude_elements": Variant("magnitude_elements", quant, ProtectionSpec(magnitude_fraction=float(fraction)), scope),
    }
    for j in range(int(draws)):
        chosen = random_layers(n_layers, k, seed=seed + j, exclude=exclude)
        out[f"random_layers_{j + 1}"] = Variant(f"random_layers_{j + 1}", quant, ProtectionSpec(layers=chosen), scope)
    return out


def layer_set_variant(name: str, layers: Sequence[int], protocol: str = "sound", bits: int = 4) -> Variant:
    """One variant protecting whole ``layers`` (e.g. the top-k layers by weight variance)."""
    quant, scope = protocol_settings(protocol, bits)
    return Variant(name, quant, ProtectionSpec(layers=tuple(int(i) for i in layers)), scope)


def quantize_only_variant(name: str, layers: Sequence[int], n_layers: int, protocol: str = "sound", bits: int = 4) -> Variant:
    """One variant that quantizes only the decoder ``layers``: every other layer stays in full
    precision, and so do the embeddings, norms outside the blocks and the LM head (which the
    ``seed`` protocol's scope would otherwise quantize)."""
    quant, scope = protocol_settings(protocol, bits)
    keep = tuple(i for i in range(n_layers) if i not in set(int(j) for j in layers))
    extra = ("outside_layers",) if protocol == "seed" else ()
    return make_variants({name: ProtectionSpec(layers=keep)}, quant, scope, extra_protect=extra)[name]


def precision_variants(
    n_layers: int, bits_list: Sequence[int], protocol: str = "sound", skip_bits: int | None = None
) -> dict[str, Variant]:
    """The precision axis (seed 002, exp044): ``int{b}:none`` and ``int{b}:L0+L{last}`` for each
    ``b`` in ``bits_list`` except ``skip_bits`` (the study's own width, already run as ``none``
    and ``L0+L{last}``)."""
    last = n_layers - 1
    out: dict[str, Variant] = {}
    for b in bits_list:
        if skip_bits is not None and int(b) == int(skip_bits):
            continue
        quant, scope = protocol_settings(protocol, int(b))
        out[f"int{b}:none"] = Variant(f"int{b}:none", quant, ProtectionSpec(), scope)
        out[f"int{b}:L0+L{last}"] = Variant(f"int{b}:L0+L{last}", quant, ProtectionSpec(layers=(0, last)), scope)
    return out


def custom_variants(specs: Mapping[str, Any], protocol: str = "sound", bits: int = 4) -> dict[str, Variant]:
    """Variants from user strategies ``{name: protection}`` under a protocol.

    A protection is a list of name substrings (the seeds' form, e.g. ``["h.0."]``), a
    :class:`ProtectionSpec` or a dict of its fields; a dict may also carry ``"scope"`` and
    ``"bits"`` to override the protocol's for that strategy.
    """
    if not isinstance(specs, Mapping) or not specs:
        raise ConfigError(f"STRATEGIES must be a non-empty dict name -> protection, got {specs!r}")
    out: dict[str, Variant] = {}
    for name, protect in specs.items():
        bits_here, scope = bits, None
        if isinstance(protect, Mapping):
            protect = dict(protect)
            scope = protect.pop("scope", None)
            raw_bits = protect.pop("bits", bits)
            try:
                bits_here = int(raw_bits)
            except (TypeError, ValueError):
                bits_here = None
            if bits_here is None or isinstance(raw_bits, bool) or (isinstance(raw_bits, float) and raw_bits != bits_here):
                raise ConfigError(
                    f"strategy {name!r}: bits must be a whole number between 2 and 8, got {raw_bits!r}"
                )
        quant, default_scope = protocol_settings(protocol, bits_here)
        out[str(name)] = Variant(str(name), quant, ProtectionSpec.from_any(protect), scope or default_scope)
    return out

"""What gets quantized and what stays in full precision.

A :class:`ProtectionSpec` names protected layers, components (optionally per layer) and
plain name-substring patterns (the seeds' form). :func:`resolve_plan` turns a spec, a
scope and a model into a :class:`QuantPlan`: the exact tensors (and, for fused q/k/v
projections, the exact output rows) that are quantized, plus the protected fraction of
parameters that the seeds call "overhead".

Scopes:

``linear``
    every linear / Conv1D weight inside the decoder blocks (the realistic default);
``seed``
    every parameter whose name contains ``weight`` (embeddings, norms and a tied
    lm_head included), as the seed experiments did;
``all``
    every parameter, biases included (seed exp039 "biases quantized").
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from qhelpers.models.archs import (
    COMPONENT_GROUPS,
    GLOBAL_COMPONENTS,
    LAYER_COMPONENTS,
    LINEAR_COMPONENTS,
    ArchSpec,
    decoder_layers,
    get_arch,
    get_module,
    normalize_layer_index,
    qkv_rows,
    weight_out_dim,
)
from qhelpers.util.errors import ConfigError

SCOPES = ("linear", "seed", "all")
_QUALIFIED = re.compile(r"^L(-?\d+)\.(\w+)$")


@dataclass(frozen=True)
class ProtectionSpec:
    """Which parameters stay in full precision.

    Args:
        layers: whole decoder layers to protect (negative indices count from the end).
        components: component names, each either global to the model (``"lm_head"``,
            ``"embed_tokens"``, ``"final_norm"`` ...), per layer in every layer
            (``"mlp"``, ``"attn_v"``, ``"norm"``, ``"bias"``) or qualified by a layer
            (``"L0.attn"``, ``"L-1.mlp_out"``). Groups: attn, attn_qkv, mlp, linear,
            embeddings.
        patterns: plain substrings; a parameter whose name contains any of them is
            protected (the seeds' form, e.g. ``"h.0."``, ``"ln_f"``).
        magnitude_fraction: protect this fraction of the largest-magnitude elements of
            every quantized tensor (per tensor).
        random_fraction: protect this fraction of randomly chosen elements of every
            quantized tensor (fixed ``seed``).
        seed: seed of the random selection.
    """

    layers: tuple[int, ...] = ()
    components: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    magnitude_fraction: float = 0.0
    random_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("layers", "components", "patterns"):
            value = getattr(self, name)
            if isinstance(value, (str, int)):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        for index in self.layers:
            if not isinstance(index, int) or isinstance(index, bool):
                raise ConfigError(f"ProtectionSpec.layers must hold ints, got {index!r}")
        for pattern in self.patterns:
            if not isinstance(pattern, str) or not pattern:
                raise ConfigError(f"ProtectionSpec.patterns must be non-empty strings, got {pattern!r}")
        for name in ("magnitude_fraction", "random_fraction"):
            value = getattr(self, name)
            if not 0.0 <= float(value) < 1.0:
                raise ConfigError(f"ProtectionSpec.{name} must be in [0, 1), got {value!r}")
        for component in self.components:
            _parse_component(component)  # validates the name early

    @classmethod
    def from_any(cls, value: Any) -> "ProtectionSpec":
        """Build a spec from None, a spec, a list of name substrings (the seeds' form) or a dict."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            raise ConfigError(
                f"a protection spec cannot be a bare string ({value!r}); pass a list of name "
                f"substrings like [{value!r}] or a dict like {{'components': [{value!r}]}}"
            )
        if isinstance(value, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = set(value) - known
            if unknown:
                raise ConfigError(f"unknown protection keys {sorted(unknown)}; valid keys: {sorted(known)}")
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
        if isinstance(value, Iterable):
            return cls(patterns=tuple(value))
        raise ConfigError(f"cannot build a ProtectionSpec from {type(value).__name__}: {value!r}")

    @property
    def is_empty(self) -> bool:
        return not (self.layers or self.components or self.patterns or self.magnitude_fraction or self.random_fraction)

    def describe(self) -> str:
        """Short human-readable summary."""
        parts = []
        if self.layers:
            parts.append("layers " + ",".join(map(str, self.layers)))
        if self.components:
            parts.append("+".join(self.components))
        if self.patterns:
            parts.append("patterns " + ",".join(repr(p) for p in self.patterns))
        if self.magnitude_fraction:
            parts.append(f"top-{self.magnitude_fraction:.1%} magnitude")
        if self.random_fraction:
            parts.append(f"random {self.random_fraction:.1%} (seed {self.seed})")
        return "; ".join(parts) or "nothing protected"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


def _parse_component(component: str) -> tuple[int | None, tuple[str, ...]]:
    """Split ``"L3.mlp"`` into (3, expanded components); unqualified gives (None, ...)."""
    if not isinstance(component, str):
        raise ConfigError(f"component names are strings, got {component!r}")
    layer: int | None = None
    name = component
    match = _QUALIFIED.match(component)
    if match:
        layer, name = int(match.group(1)), match.group(2)
    if name in COMPONENT_GROUPS:
        expanded = COMPONENT_GROUPS[name]
    elif name in LAYER_COMPONENTS or name in GLOBAL_COMPONENTS:
        expanded = (name,)
    else:
        valid = sorted(set(LAYER_COMPONENTS) | set(GLOBAL_COMPONENTS) | set(COMPONENT_GROUPS))
        raise ConfigError(
            f"unknown component {component!r}; valid names: {', '.join(valid)} "
            "(qualify per-layer ones as 'L<index>.<name>', e.g. 'L0.mlp')"
        )
    if layer is not None and any(c in GLOBAL_COMPONENTS for c in expanded):
        raise ConfigError(f"{name!r} is a model-level component; write it without a layer prefix, not {component!r}")
    return layer, expanded


# ----------------------------------------------------------------------------- plans


@dataclass
class TensorPlan:
    """How one parameter is quantized.

    ``keep_rows`` are output rows (along ``out_dim``) kept in full precision;
    ``keep_mask`` is an element mask kept in full precision. Both may be None.
    """

    name: str
    out_dim: int
    numel: int
    keep_rows: torch.Tensor | None = None
    keep_mask: torch.Tensor | None = None
    mask_key: str = ""

    @property
    def n_kept(self) -> int:
        if self.keep_mask is not None:
            return int(self.keep_mask.sum())
        return 0

    def exclude_mask(self, weight: torch.Tensor) -> torch.Tensor | None:
        """Bool mask (weight's shape) of elements that stay in full precision, or None."""
        if self.keep_rows is None and self.keep_mask is None:
            return None
        mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
        if self.keep_rows is not None:
            mask.index_fill_(self.out_dim if weight.dim() > 1 else 0, self.keep_rows.to(weight.device), True)
        if self.keep_mask is not None:
            mask |= self.keep_mask.to(weight.device)
        return mask


@dataclass
class QuantPlan:
    """The resolved configuration: tensors to quantize and the protection accounting."""

    scope: str
    tensors: dict[str, TensorPlan]
    protected_params: int
    quantized_params: int
    scope_params: int
    total_params: int
    protected_names: list[str] = field(default_factory=list)

    @property
    def protected_fraction(self) -> float:
        """Protected parameters / all parameters (the seeds' "overhead")."""
        return self.protected_params / self.total_params

    @property
    def quantized_fraction(self) -> float:
        """Quantized parameters / all parameters."""
        return self.quantized_params / self.total_params

    @property
    def scope_kept_fraction(self) -> float:
        """Share of the scope left in full precision (what protection saves from quantization)."""
        return 1.0 - self.quantized_params / self.scope_params if self.scope_params else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "n_quantized_tensors": len(self.tensors),
            "quantized_params": self.quantized_params,
            "protected_params": self.protected_params,
            "scope_params": self.scope_params,
            "total_params": self.total_params,
            "protected_fraction": self.protected_fraction,
            "quantized_fraction": self.quantized_fraction,
            "scope_kept_fraction": self.scope_kept_fraction,
        }


def canonical_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``named_parameters()`` with tied parameters listed once (under their first name)."""
    return dict(model.named_parameters())


def _name_of(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in canonical_parameters(model).items()}


def _module_params(module: nn.Module, names: dict[int, str]) -> list[str]:
    return [names[id(p)] for p in module.parameters(recurse=True) if id(p) in names]


def scope_names(model: nn.Module, scope: str, arch: ArchSpec | None = None) -> list[str]:
    """Canonical names of the parameters a scope may quantize."""
    if scope not in SCOPES:
        raise ConfigError(f"unknown scope {scope!r}; valid scopes: {', '.join(SCOPES)}")
    params = canonical_parameters(model)
    if scope == "seed":
        return [n for n in params if "weight" in n]
    if scope == "all":
        return [n for n, p in params.items() if p.is_floating_point()]
    arch = arch or get_arch(model)
    names = _name_of(model)
    out: list[str] = []
    for layer in decoder_layers(model, arch):
        for component in LINEAR_COMPONENTS:
            for path in arch.components.get(component, ()):
                name = names[id(get_module(layer, path).weight)]
                if name not in out:
                    out.append(name)
    return out


def owner_out_dim(model: nn.Module, name: str) -> int:
    """The output-channel dimension of parameter ``name`` (1 for GPT-2's ``Conv1D`` weights, else 0)."""
    module_path, _, attr = name.rpartition(".")
    if attr != "weight":
        return 0
    return weight_out_dim(get_module(model, module_path))


def resolve_plan(
    model: nn.Module,
    protect: ProtectionSpec | Any = None,
    scope: str = "linear",
    arch: ArchSpec | None = None,
) -> QuantPlan:
    """Resolve a protection spec against a model: which tensors (rows) get quantized."""
    spec = ProtectionSpec.from_any(protect)
    arch = arch or get_arch(model)
    params = canonical_parameters(model)
    names = _name_of(model)
    layers = decoder_layers(model, arch)
    n_layers = len(layers)
    in_scope = scope_names(model, scope, arch)

    full: set[str] = set()
    rows: dict[str, list[torch.Tensor]] = {}

    def protect_module_params(module: nn.Module) -> None:
        full.update(_module_params(module, names))

    for index in spec.layers:
        protect_module_params(layers[normalize_layer_index(index, n_layers)])

    for component in spec.components:
        layer_index, expanded = _parse_component(component)
        explicit = len(expanded) == 1
        for name in expanded:
            if name in GLOBAL_COMPONENTS:
                path = arch.global_path(name)
                if path is None and not explicit:
                    continue  # a group member the architecture lacks (e.g. embed_positions in Llama)
                if path is None:
                    raise ConfigError(
                        f"{arch.model_type} has no {name!r} ({GLOBAL_COMPONENTS[name]}); "
                        f"available components: {', '.join(arch.available_components())}"
                    )
                protect_module_params(get_module(model, path))
                continue
            if not arch.has_component(name):
                if explicit:
                    raise ConfigError(
                        f"{arch.model_type} has no {name!r} ({LAYER_COMPONENTS[name]}); "
                        f"available components: {', '.join(arch.available_components())}"
                    )
                continue  # a group member the architecture lacks (e.g. mlp_gate in GPT-2)
            if layer_index is None:
                selected = list(range(n_layers))
            else:
                selected = [normalize_layer_index(layer_index, n_layers)]
            for i in selected:
                _protect_layer_component(model, arch, layers[i], name, names, full, rows)
        if layer_index is None and "bias" in expanded:
            # unqualified "bias" means every bias of the model, final norm included
            full.update(n for n in params if n.endswith("bias"))

    for pattern in spec.patterns:
        matched = [n for n in params if pattern in n]
        if not matched:
            example = next(iter(params))
            raise ConfigError(
                f"protection pattern {pattern!r} matches no parameter of this {arch.model_type} model; "
                f"parameter names look like {example!r} (list them with model.named_parameters())"
            )
        full.update(matched)

    tensors: dict[str, TensorPlan] = {}
    kept_rows: dict[str, torch.Tensor] = {}
    for name, parts in rows.items():
        if name in full:
            continue
        weight = params[name]
        out_dim = owner_out_dim(model, name) if weight.dim() > 1 else 0
        keep = torch.unique(torch.cat(parts))
        if len(keep) == weight.shape[out_dim]:
            full.add(name)
        else:
            kept_rows[name] = keep

    quantized = 0
    for name in in_scope:
        if name in full:
            continue
        weight = params[name]
        plan = TensorPlan(name=name, out_dim=owner_out_dim(model, name), numel=weight.numel())
        if name in kept_rows:
            plan.keep_rows = kept_rows[name]
            plan.mask_key = f"rows{len(plan.keep_rows)}:{zlib.crc32(plan.keep_rows.numpy().tobytes())}"
        if spec.magnitude_fraction or spec.random_fraction:
            plan.keep_mask = _element_mask(weight, plan, spec, name)
            plan.mask_key += f"|mag{spec.magnitude_fraction}|rand{spec.random_fraction}:{spec.seed}"
        mask = plan.exclude_mask(weight.detach())
        tensors[name] = plan
        quantized += weight.numel() - (int(mask.sum()) if mask is not None else 0)

    protected = sum(params[n].numel() for n in full)
    for name, keep in kept_rows.items():
        weight = params[name]
        if name not in tensors:  # out of scope: only the protected rows count
            protected += len(keep) * (weight.numel() // weight.shape[owner_out_dim(model, name) if weight.dim() > 1 else 0])
    protected += sum(params[n].numel() for n in tensors) - quantized
    return QuantPlan(
        scope=scope,
        tensors=tensors,
        protected_params=protected,
        quantized_params=quantized,
        scope_params=sum(params[n].numel() for n in in_scope),
        total_params=sum(p.numel() for p in params.values()),
        protected_names=sorted(full),
    )


def _protect_layer_component(
    model: nn.Module,
    arch: ArchSpec,
    layer: nn.Module,
    component: str,
    names: dict[int, str],
    full: set[str],
    rows: dict[str, list[torch.Tensor]],
) -> None:
    if component == "bias":
        full.update(names[id(p)] for n, p in layer.named_parameters() if n.endswith("bias") and id(p) in names)
        return
    for path in arch.components[component]:
        module = get_module(layer, path)
        fused = arch.fused_qkv is not None and path == arch.fused_qkv.module and component in ("attn_q", "attn_k", "attn_v")
        if not fused:
            full.update(_module_params(module, names))
            continue
        part = component[-1]
        out_dim = weight_out_dim(module)
        keep = qkv_rows(arch, model, part, module.weight.shape[out_dim])
        rows.setdefault(names[id(module.weight)], []).append(keep)
        if getattr(module, "bias", None) is not None:
            rows.setdefault(names[id(module.bias)], []).append(keep)


def _element_mask(weight: torch.Tensor, plan: TensorPlan, spec: ProtectionSpec, name: str) -> torch.Tensor:
    """Element mask of magnitude- and/or randomly-protected entries (same shape as weight)."""
    flat = weight.detach().reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if spec.magnitude_fraction:
        k = int(round(spec.magnitude_fraction * flat.numel()))
        if k:
            mask[torch.topk(flat.abs().float().cpu(), k).indices] = True
    if spec.random_fraction:
        k = int(round(spec.random_fraction * flat.numel()))
        if k:
            generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + zlib.crc32(name.encode()))
            mask[torch.randperm(flat.numel(), generator=generator)[:k]] = True
    return mask.reshape(weight.shape)

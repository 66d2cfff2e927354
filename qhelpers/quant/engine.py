"""Apply a quantization configuration to a loaded model, measure, restore.

The model's own weight tensors are never overwritten. Applying a :class:`Variant`
attaches forward hooks to the modules that own the quantized parameters; during each
forward pass a hook swaps in the dequantized tensor (from a compact cache of integer
codes) and swaps the original back when the module returns. Restoring removes the hooks,
so every tensor is bit-identical to the loaded one by construction, and nothing is
reloaded or copied.

Memory: the model (1x) + cached codes (1 byte per quantized element, bounded by
``cache_fraction`` of the fp32 model size, least recently used evicted) + one module's
dequantized weight at a time. ``resident=True`` trades memory for speed: dequantized
tensors stay swapped in until ``restore()`` (no per-forward dequantization).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from qhelpers.models.archs import ArchSpec, get_arch
from qhelpers.models.loaded import as_module
from qhelpers.quant.protection import (
    SCOPES,
    ProtectionSpec,
    QuantPlan,
    TensorPlan,
    canonical_parameters,
    resolve_plan,
)
from qhelpers.quant.methods import Encoded, TensorRole, WeightMethod, tensor_roles
from qhelpers.quant.quantizers import QuantConfig, quantize
from qhelpers.util.errors import ConfigError


@dataclass(frozen=True)
class Variant:
    """One experiment configuration: how to quantize and what to protect.

    ``quant=None`` is the full-precision baseline; ``quant`` is a round-to-nearest / NF4
    :class:`~qhelpers.quant.quantizers.QuantConfig` or any :class:`~qhelpers.quant.methods.WeightMethod`
    (GGUF k-quants, HQQ, AWQ, SignRound...).
    """

    name: str
    quant: QuantConfig | WeightMethod | None = None
    protect: ProtectionSpec = field(default_factory=ProtectionSpec)
    scope: str = "linear"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a Variant needs a non-empty name, got {self.name!r}")
        if self.scope not in SCOPES:
            raise ConfigError(f"unknown scope {self.scope!r} in variant {self.name!r}; valid: {', '.join(SCOPES)}")
        object.__setattr__(self, "protect", ProtectionSpec.from_any(self.protect))
        if self.quant is not None and not isinstance(self.quant, (QuantConfig, WeightMethod)):
            raise ConfigError(f"Variant.quant must be a QuantConfig, a WeightMethod (qhelpers.quant.methods) or None, "
                              f"got {type(self.quant).__name__}")

    @property
    def is_baseline(self) -> bool:
        return self.quant is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "quant": None if self.quant is None else self.quant.to_dict(),
            "protect": self.protect.to_dict(),
            "scope": self.scope,
        }


@dataclass
class _Entry:
    qtensor: Encoded
    keep: torch.Tensor | None  # bool mask of elements restored from the original

    @property
    def nbytes(self) -> int:
        return self.qtensor.nbytes + (self.keep.numel() if self.keep is not None else 0)

    def materialize(self, original: torch.Tensor) -> torch.Tensor:
        weight = self.qtensor.dequantize()
        if self.keep is not None:
            weight = torch.where(self.keep, original, weight)
        return weight


class QuantEngine:
    """Applies :class:`Variant` s to one loaded model and restores it.

    Args:
        model: a causal LM (or a :class:`~qhelpers.models.loading.LoadedModel`).
        cache_fraction: memory budget of the code cache, as a fraction of the fp32
            model size.
        resident: keep dequantized tensors swapped in while a variant is applied
            (faster, needs memory for every quantized tensor). A resident engine also keeps the
            dequantized tensors it swapped in, up to ``dense_fraction`` of the model's parameter
            bytes, so that applying a variant again (or another one that quantizes a tensor the
            same way) runs no tensor operation at all (dequantizing took ~8 small operations per
            tensor, 1.7k per SmolLM2 variant: on a GPU, as many kernel launches). Kept tensors are
            what the parameters hold while a variant is applied: do not modify parameters in
            place then.
        dense_fraction: budget of those kept tensors (0 keeps none). Tensors that do not fit are
            dequantized at each application, as without the budget; nothing kept is evicted
            (variants reuse tensors in a cycle, where least-recently-used eviction would keep
            nothing that is used again).
    """

    def __init__(self, model: Any, cache_fraction: float = 0.3, resident: bool = False,
                 dense_fraction: float = 1.0) -> None:
        self.model: nn.Module = as_module(model)
        self.tokenizer = getattr(model, "tokenizer", None)  # a LoadedModel's, for calibrated methods
        self.arch: ArchSpec = get_arch(self.model)
        self.params = canonical_parameters(self.model)
        self.fp32_bytes = 4 * sum(p.numel() for p in self.params.values())
        self.cache_budget = int(cache_fraction * self.fp32_bytes)
        self.resident = resident
        if dense_fraction < 0:
            raise ConfigError(f"dense_fraction must be >= 0, got {dense_fraction}")
        self.dense_budget = int(dense_fraction * sum(p.numel() * p.element_size() for p in self.params.values()))
        self._dense: dict[tuple, torch.Tensor] = {}
        self._dense_bytes = 0
        #: parameter name -> the (module, attribute) pairs that hold it (tied weights have several)
        self.owners = self._find_owners()
        self._cache: OrderedDict[tuple, _Entry] = OrderedDict()
        self._cache_bytes = 0
        self._plans: dict[tuple, QuantPlan] = {}
        self._roles: dict[str, TensorRole] | None = None
        self._prepared: dict[WeightMethod, Any] = {}
        #: storage bits of every tensor ever encoded (kept after its codes are evicted, so sizes
        #: never cost a second quantization)
        self._storage_bits: dict[tuple, int] = {}
        self._handles: list[Any] = []
        self._swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.active: Variant | None = None
        self.counters = {"quantized": 0, "cache_hits": 0, "evicted": 0, "dense_hits": 0}

    # ------------------------------------------------------------------ planning
    def _find_owners(self) -> dict[str, list[tuple[nn.Module, str]]]:
        by_id = {id(p): n for n, p in self.params.items()}
        owners: dict[str, list[tuple[nn.Module, str]]] = {}
        for module in self.model.modules():
            for attr, param in module._parameters.items():
                if param is not None and id(param) in by_id:
                    owners.setdefault(by_id[id(param)], []).append((module, attr))
        return owners

    def plan(self, variant: Variant) -> QuantPlan:
        """The resolved :class:`QuantPlan` of a variant (cached)."""
        key = (variant.protect, variant.scope)
        if key not in self._plans:
            self._plans[key] = resolve_plan(self.model, variant.protect, variant.scope, self.arch)
        return self._plans[key]

    def overhead(self, variant: Variant) -> dict[str, Any]:
        """Protection accounting of a variant (protected fraction = the seeds' overhead)."""
        if variant.is_baseline:
            total = sum(p.numel() for p in self.params.values())
            return {"scope": variant.scope, "protected_fraction": 1.0, "quantized_fraction": 0.0,
                    "quantized_params": 0, "total_params": total}
        return self.plan(variant).summary()

    # ------------------------------------------------------------------ cache
    @property
    def roles(self) -> dict[str, TensorRole]:
        """The :class:`~qhelpers.quant.methods.TensorRole` of every parameter (computed once)."""
        if self._roles is None:
            self._roles = tensor_roles(self.model, self.arch)
        return self._roles

    def _encode(self, quant: QuantConfig | WeightMethod, weight: torch.Tensor, tplan: TensorPlan,
                keep: torch.Tensor | None) -> Encoded:
        if isinstance(quant, QuantConfig):
            return quantize(weight, quant, out_dim=tplan.out_dim, exclude=keep)
        if quant not in self._prepared:
            if self._swapped or self._handles:  # prepare() must see the loaded weights (calibration forwards)
                raise ConfigError(f"cannot prepare {quant.label} while variant {self.active.name if self.active else '?'} "
                                  "is applied; restore() first (or prepare it before applying another)")
            self._prepared[quant] = quant.prepare(self.model, self.roles, self.tokenizer)
        return quant.encode(weight, self.roles[tplan.name], keep, self._prepared[quant])

    def bits_per_weight(self, variant: Variant) -> float:
        """Storage bits per quantized weight of ``variant`` (codes, scales, minimums and headers of
        its format; protected elements excluded from neither count: they are stored quantized too
        in a deployable file and kept beside it)."""
        if variant.is_baseline:
            raise ConfigError("the full-precision baseline has no quantized weights")
        plan = self.plan(variant)
        total = sum(tplan.numel for tplan in plan.tensors.values())
        if total == 0:
            raise ConfigError(f"variant {variant.name!r} quantizes no tensor: bits per weight is undefined")
        bits = 0
        for name, tplan in plan.tensors.items():
            key = (name, variant.quant, tplan.mask_key)
            if key not in self._storage_bits:
                self._entry(variant.quant, tplan)
            bits += self._storage_bits[key]
        return bits / total

    def _entry(self, quant: QuantConfig | WeightMethod, tplan: TensorPlan) -> _Entry:
        key = (tplan.name, quant, tplan.mask_key)
        entry = self._cache.get(key)
        if entry is not None:
            self._cache.move_to_end(key)
            self.counters["cache_hits"] += 1
            return entry
        weight = self.params[tplan.name].detach()
        keep = tplan.exclude_mask(weight)
        entry = _Entry(self._encode(quant, weight, tplan, keep), keep)
        self._storage_bits[key] = int(entry.qtensor.storage_bits)
        self.counters["quantized"] += 1
        self._cache[key] = entry
        self._cache_bytes += entry.nbytes
        while self._cache_bytes > self.cache_budget and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes
            self.counters["evicted"] += 1
        return entry

    @property
    def cache_bytes(self) -> int:
        return self._cache_bytes

    @property
    def dense_bytes(self) -> int:
        """Bytes of the dequantized tensors a resident engine keeps (see ``dense_fraction``)."""
        return self._dense_bytes

    def clear_cache(self) -> None:
        """Drop every cached quantized tensor (and every kept dequantized one)."""
        self._cache.clear()
        self._cache_bytes = 0
        self._dense.clear()
        self._dense_bytes = 0

    def _dense_weight(self, quant: QuantConfig | WeightMethod, tplan: TensorPlan, original: torch.Tensor) -> torch.Tensor:
        """The dequantized tensor of ``tplan`` under ``quant``: kept from an earlier application,
        or made now (and kept where the budget allows)."""
        key = (tplan.name, quant, tplan.mask_key)
        dense = self._dense.get(key)
        if dense is not None:
            self.counters["dense_hits"] += 1
            return dense
        dense = self._entry(quant, tplan).materialize(original)
        size = dense.numel() * dense.element_size()
        if self._dense_bytes + size <= self.dense_budget:
            self._dense[key] = dense
            self._dense_bytes += size
        return dense

    # ------------------------------------------------------------------ apply / restore
    def apply(self, variant: Variant) -> QuantPlan | None:
        """Quantize according to ``variant`` until :meth:`restore`."""
        if self.active is not None:
            raise ConfigError(
                f"variant {self.active.name!r} is still applied; call restore() (or use "
                "`with engine.applied(variant):`) before applying another"
            )
        self.active = variant
        if variant.is_baseline:
            return None
        plan = self.plan(variant)
        try:
            by_module: dict[nn.Module, list[tuple[str, _Entry]]] = {}
            for name, tplan in plan.tensors.items():
                if self.resident:
                    param = self.params[name]
                    original = param.data
                    weight = self._dense_weight(variant.quant, tplan, original)  # before the swap: a
                    self._swapped.append((param, original))  # method's prepare() must see loaded weights
                    param.data = weight
                    continue
                entry = self._entry(variant.quant, tplan)
                for module, attr in self.owners[name]:
                    by_module.setdefault(module, []).append((attr, entry))
            for module, items in by_module.items():
                self._hook(module, items)
        except BaseException:
            self.restore()
            raise
        return plan

    def _hook(self, module: nn.Module, items: list[tuple[str, _Entry]]) -> None:
        saved: list[torch.Tensor] = []

        def swap_in(mod: nn.Module, args: Any) -> None:
            for attr, entry in items:
                param = mod._parameters[attr]
                saved.append(param.data)
                param.data = entry.materialize(param.data)

        def swap_out(mod: nn.Module, args: Any, output: Any) -> None:
            for (attr, _), original in zip(items, saved):
                mod._parameters[attr].data = original
            saved.clear()

        self._handles.append(module.register_forward_pre_hook(swap_in))
        self._handles.append(module.register_forward_hook(swap_out, always_call=True))

    def restore(self) -> None:
        """Remove the applied variant; every parameter is its original tensor again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for param, original in reversed(self._swapped):
            param.data = original
        self._swapped.clear()
        self.active = None

    @contextlib.contextmanager
    def applied(self, variant: Variant) -> Iterator[QuantPlan | None]:
        """Context manager: apply on entry, restore on exit (also on errors)."""
        plan = self.apply(variant)
        try:
            yield plan
        finally:
            self.restore()

    def original_tensor(self, name: str) -> torch.Tensor:
        """The loaded tensor of parameter ``name`` (also while a resident variant has swapped a
        dequantized one in)."""
        param = self.params[name]
        for swapped, original in self._swapped:
            if swapped is param:
                return original
        return param.data

    def quantized_weights(self, variant: Variant) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, dequantized tensor) for each tensor the variant quantizes (for analyses)."""
        if variant.is_baseline:
            return
        for name, tplan in self.plan(variant).tensors.items():
            yield name, self._entry(variant.quant, tplan).materialize(self.params[name].detach())

"""Quantization methods beyond round-to-nearest: the interface every backend implements.

A *method* is a frozen, hashable configuration (like :class:`~qhelpers.quant.quantizers.QuantConfig`)
that turns one weight tensor into an :class:`Encoded` tensor: something that dequantizes back to
the tensor's shape and dtype and knows how many bits its deployable form takes. The
:class:`~qhelpers.quant.engine.QuantEngine` applies methods exactly as it applies ``QuantConfig``:
protection specs, the prefix cache and sweeps work unchanged, and restoring leaves every loaded
tensor bit-identical.

Two kinds of method:

* *per-tensor* (GGUF k-quants, HQQ): :meth:`WeightMethod.encode` sees one tensor and its
  :class:`TensorRole` (component, layer), which is what llama.cpp's per-tensor type rules need;
* *calibrated, model-level* (AWQ, SignRound, GPTQ): :meth:`WeightMethod.prepare` runs once per
  engine on the whole model (and calibration text) and returns what ``encode`` then looks up.
  ``prepare`` must leave the model's weights as it found them.

Bits per weight (``QuantEngine.bits_per_weight``) counts everything the deployable format stores (codes,
scales, minimums, super-block headers), the way llama.cpp reports a GGUF file's size, so methods
are compared at equal size.
"""
from __future__ import annotations

import abc
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

from qhelpers.models.archs import ArchSpec, LINEAR_COMPONENTS, decoder_layers, get_arch, get_module
from qhelpers.quant.protection import canonical_parameters, owner_out_dim
from qhelpers.util.errors import ConfigError

__all__ = ["TensorRole", "tensor_roles", "Encoded", "DenseEncoded", "WeightMethod"]


@dataclass(frozen=True)
class TensorRole:
    """Where a parameter sits in the model.

    ``component``: a per-layer linear component (``attn_q``, ``attn_k``, ``attn_v``,
    ``attn_out``, ``mlp_in``, ``mlp_gate``, ``mlp_out``), ``embed_tokens``, ``lm_head``, or None
    (norms, biases, anything the architecture table does not name). ``layer``: the decoder layer
    (None for globals). ``out_dim``: the output-channel dimension (0 for ``nn.Linear``, 1 for
    GPT-2's ``Conv1D``); a row of the quantized matrix is one output channel's input weights.
    ``fused``: the components sharing this tensor (GPT-2's ``c_attn`` holds q, k and v).
    """

    name: str
    component: str | None
    layer: int | None
    n_layers: int
    out_dim: int
    fused: tuple[str, ...] = ()


def tensor_roles(model: nn.Module, arch: ArchSpec | None = None) -> dict[str, TensorRole]:
    """The :class:`TensorRole` of every canonical parameter of ``model`` (from the architecture
    table, :mod:`qhelpers.models.archs`; tied weights appear once, under their first name)."""
    arch = arch or get_arch(model)
    params = canonical_parameters(model)
    by_id = {id(p): n for n, p in params.items()}
    layers = decoder_layers(model, arch)
    n_layers = len(layers)
    found: dict[str, tuple[list[str], int | None]] = {}
    for index, layer in enumerate(layers):
        for component in LINEAR_COMPONENTS:
            for path in arch.components.get(component, ()):
                weight = getattr(get_module(layer, path), "weight", None)
                if weight is None or id(weight) not in by_id:
                    continue
                comps, _ = found.setdefault(by_id[id(weight)], ([], index))
                if component not in comps:
                    comps.append(component)
    for component in ("embed_tokens", "lm_head"):
        path = arch.global_path(component)
        if not path:
            continue
        try:
            weight = get_module(model, path).weight
        except (AttributeError, ConfigError):
            continue
        if id(weight) in by_id and by_id[id(weight)] not in found:
            found[by_id[id(weight)]] = ([component], None)
    roles: dict[str, TensorRole] = {}
    for name in params:
        comps, layer = found.get(name, ([], None))
        roles[name] = TensorRole(name, comps[0] if comps else None, layer, n_layers, owner_out_dim(model, name),
                                 tuple(comps) if len(comps) > 1 else ())
    return roles


@runtime_checkable
class Encoded(Protocol):
    """A quantized tensor: ``dequantize()`` gives it back (original shape and dtype), ``nbytes``
    is the memory this object holds, ``storage_bits`` the size of its deployable form."""

    def dequantize(self) -> torch.Tensor: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def storage_bits(self) -> int: ...


@dataclass
class DenseEncoded:
    """An already dequantized tensor (what a library hands back), with the bit count of the
    format it stands for."""

    weight: torch.Tensor
    bits: int

    def dequantize(self) -> torch.Tensor:
        return self.weight

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    @property
    def storage_bits(self) -> int:
        return int(self.bits)


class WeightMethod(abc.ABC):
    """A quantization method. Subclasses are frozen dataclasses (hashable: the engine caches
    encoded tensors under ``(name, method)``), validate their fields in ``__post_init__`` and
    raise :class:`~qhelpers.util.errors.ConfigError` naming the problem and the fix."""

    #: whether the method needs calibration text (AWQ, SignRound, GPTQ, an importance matrix)
    needs_calibration: bool = False

    @property
    @abc.abstractmethod
    def label(self) -> str:
        """Short name for tables, e.g. ``gguf-Q4_K_M``, ``hqq4-g64``."""

    def prepare(self, model: nn.Module, roles: Mapping[str, TensorRole], tokenizer: Any = None) -> Any:
        """Model-level work done once per engine (calibration); the result is passed to every
        :meth:`encode`. ``tokenizer`` is the loaded model's (None when the engine was given a bare
        module: a calibrated method then raises a ConfigError asking for the LoadedModel). Must
        leave the model's weights unchanged. Default: nothing."""
        return None

    @abc.abstractmethod
    def encode(self, weight: torch.Tensor, role: TensorRole, exclude: torch.Tensor | None, prepared: Any) -> Encoded:
        """Quantize ``weight`` (a detached parameter tensor). ``exclude``: elements the caller keeps
        in full precision (zero them before computing any scale; their codes are ignored)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields, with the method's class name under ``backend``."""
        out = {"backend": type(self).__name__}
        out.update({k: v for k, v in asdict(self).items() if not k.startswith("_")})  # type: ignore[call-overload]
        return out


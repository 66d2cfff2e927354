"""HQQ (Half-Quadratic Quantization, ``hqq`` 0.2.8) as a per-tensor, calibration-free method.

:class:`HQQMethod` calls ``hqq.core.quantize.Quantizer.quantize`` / ``Quantizer.dequantize``
directly (transformers 5.25's ``HqqConfig`` raises NotImplementedError), with the settings of
hqq's own ``BaseQuantizeConfig`` (the configuration ``HQQLinear`` and transformers use):
``channel_wise=True``, ``round_zero=True`` for 4 bits only, zeros and scales not quantized.

What hqq does with a weight ``W`` (read from hqq's source, ``core/quantize.py`` and
``core/optimize.py``):

* Groups: ``axis=1`` reshapes the row-major weight to ``[numel / group_size, group_size]``
  (a group = ``group_size`` consecutive input weights of one output row, when the row length
  is a multiple of ``group_size``; otherwise groups run on into the next row, as in hqq);
  ``axis=0`` reshapes it to ``[group_size, numel / group_size]`` and groups are the columns.
  ``numel`` must be a multiple of ``group_size``.
* Asymmetric min-max start: ``s = (2**b - 1) / (max - min)``, ``z = -min * s`` per group;
  with ``optimize=True`` the zero-point is then refined by a half-quadratic proximal solver
  for the l_p error (p = 0.7) with the scale fixed, for at most 20 iterations, stopping when
  the mean absolute error stops falling; codes ``q = clamp(round(W * s + z), 0, 2**b - 1)``.
  The solver has no guarantee of beating plain min-max rounding (it may stop one step past its
  best mean error); on heavy-tailed weights it lowers the mean absolute error (tests check it).
* On CPU the solver runs in float32, on CUDA in float16 (``device`` is the weight's device),
  so results depend on the device. On CPU it is deterministic.
* Storage (``HQQLinear``): codes bit-packed (8 bits: one byte; 4 bits: two per byte; 2 bits:
  four per byte; 3 bits: ten per int32 word, rows of the code matrix padded to a multiple of
  10), plus one scale (stored as ``1 / s``) and one zero per group in the compute dtype
  (float16 by default; ``HQQLinear.cuda()`` casts them). 4 bits with groups of 64:
  ``4 + 2 * 16 / 64 = 4.5`` bits per weight; 3 bits: 3.2 bits per code before padding.
* Dequantization: ``(q - z) * (1 / s)`` computed in the compute dtype, reshaped back.

Orientation: a row of the matrix hqq sees is one output channel (``TensorRole.out_dim``; GPT-2's
``Conv1D`` [in, out] is transposed first), as if the layer were an ``nn.Linear`` given to
``HQQLinear``. Excluded elements are set to 0 before quantizing.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from qhelpers.quant.methods import TensorRole, WeightMethod
from qhelpers.util.errors import ConfigError

__all__ = ["HQQ_BITS", "HQQ_COMPUTE_DTYPES", "HQQMethod", "HQQEncoded"]

#: Bit widths offered (hqq also has 1, 1.58, 5 and 6; its 5 and 6 bits are stored as bytes).
HQQ_BITS: tuple[int, ...] = (2, 3, 4, 8)

#: Compute dtypes: the dtype hqq keeps scales and zeros in and dequantizes with.
HQQ_COMPUTE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _packed_code_bits(bits: int, rows: int, cols: int) -> int:
    """Bits of hqq's bit-packed codes of a ``[rows, cols]`` code matrix (packing runs along rows)."""
    if bits == 3:  # "3bit_32": ten 3-bit codes per int32, rows zero-padded to a multiple of 10
        return math.ceil(rows / 10) * cols * 32
    return rows * cols * bits


@dataclass
class HQQEncoded:
    """One tensor quantized by hqq: unpacked codes (one byte each) and hqq's meta dictionary
    (scale ``1 / s`` and zero per group, in the compute dtype)."""

    codes: torch.Tensor
    meta: dict[str, Any]
    out_dim: int
    shape: torch.Size
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        from hqq.core.quantize import Quantizer

        rows = Quantizer.dequantize(self.codes, self.meta)  # hqq's own (q - z) * scale, reshaped
        return _from_rows(rows, self.out_dim, self.shape).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.meta["scale"], self.meta["zero"]))

    @property
    def storage_bits(self) -> int:
        rows, cols = self.codes.shape
        meta_bits = sum(8 * t.numel() * t.element_size() for t in (self.meta["scale"], self.meta["zero"]))
        return _packed_code_bits(int(self.meta["nbits"]), rows, cols) + meta_bits


def _to_rows(weight: torch.Tensor, out_dim: int) -> torch.Tensor:
    """The weight with output channels as rows (``[C, K]``; 0-D/1-D tensors unchanged)."""
    if weight.ndim < 2:
        return weight
    moved = weight.movedim(out_dim, 0)
    return moved.reshape(moved.shape[0], -1).contiguous()


def _from_rows(rows: torch.Tensor, out_dim: int, shape: torch.Size) -> torch.Tensor:
    if len(shape) < 2:
        return rows.reshape(shape)
    moved_shape = (shape[out_dim],) + tuple(s for i, s in enumerate(shape) if i != out_dim)
    return rows.reshape(moved_shape).movedim(0, out_dim)


@dataclass(frozen=True)
class HQQMethod(WeightMethod):
    """HQQ at ``bits`` (2, 3, 4, 8) with groups of ``group_size`` (a multiple of 8, as hqq's
    ``BaseQuantizeConfig`` requires) along ``axis`` (1: along a row's input weights, hqq's
    default for its fast kernels; 0: along columns of the reshaped weight). ``optimize``: run
    hqq's zero-point solver (False: plain min-max rounding). ``compute_dtype``: dtype of the
    stored scales and zeros and of dequantization (``HQQLinear``'s default is float16)."""

    bits: int = 4
    group_size: int = 64
    axis: int = 1
    optimize: bool = True
    compute_dtype: str = "float16"

    def __post_init__(self) -> None:
        for name in ("bits", "group_size", "axis"):  # accept numpy integers (sweeps)
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                object.__setattr__(self, name, int(value))
        if isinstance(self.bits, bool) or self.bits not in HQQ_BITS:
            raise ConfigError(f"HQQ bits must be one of {list(HQQ_BITS)}, got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 8 \
                or self.group_size % 8:
            raise ConfigError(f"HQQ group_size must be a positive multiple of 8 (hqq's BaseQuantizeConfig "
                              f"requires it), e.g. 64 or 128; got {self.group_size!r}")
        if isinstance(self.axis, bool) or self.axis not in (0, 1):
            raise ConfigError(f"HQQ axis must be 0 or 1 (1: groups along a row's input weights), got {self.axis!r}")
        if not isinstance(self.optimize, bool):
            raise ConfigError(f"HQQ optimize must be True or False, got {self.optimize!r}")
        if self.compute_dtype not in HQQ_COMPUTE_DTYPES:
            raise ConfigError(f"HQQ compute_dtype must be one of {list(HQQ_COMPUTE_DTYPES)}, got {self.compute_dtype!r}")

    @property
    def label(self) -> str:
        label = f"hqq{self.bits}-g{self.group_size}"
        if self.axis == 0:
            label += "-ax0"
        if not self.optimize:
            label += "-noopt"
        if self.compute_dtype != "float16":
            label += "-bf16"
        return label

    def encode(self, weight: torch.Tensor, role: TensorRole, exclude: torch.Tensor | None, prepared: Any) -> HQQEncoded:
        from hqq.core.quantize import Quantizer

        if weight.numel() % self.group_size:
            raise ConfigError(f"HQQ cannot quantize {role.name} (shape {tuple(weight.shape)}, {weight.numel()} "
                              f"elements) with group_size={self.group_size}: hqq needs the element count to be a "
                              "multiple of the group size; choose another group_size or protect this tensor")
        out_dim = role.out_dim if weight.ndim >= 2 else 0
        w = weight.detach()
        if exclude is not None:
            w = w.masked_fill(exclude, 0)
        rows = _to_rows(w, out_dim)
        dtype = HQQ_COMPUTE_DTYPES[self.compute_dtype]
        # bitpack=False: the same codes, kept one per byte (hqq's packing asserts row counts
        # divisible by 2 or 4; storage_bits counts the packed size)
        codes, meta = Quantizer.quantize(
            rows, nbits=self.bits, channel_wise=True, group_size=self.group_size, optimize=self.optimize,
            round_zero=self.bits == 4, axis=self.axis, bitpack=False, compute_dtype=dtype, device=str(rows.device),
        )
        # what HQQLinear.cuda() does to the meta: scale and zero in the compute dtype
        meta["scale"] = meta["scale"].to(dtype).contiguous()
        meta["zero"] = meta["zero"].to(dtype).contiguous()
        meta["compute_dtype"] = dtype
        return HQQEncoded(codes.to(torch.uint8), meta, out_dim, weight.shape, weight.dtype)

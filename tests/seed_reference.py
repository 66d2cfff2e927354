"""The precursor's quantizer, copied verbatim from seed 000: the independent reference that
tests compare qhelpers' seed protocol against."""
from __future__ import annotations

import torch


def quantize_tensor_symmetric(tensor: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """
    Symmetric quantization of a tensor.

    Maps values to [-2^(B-1), 2^(B-1)-1] range.
    """
    n_levels = 2 ** bits
    qmin = -(n_levels // 2)
    qmax = n_levels // 2 - 1

    # Compute scale
    abs_max = tensor.abs().max()
    if abs_max == 0:
        return tensor
    scale = abs_max / qmax

    # Quantize and dequantize
    quantized = torch.clamp(torch.round(tensor / scale), qmin, qmax)
    dequantized = quantized * scale

    return dequantized.to(tensor.dtype)

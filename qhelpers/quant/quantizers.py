"""Weight quantization as pure functions on tensors (simulated, "fake" quantization).

Everything here works on one tensor at a time and never touches a model; the model-level
code elsewhere in qhelpers decides which tensors to quantize and puts the results back.

Schemes
-------
``QuantConfig(method="int")``  uniform INT-b, symmetric or asymmetric, per tensor, per output
channel or per group of input features, with optional clipping.

* Symmetric: ``qmax = 2**(b-1) - 1``, ``qmin = -2**(b-1)``, ``scale = alpha / qmax`` where
  ``alpha`` is the unit's absmax or its clip threshold; ``q = clamp(round(w / scale), qmin,
  qmax)``; ``deq = q * scale``. With per-tensor absmax this is, operation for operation, the
  seeds' ``quantize_tensor_symmetric`` (``QuantConfig.seed()``), so results are equal bit for
  bit in fp32. A unit whose scale is 0 (all zeros) dequantizes to zeros.
* Asymmetric: ``scale = (hi - lo) / (2**b - 1)``, ``zero = round(-lo / scale)``,
  ``q = clamp(round(w / scale) + zero, 0, 2**b - 1)``, ``deq = (q - zero) * scale``. Without
  clipping ``lo, hi = min, max`` of the unit. With clipping threshold ``alpha``,
  ``[lo, hi] = [mean - alpha, mean + alpha]`` intersected with ``[min, max]``. A constant unit
  (``hi == lo == c``) uses ``scale = |c|`` (1 if ``c == 0``) so that it dequantizes to ``c``
  exactly.
* ``torch.round`` rounds half to even (``round(2.5) == 2``, ``round(-0.5) == -0``).

``QuantConfig(method="nf4" | "fp4")`` simulates bitsandbytes' blockwise 4-bit quantization:
flatten, blocks of ``block_size`` consecutive elements (the last block may be partial), absmax
per block, normalise, pick the nearest code of the NF4 / FP4 code book, dequantize as
``code * absmax``. It follows bitsandbytes 0.50.2's CPU path (``quantize_4bit`` =
``backends/default/ops.py``: multiply by ``1 / absmax`` for full blocks, divide for the partial
last block, ``absmax.clamp(min=1e-38)``, ``torch.bucketize`` on the midpoints of the sorted
code book, so a value exactly on a midpoint goes to the lower code) and is bit-exact with
``bitsandbytes.functional.quantize_4bit`` + ``dequantize_4bit`` on CPU for fp32, fp16 and
bf16 inputs (see tests/test_quant.py). bitsandbytes' CUDA kernels (``csrc/kernels.cu``,
``dQuantizeNF4``/``dQuantizeFP4``) use hard-coded decision trees instead: for NF4 the
thresholds are the same fp32 numbers and ties also go to the lower code, so codes should agree
except in a partial last block (CUDA multiplies by ``1 / absmax`` there too); for FP4 some
thresholds differ by 1-14 ulp and negative ties round toward zero. Not run on a GPU here.

Granularity
-----------
* ``"tensor"``: one scale for the whole tensor.
* ``"channel"``: one scale per output channel, i.e. per index along ``out_dim``
  (``weight_out_dim(module)``: 0 for ``nn.Linear`` [out, in] and embeddings (one scale per
  row), 1 for GPT-2's ``Conv1D`` [in, out], where channels are columns). All other
  dimensions are flattened into the channel's input features.
* ``"group"``: per output channel, groups of ``group_size`` consecutive input features. If
  ``group_size`` does not divide the number of input features, the LAST group of every
  channel is partial (smaller) - the same fallback as bitsandbytes' last block. If
  ``group_size`` exceeds it, each channel is one group (= per channel).
* 0-D and 1-D tensors (biases, norm weights) are always quantized per tensor.

Clipping (per quantization unit: the tensor, a channel or a group)
------------------------------------------------------------------
* ``"absmax"``: no clipping.
* ``"kurtosis_heuristic"``: ``alpha = sigma * (2.5 + 0.3 * ln(1 + max(0, excess_kurtosis)))``.
  This is a HEURISTIC from the precursor project's code (seed 003). It is often attributed
  to Banner et al. (2019) but is not in that paper.
* ``"banner_gaussian"``: ``alpha = c_G(bits) * sigma``; ``"banner_laplace"``:
  ``alpha = c_L(bits) * b`` with ``b = mean|w - mean|``. ``c_G``, ``c_L`` minimise Banner et
  al. (2019)'s MSE model, see :func:`banner_alpha`.
* ``"mse"``: ``alpha = f * absmax`` with ``f`` chosen from ``MSE_GRID`` (100 points in
  [0.05, 1], 1 included) to minimise the actual quantize/dequantize squared error of the unit
  (asymmetric: ``f`` times the largest deviation from the unit's mean). Because ``f = 1`` is
  in the grid and evaluated by the same code as the final quantization, the result is never
  worse than absmax. Cost: about 100 quantize/dequantize passes over the tensor (roughly 1-4 s
  per 2.4M-element GPT-2 MLP matrix on 2 CPU cores).

``sigma`` is the unit's population standard deviation (about its mean); statistics are
computed in float64. Every threshold is capped at the unit's absmax (asymmetric: its largest
deviation from the mean); a unit whose statistic is 0 (constant unit) falls back to absmax.

Excluded elements
-----------------
``exclude`` (bool mask, same shape as ``w``) marks elements the caller keeps in full
precision. They are replaced by 0 before any range or statistic is computed (so an excluded
outlier never sets a scale; note that the zeros still count in means and variances), they
carry no weight in the MSE search, and their codes are meaningless: the caller puts the
original values back.

Precision: computation is in fp32 whatever the input dtype (fp16/bf16 are upcast, the
result is cast back). For fp16/bf16 inputs this is therefore slightly more accurate than the
seeds' code, which ran in the model's own dtype.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
from torch import Tensor

from qhelpers.util.errors import ConfigError, MeasurementError

__all__ = [
    "METHODS",
    "GRANULARITIES",
    "CLIPPINGS",
    "MSE_GRID",
    "NF4_CODE",
    "FP4_CODE",
    "QuantConfig",
    "QTensor",
    "quantize",
    "fake_quantize",
    "clip_threshold",
    "banner_alpha",
    "excess_kurtosis",
    "quantization_error",
]

METHODS: tuple[str, ...] = ("int", "nf4", "fp4")
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group")
CLIPPINGS: tuple[str, ...] = ("absmax", "kurtosis_heuristic", "banner_gaussian", "banner_laplace", "mse")
_CLIP_LABELS = {
    "kurtosis_heuristic": "kurt",
    "banner_gaussian": "bannerG",
    "banner_laplace": "bannerL",
    "mse": "mse",
}

#: Fractions of the unit's absmax searched by ``clipping="mse"`` (100 points, 1.0 included).
MSE_GRID: Tensor = torch.linspace(0.05, 1.0, 100, dtype=torch.float32)

#: bitsandbytes' NF4 code book (``bitsandbytes.functional.get_4bit_type("nf4")``), index = 4-bit code.
NF4_CODE: Tensor = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bits, exponent bias 2) in bit-pattern
# order, normalised by its absmax in fp32 exactly as get_4bit_type("fp4") does.
_FP4_RAW = torch.tensor(
    [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    dtype=torch.float32,
)
#: bitsandbytes' FP4 code book (``get_4bit_type("fp4")``), index = 4-bit code.
FP4_CODE: Tensor = _FP4_RAW / _FP4_RAW.abs().max()
del _FP4_RAW

_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


@functools.lru_cache(maxsize=None)
def _code_bounds(method: str) -> tuple[Tensor, Tensor]:
    # Same construction as bitsandbytes' _get_4bit_quantize_bounds (argsort of the code
    # book, fp32 midpoints), so ties and the FP4 +0/-0 pair map to the same code index.
    code = _CODES[method]
    order = torch.argsort(code)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    return midpoints, order


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize one weight tensor.

    ``method``: ``"int"`` (uniform INT-``bits``), ``"nf4"`` or ``"fp4"`` (bitsandbytes
    blockwise 4-bit, simulated). ``group_size`` is the group length of
    ``granularity="group"`` (INT only); ``block_size`` is the bitsandbytes block size
    (NF4/FP4 only; bitsandbytes itself accepts 32, 64, ..., 4096). For NF4/FP4,
    ``granularity`` is normalised to ``"block"`` and ``symmetric``/``clipping`` must keep
    their defaults (bitsandbytes has neither option).
    """

    method: str = "int"
    bits: int = 4
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int = 128
    block_size: int = 64
    clipping: str = "absmax"

    def __post_init__(self) -> None:
        for name in ("bits", "group_size", "block_size"):  # accept numpy integers (sweeps)
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                object.__setattr__(self, name, int(value))
        if self.method not in METHODS:
            raise ConfigError(f"unknown quantization method {self.method!r}; choose one of {list(METHODS)}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigError(f"bits must be an int between 2 and 8, got {self.bits!r}")
        if self.method in ("nf4", "fp4"):
            if self.bits != 4:
                raise ConfigError(
                    f"method={self.method!r} is a 4-bit format: it implies bits=4, got bits={self.bits}. "
                    "Use bits=4, or method='int' for other bit widths."
                )
            if self.clipping != "absmax":
                raise ConfigError(
                    f"method={self.method!r} (bitsandbytes blockwise absmax) has no clipping option; "
                    f"use clipping='absmax', or method='int' to clip (got {self.clipping!r})"
                )
            if not self.symmetric:
                raise ConfigError(
                    f"method={self.method!r} uses a fixed signed code book; symmetric=False is only for method='int'"
                )
            if self.granularity not in GRANULARITIES + ("block",):
                raise ConfigError(
                    f"unknown granularity {self.granularity!r}; choose one of {list(GRANULARITIES)}"
                )
            object.__setattr__(self, "granularity", "block")
        else:
            if not 2 <= self.bits <= 8:
                raise ConfigError(f"bits must be between 2 and 8, got {self.bits}")
            if self.granularity not in GRANULARITIES:
                raise ConfigError(
                    f"unknown granularity {self.granularity!r}; choose one of {list(GRANULARITIES)}"
                    + (" ('block' is for method='nf4'/'fp4')" if self.granularity == "block" else "")
                )
            if self.clipping not in CLIPPINGS:
                raise ConfigError(f"unknown clipping {self.clipping!r}; choose one of {list(CLIPPINGS)}")
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"symmetric must be True or False, got {self.symmetric!r}")
        for name in ("group_size", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ConfigError(f"{name} must be an int >= 2, got {value!r}")

    @classmethod
    def seed(cls) -> "QuantConfig":
        """The seed experiments' protocol: INT4, symmetric, per tensor, absmax."""
        return cls(method="int", bits=4, symmetric=True, granularity="tensor", clipping="absmax")

    @property
    def label(self) -> str:
        """Short name, e.g. ``int4-sym-channel``, ``int3-asym-g128-mse``, ``nf4-b64``."""
        if self.method in ("nf4", "fp4"):
            return f"{self.method}-b{self.block_size}"
        gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        label = f"int{self.bits}-{'sym' if self.symmetric else 'asym'}-{gran}"
        if self.clipping != "absmax":
            label += f"-{_CLIP_LABELS[self.clipping]}"
        return label

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable) of all fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown QuantConfig keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**dict(data))


# ----------------------------------------------------------------------------- QTensor


@dataclass
class QTensor:
    """A quantized tensor in compact form.

    ``codes``: one byte per element, in the original shape (int8 for symmetric INT, uint8
    for asymmetric INT and for NF4/FP4 code-book indices 0..15). ``scale`` (fp32): for INT,
    shape ``[]`` (tensor), ``[C]`` (channel) or ``[C, G]`` (group, ``C`` = size along
    ``out_dim``); for NF4/FP4 the per-block absmax ``[n_blocks]``. ``zero`` (fp32, integer
    valued, asymmetric INT only): same shape as ``scale``.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    out_dim: int
    config: QuantConfig

    def dequantize(self) -> Tensor:
        """The dequantized tensor, in the original dtype and shape."""
        cfg = self.config
        if cfg.method in ("nf4", "fp4"):
            return _dequantize_blockwise4(self.codes, self.scale, cfg.method, cfg.block_size).reshape(
                self.shape
            ).to(self.dtype)
        gran = _effective_granularity(cfg, len(self.shape))
        q2d, moved_shape = _to_2d(self.codes, gran, self.out_dim)
        parts = []
        for q_part, sl in _split_units(q2d, gran, cfg.group_size):
            scale = self.scale.reshape(-1, 1) if gran != "group" else self.scale[:, sl].reshape(-1, 1)
            zero = None
            if self.zero is not None:
                zero = self.zero.reshape(-1, 1) if gran != "group" else self.zero[:, sl].reshape(-1, 1)
            parts.append(_dequant_units(q_part, scale, zero).reshape(q2d.shape[0], -1))
        deq = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return _from_2d(deq, gran, self.out_dim, moved_shape).to(self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held by this object (codes at 1 byte/element + scales + zero points)."""
        total = self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()
        if self.zero is not None:
            total += self.zero.numel() * self.zero.element_size()
        return total

    @property
    def storage_bits(self) -> int:
        """Bits of the packed form (:attr:`packed_nbytes`), for bits-per-weight accounting."""
        return 8 * self.packed_nbytes

    @property
    def packed_nbytes(self) -> int:
        """Bytes a packed format would need: ``bits`` per code + fp32 scales (+ zero points)."""
        n = math.prod(self.shape)
        total = (n * self.config.bits + 7) // 8 + 4 * self.scale.numel()
        if self.zero is not None:
            total += 4 * self.zero.numel()
        return total


# ----------------------------------------------------------------------------- layout


def _effective_granularity(cfg: QuantConfig, ndim: int) -> str:
    if cfg.method in ("nf4", "fp4"):
        return "block"
    if ndim <= 1:
        return "tensor"
    return cfg.granularity


def _normalize_out_dim(out_dim: int, ndim: int) -> int:
    if ndim <= 1:
        return 0
    if isinstance(out_dim, bool) or not isinstance(out_dim, int) or not -ndim <= out_dim < ndim:
        raise ConfigError(
            f"out_dim={out_dim!r} is not a dimension of a {ndim}-D tensor; use 0 for nn.Linear/embeddings, "
            "1 for GPT-2 Conv1D (qhelpers.models.archs.weight_out_dim(module) gives it)"
        )
    return out_dim % ndim


def _to_2d(t: Tensor, gran: str, out_dim: int) -> tuple[Tensor, torch.Size]:
    """[C, K] view of ``t``: rows are output channels (one row for ``tensor``)."""
    if gran == "tensor":
        return t.reshape(1, -1), t.shape
    moved = t.movedim(out_dim, 0)
    return moved.reshape(moved.shape[0], -1), moved.shape


def _from_2d(t2d: Tensor, gran: str, out_dim: int, moved_shape: torch.Size) -> Tensor:
    if gran == "tensor":
        return t2d.reshape(moved_shape)
    return t2d.reshape(moved_shape).movedim(0, out_dim)


def _split_units(x2d: Tensor, gran: str, group_size: int) -> list[tuple[Tensor, slice]]:
    """Split a [C, K] tensor into blocks of quantization units, each [U, L] (one unit a row).

    Returns (units, group slice) pairs; for ``group`` the full groups come first (one row
    per channel and group) and the partial last groups (one per channel) second.
    """
    if gran != "group":
        return [(x2d, slice(None))]
    c, k = x2d.shape
    g_full, rem = divmod(k, group_size)
    parts = []
    if g_full:
        parts.append((x2d[:, : g_full * group_size].reshape(c * g_full, group_size), slice(0, g_full)))
    if rem:
        parts.append((x2d[:, g_full * group_size :], slice(g_full, g_full + 1)))
    return parts


# ----------------------------------------------------------------------------- statistics


def _row_slices(n_rows: int, row_len: int, budget: int = 1 << 22) -> list[slice]:
    """Row slices of about ``budget`` elements each (bounds temporary memory on huge tensors)."""
    step = max(1, budget // max(1, row_len))
    return [slice(i, i + step) for i in range(0, n_rows, step)]


def _moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row variance, mean absolute deviation and excess kurtosis of ``x`` [U, L] (float64)."""
    out = torch.empty(3, x.shape[0], dtype=torch.float64, device=x.device)
    for sl in _row_slices(x.shape[0], x.shape[1]):
        x64 = x[sl].double()
        d = x64 - x64.mean(dim=1, keepdim=True)
        d2 = d * d
        var = d2.mean(dim=1)
        out[0, sl] = var
        out[1, sl] = d.abs().mean(dim=1)
        out[2, sl] = torch.where(var > 0, (d2 * d2).mean(dim=1) / (var * var) - 3.0, torch.full_like(var, float("nan")))
    return out[0], out[1], out[2]


def excess_kurtosis(x: Tensor, dim: int | None = None) -> Tensor:
    """Fisher (excess) kurtosis, biased: ``m4 / m2**2 - 3``.

    Same as ``scipy.stats.kurtosis(x, axis=dim, fisher=True, bias=True)``. Computed in
    float64 and returned as float64 (a 0-D tensor when ``dim`` is None). A constant slice
    gives NaN, as in scipy.
    """
    if dim is None:
        flat = x.reshape(-1)
        # two passes in chunks: exact float64 moments without a float64 copy of a huge tensor
        n = flat.numel()
        if n == 0:
            raise MeasurementError("excess_kurtosis of an empty tensor is undefined; pass a non-empty tensor")
        chunk = 1 << 22
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        for i in range(0, n, chunk):
            total += flat[i : i + chunk].double().sum()
        mean = total / n
        s2 = torch.zeros((), dtype=torch.float64, device=x.device)
        s4 = torch.zeros((), dtype=torch.float64, device=x.device)
        for i in range(0, n, chunk):
            d2 = (flat[i : i + chunk].double() - mean) ** 2
            s2 += d2.sum()
            s4 += (d2 * d2).sum()
        m2, m4 = s2 / n, s4 / n
        return m4 / (m2 * m2) - 3.0 if m2 > 0 else torch.full_like(m2, float("nan"))
    x64 = x.double()
    d = x64 - x64.mean(dim=dim, keepdim=True)
    d2 = d * d
    m2 = d2.mean(dim=dim)
    m4 = (d2 * d2).mean(dim=dim)
    return torch.where(m2 > 0, m4 / (m2 * m2) - 3.0, torch.full_like(m2, float("nan")))


@functools.lru_cache(maxsize=None)
def banner_alpha(bits: int, distribution: str) -> float:
    """Optimal clipping threshold of Banner et al. (2019), in units of the distribution's scale.

    Minimises Banner's MSE model ``clip_noise(alpha) + alpha**2 / (3 * 4**bits)`` (the
    second term is the rounding noise of ``2**bits`` uniform levels on ``[-alpha, alpha]``)
    with scipy:

    * ``"gaussian"`` (unit sigma): ``clip_noise = (1 + a^2) erfc(a / sqrt 2) - a sqrt(2/pi) exp(-a^2/2)``,
      result in units of sigma (published: 1.71, 2.15, 2.55 at 2, 3, 4 bits);
    * ``"laplace"`` (unit b): ``clip_noise = 2 exp(-a)``, result in units of ``b`` (published
      2.83, 3.89, 5.03 at 2, 3, 4 bits).
    """
    import numpy as np
    from scipy import optimize, special

    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ConfigError(f"banner_alpha: bits must be an int between 1 and 16, got {bits!r}")
    rounding = 3.0 * 4.0**bits
    if distribution == "gaussian":

        def mse(a: float) -> float:
            return (1 + a * a) * special.erfc(a / np.sqrt(2)) - a * np.sqrt(2 / np.pi) * np.exp(-a * a / 2) + a * a / rounding

        upper = 20.0
    elif distribution == "laplace":

        def mse(a: float) -> float:
            return 2 * np.exp(-a) + a * a / rounding

        upper = 60.0
    else:
        raise ConfigError(f"banner_alpha: unknown distribution {distribution!r}; choose 'gaussian' or 'laplace'")
    res = optimize.minimize_scalar(mse, bounds=(1e-6, upper), method="bounded", options={"xatol": 1e-12})
    if not res.success:  # pragma: no cover - scipy's bounded Brent always converges here
        raise MeasurementError(f"banner_alpha({bits}, {distribution!r}) did not converge: {res.message}")
    return float(res.x)


# ----------------------------------------------------------------------------- INT core


def _int_range(cfg: QuantConfig) -> tuple[int, int]:
    if cfg.symmetric:
        return -(2 ** (cfg.bits - 1)), 2 ** (cfg.bits - 1) - 1
    return 0, 2**cfg.bits - 1


def _sym_params(alpha: Tensor, qmax: int) -> Tensor:
    return alpha / qmax


def _asym_params(lo: Tensor, hi: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    scale = (hi - lo) / levels
    const = hi == lo
    if bool(const.any()):
        fallback = torch.where(lo != 0, lo.abs(), torch.ones_like(lo))
        scale = torch.where(const, fallback, scale)
    zero = torch.round(-lo / scale)
    return scale, zero


def _quant_units(x: Tensor, scale: Tensor, zero: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """Integer codes (as fp32) of rows ``x`` [U, L] with per-row ``scale``/``zero`` [U, 1]."""
    if zero is None:
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        return torch.clamp(torch.round(x / safe), qmin, qmax)
    return torch.clamp(torch.round(x / scale) + zero, qmin, qmax)


def _dequant_units(q: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
    q = q.float()
    if zero is None:
        return q * scale
    return (q - zero) * scale


def _alpha_units(x: Tensor, cfg: QuantConfig, weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """Clip threshold per row of ``x`` [U, L] and the row's centre (0 for symmetric).

    Symmetric: threshold on ``|w|``. Asymmetric: half-width about the row mean.
    """
    if cfg.symmetric:
        cap = x.abs().amax(dim=1)
        centre = torch.zeros_like(cap)
    else:
        mean32 = (x.sum(dim=1, dtype=torch.float64) / x.shape[1]).float()
        cap = torch.maximum(x.amax(dim=1) - mean32, mean32 - x.amin(dim=1))
        centre = mean32
    if cfg.clipping == "absmax":
        return cap, centre
    if cfg.clipping == "mse":
        return _mse_alpha(x, cfg, cap, centre, weight), centre
    var, mad, kurt = _moments(x)
    sigma = var.sqrt()
    if cfg.clipping == "kurtosis_heuristic":
        k = torch.nan_to_num(kurt, nan=0.0).clamp(min=0.0)
        alpha = sigma * (2.5 + 0.3 * torch.log1p(k))
    elif cfg.clipping == "banner_gaussian":
        alpha = banner_alpha(cfg.bits, "gaussian") * sigma
    else:  # banner_laplace
        alpha = banner_alpha(cfg.bits, "laplace") * mad
    alpha = alpha.float()
    return torch.where(alpha > 0, torch.minimum(alpha, cap), cap), centre


def _params_from_alpha(
    x: Tensor, cfg: QuantConfig, alpha: Tensor, centre: Tensor
) -> tuple[Tensor, Tensor | None]:
    """Scale (and zero point) per row [U] from a clip threshold per row."""
    _, qmax = _int_range(cfg)
    if cfg.symmetric:
        return _sym_params(alpha, qmax), None
    lo = x.amin(dim=1)
    hi = x.amax(dim=1)
    if cfg.clipping != "absmax":
        lo = torch.maximum(lo, centre - alpha)
        hi = torch.minimum(hi, centre + alpha)
    return _asym_params(lo, hi, qmax)


def _mse_alpha(x: Tensor, cfg: QuantConfig, cap: Tensor, centre: Tensor, weight: Tensor | None) -> Tensor:
    qmin, qmax = _int_range(cfg)
    u, length = x.shape
    best_err = torch.full((u,), float("inf"), dtype=torch.float64, device=x.device)
    best_alpha = cap.clone()
    for sl in _row_slices(u, length):
        xs, caps, cs = x[sl], cap[sl], centre[sl]
        ws = None if weight is None else weight[sl]
        lo = xs.amin(dim=1)
        hi = xs.amax(dim=1)
        buf = torch.empty_like(xs)
        for f in MSE_GRID.tolist():
            alpha = caps * f if f != 1.0 else caps
            # same elementwise operations as _quant_units/_dequant_units, done in place
            if cfg.symmetric:
                scale = _sym_params(alpha, qmax).unsqueeze(1)
                torch.div(xs, torch.where(scale == 0, torch.ones_like(scale), scale), out=buf)
                buf.round_().clamp_(qmin, qmax).mul_(scale)
            else:
                scale, zero = _asym_params(torch.maximum(lo, cs - alpha), torch.minimum(hi, cs + alpha), qmax)
                scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
                torch.div(xs, scale, out=buf)
                buf.round_().add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(scale)
            buf.sub_(xs).square_()
            if ws is not None:
                buf.mul_(ws)
            err = buf.sum(dim=1, dtype=torch.float64)
            better = err < best_err[sl]
            best_err[sl] = torch.where(better, err, best_err[sl])
            best_alpha[sl] = torch.where(better, alpha, best_alpha[sl])
    return best_alpha


# ----------------------------------------------------------------------------- NF4 / FP4


def _quantize_blockwise4(x: Tensor, method: str, block_size: int) -> tuple[Tensor, Tensor]:
    """bitsandbytes' quantize_4bit (default/CPU path), unpacked: (codes uint8 [n], absmax [blocks])."""
    bounds, order = (t.to(x.device) for t in _code_bounds(method))
    flat = x.reshape(-1)
    n = flat.numel()
    rem = n % block_size
    full = n - rem
    blocks = flat[:full].reshape(full // block_size, block_size)
    absmax = blocks.abs().max(dim=-1)[0] if full else flat.new_zeros(0)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    q = torch.bucketize(scaled, bounds, out_int32=True)
    if method != "nf4":
        q = order[q]
    return q.to(torch.uint8), absmax


def _dequantize_blockwise4(codes: Tensor, absmax: Tensor, method: str, block_size: int) -> Tensor:
    """``code[q] * absmax`` per block in fp32 (flat), as bitsandbytes' dequantize_4bit."""
    values = _CODES[method].to(codes.device)[codes.reshape(-1).long()]
    n = values.numel()
    rem = n % block_size
    full = n - rem
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    if full:
        out[:full] = (values[:full].view(-1, block_size) * absmax[: full // block_size].view(-1, 1)).reshape(-1)
    if rem:
        out[full:] = values[full:] * absmax[full // block_size]
    return out


# ----------------------------------------------------------------------------- public API


def _prepare(w: Tensor, exclude: Tensor | None) -> Tensor:
    if not isinstance(w, Tensor):
        raise ConfigError(f"quantize expects a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise ConfigError(f"quantize expects a floating-point tensor, got dtype {w.dtype}")
    if w.numel() == 0:
        raise ConfigError("cannot quantize an empty tensor")
    w32 = w.detach().to(dtype=torch.float32)
    if exclude is not None:
        if exclude.shape != w.shape:
            raise ConfigError(
                f"exclude mask has shape {tuple(exclude.shape)} but the weight has {tuple(w.shape)}; "
                "pass a bool mask of the weight's shape"
            )
        w32 = w32.masked_fill(exclude.to(device=w32.device, dtype=torch.bool), 0.0)
    if not bool(torch.isfinite(w32).all()):
        raise MeasurementError(
            "the weight contains NaN or inf values; quantization is undefined. Check the model load "
            "(dtype overflow?) or exclude those elements"
        )
    return w32


def _int_units(w32: Tensor, config: QuantConfig, out_dim: int, exclude: Tensor | None):
    """Yield (units [U, L], MSE weight or None, group slice) for an INT config."""
    gran = _effective_granularity(config, w32.dim())
    x2d, moved_shape = _to_2d(w32, gran, out_dim)
    weight2d = None
    if exclude is not None and config.clipping == "mse":
        weight2d, _ = _to_2d((~exclude.to(device=w32.device, dtype=torch.bool)).float(), gran, out_dim)
    parts = _split_units(x2d, gran, config.group_size)
    wparts = _split_units(weight2d, gran, config.group_size) if weight2d is not None else [(None, None)] * len(parts)
    return gran, x2d, moved_shape, [(x, wp, sl) for (x, sl), (wp, _) in zip(parts, wparts)]


def _reshape_stat(values: list[Tensor], gran: str, c: int) -> Tensor:
    if gran == "tensor":
        return values[0].reshape(())
    if gran == "channel":
        return values[0].reshape(c)
    return torch.cat([v.reshape(c, -1) for v in values], dim=1)


def clip_threshold(
    w: Tensor, config: QuantConfig, out_dim: int = 0, exclude: Tensor | None = None
) -> Tensor:
    """Clip threshold ``alpha`` (fp32) per quantization unit, after capping.

    Shape as :attr:`QTensor.scale`: ``[]``, ``[C]`` or ``[C, G]``. Symmetric: the threshold
    on ``|w|`` (absmax when ``clipping="absmax"``). Asymmetric: the half-width about the
    unit's mean (the range used is ``[mean - alpha, mean + alpha]`` intersected with
    ``[min, max]``). NF4/FP4: the per-block absmax.
    """
    w32 = _prepare(w, exclude)
    if config.method in ("nf4", "fp4"):
        return _quantize_blockwise4(w32, config.method, config.block_size)[1]
    out_dim = _normalize_out_dim(out_dim, w32.dim())
    gran, x2d, _, parts = _int_units(w32, config, out_dim, exclude)
    alphas = [_alpha_units(x, config, wp)[0] for x, wp, _ in parts]
    return _reshape_stat(alphas, gran, x2d.shape[0])


def quantize(w: Tensor, config: QuantConfig, out_dim: int = 0, exclude: Tensor | None = None) -> QTensor:
    """Quantize ``w`` to a compact :class:`QTensor` (see the module docstring for the maths).

    ``out_dim``: the dimension of ``w`` that indexes output channels
    (``qhelpers.models.archs.weight_out_dim(module)``). ``exclude``: bool mask of elements kept in
    full precision by the caller; they do not influence any scale and their codes are
    meaningless.
    """
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, got {type(config).__name__}")
    w32 = _prepare(w, exclude)
    if config.method in ("nf4", "fp4"):
        codes, absmax = _quantize_blockwise4(w32, config.method, config.block_size)
        return QTensor(codes.reshape(w.shape), absmax, None, w.shape, w.dtype, 0, config)
    out_dim = _normalize_out_dim(out_dim, w32.dim())
    qmin, qmax = _int_range(config)
    gran, x2d, moved_shape, parts = _int_units(w32, config, out_dim, exclude)
    c = x2d.shape[0]
    code_parts, scales, zeros = [], [], []
    for x, wp, _ in parts:
        alpha, centre = _alpha_units(x, config, wp)
        scale, zero = _params_from_alpha(x, config, alpha, centre)
        q = _quant_units(x, scale.unsqueeze(1), None if zero is None else zero.unsqueeze(1), qmin, qmax)
        code_parts.append(q.reshape(c, -1))
        scales.append(scale)
        zeros.append(zero)
    q2d = code_parts[0] if len(code_parts) == 1 else torch.cat(code_parts, dim=1)
    codes = _from_2d(q2d, gran, out_dim, moved_shape).to(torch.int8 if config.symmetric else torch.uint8)
    scale_t = _reshape_stat(scales, gran, c)
    zero_t = None if config.symmetric else _reshape_stat(zeros, gran, c)
    return QTensor(codes.contiguous(), scale_t, zero_t, w.shape, w.dtype, out_dim, config)


def fake_quantize(w: Tensor, config: QuantConfig, out_dim: int = 0, exclude: Tensor | None = None) -> Tensor:
    """``quantize(w, config, out_dim, exclude).dequantize()``: same shape and dtype as ``w``.

    At excluded positions the values are meaningless; put the originals back
    (``torch.where(exclude, w, result)``).
    """
    return quantize(w, config, out_dim=out_dim, exclude=exclude).dequantize()


def quantization_error(w: Tensor, config: QuantConfig, out_dim: int = 0) -> dict[str, float]:
    """Error of ``fake_quantize(w)`` against ``w``, in float64.

    ``mse`` = mean squared error; ``rel_mse`` = ``mse / mean(w**2)`` (0.0 for an all-zero
    ``w``, which is reproduced exactly); ``max_abs_err`` = largest absolute error.
    """
    deq = fake_quantize(w, config, out_dim=out_dim).detach().reshape(-1)
    ref = w.detach().reshape(-1)
    sq_err = sq_ref = 0.0
    max_err = 0.0
    for i in range(0, ref.numel(), 1 << 22):
        r = ref[i : i + (1 << 22)].double()
        e = deq[i : i + (1 << 22)].double() - r
        sq_err += float((e * e).sum())
        sq_ref += float((r * r).sum())
        max_err = max(max_err, float(e.abs().max()))
    n = ref.numel()
    mse = sq_err / n
    power = sq_ref / n
    return {"mse": mse, "rel_mse": mse / power if power > 0 else 0.0, "max_abs_err": max_err}

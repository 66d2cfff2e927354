"""GGUF quantization: llama.cpp's GGML block types through ``libgguf``, and llama-quantize's presets.

Two methods (:class:`~qhelpers.quant.methods.WeightMethod` s):

* :class:`GGUFType` quantizes every 2-D weight to one GGML type (``Q4_K``, ``IQ4_NL``, ``Q8_0``...),
  like ``llama-quantize --pure``;
* :class:`GGUFPreset` applies a mixture preset (``Q4_K_M``, ``Q3_K_M``, ``Q2_K``...) with
  llama-quantize's per-tensor type rules.

Rows. GGML quantizes a tensor row by row; a row is ``ne[0]`` consecutive weights, which for a weight
matrix is one output channel's input weights (``in_features`` long). ``nn.Linear`` weights are
``[out, in]`` already; GPT-2's ``Conv1D`` (``TensorRole.out_dim == 1``) is ``[in, out]`` and is
transposed first. Rows are quantized in float32 (libgguf takes float32) and dequantized weights come
back in the weight's dtype. Excluded elements (protection) are zeroed before quantizing.

Encoding is ``libgguf.quantize_rows``, libgguf's native reference row kernels of llama.cpp's
quantization (with the importance-matrix weighting of ``ggml_quantize_chunk``): re-quantizing the
shipped Gemma file's dequantized Q5_0 / Q8_0 tensors gives back its bytes, and decoding agrees with
gguf-py's ``gguf.quants.dequantize`` bit for bit (tests/test_gguf.py). K-quant searches are not
fixed points: re-quantizing a dequantized Q4_K tensor changes a few blocks (0.2-1.4 % of rows of
Gemma's tensors, and of libgguf's own round trip).

Bits per weight (:attr:`GGUFEncoded.storage_bits`) are the bytes of the GGML blocks
(``gguf.constants.GGML_QUANT_SIZES``) times 8, scales, minimums and super-block headers included:
Q2_K 2.625, Q3_K 3.4375, Q4_K 4.5, Q5_K 5.5, Q6_K 6.5625, Q8_0 8.5, Q4_0 4.5, IQ4_NL 4.5, IQ4_XS 4.25.
Tensors GGUF keeps unquantized (1-D norms and biases, learned position embeddings) are returned
unchanged and counted as F32, 32 bits each, as llama.cpp's converter stores 1-D tensors; they only
reach a method under the ``all`` / ``seed`` scopes.

Preset rules. :func:`preset_tensor_types` follows ``llama_tensor_get_type`` of ggml-org/llama.cpp
``src/llama-quant.cpp`` at commit 8784689f (late 2025; :data:`LLAMA_CPP_SOURCE`): the per-preset
rules for ``attn_v`` (with ``use_more_bits`` over ``n_attention_wv``), ``ffn_down``, ``attn_output``,
``attn_qkv``, the output tensor and the token embeddings (which take the output rule when the model
has no separate ``output.weight``, i.e. tied embeddings), then the fallback for a row length that is
not a multiple of the chosen type's block (Q2_K/Q3_K/IQ4_XS -> IQ4_NL, Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0, and F16 where the fallback's block does not fit either). The rules for Falcon, the 70B
llama, mixture-of-experts models and the IQ1/IQ2/IQ3 presets are not carried over (no such model or
preset here). llama.cpp's tensor names come from the architecture table through
:class:`~qhelpers.quant.methods.TensorRole` (:func:`llama_name`); a fused q/k/v projection (GPT-2
``c_attn``, BLOOM/GPT-NeoX ``query_key_value``) is llama.cpp's ``attn_qkv``.

Later llama.cpp (master of 2026, commit 007dbbf) changed two rules that matter here: the fallback
of Q2_K/Q3_K became Q4_0 (IQ4_NL before; both 4.5 bits per weight), and ``attn_qkv`` is treated as
``attn_v`` (``use_more_bits`` -> Q6_K under Q4_K_M/Q5_K_M) instead of its own rule (Q5_K under
Q4_K_M, Q6_K under Q5_K_M, Q4_K under Q3_K_M/L).

Importance matrix. With ``calibration`` set (a calibration-set name such as ``"en"``, ``"sw"`` or
``"mix"``), ``prepare`` computes what ``llama-imatrix`` computes, the mean squared activation per
input channel of every decoder-block matrix (token embeddings and the output are left without one,
as llama-imatrix does by default), and passes each to the quantizer as its weighting; the presets
then also apply llama.cpp's ``has_imatrix`` rules.
"""
from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from qhelpers.models.archs import LINEAR_COMPONENTS, get_arch, get_module
from qhelpers.quant.imatrix import calibration_imatrix
from qhelpers.quant.methods import DenseEncoded, Encoded, TensorRole, WeightMethod
from qhelpers.util.errors import ConfigError

__all__ = [
    "LLAMA_CPP_SOURCE",
    "QTYPES",
    "PRESETS",
    "GGUFEncoded",
    "GGUFType",
    "GGUFPreset",
    "ModelFacts",
    "bits_per_weight_of",
    "encode_tensor",
    "fallback_type",
    "llama_category",
    "llama_name",
    "model_facts",
    "preset_tensor_types",
    "tensor_storage_bits",
]

#: Where the preset rules come from.
LLAMA_CPP_SOURCE = "ggml-org/llama.cpp src/llama-quant.cpp, llama_tensor_get_type at commit 8784689f (late 2025)"

#: GGML types a tensor can be quantized to (none of them needs an importance matrix).
QTYPES: tuple[str, ...] = (
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
)

#: llama-quantize presets (``llama_ftype``) and their default GGML type.
PRESETS: dict[str, str] = {
    "Q2_K": "Q2_K",
    "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
    "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K",
    "Q6_K": "Q6_K",
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0",
    "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS",
}

#: Kept as they are (F32 in a GGUF file) / the last-resort fallback.
_KEEP, _F16 = "F32", "F16"

#: ``tensor_type_fallback`` (``convert_incompatible_tensor``) at the source commit.
_FALLBACK: dict[str, str] = {
    "IQ4_XS": "IQ4_NL", "Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL",
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}

#: qhelpers component -> llama.cpp tensor name (a fused q/k/v projection is ``attn_qkv``).
_LLAMA_NAMES: dict[str, str] = {
    "attn_q": "attn_q", "attn_k": "attn_k", "attn_v": "attn_v", "attn_out": "attn_output",
    "mlp_in": "ffn_up", "mlp_gate": "ffn_gate", "mlp_out": "ffn_down",
    "embed_tokens": "token_embd", "lm_head": "output",
}


def _libgguf() -> Any:
    try:
        return importlib.import_module("libgguf")
    except ImportError as exc:
        raise ConfigError(f"GGUF quantization needs libgguf: pip install libgguf==0.2.2 ({exc})") from exc


def _check_qtype(qtype: str, *, allow_storage: bool = False) -> str:
    valid = QTYPES + ((_F16,) if allow_storage else ())
    if qtype not in valid:
        raise ConfigError(f"unknown GGML type {qtype!r}; valid: {', '.join(valid)}")
    return qtype


def _block(qtype: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a GGML type."""
    import gguf

    return tuple(gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]])  # type: ignore[return-value]


def bits_per_weight_of(qtype: str) -> float:
    """Storage bits per weight of a GGML type (block bytes x 8 / block size): Q4_K 4.5, Q6_K 6.5625..."""
    size, nbytes = _block(qtype)
    return 8 * nbytes / size


def tensor_storage_bits(qtype: str, n_rows: int, n_per_row: int) -> int:
    """Bits a tensor of ``n_rows`` rows of ``n_per_row`` weights takes in ``qtype`` (F32 for kept ones)."""
    if qtype == _KEEP:
        return 32 * n_rows * n_per_row
    size, nbytes = _block(qtype)
    if n_per_row % size:
        raise ConfigError(f"{qtype} needs rows of a multiple of {size} weights, got {n_per_row}")
    return 8 * nbytes * (n_per_row // size) * n_rows


def fallback_type(qtype: str, n_per_row: int) -> str:
    """``qtype``, or llama.cpp's fallback when ``n_per_row`` is not a multiple of its block size
    (Q4_K -> Q5_0, Q6_K -> Q8_0...; F16 when the fallback's block does not fit either)."""
    if n_per_row % _block(qtype)[0] == 0:
        return qtype
    if qtype not in _FALLBACK:
        # llama.cpp throws here ("Unsupported tensor size encountered"): no fallback for a 32-block type
        raise ConfigError(f"rows of {n_per_row} weights cannot be stored as {qtype} (blocks of {_block(qtype)[0]}) "
                          "and llama.cpp defines no fallback for it; choose another type or keep the tensor out of scope")
    new = _FALLBACK[qtype]
    return new if n_per_row % _block(new)[0] == 0 else _F16


# ----------------------------------------------------------------------------- names and model facts


def llama_category(role: TensorRole) -> str | None:
    """llama.cpp's name for the kind of tensor (``attn_v``, ``ffn_down``, ``attn_qkv``, ``output``...),
    None for tensors llama.cpp has no rule for (norms, biases, position embeddings)."""
    if "attn_v" in role.fused:
        return "attn_qkv"
    return _LLAMA_NAMES.get(role.component or "")


def llama_name(role: TensorRole) -> str | None:
    """The tensor's name in a llama.cpp GGUF file (``blk.3.attn_v.weight``, ``token_embd.weight``)."""
    category = llama_category(role)
    if category is None:
        return None
    return f"{category}.weight" if role.layer is None else f"blk.{role.layer}.{category}.weight"


@dataclass(frozen=True)
class ModelFacts:
    """What llama-quantize's rules read from the model besides the tensor itself.

    ``n_attention_wv``: tensors named attn_v / attn_qkv; ``n_gqa``: query heads per key/value head
    (integer division, as ``hparams.n_gqa()``); ``has_output``: a separate ``output.weight``
    (False for tied embeddings, whose token_embd then takes the output rule); ``keep``: 2-D
    parameters llama-quantize leaves unquantized (learned position embeddings)."""

    n_layers: int
    n_attention_wv: int
    n_gqa: int
    has_output: bool
    keep: frozenset[str] = frozenset()


def model_facts(model: nn.Module, roles: Mapping[str, TensorRole]) -> ModelFacts:
    """The :class:`ModelFacts` of a model (its architecture-table entry and config)."""
    arch = get_arch(model)
    config = model.config
    n_head = int(getattr(config, arch.heads_attr))
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    categories = [llama_category(r) for r in roles.values()]
    keep: set[str] = set()
    path = arch.global_path("embed_positions")
    if path:
        weight = getattr(get_module(model, path), "weight", None)
        keep |= {n for n, p in model.named_parameters() if p is weight}
    n_layers = next(iter(roles.values())).n_layers if roles else 0
    return ModelFacts(n_layers=n_layers, n_attention_wv=sum(c in ("attn_v", "attn_qkv") for c in categories),
                      n_gqa=n_head // n_kv, has_output="output" in categories, keep=frozenset(keep))


# ----------------------------------------------------------------------------- llama-quantize's rules


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _mixture_type(preset: str, category: str | None, layer: int, n_per_row: int, facts: ModelFacts,
                  has_imatrix: bool) -> str:
    """``llama_tensor_get_type`` before the shape fallback, for the presets of :data:`PRESETS`.

    The counters ``i_attention_wv`` / ``i_ffn_down`` equal the layer index: llama.cpp visits tensors
    sorted by layer (``weight_name_comparer``) and each layer has one attn_v and one ffn_down."""
    new = default = PRESETS[preset]
    n = facts.n_layers
    if category == "output" or (category == "token_embd" and not facts.has_output):
        if n_per_row % _block(default)[0] != 0:
            new = "Q8_0"
        elif new != "Q8_0":
            new = "Q6_K"
    elif category == "attn_v":
        if preset == "Q2_K":
            new = "Q4_K" if facts.n_gqa >= 4 else "Q3_K"
        elif preset == "Q3_K_M":
            new = "Q5_K" if layer < 2 else "Q4_K"
        elif preset == "Q3_K_L":
            new = "Q5_K"
        elif preset in ("IQ4_NL", "IQ4_XS") and facts.n_gqa >= 4:
            new = "Q5_K"
        elif preset in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, facts.n_attention_wv):
            new = "Q6_K"
        elif preset == "Q4_K_S" and layer < 4:
            new = "Q5_K"
    elif category == "ffn_down":
        if preset == "Q2_K":
            new = "Q3_K"
        elif preset == "Q3_K_M":
            new = "Q5_K" if layer < n // 16 else "Q4_K"  # Q3_K only for Falcon
        elif preset == "Q3_K_L":
            new = "Q5_K"
        elif preset == "Q4_K_M":
            if _use_more_bits(layer, n):
                new = "Q6_K"
        elif layer < n // 8 and preset in ("IQ4_NL", "IQ4_XS") and not has_imatrix:
            new = "Q5_K"
        elif preset == "Q5_K_M" and _use_more_bits(layer, n):
            new = "Q6_K"
        elif preset == "Q4_K_S" and layer < n // 8:
            new = "Q5_K"
        elif preset in ("Q4_0", "Q5_0") and has_imatrix and layer < n // 8:
            new = "Q4_1" if preset == "Q4_0" else "Q5_1"
    elif category == "attn_output":
        new = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(preset, new)
    elif category == "attn_qkv":
        new = {"Q3_K_M": "Q4_K", "Q3_K_L": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(preset, new)
    return new


def _shape_rows(shape: tuple[int, ...], out_dim: int) -> tuple[int, int]:
    """(rows, weights per row) of a tensor quantized one output channel per row."""
    if len(shape) == 1:
        return 1, shape[0]
    n_rows = shape[out_dim]
    return n_rows, int(np.prod(shape)) // n_rows if n_rows else 0


def preset_tensor_types(model: nn.Module, roles: Mapping[str, TensorRole], preset: str, *,
                        has_imatrix: bool = False, pure: bool = False) -> dict[str, str]:
    """The GGML type of every parameter under a llama-quantize preset (``"F32"``: kept as is).

    ``pure=True``: ``preset`` is a GGML type (:data:`QTYPES`) given to every quantizable tensor
    (``--pure``), with the shape fallback still applied. ``has_imatrix``: quantized with an
    importance matrix (changes the Q4_0/Q5_0/IQ4 ``ffn_down`` rules)."""
    if pure:
        _check_qtype(preset)
    elif preset not in PRESETS:
        raise ConfigError(f"unknown llama.cpp preset {preset!r}; valid: {', '.join(PRESETS)}")
    facts = model_facts(model, roles)
    params = dict(model.named_parameters())
    types: dict[str, str] = {}
    for name, role in roles.items():
        shape = tuple(params[name].shape)
        if len(shape) < 2 or name in facts.keep:
            types[name] = _KEEP
            continue
        _, n_per_row = _shape_rows(shape, role.out_dim)
        if pure:
            new = preset
        else:
            new = _mixture_type(preset, llama_category(role), role.layer if role.layer is not None else -1,
                                n_per_row, facts, has_imatrix)
        types[name] = fallback_type(new, n_per_row)
    return types


# ----------------------------------------------------------------------------- encoding


def _to_rows(weight: torch.Tensor, out_dim: int) -> torch.Tensor:
    if weight.ndim == 1:
        return weight.reshape(1, -1)
    moved = weight.movedim(out_dim, 0)
    return moved.reshape(moved.shape[0], -1)


@dataclass
class GGUFEncoded:
    """A tensor stored as GGML blocks (``codes``: one row of bytes per output channel)."""

    codes: np.ndarray
    qtype: str
    shape: tuple[int, ...]
    out_dim: int
    dtype: torch.dtype
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def dequantize(self) -> torch.Tensor:
        _, n_per_row = _shape_rows(self.shape, self.out_dim)
        if self.qtype == _F16:
            rows = self.codes.view(np.float16).astype(np.float32)
        else:
            lib = _libgguf()
            rows = lib.dequantize_rows(self.codes, lib.GGMLQuantizationType[self.qtype], n_per_row=n_per_row)
        out = torch.from_numpy(rows)
        if len(self.shape) > 1:
            moved = (self.shape[self.out_dim],) + tuple(s for i, s in enumerate(self.shape) if i != self.out_dim)
            out = out.reshape(moved).movedim(0, self.out_dim)
        return out.reshape(self.shape).to(device=self.device, dtype=self.dtype).contiguous()

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes)

    @property
    def storage_bits(self) -> int:
        return 8 * int(self.codes.nbytes)


def _imatrix_array(imatrix: Any, n_per_row: int) -> np.ndarray:
    if isinstance(imatrix, torch.Tensor):
        imatrix = imatrix.detach().to("cpu", torch.float32).numpy()
    values = np.ascontiguousarray(imatrix, dtype=np.float32)
    if values.shape != (n_per_row,):
        raise ConfigError(f"an importance matrix needs one value per input channel ({n_per_row}), got shape {values.shape}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ConfigError("an importance matrix must be finite and non-negative (mean squared activations)")
    return values


def encode_tensor(weight: torch.Tensor, qtype: str, imatrix: Any = None, out_dim: int = 0,
                  exclude: torch.Tensor | None = None) -> GGUFEncoded:
    """Quantize ``weight`` to GGML type ``qtype`` (or ``"F16"``), one output channel per row.

    ``imatrix``: optional weighting per input channel (length = row length, e.g. llama-imatrix's
    mean squared activations); ``out_dim``: 1 for GPT-2 ``Conv1D`` ``[in, out]`` weights;
    ``exclude``: elements zeroed first. The row length must fit ``qtype``'s block
    (:func:`fallback_type` picks llama.cpp's fallback)."""
    _check_qtype(qtype, allow_storage=True)
    w = weight.detach()
    if exclude is not None:
        w = w.masked_fill(exclude.to(w.device), 0)
    rows = _to_rows(w.to(torch.float32), out_dim).cpu().contiguous().numpy()
    n_per_row = rows.shape[1]
    block = _block(qtype)[0]
    if n_per_row % block:
        hint = f"llama.cpp falls back to {fallback_type(qtype, n_per_row)} (see fallback_type)" if qtype in _FALLBACK else \
            "llama.cpp has no fallback for it"
        raise ConfigError(f"{qtype} needs rows of a multiple of {block} weights, got {n_per_row}; {hint}")
    lib = _libgguf()
    weights = None if imatrix is None or qtype == _F16 else _imatrix_array(imatrix, n_per_row)
    codes = lib.quantize_rows(rows, lib.GGMLQuantizationType[qtype], imatrix=weights)
    return GGUFEncoded(np.ascontiguousarray(codes).view(np.uint8), qtype, tuple(weight.shape),
                       out_dim if weight.ndim > 1 else 0, weight.dtype, weight.device)


# ----------------------------------------------------------------------------- methods


@dataclass
class _Prepared:
    types: dict[str, str]
    imatrix: dict[str, np.ndarray]


class _GGUFMethod(WeightMethod):
    """Shared by :class:`GGUFType` and :class:`GGUFPreset`: per-tensor types planned once per model in
    :meth:`prepare` (with the importance matrix when ``calibration`` is set), then encoded."""

    calibration: str | None
    _pure: bool = False

    def _normalize_calibration(self) -> None:
        value = self.calibration
        if isinstance(value, str) and value.strip().lower() in ("", "none"):
            value = None
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"calibration must be a calibration-set name ('en', 'sw', 'mix'...) or None, got {value!r}")
        object.__setattr__(self, "calibration", value.strip() if isinstance(value, str) else None)

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.calibration is not None

    @property
    @abc.abstractmethod
    def _preset(self) -> str:
        """The preset (or, for ``--pure``, the GGML type) whose rules give the tensor types."""

    @property
    def label(self) -> str:
        return f"gguf-{self._preset}" + (f"-imat-{self.calibration}" if self.calibration else "")

    def _importance(self, model: nn.Module, roles: Mapping[str, TensorRole], tokenizer: Any) -> dict[str, np.ndarray]:
        if self.calibration is None:
            return {}
        if tokenizer is None:
            raise ConfigError(f"{self.label} computes an importance matrix from calibration text and needs the "
                              "tokenizer: give QuantEngine the LoadedModel, not a bare module")
        # llama-imatrix collects the matrices of the decoder blocks only (not token_embd / output)
        targets = {n: r for n, r in roles.items() if r.component in LINEAR_COMPONENTS}
        matrix = calibration_imatrix(model, tokenizer, self.calibration, roles, names=sorted(targets))
        found = {n: matrix[n] for n in targets if n in matrix}
        return {n: np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v, dtype=np.float32)
                for n, v in found.items()}

    def prepare(self, model: nn.Module, roles: Mapping[str, TensorRole], tokenizer: Any = None) -> _Prepared:
        imatrix = self._importance(model, roles, tokenizer)
        types = preset_tensor_types(model, roles, self._preset, has_imatrix=bool(imatrix), pure=self._pure)
        return _Prepared(types, imatrix)

    def encode(self, weight: torch.Tensor, role: TensorRole, exclude: torch.Tensor | None, prepared: Any) -> Encoded:
        if not isinstance(prepared, _Prepared):
            raise ConfigError(f"{self.label} plans its per-tensor types in prepare(model, roles); "
                              "apply it through QuantEngine (or call prepare first)")
        qtype = prepared.types.get(role.name)
        if qtype is None:
            raise ConfigError(f"{role.name!r} is not a parameter of the model {self.label} was prepared for")
        if qtype == _KEEP:
            return DenseEncoded(weight, 32 * weight.numel())
        return encode_tensor(weight, qtype, prepared.imatrix.get(role.name), role.out_dim, exclude)


@dataclass(frozen=True)
class GGUFType(_GGUFMethod):
    """Every 2-D weight in one GGML type (``llama-quantize --pure``), with llama.cpp's fallback for
    rows that are not a multiple of the type's block (Q4_K -> Q5_0 on rows of 640...).

    ``qtype``: one of :data:`QTYPES`; ``calibration``: None (no importance matrix) or a
    calibration-set name for an importance matrix."""

    qtype: str = "Q4_K"
    calibration: str | None = None
    _pure = True

    def __post_init__(self) -> None:
        if not isinstance(self.qtype, str):
            raise ConfigError(f"GGUFType.qtype must be a GGML type name, got {self.qtype!r}; valid: {', '.join(QTYPES)}")
        object.__setattr__(self, "qtype", self.qtype.strip().upper())
        _check_qtype(self.qtype)
        self._normalize_calibration()

    @property
    def _preset(self) -> str:
        return self.qtype


@dataclass(frozen=True)
class GGUFPreset(_GGUFMethod):
    """A llama-quantize mixture preset (``Q4_K_M``, ``Q3_K_M``, ``Q2_K``...) with its per-tensor rules
    (:func:`preset_tensor_types`). ``calibration``: None or a calibration-set name for an importance
    matrix (which also switches on llama.cpp's ``has_imatrix`` rules)."""

    preset: str = "Q4_K_M"
    calibration: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.preset, str) or self.preset.strip().upper() not in PRESETS:
            raise ConfigError(f"unknown llama.cpp preset {self.preset!r}; valid: {', '.join(PRESETS)}")
        object.__setattr__(self, "preset", self.preset.strip().upper())
        self._normalize_calibration()

    @property
    def _preset(self) -> str:
        return self.preset

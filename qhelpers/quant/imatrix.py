"""Importance matrices: what llama.cpp's ``llama-imatrix`` computes, from calibration text.

For every weight matrix ``W`` that multiplies activations (``y = x W^T``), the importance of input
channel ``j`` is the mean squared input activation over the calibration tokens,
``imatrix[j] = sum_t x[t, j]^2 / n_tokens``. llama.cpp (``tools/imatrix/imatrix.cpp``,
``IMatrixCollector::collect_imatrix``) accumulates, per matrix, ``in_sum2[j] += x[j]^2`` for every
row (token) of the activation the matrix multiplies and ``counts += n_rows``; it stores both, and
``llama-quantize`` uses ``in_sum2 / counts`` (1.0 where a matrix saw no token). k-quant and i-quant
encoders then weight each column's rounding error by it (``libgguf.quantize_rows(..., imatrix=)``).

Differences from ``llama-imatrix``, and why:

* it concatenates the calibration file into one token stream, cuts it into ``n_ctx``-token chunks
  (default 512; the remainder is dropped) and puts BOS first in each; here each text is its own
  sequence (BOS first, as qhelpers scores text: :func:`~qhelpers.text.encoding.encode_text`), cut at
  ``max_length`` tokens, so texts of different languages never share a context;
* it skips matrix multiplications of fewer than 16 rows (small ubatches); every token counts here;
* it collects ``blk.*`` matrices (the decoder layers), and ``output.weight`` only with
  ``--process-output``; by default this module takes every per-layer linear role and lets
  ``names`` add the LM head.

Padding positions of a batch are left out of both the sums and the counts, so a batch gives the
same matrix as its texts one at a time (up to float rounding). Accumulation is float64.
"""
from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from qhelpers.models.archs import LINEAR_COMPONENTS, get_module
from qhelpers.models.loaded import LoadedModel, as_module
from qhelpers.quant.methods import TensorRole
from qhelpers.text.calibration import calibration_texts
from qhelpers.text.encoding import bos_id, default_batch_tokens, encode_text, iter_padded_batches
from qhelpers.util.errors import ConfigError

__all__ = ["ImportanceMatrix", "compute_imatrix", "default_imatrix_names", "calibration_imatrix"]


@dataclass(frozen=True)
class ImportanceMatrix:
    """Per-input-channel sums of squared activations (and token counts) of weight matrices.

    Equality and hashing go by ``digest`` (a SHA-256 of every name, count and float64 sum), so an
    importance matrix can be a field of a frozen method or a cache key; the arrays themselves are
    kept out of ``==`` and ``hash``. Build one with :func:`compute_imatrix` or
    :meth:`from_sums`; add two with ``+`` (llama.cpp's ``--in-file`` merge: sums and counts add).
    """

    digest: str
    names: tuple[str, ...]
    n_tokens: int
    source: str = field(default="", compare=False)
    _sums: dict[str, np.ndarray] = field(default_factory=dict, compare=False, hash=False, repr=False)
    _counts: dict[str, int] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_sums(cls, sums: Mapping[str, Any], counts: Mapping[str, int], source: str = "") -> "ImportanceMatrix":
        """An importance matrix from ``sums[name]`` (sum of x² per input channel) and
        ``counts[name]`` (tokens seen)."""
        if set(sums) != set(counts):
            raise ConfigError(f"sums and counts name different matrices: {sorted(set(sums) ^ set(counts))}")
        names = tuple(sorted(sums))
        s = {n: np.ascontiguousarray(np.asarray(sums[n], dtype=np.float64).reshape(-1)) for n in names}
        c = {n: int(counts[n]) for n in names}
        for n in names:
            if c[n] < 0 or not np.all(np.isfinite(s[n])) or np.any(s[n] < 0):
                raise ConfigError(f"importance matrix entry {n!r} has a negative count or a negative or non-finite sum")
            s[n].setflags(write=False)
        h = hashlib.sha256()
        for n in names:
            h.update(n.encode("utf-8") + b"\0")
            h.update(np.int64(c[n]).tobytes())
            h.update(np.int64(s[n].size).tobytes())
            h.update(s[n].tobytes())
        return cls(h.hexdigest(), names, max(c.values(), default=0), source, s, c)

    def sum(self, name: str) -> np.ndarray:
        """Sum of squared input activations per input channel (float64, read-only)."""
        return self._sums[self._check(name)]

    def count(self, name: str) -> int:
        """Tokens that went through ``name``."""
        return self._counts[self._check(name)]

    def vector(self, name: str) -> np.ndarray:
        """Mean squared input activation per input channel (float32, length ``in_features``), as
        llama-quantize reads it: ``sum / count``, all ones when the matrix saw no token."""
        s, c = self.sum(name), self.count(name)
        if c == 0:
            return np.ones(s.shape, dtype=np.float32)
        return (s / c).astype(np.float32)

    def as_dict(self) -> dict[str, np.ndarray]:
        """``{name: vector(name)}``."""
        return {n: self.vector(n) for n in self.names}

    def __contains__(self, name: object) -> bool:
        return name in self._sums

    def __getitem__(self, name: str) -> np.ndarray:
        """``imatrix[name]`` is :meth:`vector` (a read-only mapping of name to mean squares)."""
        return self.vector(name)

    def __len__(self) -> int:
        return len(self.names)

    def __add__(self, other: "ImportanceMatrix") -> "ImportanceMatrix":
        if not isinstance(other, ImportanceMatrix):
            return NotImplemented
        if set(self.names) != set(other.names):
            raise ConfigError("cannot add importance matrices of different tensors: "
                              f"{sorted(set(self.names) ^ set(other.names))[:5]}")
        for n in self.names:
            if self._sums[n].shape != other._sums[n].shape:
                raise ConfigError(f"{n!r} has {self._sums[n].size} input channels in one matrix, {other._sums[n].size} in the other")
        source = " + ".join(s for s in (self.source, other.source) if s)
        return ImportanceMatrix.from_sums({n: self._sums[n] + other._sums[n] for n in self.names},
                                          {n: self._counts[n] + other._counts[n] for n in self.names}, source)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (the arrays are identified by ``digest``)."""
        return {"digest": self.digest, "n_tensors": len(self.names), "n_tokens": self.n_tokens, "source": self.source}

    def _check(self, name: str) -> str:
        if name not in self._sums:
            raise ConfigError(f"no importance-matrix entry for {name!r}; it has {len(self.names)} entries, "
                              f"e.g. {', '.join(self.names[:3])}")
        return name


def default_imatrix_names(roles: Mapping[str, TensorRole]) -> list[str]:
    """The matrices llama-imatrix collects by default: every per-layer linear weight (its
    ``blk.*`` tensors), not the embedding or the LM head."""
    return [n for n, r in roles.items() if r.layer is not None and r.component in LINEAR_COMPONENTS]


class _Collector:
    """Forward pre-hooks that add up x² over the non-padding tokens of each hooked module's input."""

    def __init__(self, model: nn.Module, roles: Mapping[str, TensorRole], names: Sequence[str]) -> None:
        self.modules: dict[str, nn.Module] = {}
        self.in_features: dict[str, int] = {}
        params = dict(model.named_parameters(remove_duplicate=False))
        for name in names:
            if name not in roles:
                raise ConfigError(f"{name!r} is not a parameter of this model's roles; pass names from "
                                  "tensor_roles(model) (qhelpers.quant.methods)")
            module_path, _, attr = name.rpartition(".")
            weight = params.get(name)
            module = get_module(model, module_path) if module_path else model
            if attr != "weight" or weight is None or weight.dim() != 2 or isinstance(module, nn.Embedding):
                raise ConfigError(f"{name!r} is not the weight of a module that multiplies its input "
                                  "(a linear or GPT-2 Conv1D weight); an importance matrix needs one")
            self.modules[name] = module
            # nn.Linear stores [out, in] (out_dim 0); GPT-2's Conv1D stores [in, out] (out_dim 1)
            self.in_features[name] = int(weight.shape[1 - roles[name].out_dim])
        self.sums = {n: torch.zeros(k, dtype=torch.float64) for n, k in self.in_features.items()}
        self.counts = dict.fromkeys(self.in_features, 0)
        self.mask: torch.Tensor | None = None  # [batch, seq] bool of the current batch
        self.handles: list[Any] = []

    def __enter__(self) -> "_Collector":
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, name: str):
        k = self.in_features[name]

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if x.shape[-1] != k:
                raise ConfigError(f"{name!r}: its module's input has {x.shape[-1]} features, the weight {k} input "
                                  "channels; the role's out_dim does not match how the module uses its weight")
            x = x.detach().reshape(-1, k)
            mask = self.mask
            if mask is not None:
                if mask.numel() != x.shape[0]:
                    raise ConfigError(f"{name!r}: its input has {x.shape[0]} rows, the batch {mask.numel()} token "
                                      "positions; cannot tell padding apart (a module that does not see every token?)")
                x = x[mask.reshape(-1).to(x.device)]
            xd = x.to(torch.float64)
            self.sums[name] += (xd * xd).sum(dim=0).cpu()
            self.counts[name] += int(x.shape[0])

        return hook


def compute_imatrix(
    model: nn.Module | LoadedModel,
    tokenizer: Any,
    texts: Iterable[str],
    roles: Mapping[str, TensorRole],
    names: Sequence[str] | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    progress: bool = False,
    source: str = "",
) -> ImportanceMatrix:
    """The importance matrix of ``model`` over ``texts``.

    ``roles``: :func:`~qhelpers.quant.methods.tensor_roles` of the model (which dimension of each
    weight is its input); ``names``: the weights to collect (default
    :func:`default_imatrix_names`: every per-layer linear weight; a fused weight such as GPT-2's
    ``c_attn`` is one matrix with one vector). Each text is encoded as qhelpers scores it (BOS
    first), cut at ``max_length`` tokens and run in right-padded batches of at most
    ``batch_size`` texts; padding is not counted. ``tokenizer`` None takes the LoadedModel's.
    ``source`` labels the result (e.g. the calibration set's name); it is not part of equality.
    """
    if isinstance(model, LoadedModel) and tokenizer is None:
        tokenizer = model.tokenizer
    if tokenizer is None:
        raise ConfigError("compute_imatrix needs a tokenizer: pass it, or pass the LoadedModel")
    if not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"max_length must be a positive int, got {max_length!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    module = as_module(model)
    texts = list(texts)
    if not texts:
        raise ConfigError("no calibration texts: an importance matrix needs at least one text "
                          "(calibration set 'none' means: do not use an importance matrix)")
    names = list(default_imatrix_names(roles) if names is None else names)
    if not names:
        raise ConfigError("no weights to collect: roles has no per-layer linear weight and names is empty")
    seqs = [encode_text(tokenizer, t)[:max_length] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos_id(tokenizer)
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    try:
        with _Collector(module, roles, names) as collector, torch.no_grad():
            for batch in iter_padded_batches(seqs, int(pad or 0), device, default_batch_tokens(device), batch_size,
                                             progress=progress, desc="imatrix"):
                collector.mask = batch.attention_mask.bool()
                module(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                       use_cache=False)
    finally:
        module.train(was_training)
    return ImportanceMatrix.from_sums({n: s.numpy() for n, s in collector.sums.items()}, collector.counts, source)


#: model -> {(calibration set, weights' storage, names): ImportanceMatrix}; entries die with the model
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, ImportanceMatrix]]" = weakref.WeakKeyDictionary()


def calibration_imatrix(model: nn.Module | LoadedModel, tokenizer: Any, calibration: str,
                        roles: Mapping[str, TensorRole], names: Sequence[str] | None = None) -> ImportanceMatrix:
    """:func:`compute_imatrix` over the calibration set ``calibration`` (:mod:`qhelpers.text.calibration`),
    computed once per model and set: several quantization configurations calibrated on the same text
    (Q4_K_M and Q2_K on Swahili) share it. The cache key includes every parameter's storage address,
    so a model whose weights were swapped or reloaded is measured again (weights edited in place are
    not noticed: call :func:`compute_imatrix` directly after such edits)."""
    module = as_module(model)
    names = tuple(default_imatrix_names(roles) if names is None else names)
    key = (calibration, tuple(p.data_ptr() for p in module.parameters()), names)
    per_model = _CACHE.setdefault(module, {})
    if key not in per_model:
        per_model[key] = compute_imatrix(model, tokenizer, calibration_texts(calibration), roles, names=list(names),
                                         source=f"calibration set {calibration!r}")
    return per_model[key]

"""``LoadedModel``: a causal LM with its tokenizer, architecture entry, device, dtype and origin.

Kept apart from :mod:`qhelpers.models.loading` (which imports transformers' loaders and
the GGUF converter) so that code that only needs the type stays light."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qhelpers.models.archs import (
    ArchSpec,
    num_layers,
)


#: ``LoadedModel.context_length`` never exceeds this (long-context models such as
#: Gemma-3 report 32k positions; nothing here evaluates windows that long).
MAX_CONTEXT_LENGTH = 8192

#: Context length assumed for architectures without a position limit (BLOOM's ALiBi)
#: and tokenizers that do not state one.
_FALLBACK_CONTEXT_LENGTH = 2048

@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, its registry entry and where it came from."""

    model: nn.Module
    tokenizer: Any
    spec: str
    arch: ArchSpec
    device: torch.device
    dtype: torch.dtype
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return num_layers(self.model, self.arch)

    @property
    def n_params(self) -> int:
        """Number of distinct parameters (tied embeddings counted once)."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def fp32_bytes(self) -> int:
        """Size of the parameters in float32 (``n_params * 4``)."""
        return self.n_params * 4

    @property
    def model_type(self) -> str:
        return self.arch.model_type

    @property
    def source(self) -> str:
        return str(self.metadata.get("source", "unknown"))

    @property
    def context_length(self) -> int:
        """Longest input the model should be given, in tokens.

        The config's position limit (``n_positions`` / ``max_position_embeddings`` /
        ``n_ctx`` / ``seq_length``), lowered to the tokenizer's ``model_max_length`` when that
        is smaller, and capped at :data:`MAX_CONTEXT_LENGTH`.
        """
        return context_length_of(self.model, self.tokenizer)

    def describe(self) -> str:
        """One-line summary."""
        m = self.metadata
        extra = ""
        if m.get("source") == "embedded":
            extra = f", dequantized GGUF {m.get('gguf_quantization', '?')} baseline"
        elif m.get("source") == "tiny":
            extra = f", random init (seed {m.get('seed')})"
        return (
            f"{self.spec}: {self.arch.model_type}, {self.n_layers} layers, "
            f"{self.n_params / 1e6:.1f}M params, {dtype_name(self.dtype)} on {self.device}, "
            f"source={m.get('source', 'unknown')}{extra}"
        )

    def __repr__(self) -> str:  # the dataclass repr would print the whole module tree
        return f"LoadedModel({self.describe()})"


def as_module(model: Any) -> nn.Module:
    """The ``nn.Module`` of a :class:`LoadedModel`, or ``model`` itself when it already is one.

    (A plain ``getattr(x, "model", x)`` would be wrong: Hugging Face causal LMs have a
    ``.model`` attribute too, their decoder body.)
    """
    return model.model if isinstance(model, LoadedModel) else model


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (as results and zoo manifests record it)."""
    return str(dtype).removeprefix("torch.")


def context_length_of(model: nn.Module, tokenizer: Any) -> int:
    config = getattr(model, "config", None)
    value = None
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length", "max_sequence_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            value = v
            break
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        value = tok_max if value is None else min(value, tok_max)
    if value is None:
        value = _FALLBACK_CONTEXT_LENGTH
    return min(value, MAX_CONTEXT_LENGTH)

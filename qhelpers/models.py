"""Model loading: hub ids, local folders, embedded GGUF models and tiny random models.

(Interface stub: the implementation is being written.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .archs import ArchSpec, num_layers


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

"""Per-token KL divergence of a quantized model's next-token distribution from the full-precision one.

``KL(p_full || p_quant) = sum_v p_v (log p_v - log q_v)`` in nats, for each prediction (row) of
two ``[..., vocab]`` tensors, computed in float64 as ``sum p log p - sum p log q``. The first sum
depends on the reference only, so :class:`KLReference` computes it once and compares any number
of quantized outputs with it; :func:`kl_divergence` is the one-off form. Inputs are
log-probabilities by default, or logits with ``logits=True`` (normalised here with a float64
``log_softmax``). Identical rows give exactly 0; rounding can make nearly identical rows a hair
negative (about 1e-15 times the entropy).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qhelpers.util.errors import ConfigError

__all__ = ["KLReference", "kl_divergence", "token_kl"]


def _log_probs(x: Any, logits: bool) -> torch.Tensor:
    """float64 CPU log-probabilities of ``x`` (log-probabilities, or logits when ``logits``)."""
    t = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    if t.dim() < 1 or t.shape[-1] < 1:
        raise ConfigError(f"expected [..., vocab] {'logits' if logits else 'log-probabilities'}, got shape {tuple(t.shape)}")
    return torch.log_softmax(t, dim=-1) if logits else t


class KLReference:
    """The reference distribution ``p_full`` of ``KL(p_full || q)``, prepared once.

    ``reference``: ``[..., vocab]`` log-probabilities (or logits with ``logits=True``) of the
    full-precision model. :meth:`divergence` compares a quantized model's output with it.
    """

    def __init__(self, reference: Any, *, logits: bool = False) -> None:
        logp = _log_probs(reference, logits)
        self.p = logp.exp()
        self.neg_entropy = torch.einsum("...v,...v->...", self.p, logp)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape ``[..., vocab]`` of the reference."""
        return tuple(self.p.shape)

    def divergence(self, other: Any, *, logits: bool = False) -> np.ndarray:
        """``KL(p_full || q)`` in nats per row (float64 ``[...]``), ``other`` the ``[..., vocab]``
        log-probabilities (or logits with ``logits=True``) of ``q``, shaped like the reference."""
        logq = _log_probs(other, logits)
        if tuple(logq.shape) != self.shape:
            raise ConfigError(
                f"log-probabilities must have the same shape [..., vocab], got {self.shape} and {tuple(logq.shape)}"
            )
        return (self.neg_entropy - torch.einsum("...v,...v->...", self.p, logq)).numpy()


def kl_divergence(full: Any, quant: Any, *, logits: bool = False) -> np.ndarray:
    """Per-token ``KL(p_full || p_quant)`` in nats (float64 ``[...]``) from two ``[..., vocab]``
    tensors of log-probabilities (or logits with ``logits=True``) of the same shape; see the
    module docstring."""
    return KLReference(full, logits=logits).divergence(quant, logits=logits)


def token_kl(logp_full: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(p_full || q) = sum_v p_v (log p_v - log q_v)`` in nats, summed in float64,
    on the tensors' own device (the sweep's damage card: one call per batch of token positions).

    Computed as the weighted sum of differences (not ``sum p log p - sum p log q``), so two
    identical rows give exactly 0 and small divergences keep their digits: with float32
    log-probabilities the rounding is about 1e-7 nats per row (the terms are float32, their sum
    float64).
    """
    if logp_full.shape != logq.shape:
        raise ConfigError(f"log-probabilities must have the same shape, got {tuple(logp_full.shape)} and {tuple(logq.shape)}")
    return (logp_full.exp() * (logp_full - logq)).sum(dim=-1, dtype=torch.float64)

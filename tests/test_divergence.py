"""measure.divergence: per-token KL(p_full || p_quant) against torch's own kl_div."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qhelpers.measure.divergence import KLReference, kl_divergence
from qhelpers.util.errors import ConfigError


def _logits(seed: int, shape=(3, 5, 40), scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _torch_kl(full_logits: torch.Tensor, quant_logits: torch.Tensor) -> np.ndarray:
    """KL(p_full || p_quant) per row with torch.nn.functional.kl_div (input = log q, target = log p)."""
    log_p = torch.log_softmax(full_logits, dim=-1)
    log_q = torch.log_softmax(quant_logits, dim=-1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1).numpy()


def test_kl_matches_torch_kl_div_from_log_probs_and_from_logits():
    full, quant = _logits(0), _logits(1)
    expected = _torch_kl(full, quant)
    from_logp = kl_divergence(torch.log_softmax(full, -1), torch.log_softmax(quant, -1))
    from_logits = kl_divergence(full, quant, logits=True)
    assert from_logp.shape == (3, 5)
    np.testing.assert_allclose(from_logp, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(from_logits, expected, rtol=1e-12, atol=1e-15)
    assert (from_logp > 0).all()


def test_kl_of_a_small_perturbation_and_of_identical_rows():
    full = _logits(2, (4, 30))
    quant = full + 1e-3 * _logits(3, (4, 30), scale=1.0)
    np.testing.assert_allclose(kl_divergence(full, quant, logits=True), _torch_kl(full, quant), rtol=1e-9)
    logp = torch.log_softmax(full, -1)
    assert kl_divergence(logp, logp.clone()).tolist() == [0.0] * 4


def test_reference_is_prepared_once_and_compared_with_many():
    full = torch.log_softmax(_logits(4), -1)
    ref = KLReference(full)
    for seed in (5, 6):
        quant = torch.log_softmax(_logits(seed), -1)
        assert np.array_equal(ref.divergence(quant), kl_divergence(full, quant))
    # float32 inputs are computed in float64 and agree with torch to float32 precision
    quant = _logits(7)
    np.testing.assert_allclose(KLReference(full.float()).divergence(torch.log_softmax(quant, -1).float()),
                               _torch_kl(_logits(4), quant), rtol=1e-5)


def test_kl_shape_errors_name_the_problem():
    with pytest.raises(ConfigError, match="same shape"):
        kl_divergence(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ConfigError, match=r"\[\.\.\., vocab\]"):
        kl_divergence(torch.tensor(0.0), torch.tensor(0.0))

"""Quantities derived from summed negative log-likelihoods, each computed by one formula.

Every conversion of nats to bits in the package goes through :func:`nats_to_bits` (a test
enforces it), and bits per byte and perplexity through :func:`bits_per_byte` and
:func:`perplexity`. The functions work elementwise on Python or numpy scalars, numpy arrays
and pandas Series alike.
"""
from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["bits_per_byte", "nats_to_bits", "perplexity", "KL_HIST_EDGES", "histogram_quantile"]

_LN2 = math.log(2.0)

#: A scalar, a numpy array or a pandas Series (elementwise arithmetic).
Values = Union[float, np.ndarray, "pd.Series"]


def nats_to_bits(nats: Values) -> Values:
    """``nats / ln 2``: a log-likelihood, loss or divergence in nats, in bits."""
    return nats / _LN2


def bits_per_byte(nll_nats: Values, n_bytes: Values) -> Values:
    """``nll_nats / ln 2 / n_bytes``: a summed negative log-likelihood in nats, in bits per
    UTF-8 byte. Always in this order (to bits first, then per byte), so that every result is
    the same to the last bit wherever it is computed."""
    return nats_to_bits(nll_nats) / n_bytes


def perplexity(nll_nats: Values, n_tokens: Values) -> Values:
    """``exp(nll_nats / n_tokens)``: the perplexity of a summed negative log-likelihood in nats
    over ``n_tokens`` scored tokens.

    A scalar goes through :func:`math.exp` (an overflow gives ``inf``), an array or Series
    through :func:`numpy.exp`. The two can differ in the last bit, so a point estimate and its
    bootstrap replicates are exponentiated the way they always were.
    """
    per_token = nll_nats / n_tokens
    if isinstance(per_token, numbers.Real):
        try:
            return math.exp(per_token)
        except OverflowError:
            return math.inf
    return np.exp(per_token)


#: Bin edges (nats) of the per-token KL histograms a sweep keeps per text (the damage card's
#: tail KL): 0, then 40 log-spaced bins per decade from 1e-7 to 1e2 nats, then infinity. Per-token
#: KLs are not kept one by one (a corpus has ~1e5-1e6 tokens per variant); a histogram per
#: text is small, adds up over resampled texts, and gives a quantile to within one bin
#: (a factor 10**(1/40), 5.9 %) by :func:`histogram_quantile`.
KL_HIST_EDGES: np.ndarray = np.concatenate([[0.0], np.logspace(-7, 2, 9 * 40 + 1), [np.inf]])


def histogram_quantile(counts: np.ndarray, q: float, edges: np.ndarray = KL_HIST_EDGES) -> np.ndarray:
    """The ``q`` quantile (0 < q < 1) of values summarised by histogram ``counts`` over ``edges``.

    ``counts``: ``(..., n_bins)`` with ``n_bins = len(edges) - 1`` (e.g. bootstrap replicates of
    summed per-text histograms). Within the bin where the cumulative share crosses ``q`` the
    value is interpolated geometrically (linearly in the first bin, which starts at 0; the
    last, open bin returns its lower edge). NaN where a histogram is empty. Exact to within the
    bin holding the quantile.
    """
    if not 0.0 < float(q) < 1.0:
        raise ValueError(f"q must be in (0, 1), e.g. 0.99; got {q}")
    c = np.asarray(counts, dtype=np.float64)
    if c.shape[-1] != len(edges) - 1:
        raise ValueError(f"counts have {c.shape[-1]} bins but edges define {len(edges) - 1}")
    total = c.sum(axis=-1, keepdims=True)
    cum = np.cumsum(c, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        target = q * total
        k = np.minimum((cum < target).sum(axis=-1, keepdims=True), c.shape[-1] - 1)
        below = np.take_along_axis(cum, k, axis=-1) - np.take_along_axis(c, k, axis=-1)
        inside = np.take_along_axis(c, k, axis=-1)
        frac = np.clip((target - below) / inside, 0.0, 1.0)
        lo, hi = edges[k], edges[np.minimum(k + 1, len(edges) - 1)]
        geometric = lo * (hi / np.where(lo > 0, lo, 1.0)) ** frac
        value = np.where(lo > 0, geometric, lo + frac * (hi - lo))
        value = np.where(np.isinf(hi), lo, value)
        value = np.where(total > 0, value, np.nan)
    return value[..., 0]

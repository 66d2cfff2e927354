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

__all__ = ["bits_per_byte", "nats_to_bits", "perplexity"]

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

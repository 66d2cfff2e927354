"""Residual-stream activations and the statistics the theory notebooks compute on them.

Capture
-------
:func:`iter_residual_batches` runs a whole list of token sequences through the model in
least-padding batches and yields each batch's residual stream; it is built on
:func:`capture_residual`, which hooks the decoder blocks found through the architecture
registry (:func:`qhelpers.models.archs.decoder_layers`; no class-name checks) and returns, for
each requested layer ``i``, the block's output hidden states -- the residual stream after
block ``i`` -- as a detached fp32 CPU tensor ``[batch, seq, hidden]``.

How this relates to ``model(..., output_hidden_states=True).hidden_states`` (checked by
``tests/test_activations.py`` with transformers 5.23 for gpt2, llama, opt, bloom,
gpt_neox, qwen2 and gemma3_text)::

    hidden_states[0]      embedding output (after BLOOM's word_embeddings_layernorm and
                          Gemma's sqrt(d) scaling); no block hook sees it
    hidden_states[i + 1]  == capture_residual(...)[i]   for i = 0 .. n_layers - 2 (exact)
    hidden_states[-1]     == final_norm(capture_residual(...)[n_layers - 1]), NOT the raw
                          last block output, in every architecture above.
                          OPT checkpoints without a final layer norm (opt-350m:
                          do_layer_norm_before=False) apply ``project_out`` instead, so
                          there hidden_states[-1] even has a different width
                          (word_embed_proj_dim).

So the hooks give the un-normalised residual stream for every layer, the last included;
``hidden_states`` mixes the final norm into its last entry. Use the hooks when comparing
layers with each other or quantized against full precision.

Statistics
----------
Pure functions (also collected on :class:`ActivationStats`), each computed in fp64 and
tested against a known answer: :func:`pooled`, :func:`flatten_tokens`,
:func:`mean_abs_activation`, :func:`cosine_similarity`, :func:`effective_dimension`,
:func:`participation_ratio`, :func:`activation_entropy`, :func:`linear_cka` and
:func:`residual_divergence`.

Masks follow Hugging Face: ``attention_mask[b, t] == 1`` for a real token and ``0`` for
padding (either padding side).
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from qhelpers.models.archs import ArchSpec, decoder_layers, get_arch, resolve_layers
from qhelpers.text.encoding import iter_padded_batches
from qhelpers.util.errors import ConfigError, MeasurementError

__all__ = [
    "capture_residual",
    "ResidualBatch",
    "iter_residual_batches",
    "pooled",
    "flatten_tokens",
    "mean_abs_activation",
    "cosine_similarity",
    "effective_dimension",
    "participation_ratio",
    "activation_entropy",
    "linear_cka",
    "residual_divergence",
    "ActivationStats",
]


# ----------------------------------------------------------------------------- capture


class _StopForward(Exception):
    """Raised from a hook to end the forward pass once every wanted layer is captured."""


def _block_hidden(output) -> torch.Tensor:
    """Hidden states of a decoder block's output (a tensor, or the first item of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    try:
        hidden = output[0]
    except (TypeError, IndexError, KeyError):
        hidden = None
    if not isinstance(hidden, torch.Tensor):
        raise MeasurementError(
            f"a decoder block returned {type(output).__name__}, whose first item is not a tensor; "
            "capture_residual expects the block output to be the hidden states or a tuple "
            "starting with them. Check the architecture's `layers` path in qhelpers.models.archs."
        )
    return hidden


def capture_residual(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    layers: int | Iterable[int] | None = None,
    *,
    arch: ArchSpec | None = None,
    stop_early: bool = False,
    **forward_kwargs,
) -> dict[int, torch.Tensor]:
    """Residual-stream output of decoder blocks for one batch.

    Parameters
    ----------
    model:
        A Hugging Face causal LM whose ``model_type`` is in the registry.
    input_ids, attention_mask:
        ``[batch, seq]`` (a 1-D ``input_ids`` is treated as one sequence). They are moved
        to the device of the model's first parameter.
    layers:
        ``None`` (every block), one index or several; negative indices count from the end
        and anything out of range raises :class:`~qhelpers.util.errors.ConfigError`. Keys of the
        result are the non-negative indices, ascending.
    stop_early:
        End the forward pass (by an exception caught here) right after the last requested
        block, which saves the remaining layers and the LM head. The captured values are
        unaffected because a block's output does not depend on later blocks.
    forward_kwargs:
        Passed to ``model(...)``; ``use_cache`` defaults to ``False``.

    Returns
    -------
    ``{layer: Tensor[batch, seq, hidden]}``, detached copies in fp32 on the CPU. These are
    the raw block outputs; see the module docstring for how they relate to
    ``output_hidden_states`` (the last entry there has the final norm applied).

    The forward runs under ``torch.no_grad()``; the hooks are removed in a ``finally``
    block, so an exception in the forward leaves the model without extra hooks.
    If a block runs more than once in the forward, the last call's output is kept.
    """
    arch = arch or get_arch(model)
    blocks = decoder_layers(model, arch)
    wanted = resolve_layers(layers, len(blocks))

    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        if attention_mask is not None and torch.as_tensor(attention_mask).dim() == 1:
            attention_mask = torch.as_tensor(attention_mask).unsqueeze(0)
    if input_ids.dim() != 2:
        raise ConfigError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ConfigError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                f"shape {tuple(input_ids.shape)}"
            )

    try:
        device = next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        device = input_ids.device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    forward_kwargs.setdefault("use_cache", False)

    captured: dict[int, torch.Tensor] = {}
    last = wanted[-1]

    def make_hook(index: int):
        def hook(module, args, output):
            hidden = _block_hidden(output)
            captured[index] = hidden.detach().to(device="cpu", dtype=torch.float32, copy=True)
            if stop_early and index == last:
                raise _StopForward

        return hook

    handles = []
    try:
        for index in wanted:
            handles.append(blocks[index].register_forward_hook(make_hook(index)))
        with torch.no_grad():
            try:
                model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()

    missing = [i for i in wanted if i not in captured]
    if missing:
        raise MeasurementError(
            f"decoder blocks {missing} never ran in the forward pass; check the architecture's "
            "`layers` path in qhelpers.models.archs"
        )
    batch, seq = input_ids.shape
    for index, hidden in captured.items():
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != (batch, seq):
            raise MeasurementError(
                f"block {index} output has shape {tuple(hidden.shape)}; expected "
                f"[batch={batch}, seq={seq}, hidden]"
            )
    return {i: captured[i] for i in wanted}


class ResidualBatch(NamedTuple):
    """One batch of :func:`iter_residual_batches`.

    ``index``: positions (in the sequences given) of the batch's rows; ``input_ids`` and
    ``attention_mask``: the right-padded ``[batch, longest]`` CPU tensors that went through
    the model; ``residual``: :func:`capture_residual`'s ``{layer: Tensor[batch, longest,
    hidden]}`` (fp32, CPU). Row ``r`` holds sequence ``index[r]`` at positions
    ``0 .. len(sequence) - 1``, padding after them.
    """

    index: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    residual: dict[int, torch.Tensor]


def iter_residual_batches(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    layers: int | Iterable[int] | None,
    pad_id: int,
    *,
    batch_tokens: int | None,
    max_batch: int,
    progress: bool = False,
    desc: str = "activations",
) -> Iterator[ResidualBatch]:
    """Residual stream of every token sequence, one least-padding batch at a time.

    The sequences (token ids, e.g. ``EncodedText.ids``) are grouped by
    :func:`qhelpers.text.encoding.iter_padded_batches` (at most ``max_batch`` sequences and
    ``batch_tokens`` padded tokens a batch, ``None``: no token budget; the batch cost is
    priced for the model's device), right-padded with ``pad_id`` and run through
    :func:`capture_residual` with the attention mask, stopping after the last of ``layers``
    (``None``: every block). A row's first ``len(sequence)`` positions are what the sequence
    alone would give, up to float rounding (the batch shape can change the kernels' summation
    order; tested against one unpadded sequence at a time). Batches come longest first;
    ``progress`` shows a bar labelled ``desc``.
    """
    device = next(model.parameters()).device
    batches = iter_padded_batches(sequences, pad_id, device, batch_tokens, max_batch, progress=progress, desc=desc)
    for index, input_ids, attention_mask in batches:
        residual = capture_residual(model, input_ids, attention_mask, layers, stop_early=True)
        yield ResidualBatch(index, input_ids, attention_mask, residual)
        del residual  # hold no reference during the next forward: the caller's del frees the batch


# ----------------------------------------------------------------------------- masks


def _mask_for(acts: torch.Tensor, attention_mask) -> torch.Tensor:
    """A float64 ``[batch, seq]`` 0/1 mask (all ones when ``attention_mask`` is None)."""
    if acts.dim() != 3:
        raise ConfigError(f"activations must be [batch, seq, hidden], got shape {tuple(acts.shape)}")
    if attention_mask is None:
        return torch.ones(acts.shape[:2], dtype=torch.float64)
    mask = torch.as_tensor(attention_mask).detach().to("cpu")
    if mask.dim() == 1 and acts.shape[0] == 1:
        mask = mask.unsqueeze(0)
    if tuple(mask.shape) != tuple(acts.shape[:2]):
        raise ConfigError(
            f"attention_mask shape {tuple(mask.shape)} does not match activations [batch, seq] = "
            f"{tuple(acts.shape[:2])}"
        )
    mask = mask.to(torch.float64)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ConfigError("attention_mask must contain only 0 (padding) and 1 (real token)")
    return mask


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)


def pooled(acts, attention_mask=None, how: str = "mean"):
    """Pool ``[batch, seq, hidden]`` activations to ``[batch, hidden]`` (fp32, CPU).

    ``how="mean"``: mean over the real tokens of each sequence.
    ``how="last"``: the last real token (the highest position whose mask is 1, so it works
    for right and left padding).
    A dict ``{layer: acts}`` is pooled layer by layer. A sequence with no real token raises
    :class:`~qhelpers.util.errors.MeasurementError`.
    """
    if isinstance(acts, Mapping):
        return {k: pooled(v, attention_mask, how) for k, v in acts.items()}
    return _pooled64(acts, attention_mask, how).to(torch.float32)


def _pooled64(acts, attention_mask, how: str) -> torch.Tensor:
    if how not in ("mean", "last"):
        raise ConfigError(f"how must be 'mean' or 'last', got {how!r}")
    x = _f64(acts)
    mask = _mask_for(x, attention_mask)
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise MeasurementError(f"sequences {empty} have no real token (attention_mask all 0)")
    if how == "mean":
        out = (x * mask[..., None]).sum(dim=1) / counts[:, None]
    else:
        positions = torch.arange(x.shape[1], dtype=torch.float64)
        last = (mask * (positions + 1)).argmax(dim=1)
        out = x[torch.arange(x.shape[0]), last]
    return out


def flatten_tokens(acts, attention_mask=None) -> torch.Tensor:
    """The real-token rows of ``[batch, seq, hidden]`` activations as ``[n_tokens, hidden]``.

    A 2-D input is returned as is (it already is ``[n, d]``).
    """
    x = torch.as_tensor(acts).detach().to("cpu")
    if x.dim() == 2:
        if attention_mask is not None:
            raise ConfigError("attention_mask applies to [batch, seq, hidden] activations, got 2-D input")
        return x
    mask = _mask_for(x, attention_mask)
    return x[mask.bool()]


def _rows(x, attention_mask=None) -> torch.Tensor:
    rows = _f64(flatten_tokens(x, attention_mask))
    if rows.dim() != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
        raise MeasurementError(f"need a non-empty [n, d] matrix, got shape {tuple(rows.shape)}")
    if not bool(torch.isfinite(rows).all()):
        raise MeasurementError("activations contain NaN or inf")
    return rows


# ----------------------------------------------------------------------------- statistics


def mean_abs_activation(acts, attention_mask=None):
    """Mean absolute activation over real tokens and hidden units.

    Seed 003's per-layer activation magnitude ``hidden.abs().mean()``, with padding
    excluded. A dict ``{layer: acts}`` gives ``{layer: float}``.
    """
    if isinstance(acts, Mapping):
        return {k: mean_abs_activation(v, attention_mask) for k, v in acts.items()}
    x = _f64(acts)
    if x.dim() == 2 and attention_mask is None:
        return float(x.abs().mean())
    mask = _mask_for(x, attention_mask)
    n = mask.sum() * x.shape[-1]
    if n == 0:
        raise MeasurementError("no real token in the batch (attention_mask all 0)")
    return float((x.abs() * mask[..., None]).sum() / n)


def _cos_rows(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    num = (a * b).sum(dim=-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return num / den.clamp_min(eps)


def cosine_similarity(
    a,
    b,
    attention_mask=None,
    *,
    pool: str | None = None,
    mask_b=None,
    reduce: bool = True,
    eps: float = 1e-12,
):
    """Cosine similarity of two activation tensors along the hidden dimension.

    Token-wise (``pool=None``): ``a`` and ``b`` have the same shape ``[batch, seq, hidden]``
    (or ``[n, hidden]``); the cosine of each real-token pair is averaged over the real
    tokens. Pooled (``pool="mean"`` or ``"last"``): each sequence is pooled first (``a``
    with ``attention_mask``, ``b`` with ``mask_b`` if given, else the same mask, so the two
    may have different lengths, e.g. translations) and the per-sequence cosines are
    averaged over the batch. A zero vector has cosine 0 with everything (denominator
    clamped at ``eps``). ``reduce=False`` returns the per-token ``[batch, seq]`` (padding
    NaN) or per-sequence ``[batch]`` tensor instead of the mean.
    """
    if pool is not None:
        pa = _pooled64(a, attention_mask, pool)
        pb = _pooled64(b, attention_mask if mask_b is None else mask_b, pool)
        if pa.shape != pb.shape:
            raise ConfigError(f"pooled shapes differ: {tuple(pa.shape)} vs {tuple(pb.shape)}")
        cos = _cos_rows(pa, pb, eps)
        return cos if not reduce else float(cos.mean())
    if mask_b is not None:
        raise ConfigError("mask_b is only used with pool='mean' or 'last'")
    xa, xb = _f64(a), _f64(b)
    if xa.shape != xb.shape:
        raise ConfigError(f"shapes differ: {tuple(xa.shape)} vs {tuple(xb.shape)}; use pool= for different lengths")
    cos = _cos_rows(xa, xb, eps)
    if xa.dim() == 2:
        if attention_mask is not None:
            raise ConfigError("attention_mask applies to [batch, seq, hidden] activations")
        return cos if not reduce else float(cos.mean())
    mask = _mask_for(xa, attention_mask)
    if not reduce:
        return torch.where(mask.bool(), cos, torch.full_like(cos, float("nan")))
    n = mask.sum()
    if n == 0:
        raise MeasurementError("no real token in the batch (attention_mask all 0)")
    return float((cos * mask).sum() / n)


def _centred_sq_singular_values(x, attention_mask=None) -> torch.Tensor:
    """Squared singular values of the column-centred data (PCA variances up to 1/(n-1))."""
    rows = _rows(x, attention_mask)
    centred = rows - rows.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(centred)
    lam = s * s
    if float(lam.sum()) == 0.0:
        raise MeasurementError("the data has zero variance; its dimensionality is undefined")
    return lam


def effective_dimension(x, threshold: float = 0.95, attention_mask=None) -> int:
    """Number of principal components needed to explain ``threshold`` of the variance.

    The same number as seed 004 T-007 (sklearn ``PCA().fit(x)``, then
    ``np.searchsorted(cumsum(explained_variance_ratio_), threshold) + 1``), computed from
    the singular values of the column-centred data. ``x`` is ``[n, d]`` or
    ``[batch, seq, hidden]`` (real tokens become rows). A relative slack of 1e-12 on the
    cumulative ratio keeps an exactly reached threshold from counting one component more
    through rounding.
    """
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"threshold must be in (0, 1], got {threshold}")
    lam = _centred_sq_singular_values(x, attention_mask)
    ratio = (lam / lam.sum()).numpy()
    cumsum = np.cumsum(ratio)
    k = int(np.searchsorted(cumsum, threshold - 1e-12)) + 1
    return min(k, len(ratio))


def participation_ratio(x, attention_mask=None) -> float:
    """Participation ratio ``(sum l_i)^2 / sum l_i^2`` of the covariance eigenvalues ``l_i``.

    A continuous dimensionality: ``k`` for variance spread equally over ``k`` orthogonal
    directions, 1 for a single direction. Computed from the centred data's singular values
    (the 1/(n-1) factor cancels).
    """
    lam = _centred_sq_singular_values(x, attention_mask)
    return float(lam.sum() ** 2 / (lam * lam).sum())


def activation_entropy(
    x,
    bins: int = 100,
    attention_mask=None,
    *,
    value_range: tuple[float, float] | None = None,
    differential: bool = False,
) -> float:
    """Shannon entropy, in bits, of the histogram of all activation values.

    Estimator: the plug-in (maximum-likelihood) entropy ``H = -sum_i p_i log2 p_i`` of an
    equal-width histogram with ``bins`` bins over ``value_range`` (default: the data's min
    to max), empty bins contributing 0. It is the entropy of the *discretised* values, so
    it depends on ``bins`` and the range: compare numbers only at equal ``bins`` (and,
    ideally, a fixed ``value_range``). It is biased low for few samples per bin (Miller-Madow
    bias about ``(K - 1) / (2 N ln 2)`` bits for ``K`` occupied bins and ``N`` values).
    ``differential=True`` adds ``log2(bin width)``, the histogram estimate of the
    differential entropy ``h(X)`` (about ``0.5 * log2(2 pi e sigma^2)`` for a Gaussian).
    Padding tokens are excluded when ``attention_mask`` is given.
    """
    if not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ConfigError(f"bins must be a positive int, got {bins!r}")
    t = torch.as_tensor(x)
    values = flatten_tokens(t, attention_mask) if attention_mask is not None else t
    values = _f64(values).reshape(-1).numpy()
    if values.size == 0:
        raise MeasurementError("no values to compute an entropy of")
    if not np.isfinite(values).all():
        raise MeasurementError("activations contain NaN or inf")
    counts, edges = np.histogram(values, bins=int(bins), range=value_range)
    total = counts.sum()
    if total == 0:
        raise MeasurementError(f"no value falls inside value_range={value_range}")
    p = counts[counts > 0] / total
    h = float(-(p * np.log2(p)).sum())
    if differential:
        h += math.log2(edges[1] - edges[0])
    return h


def linear_cka(x, y, attention_mask=None) -> float:
    """Linear centred kernel alignment (Kornblith et al., 2019) of two representations.

    ``x`` is ``[n, d1]`` and ``y`` ``[n, d2]`` with the same ``n`` examples in the same
    order (or ``[batch, seq, hidden]`` with one shared mask). With column-centred ``X``,
    ``Y``: ``CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``. It lies in [0, 1], equals 1
    for ``x`` against itself, is invariant to orthogonal transforms and isotropic scaling
    of either side, and equals the squared Pearson correlation for 1-D features.
    """
    X = _rows(x, attention_mask)
    Y = _rows(y, attention_mask)
    if X.shape[0] != Y.shape[0]:
        raise ConfigError(f"x and y need the same number of rows (examples): {X.shape[0]} vs {Y.shape[0]}")
    X = X - X.mean(dim=0, keepdim=True)
    Y = Y - Y.mean(dim=0, keepdim=True)
    cross = torch.linalg.matrix_norm(Y.T @ X) ** 2
    nx = torch.linalg.matrix_norm(X.T @ X)
    ny = torch.linalg.matrix_norm(Y.T @ Y)
    if float(nx) == 0.0 or float(ny) == 0.0:
        raise MeasurementError("a representation has zero variance; CKA is undefined")
    return float(cross / (nx * ny))


def residual_divergence(acts_a: Mapping, acts_b: Mapping, attention_mask=None) -> pd.DataFrame:
    """Per-layer divergence of activations ``a`` (e.g. quantized) from reference ``b`` (fp).

    For each layer in both dicts (the key sets must be equal), over real tokens only:
    ``rel_l2 = ||a - b||_F / ||b||_F`` (0 if both are zero, inf if only ``b`` is) and
    ``cosine``, the token-wise cosine averaged over real tokens. Returns a DataFrame with
    columns ``layer, rel_l2, cosine``, one row per layer, ascending.
    """
    if set(acts_a) != set(acts_b):
        raise ConfigError(
            f"layer sets differ: only in a {sorted(set(acts_a) - set(acts_b))}, "
            f"only in b {sorted(set(acts_b) - set(acts_a))}"
        )
    rows = []
    for layer in sorted(acts_a):
        a, b = _f64(acts_a[layer]), _f64(acts_b[layer])
        if a.shape != b.shape:
            raise ConfigError(f"layer {layer}: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
        if a.dim() == 3:
            mask = _mask_for(a, attention_mask)[..., None]
            diff = float(((a - b) * mask).norm())
            ref = float((b * mask).norm())
        else:
            diff, ref = float((a - b).norm()), float(b.norm())
        if ref == 0.0:
            rel = 0.0 if diff == 0.0 else math.inf
        else:
            rel = diff / ref
        rows.append({"layer": int(layer), "rel_l2": rel, "cosine": cosine_similarity(a, b, attention_mask)})
    return pd.DataFrame(rows, columns=["layer", "rel_l2", "cosine"])


class ActivationStats:
    """The activation statistics as one namespace (``ActivationStats.linear_cka(x, y)``)."""

    pooled = staticmethod(pooled)
    flatten_tokens = staticmethod(flatten_tokens)
    mean_abs_activation = staticmethod(mean_abs_activation)
    cosine_similarity = staticmethod(cosine_similarity)
    effective_dimension = staticmethod(effective_dimension)
    participation_ratio = staticmethod(participation_ratio)
    activation_entropy = staticmethod(activation_entropy)
    linear_cka = staticmethod(linear_cka)
    residual_divergence = staticmethod(residual_divergence)

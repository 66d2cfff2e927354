"""Weight statistics: per tensor, per (layer, component, parameter) and per layer.

Every statistic is computed in fp64 on the CPU. Moments are accumulated over chunks of
``2**22`` values, so a 262144 x 640 embedding never needs a full fp64 copy.

Definitions (all orientation-agnostic: ``W`` and ``W.T`` give the same numbers)

* ``mean``, ``variance`` (population, divides by N), ``std`` = sqrt(variance).
* ``kurtosis``: excess (Fisher) kurtosis, biased: ``m4 / m2**2 - 3`` with central moments
  ``m_k = mean((w - mean)**k)`` -- identical to
  ``scipy.stats.kurtosis(w, fisher=True, bias=True)`` (the call seed 003 makes). NaN for
  a constant tensor, as in scipy.
* ``absmax``: ``max |w|``.
* ``outlier_frac``: fraction with ``|w - mean| > outlier_sigma * std`` (strict); 0 for a
  constant tensor.
* ``sparsity``: fraction with ``|w| <= sparsity_eps``; ``sparsity_eps`` defaults to
  ``1e-3 * absmax`` (a value a thousand times smaller than the largest one counts as zero,
  which with 4-bit (16 levels) or 8-bit (256 levels) absmax quantization rounds to zero
  anyway). The eps used is returned as ``sparsity_eps``.
* For 2-D tensors, from the singular values ``s`` (``torch.linalg.svdvals`` in fp64):
  ``effective_rank`` = exp of the Shannon entropy (natural log) of ``s / sum(s)``
  (Roy & Vetterli, 2007; n for an n x n identity, 1 for rank 1);
  ``count_rank`` = ``#{s > 0.01 * s_max}`` (seed 004 T-005);
  ``stable_rank`` = ``||W||_F**2 / s_max**2``;
  ``condition_number`` = ``s_max / s_min`` over the ``min(m, n)`` singular values, ``inf``
  when ``s_min == 0`` exactly (noted in ``svd_note``). Floating-point rank deficiency
  usually leaves ``s_min`` at rounding level rather than 0, giving a huge finite number;
  look at ``count_rank`` / ``effective_rank`` for rank.
  ``s_max`` and ``s_min`` are returned too. For other shapes, or when the SVD is skipped,
  these keys are NaN and ``svd_note`` says why.

SVD cost: ``svd="auto"`` (default) runs it when the smaller side is at most
``svd_max_side`` (2048) and the tensor has at most ``svd_max_numel`` (2**24) values, which
skips vocabulary-sized embeddings (a 262144 x 640 matrix takes ~25 s on two cores);
``svd=True`` forces it, ``svd=False`` skips it.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from qhelpers.models.archs import (
    COMPONENT_GROUPS,
    GLOBAL_COMPONENTS,
    LAYER_COMPONENTS,
    ArchSpec,
    decoder_layers,
    get_arch,
    get_module,
    qkv_rows,
    resolve_layers,
    weight_out_dim,
)
from qhelpers.util.errors import ConfigError, MeasurementError

__all__ = ["tensor_stats", "weight_table", "layer_table", "STAT_KEYS", "SVD_KEYS"]

_CHUNK = 1 << 22

MOMENT_KEYS: tuple[str, ...] = (
    "mean",
    "variance",
    "std",
    "kurtosis",
    "absmax",
    "outlier_frac",
    "sparsity",
    "sparsity_eps",
)
SVD_KEYS: tuple[str, ...] = (
    "s_max",
    "s_min",
    "effective_rank",
    "count_rank",
    "stable_rank",
    "condition_number",
    "svd_note",
)
#: Keys of :func:`tensor_stats`, in order.
STAT_KEYS: tuple[str, ...] = MOMENT_KEYS + SVD_KEYS

_SVD_MAX_SIDE = 2048
_SVD_MAX_NUMEL = 1 << 24


# ----------------------------------------------------------------------------- moments


def _chunks(tensors: Sequence[torch.Tensor]) -> Iterable[torch.Tensor]:
    for t in tensors:
        flat = t.detach().reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            yield flat[start : start + _CHUNK].to(device="cpu", dtype=torch.float64)


def _moment_stats(
    tensors: Sequence[torch.Tensor], outlier_sigma: float = 3.0, sparsity_eps: float | None = None
) -> dict:
    """Moment statistics of all values of ``tensors`` taken together (three chunked passes)."""
    if outlier_sigma <= 0 or not math.isfinite(outlier_sigma):
        raise ConfigError(f"outlier_sigma must be a positive number, got {outlier_sigma}")
    n = 0
    total = 0.0
    lo, hi = math.inf, -math.inf
    for c in _chunks(tensors):
        if not bool(torch.isfinite(c).all()):
            raise MeasurementError(
                "the weights contain NaN or inf; check the checkpoint or the quantizer that produced them"
            )
        n += c.numel()
        total += float(c.sum())
        lo = min(lo, float(c.min()))
        hi = max(hi, float(c.max()))
    if n == 0:
        raise MeasurementError("cannot compute statistics of an empty tensor")
    absmax = max(abs(lo), abs(hi))
    constant = lo == hi
    mean = lo if constant else total / n

    if constant:
        variance, kurtosis = 0.0, math.nan
    else:
        m2 = m4 = 0.0
        for c in _chunks(tensors):
            d2 = (c - mean) ** 2
            m2 += float(d2.sum())
            m4 += float((d2 * d2).sum())
        m2 /= n
        m4 /= n
        variance = m2
        kurtosis = m4 / (m2 * m2) - 3.0 if m2 > 0 else math.nan
    std = math.sqrt(variance)

    eps = 1e-3 * absmax if sparsity_eps is None else float(sparsity_eps)
    if eps < 0:
        raise ConfigError(f"sparsity_eps must be >= 0, got {sparsity_eps}")
    outliers = sparse = 0
    limit = outlier_sigma * std
    for c in _chunks(tensors):
        if not constant:
            outliers += int(((c - mean).abs() > limit).sum())
        sparse += int((c.abs() <= eps).sum())
    return {
        "mean": mean,
        "variance": variance,
        "std": std,
        "kurtosis": kurtosis,
        "absmax": absmax,
        "outlier_frac": outliers / n,
        "sparsity": sparse / n,
        "sparsity_eps": eps,
    }


# ----------------------------------------------------------------------------- svd


def _empty_svd(note: str) -> dict:
    out = {k: math.nan for k in SVD_KEYS}
    out["svd_note"] = note
    return out


def _svd_stats(
    w: torch.Tensor, svd, svd_max_side: int, svd_max_numel: int, count_rank_rel: float
) -> dict:
    if w.dim() != 2:
        return _empty_svd(f"no SVD: {w.dim()}-D tensor")
    if svd not in (True, False, "auto"):
        raise ConfigError(f"svd must be True, False or 'auto', got {svd!r}")
    if svd is False:
        return _empty_svd("SVD skipped (svd=False)")
    if svd == "auto" and (min(w.shape) > svd_max_side or w.numel() > svd_max_numel):
        return _empty_svd(
            f"SVD skipped: shape {tuple(w.shape)} exceeds svd_max_side={svd_max_side} or "
            f"svd_max_numel={svd_max_numel}; pass svd=True to force"
        )
    s = torch.linalg.svdvals(w.detach().to(device="cpu", dtype=torch.float64))
    s_max, s_min = float(s.max()), float(s.min())
    note = ""
    if s_max == 0.0:
        return {
            "s_max": 0.0,
            "s_min": 0.0,
            "effective_rank": 0.0,
            "count_rank": 0,
            "stable_rank": math.nan,
            "condition_number": math.inf,
            "svd_note": "zero matrix: ranks 0, stable rank undefined, condition number inf",
        }
    p = s / s.sum()
    p = p[p > 0]
    effective_rank = float(torch.exp(-(p * torch.log(p)).sum()))
    count_rank = int((s > count_rank_rel * s_max).sum())
    stable_rank = float((s * s).sum()) / (s_max * s_max)
    if s_min == 0.0:
        condition = math.inf
        note = "s_min == 0 (rank deficient): condition_number is inf"
    else:
        condition = s_max / s_min
    return {
        "s_max": s_max,
        "s_min": s_min,
        "effective_rank": effective_rank,
        "count_rank": count_rank,
        "stable_rank": stable_rank,
        "condition_number": condition,
        "svd_note": note,
    }


def tensor_stats(
    w: torch.Tensor,
    outlier_sigma: float = 3.0,
    sparsity_eps: float | None = None,
    *,
    svd: bool | str = "auto",
    svd_max_side: int = _SVD_MAX_SIDE,
    svd_max_numel: int = _SVD_MAX_NUMEL,
    count_rank_rel: float = 0.01,
) -> dict:
    """Distribution and (for 2-D tensors) spectral statistics of one tensor.

    Returns a dict with the keys :data:`STAT_KEYS` (definitions in the module docstring).
    Raises :class:`~qhelpers.util.errors.MeasurementError` for an empty or non-finite tensor.
    """
    if not isinstance(w, torch.Tensor):
        w = torch.as_tensor(np.asarray(w))
    if w.is_complex():
        raise ConfigError("complex tensors are not supported")
    out = _moment_stats([w], outlier_sigma, sparsity_eps)
    out.update(_svd_stats(w, svd, svd_max_side, svd_max_numel, count_rank_rel))
    return out


# ----------------------------------------------------------------------------- tables

_TABLE_COLUMNS = ("layer", "component", "param", "kind", "numel", "shape", "tied_to")
_GLOBAL_ORDER = tuple(GLOBAL_COMPONENTS)


def _resolve_components(arch: ArchSpec, components) -> tuple[list[str], list[str]]:
    """(per-layer components, global components) requested, in canonical order."""
    if components is None:
        layer = [c for c in LAYER_COMPONENTS if c != "bias" and arch.components.get(c)]
        return layer, list(_GLOBAL_ORDER)
    if isinstance(components, str):
        components = [components]
    wanted: set[str] = set()
    for name in components:
        if name == "bias":
            raise ConfigError(
                "'bias' is not a table component: every component's biases are already rows "
                "(filter with kind == 'bias')"
            )
        if name in COMPONENT_GROUPS:
            wanted.update(COMPONENT_GROUPS[name])
        elif name in LAYER_COMPONENTS or name in GLOBAL_COMPONENTS:
            wanted.add(name)
        else:
            raise ConfigError(
                f"unknown component {name!r}; known: {sorted(set(LAYER_COMPONENTS) - {'bias'})}, "
                f"{sorted(GLOBAL_COMPONENTS)} and groups {sorted(COMPONENT_GROUPS)}"
            )
    layer = [c for c in LAYER_COMPONENTS if c in wanted and arch.components.get(c)]
    glob = [c for c in _GLOBAL_ORDER if c in wanted]
    return layer, glob


def _storage_key(p: torch.Tensor):
    return (p.data_ptr(), tuple(p.shape), tuple(p.stride()), p.dtype, p.device)


def weight_table(
    model: nn.Module,
    components: str | Iterable[str] | None = None,
    layers: int | Iterable[int] | None = None,
    include_global: bool = True,
    *,
    include_fused: bool = True,
    arch: ArchSpec | None = None,
    outlier_sigma: float = 3.0,
    sparsity_eps: float | None = None,
    svd: bool | str = "auto",
    svd_max_side: int = _SVD_MAX_SIDE,
    svd_max_numel: int = _SVD_MAX_NUMEL,
) -> pd.DataFrame:
    """One row of :func:`tensor_stats` per (layer, component, parameter).

    Rows come from the registry's components of each decoder block (``attn_q`` ...
    ``mlp_out``, ``norm``; ``components`` may name some of them, groups such as ``"attn"``,
    ``"mlp"``, ``"linear"``, or global components; components the architecture lacks are
    skipped). Every parameter of a component's module is a row (``kind`` = ``"weight"`` or
    ``"bias"``). For a fused q/k/v projection (GPT-2 ``c_attn``, BLOOM/GPT-NeoX
    ``query_key_value``), ``attn_q``/``attn_k``/``attn_v`` rows hold the statistics of that
    part only (output features selected by :func:`qhelpers.models.archs.qkv_rows` along
    :func:`qhelpers.models.archs.weight_out_dim`; biases split the same way), and, when
    ``include_fused``, an extra ``attn_qkv`` row holds the whole fused tensor -- so summing
    ``numel`` over all rows counts fused weights twice.

    With ``include_global`` (and when ``components`` is None or names them), model-level
    rows with ``layer == -1`` follow: ``embed_tokens``, ``embed_positions``, ``embed_norm``,
    ``final_norm``, ``lm_head`` (those the architecture has). A parameter that shares
    storage with an earlier row (a tied ``lm_head``) repeats that row's statistics and
    names it in ``tied_to``.

    Columns: ``layer, component, param, kind, numel, shape, tied_to`` then
    :data:`STAT_KEYS`. ``param`` is the full dotted parameter name in ``model``.
    """
    arch = arch or get_arch(model)
    blocks = decoder_layers(model, arch)
    n_layers = len(blocks)
    layer_ids = resolve_layers(layers, n_layers)
    layer_comps, global_comps = _resolve_components(arch, components)
    stat_kw = dict(svd=svd, svd_max_side=svd_max_side, svd_max_numel=svd_max_numel)

    rows: list[dict] = []
    seen: dict[tuple, tuple[str, dict]] = {}

    def add(layer: int, component: str, name: str, tensor: torch.Tensor, track: torch.Tensor | None):
        """Append a row; ``track`` is the parameter itself (for tie detection) or None for a slice."""
        kind = "bias" if name.rsplit(".", 1)[-1] == "bias" else "weight"
        tied_to = ""
        key = _storage_key(track) if track is not None else None
        if key is not None and key in seen:
            tied_to, stats = seen[key]
        else:
            stats = tensor_stats(tensor, outlier_sigma, sparsity_eps, **stat_kw)
            if key is not None:
                seen[key] = (name, stats)
        rows.append(
            {
                "layer": layer,
                "component": component,
                "param": name,
                "kind": kind,
                "numel": int(tensor.numel()),
                "shape": tuple(tensor.shape),
                "tied_to": tied_to,
                **stats,
            }
        )

    fused = arch.fused_qkv
    blocks_prefix = arch.layers
    for li in layer_ids:
        block = blocks[li]
        prefix = f"{blocks_prefix}.{li}"
        fused_done = False
        for comp in layer_comps:
            for path in arch.components[comp]:
                module = get_module(block, path)
                if module is None:
                    continue
                params = list(module.named_parameters(recurse=False))
                if fused is not None and path == fused.module and comp in ("attn_q", "attn_k", "attn_v"):
                    part = comp[-1]
                    out_dim = weight_out_dim(module)
                    for pname, p in params:
                        full = f"{prefix}.{path}.{pname}"
                        dim = out_dim if p.dim() >= 2 else 0
                        idx = qkv_rows(arch, model, part, p.shape[dim]).to(p.device)
                        add(li, comp, full, p.detach().index_select(dim, idx), None)
                    if include_fused and not fused_done:
                        fused_done = True
                        for pname, p in params:
                            add(li, "attn_qkv", f"{prefix}.{path}.{pname}", p, p)
                    continue
                for pname, p in params:
                    add(li, comp, f"{prefix}.{path}.{pname}", p, p)

    if include_global:
        for comp in global_comps:
            path = arch.global_path(comp)
            if path is None:
                continue
            module = get_module(model, path)
            if module is None:  # e.g. OPT-350m has final_layer_norm = None
                continue
            for pname, p in module.named_parameters(recurse=False):
                add(-1, comp, f"{path}.{pname}", p, p)

    columns = list(_TABLE_COLUMNS) + list(STAT_KEYS)
    return pd.DataFrame(rows, columns=columns)


_LAYER_HOW = ("numel_weighted", "mean", "pooled")


def layer_table(
    model: nn.Module,
    how: str = "numel_weighted",
    layers: int | Iterable[int] | None = None,
    *,
    params: str = "all",
    arch: ArchSpec | None = None,
    outlier_sigma: float = 3.0,
) -> pd.DataFrame:
    """Per-layer aggregate of the block's parameters (seed 003 style).

    The parameters of a layer are all of ``decoder_layers(model)[i].named_parameters()``
    (``params="all"``, what seed 003 takes, biases and norms included, a fused qkv counted
    once) or only the tensors with two or more dimensions (``params="matrices"``).

    Columns:

    * ``layer``, ``n_params`` (values), ``n_tensors``, ``n_constant`` (tensors with zero
      variance, whose kurtosis is undefined);
    * ``kurtosis_weighted``: sum_i numel_i * kurtosis_i / sum_i numel_i over the non-constant
      tensors -- seed 003's ``extract_layer_kurtosis`` when no tensor is constant (seed 003
      gets NaN for the layer otherwise, e.g. LayerNorm weights still all ones);
    * ``kurtosis_mean``: the unweighted mean of the same per-tensor kurtoses;
    * ``kurtosis_pooled``, ``variance_pooled``, ``std_pooled``, ``mean_pooled``,
      ``absmax``, ``outlier_frac_pooled``: statistics of all the layer's values
      concatenated (``variance_pooled`` is the per-layer weight variance of seed 002,
      "variance predicts criticality");
    * ``kurtosis``: a copy of the column chosen by ``how`` (``"numel_weighted"``,
      ``"mean"`` or ``"pooled"``).
    """
    if how not in _LAYER_HOW:
        raise ConfigError(f"how must be one of {_LAYER_HOW}, got {how!r}")
    if params not in ("all", "matrices"):
        raise ConfigError(f"params must be 'all' or 'matrices', got {params!r}")
    arch = arch or get_arch(model)
    blocks = decoder_layers(model, arch)
    n_layers = len(blocks)
    layer_ids = resolve_layers(layers, n_layers)

    rows = []
    for li in layer_ids:
        tensors = [p for _, p in blocks[li].named_parameters() if params == "all" or p.dim() >= 2]
        if not tensors:
            raise MeasurementError(f"layer {li} has no parameters matching params={params!r}")
        kurts, sizes = [], []
        n_constant = 0
        for p in tensors:
            k = _moment_stats([p], outlier_sigma)["kurtosis"]
            if math.isnan(k):
                n_constant += 1
                continue
            kurts.append(k)
            sizes.append(p.numel())
        if kurts:
            weighted = float(np.dot(kurts, sizes) / np.sum(sizes))
            plain = float(np.mean(kurts))
        else:
            weighted = plain = math.nan
        pooled = _moment_stats(tensors, outlier_sigma)
        row = {
            "layer": li,
            "n_params": int(sum(p.numel() for p in tensors)),
            "n_tensors": len(tensors),
            "n_constant": n_constant,
            "kurtosis_weighted": weighted,
            "kurtosis_mean": plain,
            "kurtosis_pooled": pooled["kurtosis"],
            "variance_pooled": pooled["variance"],
            "std_pooled": pooled["std"],
            "mean_pooled": pooled["mean"],
            "absmax": pooled["absmax"],
            "outlier_frac_pooled": pooled["outlier_frac"],
        }
        row["kurtosis"] = {
            "numel_weighted": weighted,
            "mean": plain,
            "pooled": pooled["kurtosis"],
        }[how]
        rows.append(row)
    return pd.DataFrame(rows)

"""Weight-space theory tests of seed 004: relative quantization error (T-002, H1.2) and
gateway weight structure (T-005, H2.2).

T-002: relative quantization error
----------------------------------
:func:`quant_error_table` quantizes every matrix of the chosen per-layer components (registry
names or groups: ``"linear"`` by default, ``"attn"``, ``"mlp"``, ``"norm"`` ...) with
:func:`qhelpers.quant.quantizers.quantize` and dequantizes it (= ``fake_quantize``; one or several :class:`~qhelpers.quant.quantizers.QuantConfig`,
each matrix along its own output dimension, a fused q/k/v projection quantized once as the
whole tensor it is) and records, per tensor, in float64:

* ``mse = mean((q(w) - w)**2)``, ``power = mean(w**2)`` (signal power),
  ``rel_error = mse / power`` (the seed's relative error) and ``sqnr_db = 10 log10(power /
  mse)`` (``inf`` when ``q(w) == w`` exactly);
* ``variance`` (population), ``kurtosis`` (excess, biased: scipy's default),
  ``absmax``, ``crest_factor = absmax / sqrt(power)``;
* ``step_rms``: root mean square of the quantization step (the QTensor's ``scale``,
  ``alpha / qmax``) over the quantization units (symmetric INT only) -- the "scale
  factor" of the seed's H1.2;
* ``rel_error_model = step_rms**2 / 12 / power``: the uniform rounding-noise model (each
  error uniform on ``[-step/2, step/2]``), for symmetric INT with tensor or channel
  granularity (NaN otherwise).

:func:`pool_quant_error` pools rows (e.g. per layer, or per layer and component group)
exactly: it sums squared errors, powers and raw moments, so a pooled ``rel_error`` is
``sum sq_err / sum w**2`` over all the pooled values and a pooled ``variance`` /
``kurtosis`` are those of the concatenated values.

Known answers (tests/test_weight_theory.py): for ``w ~ Uniform[-a, a]`` and per-tensor
symmetric absmax INT-b the step is ``Delta = a / (2**(b-1) - 1)``, ``mse = Delta**2 / 12`` and
``rel_error = (Delta**2 / 12) / (a**2 / 3) = 1 / (4 (2**(b-1) - 1)**2)``
(:func:`uniform_relative_error`). With per-tensor absmax, scaling ``w`` by ``c`` scales the
step by ``c`` too, so ``rel_error(c w) == rel_error(w)``: the relative error does not depend
on the variance at all, only on the shape of the distribution (the crest factor
``absmax / rms``, which grows with the tails, i.e. with kurtosis).

T-005: gateway structure
------------------------
:func:`svd_profile` takes the spectral statistics of :func:`qhelpers.measure.weight_stats.tensor_stats`
(count rank = ``#{s > 0.01 s_max}`` as in seed 004, effective rank, stable rank, condition
number, top singular value) for every matrix of every layer (q, k, v, o and the MLP matrices;
a fused q/k/v split into its parts). :func:`layer_distinctiveness` turns the profile into one
number per layer:

* columns = (matrix, feature), features :data:`SVD_FEATURES` (condition number and
  ``s_max`` on a log10 scale; the condition number capped at :data:`MAX_CONDITION`, beyond
  which float32 weights carry no information about it);
* robust scale per column: ``1.4826 * MAD`` over all layers; if that is 0, the standard
  deviation over all layers; columns constant over all layers are dropped (listed);
* ``z[i, j] = (x[i, j] - median_{k != i} x[k, j]) / scale_j`` (leave-one-out centre, so a
  layer is compared with the others, not with itself);
* ``distinctiveness[i] = sqrt(mean_j z[i, j]**2)``.

Gateway test (H2.2: "L0 and L_last have unique weight structure"):

* ``gateway_excess = mean(d[gateways]) - median(d[middle])`` and
  ``gateway_margin = min(d[gateways]) - max(d[middle])`` (> 0 iff the two gateways are the
  two most distinct layers), each an :class:`~qhelpers.stats.Estimate` whose percentile
  CI comes from a bootstrap over the feature columns (how much the conclusion depends on
  which structural descriptors were chosen; the columns are not independent, so read the
  interval as a sensitivity range, n = number of columns);
* ``p_perm``: exact permutation p-value over layer labels: under "layers are exchangeable"
  the gateway pair is a uniformly random pair, so ``p = #{pairs {i, j}: min(d_i, d_j) >=
  min(d_gateways)} / C(n_layers, 2)`` (at least ``1 / C(n_layers, 2)``: 1/6 with 4 layers,
  1/435 with 30).
* ``gateway_vs_chance`` (the estimate a verdict should use): ``T = min(d[gateways]) - Q``,
  where ``Q`` is the ``k``-th largest ``min(d_i, d_j)`` over the other ``C(n, 2) - 1`` pairs
  and ``k = floor(alpha * C(n, 2))``. ``T > 0`` exactly when at most ``k - 1`` other pairs
  are jointly as distinct, i.e. ``p_perm <= k / C(n, 2) <= alpha``. Its CI comes from the
  same bootstrap over feature columns (d, and with it every pair's statistic and ``Q``,
  recomputed per replicate): SUPPORTED means "beyond chance at level alpha whichever
  descriptors are resampled". Undefined (INCONCLUSIVE) when ``k == 0``: with fewer than
  ``1 / alpha`` pairs (n <= 6 layers at alpha = 0.05) no outcome can reach that level.

The feature bootstrap alone cannot judge H2.2: with exchangeable layers some pair is always
the most distinct, and a CI over descriptors says nothing about chance (a random-init
4-layer model gives ``gateway_excess`` CIs above 0 when its end layers happen to rank first
and second, which they do with probability 1/6).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from qhelpers import stats
from qhelpers.measure.weight_stats import weight_table
from qhelpers.models.archs import (
    COMPONENT_GROUPS,
    LAYER_COMPONENTS,
    decoder_layers,
    get_arch,
    get_module,
    resolve_layers,
    weight_out_dim,
)
from qhelpers.quant.quantizers import QuantConfig, quantize
from qhelpers.util.errors import ConfigError, MeasurementError
from qhelpers.util.threads import torch_threads

__all__ = [
    "ERROR_COLUMNS",
    "SVD_FEATURES",
    "MAX_CONDITION",
    "uniform_relative_error",
    "tensor_quant_error",
    "quant_error_table",
    "pool_quant_error",
    "correlation_table",
    "svd_profile",
    "profile_matrix",
    "Distinctiveness",
    "layer_distinctiveness",
    "gateway_pair_pvalue",
]

#: Per-tensor / pooled error columns (besides the identifying ones).
ERROR_COLUMNS: tuple[str, ...] = (
    "numel", "mse", "power", "rel_error", "sqnr_db", "variance", "kurtosis", "absmax",
    "crest_factor", "step_rms", "rel_error_model",
)
#: The per-matrix spectral features of the T-005 profile.
SVD_FEATURES: tuple[str, ...] = ("count_rank", "effective_rank", "stable_rank", "log10_condition", "log10_s_max")
#: Condition numbers are capped here (1 / float32 machine epsilon, about 8.4e6).
MAX_CONDITION: float = float(1.0 / np.finfo(np.float32).eps)

_MAD_TO_SIGMA = 1.4826




# ----------------------------------------------------------------------------- T-002


def uniform_relative_error(bits: int) -> float:
    """Relative error ``mse / mean(w**2)`` of symmetric absmax INT-``bits`` on ``Uniform[-a, a]``:
    ``(Delta**2 / 12) / (a**2 / 3)`` with ``Delta = a / (2**(bits-1) - 1)``, i.e.
    ``1 / (4 * (2**(bits-1) - 1)**2)`` (1/196 at 4 bits), for a large sample."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ConfigError(f"bits must be an int between 2 and 16, got {bits!r}")
    qmax = 2 ** (bits - 1) - 1
    return 1.0 / (4.0 * qmax * qmax)


def _component_list(arch, components) -> list[str]:
    if components is None:
        components = "linear"
    if isinstance(components, str):
        components = [components]
    wanted: set[str] = set()
    for name in components:
        if name in COMPONENT_GROUPS and name not in ("embeddings", "outside_layers"):
            wanted.update(COMPONENT_GROUPS[name])
        elif name in LAYER_COMPONENTS and name != "bias":
            wanted.add(name)
        else:
            valid = sorted(set(LAYER_COMPONENTS) - {"bias"}) + ["attn", "attn_qkv", "mlp", "linear"]
            raise ConfigError(
                f"unknown per-layer component {name!r}; choose from {valid} (biases and model-level "
                "tensors such as embeddings are not part of this analysis)"
            )
    return [c for c in LAYER_COMPONENTS if c in wanted and arch.components.get(c)]


def _group_of(component: str) -> str:
    if component in COMPONENT_GROUPS["attn"] or component == "attn_qkv":
        return "attn"
    if component in COMPONENT_GROUPS["mlp"]:
        return "mlp"
    return component


def _as_configs(quant) -> dict[str, QuantConfig]:
    if isinstance(quant, QuantConfig):
        return {quant.label: quant}
    if isinstance(quant, Mapping) and quant:
        out = {}
        for name, cfg in quant.items():
            if not isinstance(cfg, QuantConfig):
                raise ConfigError(f"quant[{name!r}] must be a QuantConfig, got {type(cfg).__name__}")
            out[str(name)] = cfg
        return out
    raise ConfigError(
        "quant must be a QuantConfig or a non-empty {name: QuantConfig} dict, e.g. "
        "{'sound': strategies.protocol_settings('sound', 4)[0]}"
    )


def _moment_sums(w: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """(the values as flat float64, their count, raw moment sums and absmax)."""
    x = w.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    x2 = x * x
    sums = {
        "numel": int(x.numel()),
        "s1": float(x.sum()), "s2": float(x2.sum()), "s3": float(torch.dot(x2, x)), "s4": float(torch.dot(x2, x2)),
        "absmax": float(x.abs().max()),
    }
    return x, sums


def _error_sums(w: torch.Tensor, x: torch.Tensor, cfg: QuantConfig, out_dim: int) -> dict[str, float]:
    """Squared error of quantize/dequantize (``x``: the flat float64 values of ``w``) and the
    uniform rounding-noise model's terms."""
    qt = quantize(w, cfg, out_dim=out_dim)  # raises MeasurementError on NaN/inf weights
    e = qt.dequantize().detach().to(device="cpu", dtype=torch.float64).reshape(-1) - x
    # uniform rounding-noise model: step = the unit's scale (alpha / qmax), symmetric INT only
    model_sse = step_rms = math.nan
    if cfg.method == "int" and cfg.symmetric:
        step2 = float((qt.scale.detach().to(device="cpu", dtype=torch.float64) ** 2).mean())
        step_rms = math.sqrt(step2)
        if not (cfg.granularity == "group" and w.dim() >= 2):  # unequal group sizes: no simple model
            model_sse = x.numel() * step2 / 12.0
    return {"sse": float(torch.dot(e, e)), "model_sse": model_sse, "step_rms": step_rms}


def _derive(s: Mapping[str, float]) -> dict[str, float]:
    """Error and distribution statistics from pooled sums (see the module docstring)."""
    n = float(s["numel"])
    mean = s["s1"] / n
    e2, e3, e4 = s["s2"] / n, s["s3"] / n, s["s4"] / n
    m2 = max(e2 - mean * mean, 0.0)
    m4 = e4 - 4 * mean * e3 + 6 * mean * mean * e2 - 3 * mean ** 4
    mse = s["sse"] / n
    power = e2
    rel = mse / power if power > 0 else math.nan
    if power > 0:
        sqnr = math.inf if mse == 0 else 10.0 * math.log10(power / mse)
    else:
        sqnr = math.nan
    return {
        "numel": int(s["numel"]),
        "mse": mse,
        "power": power,
        "rel_error": rel,
        "sqnr_db": sqnr,
        "variance": m2,
        "kurtosis": m4 / (m2 * m2) - 3.0 if m2 > 0 else math.nan,
        "absmax": s["absmax"],
        "crest_factor": s["absmax"] / math.sqrt(power) if power > 0 else math.nan,
        "step_rms": s["step_rms"],
        "rel_error_model": (s["model_sse"] / n) / power if power > 0 else math.nan,
    }


def tensor_quant_error(w: torch.Tensor, quant: QuantConfig, out_dim: int = 0) -> dict[str, float]:
    """:data:`ERROR_COLUMNS` of one tensor quantized with ``quant`` along output dimension
    ``out_dim`` (``qhelpers.models.archs.weight_out_dim(module)`` for a layer's weight)."""
    if not isinstance(quant, QuantConfig):
        raise ConfigError(f"quant must be a QuantConfig, got {type(quant).__name__}")
    if not isinstance(w, torch.Tensor):
        raise ConfigError(f"w must be a torch.Tensor, got {type(w).__name__}")
    x, sums = _moment_sums(w)
    if not math.isfinite(sums["s4"]):
        raise MeasurementError("the weights contain NaN or inf; check the checkpoint")
    return _derive({**sums, **_error_sums(w, x, quant, out_dim)})


def quant_error_table(
    model: Any,
    quant: QuantConfig | Mapping[str, QuantConfig],
    components: str | Iterable[str] | None = "linear",
    layers: int | Iterable[int] | None = None,
    *,
    threads: int | None = 1,
) -> pd.DataFrame:
    """One row per (config, layer, component) of the quantization error of that weight.

    ``model``: a ``LoadedModel`` or a causal LM. ``quant``: one config or ``{name: config}``
    (e.g. the ``sound`` and ``seed`` protocols' quantizers). Columns: config, quantizer
    (the config's label), layer, depth, component (``attn_qkv`` for a fused projection),
    group (``attn`` / ``mlp`` / ``norm``), param, shape, :data:`ERROR_COLUMNS` and the raw
    sums (``s1``..``s4``, ``sse``, ``model_sse``) that :func:`pool_quant_error` adds up.
    ``threads``: torch CPU threads during the call (restored afterwards; None: unchanged).
    """
    with torch_threads(threads):
        return _quant_error_table(model, quant, components, layers)


def _quant_error_table(model, quant, components, layers) -> pd.DataFrame:
    from qhelpers.models.loaded import as_module

    module_root = as_module(model)
    arch = get_arch(module_root)
    blocks = decoder_layers(module_root, arch)
    n_layers = len(blocks)
    configs = _as_configs(quant)
    comps = _component_list(arch, components)
    if not comps:
        raise ConfigError(f"{arch.model_type} has none of the components {components!r}")
    fused = arch.fused_qkv
    rows = []
    for li in resolve_layers(layers, n_layers):
        block = blocks[li]
        done: set[str] = set()
        for comp in comps:
            for path in arch.components[comp]:
                if path in done:
                    continue
                done.add(path)
                module = get_module(block, path)
                weight = getattr(module, "weight", None)
                if not isinstance(weight, torch.Tensor):
                    continue
                name = "attn_qkv" if fused is not None and path == fused.module else comp
                out_dim = weight_out_dim(module) if weight.dim() >= 2 else 0
                x, moments = _moment_sums(weight)
                for cname, cfg in configs.items():
                    sums = {**moments, **_error_sums(weight, x, cfg, out_dim)}
                    rows.append({
                        "config": cname, "quantizer": cfg.label, "layer": li,
                        "depth": li / max(n_layers - 1, 1), "component": name, "group": _group_of(name),
                        "param": f"{arch.layers}.{li}.{path}.weight", "shape": tuple(weight.shape),
                        **_derive(sums),
                        **{k: sums[k] for k in ("s1", "s2", "s3", "s4", "sse", "model_sse")},
                    })
    return pd.DataFrame(rows)


def pool_quant_error(table: pd.DataFrame, by: str | Sequence[str] = ("config", "layer")) -> pd.DataFrame:
    """Pool the rows of :func:`quant_error_table` within groups ``by`` (exact pooling of sums).

    Returns one row per group with ``by``, ``n_tensors``, ``depth`` (when ``layer`` is in
    ``by``) and :data:`ERROR_COLUMNS` of all the group's values taken together
    (``step_rms`` is the numel-weighted RMS step; ``absmax`` the largest).
    """
    by = [by] if isinstance(by, str) else list(by)
    need = set(by) | {"numel", "s1", "s2", "s3", "s4", "sse", "model_sse", "absmax", "step_rms"}
    missing = sorted(need - set(table.columns))
    if missing:
        raise ConfigError(f"pool_quant_error needs a quant_error_table (missing columns {missing})")
    if table.empty:
        raise ConfigError("pool_quant_error got an empty table")
    rows = []
    for key, g in table.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        numel = g["numel"].to_numpy(dtype=np.float64)
        sums = {k: float(g[k].sum()) for k in ("s1", "s2", "s3", "s4", "sse")}
        sums["numel"] = int(numel.sum())
        sums["absmax"] = float(g["absmax"].max())
        sums["model_sse"] = float(g["model_sse"].sum())  # NaN if any member has no model
        step2 = g["step_rms"].to_numpy(dtype=np.float64) ** 2
        sums["step_rms"] = float(np.sqrt(np.dot(numel, step2) / numel.sum()))
        row = dict(zip(by, key))
        row["n_tensors"] = len(g)
        if "layer" in by and "depth" in g.columns:
            row["depth"] = float(g["depth"].iloc[0])
        row.update(_derive(sums))
        rows.append(row)
    return pd.DataFrame(rows)


def correlation_table(
    table: pd.DataFrame,
    pairs: Sequence[tuple[str, str]],
    by: str | Sequence[str] | None = "config",
    methods: Sequence[str] = ("spearman", "pearson"),
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """:func:`qhelpers.stats.correlation` of every ``(x, y)`` column pair, within each group
    ``by`` (e.g. per quantizer), for each method: bootstrap CI over the rows (layers) and a
    permutation p-value.

    Returns a DataFrame indexed by (``by``..., x, y, method) (index level names end in
    ``_``; the same values are columns too) whose rows hold every key of the correlation
    dict (r, ci_low, ci_high, p_perm, n, method, defined, reason, ...): a row's
    ``.to_dict()`` is what :meth:`qhelpers.report.results.Hypothesis.evaluate` accepts.
    """
    by_cols = [] if by is None else ([by] if isinstance(by, str) else list(by))
    cols = {c for pair in pairs for c in pair} | set(by_cols)
    missing = sorted(cols - set(table.columns))
    if missing:
        raise ConfigError(f"correlation_table: columns {missing} are not in the table (it has {list(table.columns)})")
    if not pairs:
        raise ConfigError("pairs is empty; pass e.g. [('variance', 'rel_error')]")
    groups = table.groupby(by_cols, sort=True) if by_cols else [((), table)]
    rows = []
    for key, sub in groups:
        key = key if isinstance(key, tuple) else (key,)
        for x, y in pairs:
            for method in methods:
                c = stats.correlation(sub[x].to_numpy(dtype=float), sub[y].to_numpy(dtype=float), method=method,
                                      n_boot=n_boot, seed=seed, level=level)
                rows.append({**dict(zip(by_cols, key)), "x": x, "y": y, **c})
    return pd.DataFrame(rows).set_index([*by_cols, "x", "y", "method"], drop=False).rename_axis(
        [f"{c}_" for c in [*by_cols, "x", "y", "method"]])


# ----------------------------------------------------------------------------- T-005


def svd_profile(
    model: Any,
    components: str | Iterable[str] | None = "linear",
    layers: int | Iterable[int] | None = None,
    *,
    max_condition: float = MAX_CONDITION,
    threads: int | None = 1,
) -> pd.DataFrame:
    """Spectral statistics of every weight matrix of the chosen components, one row per
    (layer, component); a fused q/k/v projection appears as its q, k and v parts.

    Reuses :func:`qhelpers.measure.weight_stats.weight_table` (SVD forced on). Columns: layer,
    depth, component, param, shape, s_max, s_min, condition_number, svd_note and
    :data:`SVD_FEATURES` (``log10_condition`` = log10 of the condition number capped at
    ``max_condition``; ``log10_s_max`` = log10 of the top singular value). ``threads``: torch
    CPU threads during the SVDs (restored afterwards; None: unchanged).
    """
    from qhelpers.models.loaded import as_module

    if not (max_condition > 1 and math.isfinite(max_condition)):
        raise ConfigError(f"max_condition must be a finite number > 1, got {max_condition}")
    module_root = as_module(model)
    n_layers = len(decoder_layers(module_root))
    with torch_threads(threads):
        table = weight_table(module_root, components=components if components is not None else "linear",
                             layers=layers, include_global=False, include_fused=False, svd=True)
    table = table[(table["kind"] == "weight") & (table["shape"].map(len) == 2)].copy()
    if table.empty:
        raise ConfigError(f"no weight matrices among components {components!r}; use e.g. 'linear', 'attn' or 'mlp'")
    cond = table["condition_number"].astype(float).clip(upper=max_condition)
    table["log10_condition"] = np.log10(cond)
    with np.errstate(divide="ignore"):
        table["log10_s_max"] = np.log10(table["s_max"].astype(float))
    table["depth"] = table["layer"] / max(n_layers - 1, 1)
    cols = ["layer", "depth", "component", "param", "shape", "s_max", "s_min", "condition_number", "svd_note",
            *SVD_FEATURES]
    return table[cols].reset_index(drop=True)


def profile_matrix(profile: pd.DataFrame, features: Sequence[str] = SVD_FEATURES) -> pd.DataFrame:
    """(layers x "component:feature") matrix of a :func:`svd_profile` table."""
    missing = sorted({"layer", "component", *features} - set(profile.columns))
    if missing:
        raise ConfigError(f"profile_matrix needs an svd_profile table (missing columns {missing})")
    if not features:
        raise ConfigError("features is empty; pass e.g. weight_theory.SVD_FEATURES")
    wide = profile.pivot_table(index="layer", columns="component", values=list(features), aggfunc="first")
    order = list(dict.fromkeys(profile["component"]))
    cols = [(f, c) for c in order for f in features if (f, c) in wide.columns]
    out = wide[cols]
    out.columns = [f"{c}:{f}" for f, c in cols]
    out.index.name = "layer"
    return out.astype(float)


def _robust_scale(col: np.ndarray) -> float:
    med = np.median(col)
    mad = _MAD_TO_SIGMA * float(np.median(np.abs(col - med)))
    if mad > 0:
        return mad
    return float(np.std(col))


def gateway_pair_pvalue(distinctiveness: Sequence[float], gateways: Sequence[int]) -> tuple[float, int]:
    """Exact permutation p-value that two layers chosen at random are jointly as distinct as
    ``gateways`` (positions in ``distinctiveness``): ``#{pairs: min(d_i, d_j) >=
    min(d_gateways)} / C(n, 2)``. Returns (p, number of pairs)."""
    d = np.asarray(distinctiveness, dtype=np.float64)
    gw = list(gateways)
    if len(gw) != 2 or len(set(gw)) != 2:
        raise ConfigError(f"gateways must be two different layer positions, got {gateways!r}")
    if d.size < 3:
        raise ConfigError(f"a gateway test needs at least 3 layers, got {d.size}")
    if not np.all(np.isfinite(d)):
        raise MeasurementError("distinctiveness contains NaN or inf")
    observed = min(d[gw[0]], d[gw[1]])
    tol = 1e-12 * max(1.0, abs(observed))
    pairs = list(combinations(range(d.size), 2))
    hits = sum(1 for i, j in pairs if min(d[i], d[j]) >= observed - tol)
    return hits / len(pairs), len(pairs)


@dataclass
class Distinctiveness:
    """Result of :func:`layer_distinctiveness` (definitions in the module docstring)."""

    table: pd.DataFrame
    z: pd.DataFrame
    gateways: tuple[int, int]
    gateway_excess: stats.Estimate
    gateway_margin: stats.Estimate
    gateway_vs_chance: stats.Estimate
    p_perm: float
    n_pairs: int
    alpha: float
    dropped_columns: list[str] = field(default_factory=list)

    def values(self) -> pd.Series:
        """Distinctiveness indexed by layer."""
        return self.table.set_index("layer")["distinctiveness"]

    def top(self, k: int = 2) -> list[int]:
        """The ``k`` most distinct layers (ties: lower index first)."""
        ordered = self.table.sort_values(["distinctiveness", "layer"], ascending=[False, True])
        return [int(i) for i in ordered["layer"].head(int(k))]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (table as records)."""
        return {
            "gateways": list(self.gateways),
            "gateway_excess": self.gateway_excess.to_dict(),
            "gateway_margin": self.gateway_margin.to_dict(),
            "gateway_vs_chance": self.gateway_vs_chance.to_dict(),
            "p_perm": self.p_perm,
            "n_pairs": self.n_pairs,
            "alpha": self.alpha,
            "top2": self.top(2),
            "dropped_columns": self.dropped_columns,
            "table": self.table,
        }


def layer_distinctiveness(
    profile: pd.DataFrame,
    features: Sequence[str] = SVD_FEATURES,
    gateways: Sequence[int] | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    alpha: float = 0.05,
) -> Distinctiveness:
    """How much each layer's weight structure stands out from the other layers', and whether
    the gateway layers (default: the first and last layer of ``profile``) stand out most.

    ``profile``: a :func:`svd_profile` table, or already a (layers x columns) matrix (such as
    :func:`profile_matrix` returns). Returns a :class:`Distinctiveness` with the per-layer
    ``table`` (layer, distinctiveness and its CI over feature columns, rank (1 = most
    distinct), role gateway/middle), the z matrix, the gateway Estimates (``gateway_vs_chance``
    at level ``alpha`` is the one to judge H2.2 with) and the exact permutation p-value.
    """
    if "component" in profile.columns:
        matrix = profile_matrix(profile, features)
    else:
        matrix = profile.astype(float)
    if not 1 <= int(n_boot):
        raise ConfigError(f"n_boot must be >= 1 (default 2000), got {n_boot}")
    if not 0.0 < float(alpha) < 1.0:
        raise ConfigError(f"alpha must be in (0, 1), e.g. 0.05; got {alpha}")
    layers = [int(i) for i in matrix.index]
    n = len(layers)
    if n < 3:
        raise ConfigError(f"a gateway test needs at least 3 layers (2 gateways + middle), got {n}")
    if gateways is None:
        gateways = (min(layers), max(layers))
    gw = tuple(int(g) for g in gateways)
    if len(gw) != 2 or len(set(gw)) != 2 or not set(gw) <= set(layers):
        raise ConfigError(f"gateways must be two different layers of the profile {layers}, got {gateways!r}")
    x = matrix.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        cols = sorted({matrix.columns[j] for j in np.flatnonzero(bad.any(axis=0))})
        raise MeasurementError(f"profile columns {cols[:5]} hold NaN or inf; drop them or use svd=True statistics")
    keep, dropped, scales = [], [], []
    for j, name in enumerate(matrix.columns):
        s = _robust_scale(x[:, j])
        if s > 0:
            keep.append(j)
            scales.append(s)
        else:
            dropped.append(str(name))
    if not keep:
        raise MeasurementError("every profile column is constant across layers: no layer can be distinct")
    xk = x[:, keep]
    centre = np.empty_like(xk)
    for i in range(n):
        others = np.delete(xk, i, axis=0)
        centre[i] = np.median(others, axis=0)
    z = (xk - centre) / np.asarray(scales)[None, :]
    z2 = z * z
    d = np.sqrt(z2.mean(axis=1))

    pos = {layer: k for k, layer in enumerate(layers)}
    g_idx = [pos[g] for g in gw]
    mid = np.array([k for k in range(n) if k not in g_idx])

    def excess(dd: np.ndarray) -> np.ndarray:
        return dd[..., g_idx].mean(axis=-1) - np.median(dd[..., mid], axis=-1)

    def margin(dd: np.ndarray) -> np.ndarray:
        return dd[..., g_idx].min(axis=-1) - dd[..., mid].max(axis=-1)

    m = z.shape[1]
    rng = np.random.default_rng(int(seed))
    counts = stats.bootstrap_counts(m, int(n_boot), rng)  # (n_boot, columns)
    d_boot = np.sqrt(counts @ z2.T / m)  # (n_boot, layers)
    d_lo, d_hi = stats.percentile_interval(d_boot, level)

    def estimate(fn) -> stats.Estimate:
        lo, hi = stats.percentile_interval(fn(d_boot), level)
        return stats.Estimate(float(fn(d)), float(lo), float(hi), m, level)

    p, n_pairs = gateway_pair_pvalue(d, g_idx)
    k = int(math.floor(float(alpha) * n_pairs + 1e-9))
    if k == 0:
        vs_chance = stats.Estimate.undefined(
            f"too few: {n} layers give {n_pairs} pairs, so the smallest attainable p is 1/{n_pairs} > "
            f"alpha={alpha:g}; no outcome could be beyond chance (use a model with more layers)", m, level)
    else:
        pairs = np.array([pq for pq in combinations(range(n), 2) if set(pq) != set(g_idx)])

        def vs_chance_fn(dd: np.ndarray) -> np.ndarray:
            dd = np.atleast_2d(dd)
            others = np.minimum(dd[:, pairs[:, 0]], dd[:, pairs[:, 1]])
            q = -np.partition(-others, k - 1, axis=1)[:, k - 1]
            return dd[:, g_idx].min(axis=1) - q

        lo, hi = stats.percentile_interval(vs_chance_fn(d_boot), level)
        vs_chance = stats.Estimate(float(vs_chance_fn(d)[0]), float(lo), float(hi), m, level)
    order = np.argsort(-d, kind="stable")
    rank = np.empty(n, dtype=int)
    rank[order] = np.arange(1, n + 1)
    table = pd.DataFrame({
        "layer": layers,
        "distinctiveness": d,
        "distinctiveness_ci_low": d_lo,
        "distinctiveness_ci_high": d_hi,
        "rank": rank,
        "role": ["gateway" if layer in gw else "middle" for layer in layers],
    })
    zdf = pd.DataFrame(z, index=matrix.index, columns=[matrix.columns[j] for j in keep])
    return Distinctiveness(table, zdf, gw, estimate(excess), estimate(margin), vs_chance, p, n_pairs,
                           float(alpha), dropped)

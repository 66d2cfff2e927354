"""Figures for quantization-disparity studies (seaborn where it is the idiom, matplotlib elsewhere;
headless-safe).

Every plotting function takes ``ax=None`` (a new figure is made when omitted), returns the
:class:`~matplotlib.figure.Figure`, and never calls ``plt.show()``. This module does not
select a backend: matplotlib falls back to Agg without a display, and notebooks keep theirs.
Importing it applies the shared theme (:func:`apply_theme`), so every figure a notebook draws
after ``from qhelpers.report import plots`` looks the same. Intervals are always ours (paired
bootstrap, from the ``<value>_ci_low``/``_ci_high`` columns): seaborn never recomputes them.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from qhelpers.util.atomic import atomic_write
from qhelpers.util.errors import ConfigError

__all__ = [
    "THEME",
    "apply_theme",
    "language_points",
    "layer_profile",
    "layer_scatter",
    "DEFAULT_GROUPS",
    "GROUP_COLORS",
    "resource_group",
    "new_axes",
    "language_bars",
    "layer_heatmap",
    "pareto_frontier",
    "pareto_plot",
    "estimate_bars",
    "hr_lr_scatter",
    "save_figure",
]

#: High-resource languages of the project; every other language counts as low-resource.
DEFAULT_GROUPS: dict[str, str] = {"en": "HR", "de": "HR", "fr": "HR", "zh": "HR"}
#: Resource-group colours from seaborn's colour-blind-safe palette (blue vs orange, never red vs green).
GROUP_COLORS: dict[str, str] = {"HR": "#0173b2", "LR": "#de8f05"}
_OTHER_COLORS = ["#029e73", "#cc78bc", "#ca9161", "#fbafe4", "#949494", "#ece133", "#56b4e9"]

#: The shared look of every figure: seaborn's white grid and colour-blind palette, slightly small type.
THEME: dict[str, Any] = {"context": "notebook", "style": "whitegrid", "palette": "colorblind", "font_scale": 0.85}


def apply_theme() -> None:
    """Apply :data:`THEME` to matplotlib's defaults (done on import; call again after changing rcParams)."""
    sns.set_theme(**THEME)


apply_theme()


def resource_group(lang: str, lang_groups: Mapping[str, str] | None = None) -> str:
    """The resource group of ``lang``: from ``lang_groups`` when given (missing -> "LR"),
    else HR for en, de, fr, zh and LR otherwise."""
    groups = DEFAULT_GROUPS if lang_groups is None else lang_groups
    return str(groups.get(lang, "LR"))


def new_axes(ax: Any = None, figsize: tuple[float, float] = (8, 4.5)) -> tuple[Figure, Any]:
    """``(figure, ax)``: the figure of ``ax``, or a new figure of ``figsize`` with one axes when
    ``ax`` is None (every plotting function's ``ax=None`` convention)."""
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def _require(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ConfigError(f"{what} needs a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ConfigError(f"{what}: table lacks columns {missing} (has {list(df.columns)})")


def language_bars(
    table: pd.DataFrame,
    value: str = "delta_bpb",
    groups: str | None = "config",
    ax=None,
    lang_groups: Mapping[str, str] | None = None,
    lang_col: str = "lang",
    title: str | None = None,
    ylabel: str | None = None,
) -> Figure:
    """One bar per row of ``table`` (e.g. :func:`qhelpers.stats.language_table`), clustered
    by the ``groups`` column (None: one cluster), a bar per language inside a cluster,
    coloured by resource group (``lang_groups`` maps lang -> group; default en, de, fr, zh
    HR, others LR). Error bars span ``<value>_ci_low`` .. ``<value>_ci_high`` when those
    columns exist (drawn as lines, so a point estimate outside its percentile interval is
    shown as it is). NaN values leave a gap.
    """
    _require(table, [value, lang_col] + ([groups] if groups else []), "language_bars")
    fig, ax = new_axes(ax)
    clusters = list(dict.fromkeys(table[groups])) if groups else [None]
    group_names = list(dict.fromkeys(resource_group(str(x), lang_groups) for x in table[lang_col]))
    palette = dict(GROUP_COLORS)
    extra = iter(_OTHER_COLORS)
    for g in group_names:
        if g not in palette:
            palette[g] = next(extra, "#7f7f7f")
    has_ci = f"{value}_ci_low" in table.columns and f"{value}_ci_high" in table.columns
    xs, heights, colors, labels, los, his = [], [], [], [], [], []
    centers = []
    x = 0.0
    for k in clusters:
        sub = table if k is None else table[table[groups] == k]
        start = x
        for _, row in sub.iterrows():
            lang = str(row[lang_col])
            xs.append(x)
            heights.append(float(row[value]) if pd.notna(row[value]) else np.nan)
            colors.append(palette[resource_group(lang, lang_groups)])
            labels.append(lang)
            if has_ci:
                los.append(float(row[f"{value}_ci_low"]) if pd.notna(row[f"{value}_ci_low"]) else np.nan)
                his.append(float(row[f"{value}_ci_high"]) if pd.notna(row[f"{value}_ci_high"]) else np.nan)
            x += 1.0
        centers.append((start + x - 1.0) / 2.0)
        x += 1.0  # gap between clusters
    ax.bar(xs, np.nan_to_num(heights, nan=0.0), width=0.8, color=colors, edgecolor="black", linewidth=0.5)
    # NaN bars: draw them with zero height but mark them.
    for xi, h in zip(xs, heights):
        if not math.isfinite(h):
            ax.annotate("n/a", (xi, 0), ha="center", va="bottom", fontsize=7)
    if has_ci:
        ok = [i for i in range(len(xs)) if math.isfinite(los[i]) and math.isfinite(his[i])]
        if ok:
            ax.vlines([xs[i] for i in ok], [los[i] for i in ok], [his[i] for i in ok], color="black", linewidth=1.2)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=8)
    if groups:
        for c, k in zip(centers, clusters):
            ax.annotate(
                str(k), xy=(c, 0), xycoords=("data", "axes fraction"), xytext=(0, -22),
                textcoords="offset points", ha="center", va="top", fontsize=9,
            )
    level = float(table.attrs.get("level", 0.95))
    ax.set_ylabel(ylabel or (value + (f" ({level:.0%} CI)" if has_ci else "")))
    if title:
        ax.set_title(title)
    ax.legend(handles=[Patch(color=palette[g], label=g) for g in group_names], loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def language_points(
    table: pd.DataFrame,
    value: str = "delta_bpb",
    hue: str | None = "config",
    ax: Any = None,
    lang_groups: Mapping[str, str] | None = None,
    lang_col: str = "lang",
    title: str | None = None,
    ylabel: str | None = None,
) -> Figure:
    """One point per row of ``table`` (e.g. :func:`qhelpers.stats.language_table`): languages on x,
    one colour per ``hue`` level side by side (``seaborn.pointplot``), each with its interval
    ``<value>_ci_low`` .. ``<value>_ci_high`` drawn from the table (our paired bootstrap; seaborn
    computes none, and a point outside its percentile interval is shown as it is). Each tick names
    the language and its resource group. Each (language, hue) pair must be one row."""
    _require(table, [value, lang_col] + ([hue] if hue else []), "language_points")
    keys = [lang_col] + ([hue] if hue else [])
    if table.duplicated(keys).any():
        raise ConfigError(f"language_points: several rows per {keys}; one row is one estimate")
    fig, ax = new_axes(ax)
    data = table.assign(**{value: pd.to_numeric(table[value], errors="coerce"), lang_col: table[lang_col].astype(str)})
    langs = list(dict.fromkeys(data[lang_col]))
    levels = list(dict.fromkeys(data[hue].astype(str))) if hue else [None]
    if hue:
        data = data.assign(**{hue: data[hue].astype(str)})
    before = len(ax.lines)
    sns.pointplot(
        data=data, x=lang_col, y=value, hue=hue, order=langs, hue_order=levels if hue else None,
        errorbar=None, estimator="mean", dodge=0.5 if hue and len(levels) > 1 else False,
        linestyle="none", markersize=5, ax=ax,
    )
    lo_col, hi_col = f"{value}_ci_low", f"{value}_ci_high"
    if lo_col in data.columns and hi_col in data.columns:
        rows = data.set_index(keys)
        for level, line in zip(levels, ax.lines[before:]):
            for x, y in zip(line.get_xdata(), line.get_ydata()):
                if not math.isfinite(float(y)):
                    continue
                lang = langs[round(float(x))]
                row = rows.loc[(lang, level) if hue else lang]
                lo, hi = float(row[lo_col]), float(row[hi_col])
                if math.isfinite(lo) and math.isfinite(hi):
                    ax.vlines(float(x), lo, hi, color=line.get_color(), linewidth=1.4)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlim(-0.5, len(langs) - 0.5)  # the intervals' autoscaling would crop the categorical axis
    ax.set_xticks(range(len(langs)), [f"{lang}\n{resource_group(lang, lang_groups)}" for lang in langs])
    level_ci = float(table.attrs.get("level", 0.95))
    ax.set_xlabel(f"{lang_col} and resource group")
    ax.set_ylabel(ylabel or f"{value} ({level_ci:.0%} CI)")
    if title:
        ax.set_title(title)
    if hue and ax.get_legend() is not None:
        ax.legend(title=hue, fontsize=8, title_fontsize=8)
    fig.tight_layout()
    return fig


def layer_heatmap(
    matrix: pd.DataFrame,
    ax=None,
    cmap: str | None = None,
    annotate: bool = True,
    center: float | None = None,
    fmt: str = ".2f",
    title: str | None = None,
    cbar_label: str | None = None,
) -> Figure:
    """Heatmap of a (layers x languages) DataFrame (``seaborn.heatmap``). ``center`` makes the
    colour scale symmetric around it (diverging map "RdBu_r" by default; "viridis" otherwise).
    NaN cells are left blank (annotated "nan")."""
    if not isinstance(matrix, pd.DataFrame) or matrix.empty:
        raise ConfigError("layer_heatmap needs a non-empty DataFrame (rows layers, columns languages)")
    data = matrix.apply(pd.to_numeric, errors="coerce").astype(np.float64)
    values = data.to_numpy()
    fig, ax = new_axes(ax, figsize=(1.0 + 0.8 * values.shape[1], 1.0 + 0.35 * values.shape[0]))
    finite = values[np.isfinite(values)]
    if center is not None:
        half = float(np.max(np.abs(finite - center))) if finite.size else 1.0
        half = half if half > 0 else 1.0
        vmin, vmax = center - half, center + half
        cmap = cmap or "RdBu_r"
    else:
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        vmin, vmax = lo, (hi if hi > lo else lo + 1.0)
        cmap = cmap or "viridis"
    sns.heatmap(
        data, ax=ax, cmap=cmap, vmin=vmin, vmax=vmax, mask=~np.isfinite(values), annot=annotate, fmt=fmt,
        annot_kws={"fontsize": 7}, cbar_kws={"label": cbar_label} if cbar_label else {}, linewidths=0.3,
        xticklabels=[str(c) for c in matrix.columns], yticklabels=[str(r) for r in matrix.index],
    )
    if annotate:
        for i, j in zip(*np.nonzero(~np.isfinite(values))):
            ax.text(j + 0.5, i + 0.5, "nan", ha="center", va="center", fontsize=7, color="gray")
    ax.tick_params(axis="y", rotation=0)
    ax.set_xlabel(str(matrix.columns.name or "language"))
    ax.set_ylabel(str(matrix.index.name or "layer"))
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def pareto_frontier(points: pd.DataFrame, x: str = "x", y: str = "y") -> pd.DataFrame:
    """The non-dominated rows of ``points``, minimising both ``x`` (e.g. memory overhead) and
    ``y`` (e.g. disparity), sorted by ``x`` then ``y``, original index kept.

    A row is dominated when another row is <= in both and < in at least one. Exact
    duplicates do not dominate each other (both are kept). Rows with a NaN in ``x`` or
    ``y`` cannot be compared and are never on the frontier.
    """
    _require(points, [x, y], "pareto_frontier")
    xv = pd.to_numeric(points[x], errors="coerce").to_numpy(dtype=np.float64)
    yv = pd.to_numeric(points[y], errors="coerce").to_numpy(dtype=np.float64)
    ok = np.isfinite(xv) & np.isfinite(yv)
    X, Y = xv[ok][:, None], yv[ok][:, None]
    dominated = ((X.T <= X) & (Y.T <= Y) & ((X.T < X) | (Y.T < Y))).any(axis=1)
    keep = np.flatnonzero(ok)[~dominated]
    out = points.iloc[keep]
    return out.sort_values([x, y], kind="mergesort")


def pareto_plot(
    points: pd.DataFrame,
    ax=None,
    x: str = "x",
    y: str = "y",
    label: str | None = "label",
    xlabel: str = "overhead",
    ylabel: str = "disparity",
    title: str | None = None,
) -> Figure:
    """Scatter of all points (grey), the Pareto frontier (red, joined by a step line) and
    the point labels from column ``label`` when present."""
    _require(points, [x, y], "pareto_plot")
    fig, ax = new_axes(ax, figsize=(6.5, 4.5))
    front = pareto_frontier(points, x, y)
    rest = points.drop(index=front.index)
    ax.scatter(rest[x], rest[y], color="#999999", s=30, label="dominated", zorder=2)
    ax.scatter(front[x], front[y], color="#d62728", s=45, label="Pareto frontier", zorder=3)
    if len(front) > 1:
        ax.step(front[x], front[y], where="post", color="#d62728", linewidth=1.2, zorder=1)
    if label and label in points.columns:
        for _, row in points.iterrows():
            if pd.notna(row[x]) and pd.notna(row[y]):
                ax.annotate(str(row[label]), (row[x], row[y]), xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def estimate_bars(
    table: pd.DataFrame,
    value: str,
    label: str = "config",
    ax=None,
    reference: float | None = None,
    highlight: Sequence[str] = (),
    title: str | None = None,
    xlabel: str | None = None,
) -> Figure:
    """Horizontal bars of one estimate per row (e.g. disparity per configuration) with
    ``<value>_ci_low``/``<value>_ci_high`` error bars when present; undefined (NaN) rows are
    drawn as an empty slot marked "undefined". ``reference`` draws a vertical line."""
    _require(table, [label, value], "estimate_bars")
    fig, ax = new_axes(ax, figsize=(7, 0.45 * len(table) + 1.2))
    y = np.arange(len(table))
    values = pd.to_numeric(table[value], errors="coerce").to_numpy(dtype=float)
    colors = ["#d62728" if str(n) in set(highlight) else "#1f77b4" for n in table[label]]
    ax.barh(y, np.nan_to_num(values), color=colors)
    lo_col, hi_col = f"{value}_ci_low", f"{value}_ci_high"
    if lo_col in table.columns and hi_col in table.columns:
        lo = pd.to_numeric(table[lo_col], errors="coerce").to_numpy(dtype=float)
        hi = pd.to_numeric(table[hi_col], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(values) & np.isfinite(lo) & np.isfinite(hi)
        ax.errorbar(values[ok], y[ok], xerr=[values[ok] - lo[ok], hi[ok] - values[ok]], fmt="none", ecolor="black", capsize=3)
    for i in np.flatnonzero(~np.isfinite(values)):
        ax.text(0, y[i], " undefined", va="center", fontsize=8, color="#555555")
    if reference is not None:
        ax.axvline(reference, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(y, [str(v) for v in table[label]])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel or value)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def hr_lr_scatter(
    table: pd.DataFrame,
    hr: str = "hr",
    lr: str = "lr",
    label: str = "config",
    ax=None,
    title: str | None = None,
    xlabel: str = "high-resource change",
    ylabel: str = "low-resource change",
) -> Figure:
    """One point per configuration: mean high-resource vs mean low-resource change, with the
    diagonal of equal change (points above it hurt low-resource languages more)."""
    _require(table, [hr, lr, label], "hr_lr_scatter")
    fig, ax = new_axes(ax, figsize=(6, 5))
    x = pd.to_numeric(table[hr], errors="coerce").to_numpy(dtype=float)
    y = pd.to_numeric(table[lr], errors="coerce").to_numpy(dtype=float)
    ax.scatter(x, y, color="#1f77b4", s=40, zorder=3)
    for xi, yi, name in zip(x, y, table[label]):
        if np.isfinite(xi) and np.isfinite(yi):
            ax.annotate(str(name), (xi, yi), xytext=(4, 4), textcoords="offset points", fontsize=8)
    finite = np.concatenate([x[np.isfinite(x)], y[np.isfinite(y)]])
    if finite.size:
        lo, hi = min(0.0, finite.min()), finite.max()
        ax.plot([lo, hi], [lo, hi], "k--", alpha=0.4, label="equal change")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, out_dir: str | os.PathLike, name: str, dpi: int = 120) -> str:
    """Save ``fig`` as ``out_dir/<name>.png`` (dpi 120) atomically and return the path
    relative to ``out_dir`` (what :func:`qhelpers.report.results.write_results` takes in
    ``figures``). ``name`` may contain sub-folders but must stay inside ``out_dir``."""
    if not isinstance(fig, Figure):
        raise ConfigError(f"save_figure needs a matplotlib Figure, got {type(fig).__name__}")
    rel = Path(str(name))
    if rel.suffix.lower() != ".png":
        rel = rel.with_name(rel.name + ".png")
    if rel.is_absolute() or ".." in rel.parts or not rel.stem:
        raise ConfigError(f"figure name {name!r} must be a relative path inside out_dir, e.g. 'disparity_bars'")
    out = Path(out_dir) / rel
    atomic_write(out, lambda fh: fig.savefig(fh, format="png", dpi=dpi, bbox_inches="tight"))
    return rel.as_posix()


def layer_profile(
    table: pd.DataFrame,
    value: str,
    *,
    x: str = "depth",
    hue: str | None = None,
    ax=None,
    title: str | None = None,
    ylabel: str | None = None,
    window: tuple[float, float] | None = None,
    reference: float | None = None,
    logy: bool = False,
    hue_order: Sequence[str] | None = None,
    band_alpha: float | None = None,
    span: tuple[float, float, float] | None = None,
    span_label: str = "extreme (95% CI)",
    color: str | None = None,
):
    """Line plot of ``value`` against depth (or layer) with its ``<value>_ci_low/_ci_high``
    band when present; one line per ``hue`` group (e.g. lang). ``window`` shades an x range
    (e.g. the hypothesised 0.65-0.85 depth); ``reference`` draws a horizontal line (e.g.
    chance). ``band_alpha``: opacity of the bands (default 0.18, 0.07 with more than 3 lines;
    0 hides them). ``span=(x, lo, hi)`` marks a point estimate on the x axis with its interval
    (e.g. the depth of a minimum and its bootstrap CI). ``color`` sets the line colour when
    there is no ``hue``. Returns the Figure."""
    need = [x, value] + ([hue] if hue else [])
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise ConfigError(f"layer_profile: table lacks columns {missing}; it has {list(table.columns)}")
    fig, ax = new_axes(ax, figsize=(8, 4.5))
    groups = [(None, table)] if hue is None else [
        (k, table[table[hue] == k]) for k in (hue_order or list(dict.fromkeys(table[hue])))
    ]
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    alpha = band_alpha if band_alpha is not None else (0.18 if len(groups) <= 3 else 0.07)
    for n, (name, sub) in enumerate(groups):
        sub = sub.sort_values(x)
        xs = sub[x].to_numpy(dtype=float)
        ys = pd.to_numeric(sub[value], errors="coerce").to_numpy(dtype=float)
        style = "-"
        line_color = color if (hue is None and color is not None) else palette[n % len(palette)]
        if hue == "lang" and name is not None:
            style = "-" if resource_group(str(name)) == "HR" else "--"
        line, = ax.plot(xs, ys, style, marker="o", markersize=3, color=line_color, label=None if name is None else str(name))
        lo_c, hi_c = f"{value}_ci_low", f"{value}_ci_high"
        if lo_c in sub.columns and hi_c in sub.columns:
            lo = pd.to_numeric(sub[lo_c], errors="coerce").to_numpy(dtype=float)
            hi = pd.to_numeric(sub[hi_c], errors="coerce").to_numpy(dtype=float)
            ok = np.isfinite(lo) & np.isfinite(hi)
            if ok.any() and alpha > 0:
                ax.fill_between(xs[ok], lo[ok], hi[ok], color=line.get_color(), alpha=alpha, linewidth=0)
    if window is not None:
        ax.axvspan(window[0], window[1], color="#999999", alpha=0.15, label=f"{x} {window[0]:g}-{window[1]:g}")
    if span is not None:
        x0, lo, hi = (float(v) for v in span)
        if math.isfinite(lo) and math.isfinite(hi):
            ax.axvspan(lo, hi, color="#d62728", alpha=0.12, label=span_label)
        if math.isfinite(x0):
            ax.axvline(x0, color="#d62728", linewidth=1.2, linestyle="-")
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle=":", linewidth=1)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("depth (layer / (n_layers - 1))" if x == "depth" else x)
    ax.set_ylabel(ylabel or value)
    if title:
        ax.set_title(title)
    if hue is not None or window is not None or span is not None:
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def layer_scatter(
    table: pd.DataFrame,
    x: str,
    y: str,
    ax: Any = None,
    corr: Mapping[str, Any] | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    yerr: bool = True,
    highlight: Sequence[int] = (),
    reference: float | None = None,
    title: str | None = None,
):
    """``y`` against ``x``, one point per layer labelled with its index; vertical error bars
    from ``<y>_ci_low``/``_ci_high`` when present; ``highlight`` layers drawn in red;
    ``reference`` a dashed horizontal line; ``corr`` (a :func:`qhelpers.stats.correlation`
    dict) is written in the title after ``title``."""
    fig, ax = new_axes(ax, figsize=(5, 4))
    xv, yv = table[x].to_numpy(dtype=np.float64), table[y].to_numpy(dtype=np.float64)
    lo, hi = f"{y}_ci_low", f"{y}_ci_high"
    if yerr and lo in table.columns and hi in table.columns:
        err = np.vstack([yv - table[lo].to_numpy(dtype=np.float64), table[hi].to_numpy(dtype=np.float64) - yv])
        ax.errorbar(xv, yv, yerr=np.abs(err), fmt="o", ms=4, alpha=0.8, capsize=2)
    else:
        ax.plot(xv, yv, "o", ms=4)
    for layer, a, b in zip(table["layer"], xv, yv):
        if np.isfinite(a) and np.isfinite(b):
            ax.annotate(str(int(layer)), (a, b), xytext=(3, 3), textcoords="offset points", fontsize=7)
    marked = table["layer"].isin([int(i) for i in highlight]).to_numpy()
    if marked.any():
        ax.scatter(xv[marked], yv[marked], color="#d62728", zorder=3, label="highlighted layers")
        ax.legend(fontsize=8)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    heading = [title] if title else []
    if corr is not None:
        r = corr.get("r")
        if corr.get("defined") and r is not None:
            method = str(corr.get("method", "")).capitalize()
            heading.append(f"{method} r = {r:.2f} [{corr['ci_low']:.2f}, {corr['ci_high']:.2f}], n = {corr['n']}")
        else:
            heading.append(f"r undefined ({corr.get('reason')})")
    if heading:
        ax.set_title("\n".join(heading), fontsize=9)
    fig.tight_layout()
    return fig

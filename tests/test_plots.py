"""Tests of qhelpers.report.plots: the Pareto frontier as a pure function, headless figures."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import LineCollection, PathCollection, QuadMesh  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from qhelpers.report import plots  # noqa: E402
from qhelpers.util.errors import ConfigError  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


POINTS = pd.DataFrame(
    {
        "label": ["A", "B", "C", "D", "E", "F", "G", "H"],
        "x": [1.0, 2.0, 3.0, 4.0, 2.0, 5.0, np.nan, 0.5],
        "y": [5.0, 3.0, 4.0, 1.0, 3.0, 1.0, 0.0, 9.0],
    }
)


def test_pareto_frontier_known_answer():
    front = plots.pareto_frontier(POINTS)
    # C is dominated by B; F by D (same y, larger x); G has no x; B and E tie and both stay.
    assert list(front["label"]) == ["H", "A", "B", "E", "D"]
    assert list(front.index) == [7, 0, 1, 4, 3]
    pd.testing.assert_frame_equal(POINTS, POINTS.copy())  # input untouched
    single = plots.pareto_frontier(POINTS.iloc[[2]])
    assert list(single["label"]) == ["C"]
    renamed = POINTS.rename(columns={"x": "mem", "y": "disp"})
    assert list(plots.pareto_frontier(renamed, x="mem", y="disp")["label"]) == ["H", "A", "B", "E", "D"]
    with pytest.raises(ConfigError):
        plots.pareto_frontier(POINTS.drop(columns=["y"]))


def test_pareto_plot_marks_frontier():
    fig = plots.pareto_plot(POINTS)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    dominated, frontier = ax.collections[:2]
    assert len(frontier.get_offsets()) == 5
    assert len(dominated.get_offsets()) == 3  # C, F and G (G's NaN x is not drawn)
    assert len(ax.texts) == 7  # every plottable point labelled


def _table():
    rows = []
    for c in ("all_int4", "gateway"):
        for lang, v in (("en", 0.1), ("de", 0.12), ("he", 0.3)):
            rows.append({"config": c, "lang": lang, "delta_bpb": v, "delta_bpb_ci_low": v - 0.02,
                         "delta_bpb_ci_high": v + 0.03})
    t = pd.DataFrame(rows)
    t.loc[5, ["delta_bpb", "delta_bpb_ci_low", "delta_bpb_ci_high"]] = np.nan
    return t


def test_language_bars_counts_and_colours():
    t = _table()
    fig = plots.language_bars(t)
    ax = fig.axes[0]
    assert len(ax.patches) == 6
    colours = [to_hex(p.get_facecolor()) for p in ax.patches]
    hr, lr = plots.GROUP_COLORS["HR"], plots.GROUP_COLORS["LR"]
    assert colours == [hr, hr, lr, hr, hr, lr]
    heights = [p.get_height() for p in ax.patches]
    assert heights[:5] == pytest.approx([0.1, 0.12, 0.3, 0.1, 0.12]) and heights[5] == 0.0
    errbars = [c for c in ax.collections if len(c.get_segments()) == 5]
    assert len(errbars) == 1  # five finite intervals, the NaN row has none
    seg = errbars[0].get_segments()[2]
    assert seg[0][1] == pytest.approx(0.28) and seg[1][1] == pytest.approx(0.33)
    assert [tk.get_text() for tk in ax.get_xticklabels()] == ["en", "de", "he"] * 2
    labels = [tx.get_text() for tx in ax.texts]
    assert "all_int4" in labels and "gateway" in labels and "n/a" in labels

    # Custom groups, a single cluster and a caller's axes.
    fig2, ax2 = plt.subplots()
    out = plots.language_bars(t[t["config"] == "gateway"], groups=None, ax=ax2, lang_groups={"en": "HR", "de": "LR"})
    assert out is fig2 and len(ax2.patches) == 3
    assert [to_hex(p.get_facecolor()) for p in ax2.patches] == [hr, lr, lr]
    with pytest.raises(ConfigError):
        plots.language_bars(t, value="delta_nll")


def test_language_points_draws_our_intervals_not_seaborns():
    t = _table()
    fig = plots.language_points(t)
    ax = fig.axes[0]
    points = [line for line in ax.lines if line.get_marker() == "o" and len(line.get_xdata())]  # not legend handles
    assert len(points) == 2  # one per config
    assert list(points[0].get_ydata()) == pytest.approx([0.1, 0.12, 0.3])
    intervals = [seg for c in ax.collections if isinstance(c, LineCollection) for seg in c.get_segments()]
    assert len(intervals) == 5  # the NaN row has none
    assert max((round(s[0][1], 6), round(s[1][1], 6)) for s in intervals) == (0.28, 0.33)
    assert [tk.get_text() for tk in ax.get_xticklabels()] == ["en\nHR", "de\nHR", "he\nLR"]
    assert ax.get_xlim() == pytest.approx((-0.5, 2.5))
    single = plots.language_points(t[t["config"] == "gateway"], hue=None, lang_groups={"en": "HR"})
    assert [tk.get_text() for tk in single.axes[0].get_xticklabels()] == ["en\nHR", "de\nLR", "he\nLR"]
    with pytest.raises(ConfigError):
        plots.language_points(pd.concat([t, t]))


def test_theme_is_shared_and_colour_blind_safe():
    plots.apply_theme()
    cycle = [to_hex(c) for c in plt.rcParams["axes.prop_cycle"].by_key()["color"][:2]]
    assert cycle == [plots.GROUP_COLORS["HR"], plots.GROUP_COLORS["LR"]]


def test_layer_heatmap_cells_and_centre():
    m = pd.DataFrame(np.arange(12, dtype=float).reshape(4, 3) - 4.0, columns=["en", "he", "sw"])
    m.iloc[1, 1] = np.nan
    fig = plots.layer_heatmap(m, center=0.0)
    ax = fig.axes[0]
    meshes = [c for c in ax.collections if isinstance(c, QuadMesh)]  # seaborn.heatmap draws one QuadMesh
    assert len(meshes) == 1 and meshes[0].get_array().shape == (4, 3)
    assert len(ax.texts) == 12 and "nan" in [t.get_text() for t in ax.texts]
    norm = meshes[0].norm
    assert norm.vmin == pytest.approx(-7.0) and norm.vmax == pytest.approx(7.0)
    fig = plots.layer_heatmap(m, annotate=False)
    assert len(fig.axes[0].texts) == 0
    assert fig.axes[0].collections[0].norm.vmin == pytest.approx(-4.0)
    with pytest.raises(ConfigError):
        plots.layer_heatmap(pd.DataFrame())


def test_save_figure(tmp_path):
    fig = plots.pareto_plot(POINTS)
    rel = plots.save_figure(fig, tmp_path, "pareto")
    assert rel == "pareto.png"
    data = (tmp_path / rel).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    phys = data.index(b"pHYs") + 4  # pixels per metre, x then y
    assert int.from_bytes(data[phys:phys + 4], "big") == round(120 / 0.0254)
    assert plots.save_figure(fig, tmp_path, "sub/heat.png") == "sub/heat.png"
    assert sorted(os.listdir(tmp_path)) == ["pareto.png", "sub"]
    assert os.listdir(tmp_path / "sub") == ["heat.png"]
    with pytest.raises(ConfigError):
        plots.save_figure(fig, tmp_path, "../escape")


def test_estimate_bars_draws_one_bar_per_row_and_marks_undefined():
    from qhelpers.report.plots import estimate_bars

    table = pd.DataFrame(
        {"config": ["a", "b", "c"], "d": [1.0, float("nan"), 2.0], "d_ci_low": [0.5, float("nan"), 1.5], "d_ci_high": [1.5, float("nan"), 2.5]}
    )
    fig = estimate_bars(table, "d", reference=1.0, highlight=["c"])
    ax = fig.axes[0]
    assert len(ax.patches) == 3
    assert [t.get_text() for t in ax.texts] == [" undefined"]
    assert ax.patches[2].get_facecolor()[:3] != ax.patches[0].get_facecolor()[:3]


def test_hr_lr_scatter_labels_points():
    from qhelpers.report.plots import hr_lr_scatter

    table = pd.DataFrame({"config": ["x", "y"], "hr": [0.1, 0.2], "lr": [0.3, float("nan")]})
    fig = hr_lr_scatter(table)
    assert [t.get_text() for t in fig.axes[0].texts] == ["x"]


def test_plot_layer_profile_draws_bands():
    table = pd.DataFrame({"depth": [0, 0.5, 1] * 2, "lang": ["en"] * 3 + ["he"] * 3, "v": [1, 2, 3, 2, 3, 4],
                          "v_ci_low": [0.5, 1.5, 2.5, 1.5, 2.5, 3.5], "v_ci_high": [1.5, 2.5, 3.5, 2.5, 3.5, 4.5]})
    fig = plots.layer_profile(table, "v", hue="lang", window=(0.65, 0.85), span=(0.5, 0.4, 0.6))
    ax = fig.axes[0]
    assert len(ax.lines) == 3 and len(ax.collections) == 2  # 2 curves + the span's line; 2 CI bands
    bare = plots.layer_profile(table, "v", hue="lang", band_alpha=0).axes[0]
    assert len(bare.collections) == 0
    single = plots.layer_profile(table[table["lang"] == "en"], "v", color="black").axes[0]
    assert single.lines[0].get_color() == "black"
    with pytest.raises(ConfigError, match="lacks columns"):
        plots.layer_profile(table, "w")


def test_layer_scatter_bars_labels_highlight_and_correlation_title():
    table = pd.DataFrame({"layer": [0, 1, 2], "x": [1.0, 2.0, 3.0], "y": [0.5, 0.1, 0.9],
                          "y_ci_low": [0.4, 0.0, 0.7], "y_ci_high": [0.7, 0.3, 1.0]})
    corr = {"r": 0.5, "ci_low": -0.2, "ci_high": 0.9, "n": 3, "method": "spearman", "defined": True}
    ax = plots.layer_scatter(table, "x", "y", corr=corr, highlight=[2], reference=0.0, title="T").axes[0]
    bars = ax.containers[0]  # errorbar container: hand-computed lower / upper lengths
    segments = bars.lines[2][0].get_segments()
    np.testing.assert_allclose([seg[:, 1] for seg in segments], [[0.4, 0.7], [0.0, 0.3], [0.7, 1.0]])
    assert [t.get_text() for t in ax.texts] == ["0", "1", "2"]
    assert ax.get_title() == "T\nSpearman r = 0.50 [-0.20, 0.90], n = 3"
    red = [c for c in ax.collections if isinstance(c, PathCollection)]
    np.testing.assert_allclose(red[0].get_offsets(), [[3.0, 0.9]])
    undefined = plots.layer_scatter(table, "x", "y", corr={"defined": False, "reason": "too few"}).axes[0]
    assert undefined.get_title() == "r undefined (too few)"

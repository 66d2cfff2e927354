"""Reporting: recording what an experiment measured and drawing it. May import ``measure`` and
the layers below it; every notebook uses it.

- ``results``: ``Hypothesis`` with its computed verdict, the environment, versions and git
  commit, and the atomically written ``results.json``;
- ``record``: ``current_parameters``, a notebook's parameters as run (the names its parameters
  cell assigns, with papermill's overrides), read from the cells the kernel ran;
- ``plots``: the standard figures (per-language bars and points, layer profiles and heatmaps,
  Pareto fronts, estimates with intervals) in one seaborn theme, and ``save_figure``;
- ``damage``: the damage card (per language: Δ bits per byte, KL to the full model, top-1
  agreement, tail KL, with intervals) as a table and as ``results.json`` records;
- ``html``: the run report's headline, change-in-bits-per-byte table and figures inline, for
  ``runner.summary`` (standard library only: the runner imports no numeric library).
"""

"""The damage card: per language, how far a quantized model moved from the full model.

One table, language x {Δ bits per byte, KL to the full model in bits per byte, top-1
agreement, 99th-percentile per-token KL}, each with its interval, from a
:func:`qhelpers.stats.tables.language_table` of a sweep measured with the damage card
(``MeasureConfig(damage=True)``, the default). Equal perplexity can hide many changed
predictions: KL and top-1 agreement show them (llama.cpp reports the same measures for one
mixed text; here they are per language, with intervals).
"""
from __future__ import annotations

from typing import Any, Sequence

import pandas as pd

from qhelpers.report.html import CARD_COLUMNS, card_cell
from qhelpers.util.errors import ConfigError

__all__ = ["CARD_COLUMNS", "damage_card", "damage_card_records"]

def damage_card(table: pd.DataFrame, config: str | None = None) -> pd.DataFrame:
    """One row per (config, language) of a language table: n texts and the card's four
    measures as ``value [low, high]`` strings. ``config`` keeps one configuration."""
    missing = [c for c, _, _ in CARD_COLUMNS if c not in table.columns]
    if missing:
        raise ConfigError(
            f"the table lacks the damage card's columns {missing}; build it with language_table() from a sweep "
            "measured with MeasureConfig(damage=True) (the default)"
        )
    rows = table if config is None else table[table["config"] == config]
    if rows.empty:
        raise ConfigError(f"no rows for config {config!r}; configs present: {sorted(set(table['config']))}")
    out = pd.DataFrame({"config": rows["config"], "lang": rows["lang"], "n": rows["n_texts"]})
    for column, heading, digits in CARD_COLUMNS:
        out[heading] = [
            card_cell(v, lo, hi, digits)
            for v, lo, hi in zip(rows[column], rows[f"{column}_ci_low"], rows[f"{column}_ci_high"])
        ]
    return out.reset_index(drop=True)


def damage_card_records(table: pd.DataFrame, configs: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The card's numbers as plain records for ``results.json`` (``metrics["damage_card"]``):
    config, lang, n and each measure with ``_ci_low``/``_ci_high``."""
    keep = table if configs is None else table[table["config"].isin(list(configs))]
    cols = ["config", "lang", "n_texts"] + [f"{c}{s}" for c, _, _ in CARD_COLUMNS for s in ("", "_ci_low", "_ci_high")]
    missing = [c for c in cols if c not in keep.columns]
    if missing:
        raise ConfigError(f"the table lacks columns {missing}; pass a language_table of a damage-card sweep")
    return [dict(r) for r in keep[cols].to_dict("records")]

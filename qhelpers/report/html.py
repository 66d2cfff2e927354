"""The readable parts of a run's report (``index.html`` and ``summary.md``): the headline answer per
model, the change in bits per byte per language, and per notebook its hypotheses beside its figures.

Standard library only: ``qhelpers.runner.summary`` calls it, and the runner imports no numeric
library. Every value taken from a ``results.json`` is escaped (``html.escape`` in HTML, table-cell
escaping in markdown); figures are embedded as ``data:`` URIs, so ``index.html`` needs no network
and no other file. Verdicts carry a symbol and a word beside a colour-blind-safe colour.
"""
from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

__all__ = [
    "HYPOTHESIS_DEFAULTS",
    "PREMISE_IDS",
    "REPORT_CSS",
    "VERDICT_STYLE",
    "delta_bpb_tables",
    "embed_image",
    "figure_anchor",
    "headline_html",
    "CARD_COLUMNS",
    "card_cell",
    "damage_cards",
    "headline_markdown",
    "notebook_sections_html",
    "premise_hypotheses",
    "split_hypotheses",
    "with_defaults",
]

#: The keys a results.json hypothesis gained with multiplicity and premises, with the value an
#: older record (without them) is read with: not primary, family "secondary", a finding, no
#: minimum effect, raw verdict = its verdict, not adjusted. Threshold and direction unknown.
HYPOTHESIS_DEFAULTS: dict[str, Any] = {
    "primary": False,
    "family": "secondary",
    "kind": "finding",
    "min_effect": 0.0,
    "threshold": None,
    "direction": None,
    "premise": None,
    "raw_verdict": None,
    "adjusted": None,
}


def with_defaults(h: Mapping[str, Any]) -> dict[str, Any]:
    """A results.json hypothesis with every key of :data:`HYPOTHESIS_DEFAULTS` present (an older
    record gets the defaults; ``raw_verdict`` defaults to its ``verdict``)."""
    out = dict(h)
    for key, default in HYPOTHESIS_DEFAULTS.items():
        if out.get(key) is None and default is not None:
            out[key] = default
        out.setdefault(key, default)
    if out.get("raw_verdict") is None:
        out["raw_verdict"] = out.get("verdict")
    return out


def split_hypotheses(hypotheses: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """``(primary, findings, sanity_checks)`` of a notebook's hypotheses (with defaults filled):
    the primary ones, the other findings ordered family by family (families in order of first
    appearance, hypotheses in their own order), and the sanity checks."""
    rows = [with_defaults(h) for h in hypotheses if isinstance(h, Mapping)]
    primary = [h for h in rows if h["primary"] is True]
    checks = [h for h in rows if h["kind"] == "sanity check" and h["primary"] is not True]
    rest = [h for h in rows if h["primary"] is not True and h["kind"] != "sanity check"]
    families = list(dict.fromkeys(str(h["family"]) for h in rest))
    rest.sort(key=lambda h: families.index(str(h["family"])))  # stable: keeps order within a family
    return primary, rest, checks

#: Hypotheses that state the question the toolkit exists for: do low-resource languages lose more?
PREMISE_IDS: tuple[str, ...] = ("IDX-disparity-real",)

#: Verdict -> (symbol, colour): Okabe-Ito blue / vermillion / grey, read by shape and word as well.
VERDICT_STYLE: dict[str, tuple[str, str]] = {
    "SUPPORTED": ("\u2714", "#0072b2"),
    "NOT_SUPPORTED": ("\u2716", "#d55e00"),
    "INCONCLUSIVE": ("?", "#6b6b6b"),
}

REPORT_CSS = """
.headline{border:2px solid #0072b2;border-radius:6px;padding:.6em 1em;margin:1em 0;background:#f4f9fd}
.headline p{margin:.35em 0;font-size:1.05em}
.verdict{display:inline-block;padding:0 .45em;border-radius:3px;color:#fff;font-weight:600;white-space:nowrap}
.nb-section{border-top:1px solid #ddd;margin-top:1.4em;padding-top:.4em}
.nb-section figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
.nb-section img{max-width:100%;width:640px;border:1px solid #ddd}
.nb-section figcaption{font-size:.85em;color:#555}
"""

_IMAGE_TYPES = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def _e(value: Any) -> str:
    return html.escape(str(value if value is not None else ""), quote=True)


def markdown_cell(value: Any) -> str:
    """``value`` as one markdown table cell: whitespace folded, ``|`` and ``\\`` escaped, tags neutralised."""
    text = " ".join(str(value if value is not None else "").split())
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)


def _num(value: Any, digits: int = 4) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return f"{number:.{digits}g}" if math.isfinite(number) else "n/a"


def _value_ci(h: Mapping[str, Any], digits: int = 4) -> str:
    if h.get("ci_low") is None and h.get("ci_high") is None:
        return _num(h.get("value"), digits)
    return f"{_num(h.get('value'), digits)} [{_num(h.get('ci_low'), digits)}, {_num(h.get('ci_high'), digits)}]"


def figure_anchor(stem: str, index: int) -> str:
    """The HTML id of a notebook's ``index``-th figure in ``index.html``."""
    return f"fig-{re.sub(r'[^A-Za-z0-9_-]', '-', stem)}-{index}"


def embed_image(path: str | Path) -> str | None:
    """``path`` as a ``data:`` URI (PNG, SVG or JPEG), or None when it is missing or of another type."""
    path = Path(path)
    kind = _IMAGE_TYPES.get(path.suffix.lower())
    if kind is None or not path.is_file():
        return None
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _verdict_html(verdict: Any, href: str | None = None) -> str:
    symbol, colour = VERDICT_STYLE.get(str(verdict), ("", "#444444"))
    badge = f'<span class="verdict" style="background:{colour}">{_e(symbol)} {_e(verdict)}</span>'
    return f'<a href="{_e(href)}">{badge}</a>' if href else badge


def premise_hypotheses(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any], Mapping[str, Any]]]:
    """``(model, row, hypothesis)`` for every premise hypothesis (:data:`PREMISE_IDS`) of the run, in row order."""
    return [(str(r.get("model") or "?"), r, h) for r in rows for h in r.get("hypotheses") or [] if h.get("id") in PREMISE_IDS]


def _sentence(model: str, h: Mapping[str, Any]) -> tuple[str, str]:
    """(lead, detail) of one premise hypothesis: the answer in words, then value, interval and verdict."""
    answer = {"SUPPORTED": "yes", "NOT_SUPPORTED": "no"}.get(str(h.get("verdict")), "not decided by this run")
    lead = f"{model}: do low-resource languages lose more under quantization? {answer}."
    detail = f"{h.get('statement', '')}: {h.get('id')} = {_value_ci(h)}"
    if h.get("n") is not None:
        detail += f" (n = {h.get('n')})"
    return lead, detail


def delta_bpb_tables(rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, list[str], list[str], dict[tuple[str, str], str]]]:
    """Per model, the first notebook's ``metrics.per_language`` change in bits per byte:
    ``model -> (notebook, configs, languages, {(config, lang): "value [lo, hi]"})``."""
    tables: dict[str, tuple[str, list[str], list[str], dict[tuple[str, str], str]]] = {}
    for r in rows:
        model = str(r.get("model") or "?")
        per_language = ((r.get("results") or {}).get("metrics") or {}).get("per_language")
        if model in tables or not isinstance(per_language, list):
            continue
        cells: dict[tuple[str, str], str] = {}
        for entry in per_language:
            if isinstance(entry, Mapping) and {"config", "lang", "delta_bpb"} <= entry.keys():
                cells[(str(entry["config"]), str(entry["lang"]))] = _value_ci(
                    {"value": entry["delta_bpb"], "ci_low": entry.get("delta_bpb_ci_low"), "ci_high": entry.get("delta_bpb_ci_high")}, digits=2)
        if cells:
            configs = list(dict.fromkeys(c for c, _ in cells))
            langs = list(dict.fromkeys(lang for _, lang in cells))
            tables[model] = (str(r["stem"]), configs, langs, cells)
    return tables


#: The damage card's measures: (key in ``metrics["damage_card"]`` records, heading, significant digits).
CARD_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("delta_bpb", "Δ bits/byte", 3),
    ("kl_bpb", "KL bits/byte", 3),
    ("top1_agree", "top-1 agreement", 4),
    ("kl_p99", "p99 KL (nats)", 3),
)


def card_cell(value: Any, low: Any, high: Any, digits: int) -> str:
    """``value [low, high]`` to ``digits`` significant digits; ``n/a`` without a finite value,
    ``[no CI]`` without a finite interval."""
    finite = lambda v: _num(v) != "n/a"  # noqa: E731
    if not finite(value):
        return "n/a"
    if finite(low) and finite(high):
        return _value_ci({"value": value, "ci_low": low, "ci_high": high}, digits)
    return f"{_num(value, digits)} [no CI]"


def damage_cards(rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, list[list[str]]]]:
    """Per model, the first notebook's ``metrics.damage_card``: ``model -> (notebook, rows of
    cells)``, each row config, language, n and the :data:`CARD_COLUMNS` cells."""
    cards: dict[str, tuple[str, list[list[str]]]] = {}
    for r in rows:
        model = str(r.get("model") or "?")
        records = ((r.get("results") or {}).get("metrics") or {}).get("damage_card")
        if model in cards or not isinstance(records, list) or not records:
            continue
        table = []
        for rec in records:
            if not isinstance(rec, Mapping):
                continue
            table.append([str(rec.get("config")), str(rec.get("lang")), str(rec.get("n_texts"))] + [
                card_cell(rec.get(k), rec.get(f"{k}_ci_low"), rec.get(f"{k}_ci_high"), d) for k, _, d in CARD_COLUMNS
            ])
        cards[model] = (str(r["stem"]), table)
    return cards


CARD_CAPTION = ("Damage card, {model} (from {stem}; 95 % CI): change in bits per byte, KL to the full model in bits "
                "per byte, share of tokens whose top-1 prediction is unchanged, 99th-percentile per-token KL")


def headline_html(rows: Sequence[Mapping[str, Any]]) -> str:
    """The headline box (premise answer per model) and the change-in-bits-per-byte table per model."""
    out = ['<section class="headline"><h2>Headline</h2>']
    premises = premise_hypotheses(rows)
    for model, r, h in premises:
        lead, detail = _sentence(model, h)
        out.append(f"<p><strong>{_e(lead)}</strong> {_verdict_html(h.get('verdict'), '#nb-' + _e(r['stem']))}<br>"
                   f"<span class=\"meta\">{_e(detail)}</span></p>")
    if not premises:
        ids = ", ".join(PREMISE_IDS)
        out.append(f"<p>The premise ({_e(ids)}: do low-resource languages lose more?) is not in this run; "
                   "run <code>protection_strategies</code> for it.</p>")
    for model, (stem, configs, langs, cells) in delta_bpb_tables(rows).items():
        out.append(f"<h3>Change in bits per byte, {_e(model)} (from <a href=\"#nb-{_e(stem)}\">{_e(stem)}</a>; 95 % CI)</h3>")
        out.append('<div style="overflow-x:auto"><table><thead><tr><th>configuration</th>' + "".join(f"<th>{_e(lang)}</th>" for lang in langs) + "</tr></thead><tbody>")
        for config in configs:
            out.append(f"<tr><td>{_e(config)}</td>" + "".join(
                f'<td class="num">{_e(cells.get((config, lang), ""))}</td>' for lang in langs) + "</tr>")
        out.append("</tbody></table></div>")
    for model, (stem, table) in damage_cards(rows).items():
        out.append(f"<h3>{_e(CARD_CAPTION.format(model=model, stem=stem))}</h3>")
        heads = ["configuration", "language", "n", *(h for _, h, _ in CARD_COLUMNS)]
        out.append('<div style="overflow-x:auto"><table><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in heads)
                   + "</tr></thead><tbody>")
        for cells in table:
            out.append("<tr>" + "".join(f'<td class="num">{_e(c)}</td>' for c in cells) + "</tr>")
        out.append("</tbody></table></div>")
    out.append("</section>")
    return "\n".join(out)


def headline_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The markdown lines of the headline and the change-in-bits-per-byte tables (as :func:`headline_html`)."""
    lines = ["## Headline", ""]
    premises = premise_hypotheses(rows)
    for model, _, h in premises:
        lead, detail = _sentence(model, h)
        symbol = VERDICT_STYLE.get(str(h.get("verdict")), ("",))[0]
        lines.append(f"- **{markdown_cell(lead)}** {symbol} {markdown_cell(h.get('verdict'))}: {markdown_cell(detail)}")
    if not premises:
        lines.append(f"- The premise ({', '.join(PREMISE_IDS)}: do low-resource languages lose more?) is not in this run.")
    for model, (stem, configs, langs, cells) in delta_bpb_tables(rows).items():
        lines += ["", f"### Change in bits per byte, {markdown_cell(model)} (from {markdown_cell(stem)}; 95 % CI)", "",
                  "| configuration | " + " | ".join(markdown_cell(lang) for lang in langs) + " |",
                  "|---|" + "---|" * len(langs)]
        lines += [f"| {markdown_cell(config)} | " + " | ".join(markdown_cell(cells.get((config, lang), "")) for lang in langs) + " |" for config in configs]
    for model, (stem, table) in damage_cards(rows).items():
        heads = ["configuration", "language", "n", *(h for _, h, _ in CARD_COLUMNS)]
        lines += ["", f"### {markdown_cell(CARD_CAPTION.format(model=model, stem=stem))}", "",
                  "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(markdown_cell(c) for c in cells) + " |" for cells in table]
    lines.append("")
    return lines


def _hypothesis_item(h: Mapping[str, Any], href: str | None) -> str:
    """One hypothesis of a notebook section: adjusted verdict badge, id, statement, value [CI], n,
    its family and, when the adjustment changed it, the raw verdict."""
    verdict, raw = h.get("verdict"), h.get("raw_verdict") or h.get("verdict")
    details = [f"n = {_e(h.get('n', ''))}"]
    if h.get("kind") != "sanity check" and not h.get("primary"):
        details.append(f"family {_e(h.get('family', ''))}")
    adj = h.get("adjusted")
    if isinstance(adj, Mapping) and adj.get("family_size") and int(adj["family_size"]) > 1 and adj.get("p_raw") is not None:
        details.append(f"Holm over {_e(adj['family_size'])}: p {_num(adj.get('p_raw'), 3)} &rarr; {_num(adj.get('p_adjusted'), 3)}")
    if raw != verdict:
        details.append(f"raw verdict {_e(raw)}")
    return (f"{_verdict_html(verdict, href)} <strong>{_e(h.get('id'))}</strong> {_e(h.get('statement'))}: "
            f"<span class=\"num\">{_e(_value_ci(h))}</span> <span class=\"meta\">({'; '.join(details)})</span>")


def notebook_sections_html(rows: Sequence[Mapping[str, Any]], out_dir: str | Path) -> str:
    """Per notebook with results: its hypotheses, the primary first, then the families, then the
    sanity checks (each verdict, adjusted, links to the notebook's first figure; the raw verdict
    beside it when the adjustment changed it), and its figures embedded, with a link to the
    executed notebook."""
    out = ["<h2>Evidence per notebook</h2>"]
    for r in rows:
        if not r.get("results"):
            continue
        stem = str(r["stem"])
        out.append(f'<section class="nb-section" id="nb-{_e(stem)}"><h3>{_e(stem)}</h3>')
        if r.get("notebook_link"):
            out.append(f'<p>Executed notebook: <a href="{_e(quote(str(r["notebook_link"])))}">{_e(stem)}.ipynb</a></p>')
        first_figure = f"#{figure_anchor(stem, 0)}" if r.get("figures") else (quote(str(r["notebook_link"])) if r.get("notebook_link") else None)
        if r.get("hypotheses"):
            primary, findings, checks = split_hypotheses(r["hypotheses"])
            for title, group in (("Primary hypothesis", primary), ("Families", findings),
                                 ("Sanity checks (not findings)", checks)):
                if not group:
                    continue
                out.append(f"<h4>{_e(title)}</h4><ul>")
                for h in group:
                    out.append(f"<li>{_hypothesis_item(h, first_figure)}</li>")
                out.append("</ul>")
        for index, figure in enumerate(r.get("figures") or []):
            source = embed_image(Path(out_dir) / str(figure))
            name = Path(str(figure)).name
            if source is None:
                out.append(f'<p id="{figure_anchor(stem, index)}">figure missing: {_e(name)}</p>')
                continue
            out.append(f'<figure id="{figure_anchor(stem, index)}"><img src="{_e(source)}" alt="{_e(stem)}: {_e(name)}">'
                       f"<figcaption>{_e(name)}</figcaption></figure>")
        out.append("</section>")
    return "\n".join(out)

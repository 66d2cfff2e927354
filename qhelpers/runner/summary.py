"""The run's summary: ``summary.md`` and ``index.html`` in the run folder, rewritten atomically after
every notebook (the hypotheses across notebooks, then one row per notebook), and the short
formats the progress lines share with them (durations, values with intervals, verdict counts).

Hypotheses are shown in three groups: first each notebook's primary hypothesis (its adjusted
verdict, with n), then the other findings family by family, then the sanity checks (true by
construction, not counted as findings). Every row shows the adjusted verdict, the raw one and
the one-sided p-value before and after the Holm adjustment. A results.json from before
multiplicity (no ``primary``/``family`` keys) reads as a notebook without a primary, its
hypotheses in family "secondary"."""
from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from qhelpers.report.html import (
    REPORT_CSS,
    headline_html,
    headline_markdown,
    markdown_cell,
    notebook_sections_html,
    split_hypotheses,
)
from qhelpers.runner.records import (
    STATUSES,
    completion_problem,
    hypotheses_of,
    is_moved_aside,
    load_record,
    load_results,
    moved_aside_folders,
    utc_now,
)
from qhelpers.runner.plan import setting_label
from qhelpers.util.atomic import atomic_write_text

VERDICTS = ("SUPPORTED", "NOT_SUPPORTED", "INCONCLUSIVE")


def fmt_duration(seconds: float | None) -> str:
    """``3.2 s``, ``41 s``, ``2 min 05 s``, ``1 h 02 min``."""
    if seconds is None:
        return ""
    s = float(seconds)
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 3600:
        m, r = divmod(int(round(s)), 60)
        return f"{m} min {r:02d} s"
    h, r = divmod(int(round(s)), 3600)
    return f"{h} h {r // 60:02d} min"


def _fmt_num(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return "n/a"
    return f"{f:.4g}"


def fmt_value_ci(h: Mapping[str, Any]) -> str:
    """``0.123 [0.05, 0.2]`` (``n/a`` for a missing or non-finite number)."""
    value = _fmt_num(h.get("value"))
    if h.get("ci_low") is None and h.get("ci_high") is None:
        return value
    return f"{value} [{_fmt_num(h.get('ci_low'))}, {_fmt_num(h.get('ci_high'))}]"


def _counts(hypotheses: Sequence[Mapping[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for h in hypotheses:
        v = str(h.get("verdict", "?"))
        counts[v] = counts.get(v, 0) + 1
    order = [v for v in VERDICTS if v in counts] + sorted(v for v in counts if v not in VERDICTS)
    return ", ".join(f"{counts[v]} {v}" for v in order)


def verdict_counts(hypotheses: Sequence[Mapping[str, Any]]) -> str:
    """``2 hypotheses: 1 SUPPORTED, 1 INCONCLUSIVE`` / ``no hypotheses``: the findings' (adjusted)
    verdicts; sanity checks are counted apart (``...; 1 sanity check: 1 SUPPORTED``)."""
    if not hypotheses:
        return "no hypotheses"
    checks = [h for h in hypotheses if h.get("kind") == "sanity check"]
    findings = [h for h in hypotheses if h.get("kind") != "sanity check"]
    n = len(findings)
    text = f"{n} {'hypothesis' if n == 1 else 'hypotheses'}" + (f": {_counts(findings)}" if findings else "")
    if checks:
        text += f"; {len(checks)} sanity {'check' if len(checks) == 1 else 'checks'}: {_counts(checks)}"
    return text


def _p_change(h: Mapping[str, Any]) -> str:
    """``0.01 -> 0.03 (Holm, m = 3)``: the one-sided p-value (support side) before and after the
    adjustment; '' for a record without adjustment (a sanity check, an older results.json)."""
    adj = h.get("adjusted")
    if not isinstance(adj, Mapping) or not adj.get("family_size"):
        return ""
    if adj.get("p_raw") is None:
        return "not tested (see its notes)"
    if int(adj["family_size"]) == 1:
        return f"{_fmt_num(adj.get('p_raw'))} (family of one: not adjusted)"
    return f"{_fmt_num(adj.get('p_raw'))} -> {_fmt_num(adj.get('p_adjusted'))} (Holm, m = {adj.get('family_size')})"


def hypothesis_tables(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[Mapping[str, Any], dict[str, Any]]]]:
    """The run's hypotheses as ``(row, hypothesis)`` pairs in three groups: ``primary`` (one per
    notebook that declares one), ``families`` (the other findings, per notebook family by family)
    and ``sanity`` (sanity checks, not findings)."""
    out: dict[str, list[tuple[Mapping[str, Any], dict[str, Any]]]] = {"primary": [], "families": [], "sanity": []}
    for r in rows:
        primary, findings, checks = split_hypotheses(r["hypotheses"])
        out["primary"] += [(r, h) for h in primary]
        out["families"] += [(r, h) for h in findings]
        out["sanity"] += [(r, h) for h in checks]
    return out


_GROUPS = (
    ("primary", "Primary hypotheses (one per notebook; verdict after multiplicity adjustment)",
     "(no notebook has declared a primary hypothesis yet)"),
    ("families", "Families (Holm-adjusted within each family of a notebook)", "(no other hypotheses)"),
    ("sanity", "Sanity checks (true by construction or nearly so; not counted as findings)", ""),
)


def grid_tables(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The cross-model (and cross-setting) tables of a grid run: per notebook run under several
    settings, one row per hypothesis (findings, not sanity checks) and one column per setting, each
    cell the hypothesis of that job (None where the job has no such hypothesis yet), plus how many
    settings support it. Notebooks run once (no ``job`` entry in run.json) are left out."""
    by_notebook: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        job = r["record"].get("job")
        if isinstance(job, Mapping) and job.get("setting"):
            by_notebook.setdefault(str(job.get("notebook")), []).append(r)
    tables = []
    for notebook, jobs in sorted(by_notebook.items()):
        settings = [setting_label(r["record"]["job"]["setting"]) for r in jobs]
        ids: list[str] = []
        cells: dict[tuple[str, int], dict[str, Any]] = {}
        statements: dict[str, str] = {}
        for k, r in enumerate(jobs):
            for h in r["hypotheses"]:
                if h.get("kind") == "sanity check":
                    continue
                hid = str(h.get("id"))
                if hid not in statements:
                    ids.append(hid)
                    statements[hid] = str(h.get("statement", ""))
                cells[(hid, k)] = h
        table_rows = []
        for hid in ids:
            row_cells = [cells.get((hid, k)) for k in range(len(jobs))]
            verdicts = [str(c.get("verdict")) for c in row_cells if c is not None]
            supported = sum(v == "SUPPORTED" for v in verdicts)
            table_rows.append({"id": hid, "statement": statements[hid], "cells": row_cells,
                               "agreement": f"SUPPORTED in {supported} of {len(jobs)}"})
        tables.append({"notebook": notebook, "settings": settings,
                       "statuses": [str(r["record"].get("status", "pending")) for r in jobs],
                       "stems": [r["stem"] for r in jobs], "rows": table_rows})
    return tables


def _grid_cell(h: Mapping[str, Any] | None) -> str:
    return "" if h is None else f"{fmt_value_ci(h)} {h.get('verdict', '')}"


def grid_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The markdown section of :func:`grid_tables` (no lines outside a grid run)."""
    tables = grid_tables(rows)
    if not tables:
        return []
    lines = ["## Across models and settings", "",
             "Each hypothesis of a notebook run under several settings, side by side (value [95 % CI] and "
             "adjusted verdict per setting).", ""]
    for t in tables:
        heads = [s if st == "completed" else f"{s} ({st})" for s, st in zip(t["settings"], t["statuses"])]
        lines += [f"### {markdown_cell(t['notebook'])}", "",
                  "| id | statement | " + " | ".join(markdown_cell(h) for h in heads) + " | holds |",
                  "|---|---|" + "---|" * len(heads) + "---|"]
        for row in t["rows"]:
            lines.append(f"| {markdown_cell(row['id'])} | {markdown_cell(row['statement'])} | "
                         + " | ".join(markdown_cell(_grid_cell(c)) for c in row["cells"])
                         + f" | {markdown_cell(row['agreement'])} |")
        if not t["rows"]:
            lines.append("| (no hypotheses recorded yet) | |" + " |" * len(heads) + " |")
        lines.append("")
    return lines


def grid_html(rows: Sequence[Mapping[str, Any]]) -> str:
    """The HTML section of :func:`grid_tables` ('' outside a grid run)."""
    tables = grid_tables(rows)
    if not tables:
        return ""

    def e(s: Any) -> str:
        return html.escape(str(s if s is not None else ""), quote=True)

    out = ['<h2 id="grid">Across models and settings</h2>',
           "<p>Each hypothesis of a notebook run under several settings, side by side (value [95 % CI] and "
           "adjusted verdict per setting).</p>"]
    for t in tables:
        heads = "".join(f'<th><a href="#nb-{e(stem)}">{e(s)}</a>' + ("" if st == "completed" else
                        f' <span class="s-{e(st)}">({e(st)})</span>') + "</th>"
                        for s, st, stem in zip(t["settings"], t["statuses"], t["stems"]))
        out.append(f"<h3>{e(t['notebook'])}</h3><table><thead><tr><th>id</th><th>statement</th>{heads}"
                   "<th>holds</th></tr></thead><tbody>")
        for row in t["rows"]:
            tds = []
            for c in row["cells"]:
                verdict = str((c or {}).get("verdict", ""))
                cls = f' class="num v-{verdict}"' if verdict in VERDICTS else ' class="num"'
                tds.append(f"<td{cls}>{e(_grid_cell(c))}</td>")
            out.append(f"<tr><td>{e(row['id'])}</td><td>{e(row['statement'])}</td>{''.join(tds)}"
                       f"<td>{e(row['agreement'])}</td></tr>")
        out.append("</tbody></table>")
    return "\n".join(out)


def _model_name(results: Mapping[str, Any] | None, rec: Mapping[str, Any]) -> str:
    model = (results or {}).get("model")
    if isinstance(model, Mapping):
        for key in ("spec", "name", "id", "model"):
            if model.get(key):
                return str(model[key])
    elif isinstance(model, str) and model:
        return model
    params = rec.get("parameters") or {}
    if params.get("MODEL"):
        return str(params["MODEL"])
    defaults = rec.get("defaults") or {}
    return str(defaults["MODEL"]) if defaults.get("MODEL") is not None else ""


def _moved_aside(out_dir: Path, stem: str, rec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The notebook's earlier folders (``<stem>.prev-<n>``, newest first) with their status and
    why they were moved aside (from the ``previous`` entry of the run that moved each)."""
    folders = moved_aside_folders(out_dir, stem)
    reasons: dict[str, Any] = {}
    for record in [rec] + [load_record(d) or {} for d in folders]:
        prev = record.get("previous")
        if isinstance(prev, Mapping) and prev.get("folder"):
            reasons[str(prev["folder"])] = prev.get("reason")
    return [{"folder": d.name, "status": (load_record(d) or {}).get("status", "unknown"),
             "reason": reasons.get(d.name)} for d in reversed(folders)]


def collect_records(out_dir: Path, stems: Iterable[str] = (), records: Mapping[str, Mapping[str, Any]] | None = None,
                    marks: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """One entry per notebook of the run folder (every ``<stem>/run.json``) plus ``stems`` not
    started yet (status pending), sorted by stem; each with its results.json loaded.

    ``records`` (the runner's own view, e.g. of a notebook whose run.json could not be written)
    win over the files; ``marks`` (e.g. ``stale: ...``) are shown beside the status, as is what is
    wrong with a completed notebook's results.json. Earlier folders moved aside
    (``<stem>.prev-<n>``) are listed with their notebook, not as notebooks."""
    out_dir = Path(out_dir)
    names = set(stems) | set(records or {})
    if out_dir.is_dir():
        for d in out_dir.iterdir():
            if d.is_dir() and not d.name.startswith(".") and not is_moved_aside(d.name) and (d / "run.json").is_file():
                names.add(d.name)
    rows = []
    for stem in sorted(names):
        nb_dir = out_dir / stem
        rec = dict((records or {}).get(stem) or load_record(nb_dir) or {"notebook": stem, "status": "pending"})
        rec.setdefault("notebook", stem)
        mark = (marks or {}).get(stem)
        if rec.get("status") == "completed" and mark is None:
            mark = completion_problem(nb_dir, rec)
        results, err = load_results(nb_dir)
        figures = []
        if results:
            for f in results.get("figures") or []:
                figures.append(f"{stem}/{Path(str(f)).as_posix()}")
        exec_nb = nb_dir / f"{stem}.ipynb"
        rows.append({
            "stem": stem,
            "record": rec,
            "results": results,
            "results_error": err,
            "hypotheses": hypotheses_of(results),
            "figures": figures,
            "notebook_link": f"{stem}/{stem}.ipynb" if exec_nb.is_file() else None,
            "log_link": f"{stem}/log.txt" if (nb_dir / "log.txt").is_file() else None,
            "model": _model_name(results, rec),
            "mark": mark,
            "moved_aside": _moved_aside(out_dir, stem, rec),
        })
    return rows


def status_label(row: Mapping[str, Any]) -> str:
    """A row's status, with its mark: ``completed (stale: qhelpers code changed since it ran)``."""
    status = str(row["record"].get("status", "pending"))
    return f"{status} ({row['mark']})" if row.get("mark") else status


def _moved_aside_lines(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    return [(str(m["folder"]), str(m["status"]), str(m["reason"] or ""))
            for r in rows for m in r.get("moved_aside") or []]


def moved_aside_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """summary.md's list of earlier results kept aside (empty when there are none)."""
    lines = _moved_aside_lines(rows)
    if not lines:
        return []
    out = ["## Earlier results kept (moved aside, never deleted)", "", "| folder | status | why it ran again |",
           "|---|---|---|"]
    out += [f"| {_md_link(folder, folder + '/')} | {markdown_cell(status)} | {markdown_cell(reason)} |"
            for folder, status, reason in lines]
    return out + [""]


def moved_aside_html(rows: Sequence[Mapping[str, Any]]) -> str:
    """index.html's list of earlier results kept aside ('' when there are none)."""
    from urllib.parse import quote

    lines = _moved_aside_lines(rows)
    if not lines:
        return ""
    e = lambda x: html.escape(str(x), quote=True)  # noqa: E731
    body = "".join(f'<tr><td><a href="{e(quote(folder))}/">{e(folder)}</a></td><td>{e(status)}</td><td>{e(reason)}</td></tr>'
                   for folder, status, reason in lines)
    return ("<h2>Earlier results kept (moved aside, never deleted)</h2><table><thead><tr><th>folder</th>"
            f"<th>status</th><th>why it ran again</th></tr></thead><tbody>{body}</tbody></table>")


def error_text(rec: Mapping[str, Any], short: bool = False) -> str:
    """A run.json record's error as ``ename: evalue (In [n])``; ``short``: the first line of evalue, at most 200 characters."""
    err = rec.get("error")
    if not err:
        return ""
    if isinstance(err, Mapping):
        ename, evalue = err.get("ename") or "", str(err.get("evalue") or "")
        if short:
            lines = evalue.strip().splitlines()
            first = lines[0] if lines else ""
            evalue = (first[:197] + "...") if len(first) > 200 or len(lines) > 1 else first
        where = f" (In [{err['exec_count']}])" if err.get("exec_count") is not None else ""
        return f"{ename}: {evalue}{where}" if ename else f"{evalue}{where}"
    return str(err)


def _row_error(row: Mapping[str, Any]) -> str:
    """A summary row's error: the notebook's own, else what is wrong with its results.json, else ''."""
    return error_text(row["record"]) or (row["results_error"] or "")


def _md_link(label: str, href: str | None) -> str:
    if not href:
        return ""
    from urllib.parse import quote

    return f"[{markdown_cell(label)}]({quote(href)})"


def _status_counts(rows: Sequence[Mapping[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        s = str(r["record"].get("status", "pending"))
        counts[s] = counts.get(s, 0) + 1
    order = [s for s in STATUSES if s in counts] + sorted(s for s in counts if s not in STATUSES)
    return ", ".join(f"{counts[s]} {s}" for s in order) or "no notebooks"


def render_markdown(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """summary.md: the hypotheses across notebooks, then one row per notebook."""
    lines = [
        "# qhelpers run summary",
        "",
        f"- run folder: `{meta.get('out_dir', '')}`",
        f"- profile: `{meta.get('profile', '')}`; kernel: `{meta.get('kernel', '')}`",
        f"- updated: {meta.get('updated', '')}; state: {meta.get('state', '')}",
        f"- notebooks: {len(rows)} ({_status_counts(rows)})",
        "",
    ]
    lines += headline_markdown(rows)
    lines += grid_markdown(rows)
    lines += ["## Hypotheses", ""]
    tables = hypothesis_tables(rows)
    if not any(tables.values()):
        lines.append("(no hypotheses recorded yet)")
    for group, title, empty in _GROUPS if any(tables.values()) else ():
        pairs = tables[group]
        if not pairs and not empty:
            continue
        lines += [f"### {title}", ""]
        if not pairs:
            lines += [empty, ""]
            continue
        lines += ["| notebook | id | statement | value [CI] | verdict | raw verdict | n | family | p (raw -> adjusted) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r, h in pairs:
            status = r["record"].get("status")
            nb = r["stem"] + ("" if status == "completed" else f" ({status})")
            lines.append(
                f"| {markdown_cell(nb)} | {markdown_cell(h.get('id'))} | {markdown_cell(h.get('statement'))} | "
                f"{markdown_cell(fmt_value_ci(h))} | {markdown_cell(h.get('verdict'))} | "
                f"{markdown_cell(h.get('raw_verdict'))} | {markdown_cell(h.get('n', ''))} | "
                f"{markdown_cell(h.get('family'))} | {markdown_cell(_p_change(h))} |"
            )
        lines.append("")
    if lines[-1] == "":
        lines.pop()  # the Notebooks section adds its own blank line
    lines += [
        "",
        "## Notebooks",
        "",
        "| notebook | status | duration | model | hypotheses | executed notebook | figures | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rec = r["record"]
        figs = ", ".join(_md_link(Path(f).name, f) for f in r["figures"])
        err = _row_error(r)
        if err and r["log_link"]:
            err += f" (see {r['log_link']})"
        lines.append(
            f"| {markdown_cell(r['stem'])} | {markdown_cell(status_label(r))} | "
            f"{markdown_cell(fmt_duration(rec.get('duration_s')))} | {markdown_cell(r['model'])} | "
            f"{markdown_cell(verdict_counts(r['hypotheses']) if r['results'] else '')} | "
            f"{_md_link(r['stem'] + '.ipynb', r['notebook_link'])} | {figs} | {markdown_cell(err)} |"
        )
    lines.append("")
    lines += moved_aside_markdown(rows)
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}
table{border-collapse:collapse;width:100%;font-size:.92em}
th,td{border:1px solid #ccc;padding:.35em .55em;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
.meta{color:#555}.num{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:nowrap}
.v-SUPPORTED{background:#d6e9f8 !important;font-weight:600}
.v-NOT_SUPPORTED{background:#fbe0cc !important;font-weight:600}
.v-INCONCLUSIVE{background:#eeeeee !important}
.s-completed{color:#17702a;font-weight:600}.s-failed{color:#b00020;font-weight:600}
.s-interrupted{color:#a05a00;font-weight:600}.s-running{color:#0050a0}.s-pending{color:#777}
pre{white-space:pre-wrap;margin:0;font-size:.9em}
"""


def render_html(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """index.html: self-contained (inline CSS, no scripts or external assets), every text
    HTML-escaped, links relative to the run folder."""
    from urllib.parse import quote

    def e(s: Any) -> str:
        return html.escape(str(s if s is not None else ""), quote=True)

    def link(label: str, href: str | None) -> str:
        return f'<a href="{e(quote(href))}">{e(label)}</a>' if href else ""

    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>qhelpers run {e(Path(str(meta.get('out_dir', ''))).name)}</title>",
        f"<style>{_CSS}{REPORT_CSS}</style></head><body>",
        "<h1>qhelpers run summary</h1>",
        '<p class="meta">',
        f"run folder <code>{e(meta.get('out_dir', ''))}</code> &middot; profile <code>{e(meta.get('profile', ''))}</code>"
        f" &middot; kernel <code>{e(meta.get('kernel', ''))}</code><br>",
        f"updated {e(meta.get('updated', ''))} &middot; state {e(meta.get('state', ''))} &middot; "
        f"{len(rows)} notebooks ({e(_status_counts(rows))})",
        "</p>",
        headline_html(rows),
        grid_html(rows),
        "<h2>Hypotheses</h2>",
    ]
    tables = hypothesis_tables(rows)
    if not any(tables.values()):
        out.append("<p>(no hypotheses recorded yet)</p>")
    for group, title, empty in _GROUPS if any(tables.values()) else ():
        pairs = tables[group]
        if not pairs and not empty:
            continue
        out.append(f'<h3 id="hyp-{group}">{e(title)}</h3>')
        if not pairs:
            out.append(f"<p>{e(empty)}</p>")
            continue
        out.append("<table><thead><tr><th>notebook</th><th>id</th><th>statement</th><th>value [CI]</th>"
                   "<th>verdict</th><th>raw verdict</th><th>n</th><th>family</th><th>p (raw &rarr; adjusted)</th>"
                   "</tr></thead><tbody>")
        for r, h in pairs:
            status = r["record"].get("status")
            nb = e(r["stem"]) + ("" if status == "completed" else f' <span class="s-{e(status)}">({e(status)})</span>')
            verdict = str(h.get("verdict", ""))
            raw = str(h.get("raw_verdict") or verdict)
            vclass = f"v-{verdict}" if verdict in VERDICTS else ""
            rclass = f"v-{raw}" if raw in VERDICTS else ""
            out.append(
                f"<tr><td>{nb}</td><td>{e(h.get('id'))}</td>"
                f'<td title="{e(h.get("criterion", ""))}">{e(h.get("statement"))}</td>'
                f'<td class="num">{e(fmt_value_ci(h))}</td><td class="{vclass}"><a href="#nb-{e(r["stem"])}">{e(verdict)}</a></td>'
                f'<td class="{rclass}">{e(raw)}</td>'
                f'<td class="num">{e(h.get("n", ""))}</td><td>{e(h.get("family", ""))}</td>'
                f'<td class="num">{e(_p_change(h).replace(" -> ", " → "))}</td></tr>'
            )
        out.append("</tbody></table>")
    out.append("<h2>Notebooks</h2>")
    out.append("<table><thead><tr><th>notebook</th><th>status</th><th>duration</th><th>model</th>"
               "<th>hypotheses</th><th>executed notebook</th><th>figures</th><th>error</th></tr></thead><tbody>")
    for r in rows:
        rec = r["record"]
        status = str(rec.get("status", "pending"))
        figs = "<br>".join(link(Path(f).name, f) for f in r["figures"])
        err = _row_error(r)
        err_html = f"<pre>{e(err)}</pre>" if err else ""
        if err and r["log_link"]:
            err_html += link("log.txt", r["log_link"])
        nb_links = " ".join(x for x in (link(r["stem"] + ".ipynb", r["notebook_link"]), link("log", r["log_link"])) if x)
        out.append(
            f"<tr><td>{e(r['stem'])}</td><td class=\"s-{e(status)}\">{e(status_label(r))}</td>"
            f'<td class="num">{e(fmt_duration(rec.get("duration_s")))}</td><td>{e(r["model"])}</td>'
            f"<td>{e(verdict_counts(r['hypotheses']) if r['results'] else '')}</td>"
            f"<td>{nb_links}</td><td>{figs}</td><td>{err_html}</td></tr>"
        )
    out.append("</tbody></table>")
    out.append(moved_aside_html(rows))
    out.append(notebook_sections_html(rows, meta.get("out_dir", ".")))
    out.append('<p class="meta">Written by run_all.py (qhelpers.runner.cli).</p>')
    out.append("</body></html>\n")
    return "\n".join(out)


def write_summary(out_dir: str | os.PathLike, meta: Mapping[str, Any], stems: Iterable[str] = (),
                  records: Mapping[str, Mapping[str, Any]] | None = None,
                  marks: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Rewrite ``summary.md`` and ``index.html`` of ``out_dir`` atomically; returns the rows
    (``records`` and ``marks``: see :func:`collect_records`)."""
    out_dir = Path(out_dir)
    rows = collect_records(out_dir, stems, records, marks)
    meta = {**meta, "out_dir": str(out_dir), "updated": utc_now()}
    failed: list[OSError] = []
    for name, render in (("summary.md", render_markdown), ("index.html", render_html)):
        try:  # one that cannot be written does not keep the other from being written
            atomic_write_text(out_dir / name, render(rows, meta))
        except OSError as exc:
            failed.append(exc)
    if failed:
        raise failed[0]
    return rows

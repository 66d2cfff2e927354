"""The run report: headline, change-in-bits-per-byte table, figures inline, every value escaped
(qhelpers.report.html through qhelpers.runner.summary); and index.html in a real headless browser."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest

from qhelpers.report import html as report_html
from qhelpers.report import plots
from qhelpers.runner.summary import write_summary

HOSTILE = '<script>alert("x")</script>'


def make_run(folder: Path) -> Path:
    """A run folder with two completed notebooks: the premise (with a hostile statement) and a Δbpb table with a figure."""
    import pandas as pd

    premise = folder / "protection_strategies"
    premise.mkdir(parents=True)
    hypotheses = [{"id": "IDX-disparity-real", "statement": f"LR languages lose more {HOSTILE}", "value": 0.12,
                   "ci_low": 0.05, "ci_high": 0.2, "verdict": "SUPPORTED", "n": 4}]
    (premise / "results.json").write_text(json.dumps({"model": {"spec": "tiny:gpt2"}, "hypotheses": hypotheses, "figures": []}))
    (premise / "run.json").write_text(json.dumps({"notebook": premise.name, "status": "completed", "duration_s": 3.0}))

    ablation = folder / "exp005_layer_ablation"
    ablation.mkdir()
    rows = [{"config": c, "lang": lang, "delta_bpb": v, "delta_bpb_ci_low": v - 0.01, "delta_bpb_ci_high": v + 0.02}
            for c in ("all_quantized", "gateway_protected") for lang, v in (("en", 0.01), ("sw", 0.05))]
    fig = plots.language_points(pd.DataFrame(rows), title="change in bits per byte")
    figure = plots.save_figure(fig, ablation, "exp005_results")
    results = {"model": {"spec": "tiny:gpt2"}, "metrics": {"per_language": rows}, "figures": [figure],
               "hypotheses": [{"id": "H5", "statement": "protecting L0 + L_final helps", "value": None,
                               "verdict": "INCONCLUSIVE", "n": 4}]}
    (ablation / "results.json").write_text(json.dumps(results))
    (ablation / "run.json").write_text(json.dumps({"notebook": ablation.name, "status": "completed", "duration_s": 9.0}))
    (ablation / f"{ablation.name}.ipynb").write_text("{}")
    write_summary(folder, {"profile": "ci", "kernel": "python3", "state": "finished"})
    return folder / "index.html"


def test_report_has_headline_table_figures_and_escapes_everything(tmp_path):
    page = make_run(tmp_path).read_text(encoding="utf-8")
    assert HOSTILE not in page and "&lt;script&gt;" in page
    assert page.index('class="headline"') < page.index("<h2>Hypotheses</h2>") < page.index("Evidence per notebook")
    assert "tiny:gpt2: do low-resource languages lose more under quantization? yes." in page
    assert "0.12 [0.05, 0.2]" in page and "0.05 [0.04, 0.07]" in page  # the premise; sw under all_quantized
    assert page.count('<img src="data:image/png;base64,') == 1 and "http" not in page.replace("http-equiv", "")
    anchor = report_html.figure_anchor("exp005_layer_ablation", 0)
    assert f'id="{anchor}"' in page and f'href="#{anchor}"' in page  # a verdict links to its figure
    assert 'href="exp005_layer_ablation/exp005_layer_ablation.ipynb"' in page
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert summary.index("## Headline") < summary.index("## Hypotheses")
    assert "<script" not in summary and "| all_quantized | 0.01 [0, 0.03] | 0.05 [0.04, 0.07] |" in summary


def test_verdict_colours_are_not_red_and_green_alone():
    symbols = {symbol for symbol, _ in report_html.VERDICT_STYLE.values()}
    assert len(symbols) == 3  # a shape per verdict besides the colour and the word
    assert report_html.VERDICT_STYLE["SUPPORTED"][1] == "#0072b2" and report_html.VERDICT_STYLE["NOT_SUPPORTED"][1] == "#d55e00"


def test_report_without_the_premise_says_so(tmp_path):
    rows = [{"stem": "t001", "model": "m", "hypotheses": [{"id": "H1", "verdict": "SUPPORTED"}], "results": {}}]
    assert "is not in this run" in report_html.headline_html(rows)
    assert any("is not in this run" in line for line in report_html.headline_markdown(rows))


# --------------------------------------------------------------------------- a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


async def _devtools(ws_url: str, page_url: str) -> dict:
    """Open ``page_url`` over the DevTools protocol: its console errors and the state of its images."""
    from tornado.websocket import websocket_connect

    conn = await websocket_connect(ws_url, max_message_size=64 * 2**20)
    ids = iter(range(1, 10**6))
    errors: list[str] = []

    async def call(method: str, **params):
        msg_id = next(ids)
        await conn.write_message(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(await conn.read_message())
            method = msg.get("method")
            if method == "Runtime.exceptionThrown" or (method == "Runtime.consoleAPICalled" and msg["params"].get("type") == "error"):
                errors.append(json.dumps(msg["params"])[:300])
            elif method == "Log.entryAdded" and msg["params"]["entry"].get("level") == "error":
                errors.append(msg["params"]["entry"].get("text", ""))
            elif msg.get("id") == msg_id:
                return msg.get("result", {})

    for domain in ("Runtime", "Log", "Page"):
        await call(f"{domain}.enable")
    await call("Page.navigate", url=page_url)
    state = {}
    for _ in range(100):
        state = (await call("Runtime.evaluate", returnByValue=True, expression=(
            "({ready: document.readyState, images: Array.from(document.images).map(i => [i.complete, i.naturalWidth]),"
            " headline: !!document.querySelector('.headline')})")))["result"]["value"]
        if state["ready"] == "complete":
            break
        await asyncio.sleep(0.1)
    conn.close()
    return {**state, "errors": errors}


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_index_html_in_headless_chromium(tmp_path):
    index = make_run(tmp_path / "run")
    profile = tmp_path / "profile"
    browser = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", "--no-first-run", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
        result = asyncio.run(_devtools(ws_url, index.as_uri()))
    finally:
        browser.terminate()
        browser.wait(timeout=30)
    assert result["ready"] == "complete" and result["headline"]
    assert result["images"] and all(complete and width > 0 for complete, width in result["images"]), result["images"]
    assert result["errors"] == []


def test_primary_verdicts_first_then_families_then_sanity_checks(tmp_path):
    """summary.md and index.html: one primary row per notebook first (adjusted verdict, n), then the
    families with raw and adjusted verdicts, then sanity checks, which the verdict counts leave out."""
    nb = tmp_path / "t003"
    nb.mkdir()
    base = {"criterion": "c", "ci_low": 0.0, "ci_high": 1.0, "value": 0.5, "n": 30, "notes": "", "kind": "finding",
            "min_effect": 0.0, "threshold": 0.0, "direction": ">", "premise": None}
    hyps = [
        {**base, "id": "F1", "statement": "family member", "family": "robustness", "primary": False,
         "verdict": "INCONCLUSIVE", "raw_verdict": "SUPPORTED",
         "adjusted": {"method": "holm", "family_size": 2, "p_raw": 0.02, "p_adjusted": 0.04, "verdict": "INCONCLUSIVE"}},
        {**base, "id": "S1", "statement": "one more layer helps", "family": "secondary", "primary": False,
         "kind": "sanity check", "verdict": "SUPPORTED", "raw_verdict": "SUPPORTED", "adjusted": None},
        {**base, "id": "P1", "statement": "the seed's claim", "family": "primary", "primary": True,
         "verdict": "NOT_SUPPORTED", "raw_verdict": "NOT_SUPPORTED", "n": 42,
         "adjusted": {"method": "holm", "family_size": 1, "p_raw": 0.9, "p_adjusted": 0.9, "verdict": "NOT_SUPPORTED"}},
    ]
    (nb / "results.json").write_text(json.dumps({"model": {"spec": "m"}, "hypotheses": hyps, "figures": []}))
    (nb / "run.json").write_text(json.dumps({"notebook": "t003", "status": "completed", "duration_s": 1.0}))
    write_summary(tmp_path, {"profile": "ci", "kernel": "python3", "state": "finished"})
    md = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert md.index("### Primary hypotheses") < md.index("| t003 | P1 |") < md.index("### Families") \
        < md.index("| t003 | F1 |") < md.index("### Sanity checks") < md.index("| t003 | S1 |")
    assert "| t003 | P1 | the seed's claim | 0.5 [0, 1] | NOT_SUPPORTED | NOT_SUPPORTED | 42 | primary |" in md
    assert "| INCONCLUSIVE | SUPPORTED | 30 | robustness | 0.02 -> 0.04 (Holm, m = 2) |" in md
    assert "1 hypothesis" not in md and "2 hypotheses: 1 NOT_SUPPORTED, 1 INCONCLUSIVE; 1 sanity check: 1 SUPPORTED" in md
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert page.index('id="hyp-primary"') < page.index("<td>P1</td>") < page.index('id="hyp-families"') \
        < page.index("<td>F1</td>") < page.index('id="hyp-sanity"') < page.index("<td>S1</td>")
    section = page[page.index('id="nb-t003"'):]
    assert section.index("Primary hypothesis") < section.index("<strong>P1</strong>") < section.index("<strong>F1</strong>") \
        < section.index("Sanity checks") < section.index("<strong>S1</strong>")
    assert "raw verdict SUPPORTED" in section and "Holm over 2" in section

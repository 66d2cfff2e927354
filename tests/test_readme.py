"""The README's example runs and prints per-language bits per byte with CIs."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_example_prints_bits_per_byte_with_cis(embedded_smollm):
    example = python_blocks()[0]
    assert 'load_model("embedded:smollm2-135m")' in example
    example = example.replace("n_texts=10", "n_texts=2")  # same code, fewer texts to stay fast
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example, str(README), "exec"), {})
    text = out.getvalue()
    assert "bpb_ci_low" in text
    assert all(h in text for h in ("Δ bits/byte", "KL bits/byte", "top-1 agreement", "p99 KL (nats)"))  # damage card
    for lang in ("en", "de", "fr", "zh", "ar", "he", "sw"):
        assert re.search(rf"^\s*{lang}\s+2\s+\d+\.\d+", text, flags=re.M), f"no baseline row for {lang}:\n{text}"


def test_readme_names_the_two_commands_and_ci_runs_the_test_command():
    readme = README.read_text(encoding="utf-8")
    assert "bash scripts/install.sh && python run_all.py" in readme
    assert "bash scripts/install.sh && python -m pytest" in readme
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash scripts/install.sh" in ci and "python3 -m pytest" in ci

"""stats.quantities: known answers, and the rule that it is the only place converting nats to bits."""
from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import qhelpers
from qhelpers import stats
from qhelpers.stats.quantities import bits_per_byte, nats_to_bits, perplexity

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- known answers


def test_nats_to_bits_by_hand():
    assert nats_to_bits(0.0) == 0.0
    assert nats_to_bits(LN2) == 1.0
    assert nats_to_bits(math.log(8.0)) == pytest.approx(3.0, rel=1e-15)
    np.testing.assert_allclose(nats_to_bits(np.log([2.0, 4.0, 1024.0])), [1.0, 2.0, 10.0], rtol=1e-15)


def test_bits_per_byte_by_hand():
    # 10 bits of surprisal over 5 bytes
    assert bits_per_byte(10 * LN2, 5) == pytest.approx(2.0, rel=1e-15)
    # a uniform model over 256 byte values: 8 bits per byte whatever the length
    assert bits_per_byte(100 * math.log(256.0), 100) == pytest.approx(8.0, rel=1e-15)
    # the documented order (to bits first, then per byte), to the last bit
    for nll, n_bytes in [(123.456, 789), (1e-3, 7), (5432.1, 3)]:
        assert bits_per_byte(nll, n_bytes) == nll / math.log(2) / n_bytes


def test_perplexity_by_hand():
    assert perplexity(6.0, 3) == pytest.approx(math.exp(2.0), rel=1e-15)
    assert perplexity(0.0, 4) == 1.0
    # a uniform model over a vocabulary of 50 has perplexity 50
    assert perplexity(10 * math.log(50.0), 10) == pytest.approx(50.0, rel=1e-13)
    assert isinstance(perplexity(6.0, 3), float)
    assert perplexity(1e6, 1) == math.inf  # overflow is inf, not an exception
    assert math.isnan(perplexity(math.nan, 3))


def test_arrays_and_series_elementwise():
    nll = np.array([6.0, 10 * LN2, 0.0])
    n = np.array([3.0, 5.0, 4.0])
    np.testing.assert_allclose(perplexity(nll, n), [math.exp(2.0), 2.0**2, 1.0], rtol=1e-15)
    np.testing.assert_allclose(bits_per_byte(nll, n), [6.0 / LN2 / 3.0, 2.0, 0.0], rtol=1e-15)
    s_nll = pd.Series(nll, index=["a", "b", "c"])
    s_n = pd.Series(n, index=["a", "b", "c"])
    for fn in (bits_per_byte, perplexity):
        out = fn(s_nll, s_n)
        assert isinstance(out, pd.Series) and list(out.index) == ["a", "b", "c"]
        np.testing.assert_array_equal(out.to_numpy(), fn(nll, n))
    assert isinstance(nats_to_bits(s_nll), pd.Series)


def test_exported_from_stats():
    assert stats.bits_per_byte is bits_per_byte
    assert stats.perplexity is perplexity
    assert stats.nats_to_bits is nats_to_bits


# ----------------------------------------------------------------------------- one formula


_LN2_NAME = re.compile(r"_?(ln_?2|log_?2_?e)", re.IGNORECASE)


def _is_constant(node: ast.AST, value: float) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
        and not isinstance(node.value, bool) and math.isclose(node.value, value, rel_tol=1e-6)


def _is_e(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "e") or (isinstance(node, ast.Name) and node.id == "e") \
        or _is_constant(node, math.e)


def bits_conversions(source: str) -> list[tuple[int, str]]:
    """Lines of ``source`` that compute ln 2 or log2(e) for a bits conversion: ``log(2)``,
    ``log2(e)``, the literal values of either, or a name such as ``LN2`` / ``_LN2`` / ``LOG2E``."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name == "log" and _is_constant(node.args[0], 2.0):
                hits.append((node.lineno, "log(2)"))
            elif name == "log2" and _is_e(node.args[0]):
                hits.append((node.lineno, "log2(e)"))
        elif _is_constant(node, LN2) or _is_constant(node, 1.0 / LN2):
            hits.append((node.lineno, f"the constant {node.value!r}"))
        elif isinstance(node, ast.Name) and _LN2_NAME.fullmatch(node.id):
            hits.append((node.lineno, f"the name {node.id}"))
        elif isinstance(node, ast.Attribute) and _LN2_NAME.fullmatch(node.attr):
            hits.append((node.lineno, f"the attribute {node.attr}"))
    return sorted(set(hits))


def test_the_scan_finds_every_spelling_of_a_bits_conversion():
    spellings = [
        "import math\n_LN2 = math.log(2.0)\nbits = nats / _LN2\n",
        "import numpy as np\nbpb = nll / n / np.log(2)\n",
        "import numpy as np\nbits = nats * np.log2(np.e)\n",
        "bits = nats / 0.6931471805599453\n",
        "bits = nats * 1.4426950408889634\n",
        "from qhelpers.stats import quantities as q\nbits = nats / q.LN2\n",
    ]
    for source in spellings:
        assert bits_conversions(source), source
    # other logarithms of 2 and other bases are not bits conversions
    assert bits_conversions("import math\nh = 0.5 * (d * math.log(2.0 * math.pi * math.e))\n") == []
    assert bits_conversions("import math\nb = d * math.log(2.0 / (n - 1))\nh = nats / math.log(base)\n") == []


def test_only_stats_quantities_converts_nats_to_bits():
    root = Path(qhelpers.__file__).parent
    home = root / "stats" / "quantities.py"
    assert bits_conversions(home.read_text(encoding="utf-8")), "the scan must find the one formula in its home"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path == home:
            continue
        for line, what in bits_conversions(path.read_text(encoding="utf-8")):
            offenders.append(f"{path.relative_to(root.parent)}:{line} uses {what}")
    assert not offenders, (
        "convert nats to bits with qhelpers.stats.nats_to_bits / bits_per_byte, not by hand:\n" + "\n".join(offenders)
    )

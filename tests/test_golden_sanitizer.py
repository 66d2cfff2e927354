"""The nbval sanitizer keeps six significant digits of every float, whatever its size."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from nbval.plugin import get_sanitize_patterns

CFG = Path(__file__).parent / "nbval_sanitize.cfg"
PATTERNS = get_sanitize_patterns(CFG.read_text())


def sanitize(text: str) -> str:
    """Apply the rules in file order, as nbval does."""
    for regex, replace in PATTERNS:
        text = re.sub(regex, replace, text)
    return text


@pytest.mark.parametrize(
    "printed, kept",
    [
        ("50280.4909999", "50280.4"),
        ("1234567.891", "123456"),
        ("3.14159265", "3.14159"),
        ("-12.3456789", "-12.3456"),
        ("0.000123456789", "0.000123456"),
        ("-0.98765432", "-0.987654"),
        ("0.5", "0.5"),
        ("n=12345", "n=12345"),
        ("1.2345678e-05", "1.23e-05"),
    ],
)
def test_six_significant_digits(printed: str, kept: str) -> None:
    assert sanitize(printed) == kept


def test_thread_order_noise_is_masked_at_any_magnitude() -> None:
    """Values differing at 1e-11 relative print alike unless they straddle the sixth digit."""
    for value in (50280.4905, 0.00731234, 3.2107, 812.25, 1.5e7):
        noisy = value * (1 + 1e-11)
        assert sanitize(f"{value:.6f}") == sanitize(f"{noisy:.6f}")


def test_real_changes_are_kept() -> None:
    """A relative change of 1e-5 is a regression the goldens must catch."""
    for value in (50280.4905, 0.00731234, 3.2107):
        assert sanitize(f"{value:.8f}") != sanitize(f"{value * (1 + 1e-5):.8f}")

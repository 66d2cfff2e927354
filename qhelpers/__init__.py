"""qhelpers: does weight quantization hurt low-resource languages more, and what must stay in full precision?"""
from __future__ import annotations

__version__ = "0.1.0"

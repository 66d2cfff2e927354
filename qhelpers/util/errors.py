"""Error types raised by qhelpers.

Every error names the problem and the fix, so a researcher reading a failed notebook
knows what to change without reading the source.
"""
from __future__ import annotations


class QHelpersError(Exception):
    """Base class of every error raised on purpose by qhelpers."""


class ConfigError(QHelpersError, ValueError):
    """A configuration value is out of range or inconsistent."""


class UnknownArchitectureError(QHelpersError, ValueError):
    """The model's ``model_type`` is not in the architecture registry."""


class ModelLoadError(QHelpersError, RuntimeError):
    """A model could not be loaded (offline hub id, missing folder, bad embedded name)."""


class CorpusError(QHelpersError, ValueError):
    """A corpus, language or text is missing, empty or misaligned."""


class MeasurementError(QHelpersError, RuntimeError):
    """A measurement cannot be made (empty text, non-finite weights)."""

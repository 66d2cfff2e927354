"""Helpers shared by the runner tests (test_runner.py, test_faults.py, test_warm.py): the kernel check,
polling and run.json reads."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import pytest

from qhelpers.runner.environment import check_kernel
from qhelpers.runner.errors import RunnerError


def kernel_available(name: str = "python3") -> bool:
    """Whether the Jupyter kernel ``name`` is installed."""
    try:
        check_kernel(name)
        return True
    except RunnerError:
        return False


needs_kernel = pytest.mark.skipif(
    not kernel_available(),
    reason="no 'python3' Jupyter kernel: python -m ipykernel install --user --name python3",
)


def wait_for(pred: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> None:
    """Poll ``pred`` until it is true; files half written while polling count as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except (OSError, ValueError):
            pass
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def run_status(out: Path, folder: str) -> str | None:
    """``status`` of ``out/folder/run.json``, or None while it does not exist."""
    p = out / folder / "run.json"
    return json.loads(p.read_text(encoding="utf-8")).get("status") if p.is_file() else None

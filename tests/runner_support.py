"""Helpers shared by the runner tests (test_runner.py, test_faults.py): polling and run.json reads."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable


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

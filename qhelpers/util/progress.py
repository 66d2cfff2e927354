"""Progress bars for long loops (tqdm: a widget in notebooks, plain text elsewhere)."""
from __future__ import annotations

from typing import Any, Iterable


def progress_bar(iterable: Iterable, **kwargs: Any) -> Iterable:
    """tqdm progress bar: a widget in notebooks that have ipywidgets, plain text elsewhere."""
    try:
        import ipywidgets  # noqa: F401
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm.std import tqdm
    return tqdm(iterable, **kwargs)

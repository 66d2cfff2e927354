"""One way to pin torch's CPU thread count for a block of code.

Many analyses here are small independent matrix operations (SVDs, eigensolvers, ridge
solves on hidden x hidden matrices). On a CPU shared with other processes multi-threaded
LAPACK spins while its workers wait for each other; measured on this project's loaded
2-core machine: one float64 SVD of a 1536 x 576 matrix took 23.6 s with 2 threads and
0.74 s with 1, a 576 x 576 symmetric eigensolve 560 ms against 27 ms.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from qhelpers.util.errors import ConfigError

__all__ = ["torch_threads"]


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` and restore the old value after;
    ``None`` leaves torch's setting alone."""
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive int or None (leave torch's setting), got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)

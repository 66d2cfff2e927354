"""The ``torch.compile`` path of :class:`~qhelpers.measure.scoring.Scorer` (``MeasureConfig(compile=True)``).

A compiled graph is specialised to its input shape, so batches are cut to a handful of shapes:
window lengths are rounded up to a *sequence bucket* (powers of two from 64, and the window
length itself), windows of one bucket go into batches of a fixed number of rows (a power of two
under the token budget), and the last, partial batch of a bucket is padded to the next power of
two of its rows. That gives at most about two shapes per sequence bucket, each compiled once;
the time of those first calls is counted apart (:attr:`CompiledForward.compile_seconds`).

Only the decoder stack (``model.base_model``) is compiled; the LM head and the losses stay eager
(one large matmul, nothing to fuse). The compiled graph takes the parameters as inputs, so a
resident :class:`~qhelpers.quant.engine.QuantEngine` (which swaps ``param.data``) is seen by it.
Forward hooks (a streaming engine, a prefix-cache session) do Python work between modules that a
single graph cannot hold: while any module has one, the same padded batch runs eagerly instead.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from torch import nn

#: Smallest sequence bucket; shorter windows are padded up to it.
MIN_SEQ_BUCKET = 64
#: Compiled shapes a Scorer may hold at once (torch._dynamo's own default limit is 8).
RECOMPILE_LIMIT = 64


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << (max(1, int(n)) - 1).bit_length()


def seq_buckets(max_length: int) -> list[int]:
    """Padded sequence widths: powers of two from :data:`MIN_SEQ_BUCKET` below ``max_length``, then
    ``max_length`` (one bucket, ``[max_length]``, when it is at most the minimum)."""
    out, width = [], MIN_SEQ_BUCKET
    while width < max_length:
        out.append(width)
        width *= 2
    return out + [int(max_length)]


def seq_bucket(length: int, max_length: int) -> int:
    """The smallest bucket of :func:`seq_buckets` that holds ``length`` tokens."""
    for width in seq_buckets(max_length):
        if length <= width:
            return width
    raise ValueError(f"a window of {length} tokens is longer than max_length={max_length}")


def bucket_rows(width: int, batch_tokens: int, max_batch: int | None) -> int:
    """Rows of a full batch of sequence bucket ``width``: the largest power of two with
    ``rows * width <= batch_tokens`` (at least 1), at most ``max_batch``."""
    rows = _pow2_floor(max(1, batch_tokens // width))
    if max_batch is not None:
        rows = min(rows, _pow2_floor(max_batch))
    return rows


def bucket_batches(
    lengths: Sequence[int], batch_tokens: int, max_batch: int | None, max_length: int
) -> list[list[int]]:
    """Indices grouped by sequence bucket (longest bucket first), longest first within a bucket
    (ties by index), in batches of :func:`bucket_rows` rows."""
    by_bucket: dict[int, list[int]] = {}
    for i in sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i)):
        by_bucket.setdefault(seq_bucket(int(lengths[i]), max_length), []).append(i)
    batches: list[list[int]] = []
    for width in sorted(by_bucket, reverse=True):
        members = by_bucket[width]
        rows = bucket_rows(width, batch_tokens, max_batch)
        batches.extend(members[s : s + rows] for s in range(0, len(members), rows))
    return batches


def padded_shape(lengths: Sequence[int], batch_tokens: int, max_batch: int | None, max_length: int) -> tuple[int, int]:
    """(rows, width) a batch of windows of these lengths is padded to."""
    width = seq_bucket(max(lengths), max_length)
    full = bucket_rows(width, batch_tokens, max_batch)
    return min(full, _pow2_ceil(len(lengths))), width


def pad_to_shape(ids: torch.Tensor, mask: torch.Tensor, shape: tuple[int, int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``ids``/``mask`` ([batch, width]) to ``shape``. Dummy rows hold pad tokens and
    attend to their first position only (a row with no visible key would give NaN in the
    attention softmax; its outputs are never read either way)."""
    rows, width = shape
    out_ids = torch.full((rows, width), int(pad_id), dtype=ids.dtype)
    out_mask = torch.zeros((rows, width), dtype=mask.dtype)
    out_ids[: ids.shape[0], : ids.shape[1]] = ids
    out_mask[: mask.shape[0], : mask.shape[1]] = mask
    out_mask[ids.shape[0] :, 0] = 1
    return out_ids, out_mask


def has_hooks(model: nn.Module) -> bool:
    """Whether any forward (pre-)hook would run inside ``model``'s forward."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class CompiledForward:
    """``model.base_model`` under ``torch.compile`` (static shapes), compiled lazily; eager while
    hooks are present. Counts compiled and eager calls and the seconds spent in calls that compiled
    (a new shape's first call, or a recompilation of a known shape because a guard failed, e.g. a
    parameter swapped for a tensor of another dtype or stride; a forward pass in such a call is
    negligible next to the compilation). ``calls["recompiled"]`` counts the latter: each one
    means compiled graphs are not being reused, and ``compile_seconds`` says what it cost."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._compiled: Any = None
        #: Wall seconds of the calls that compiled a graph.
        self.compile_seconds = 0.0
        #: Shapes compiled so far, in order.
        self.shapes: list[tuple[int, ...]] = []
        self.calls = {"compiled": 0, "eager": 0, "recompiled": 0}

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        base = self.model.base_model
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if has_hooks(self.model):
            self.calls["eager"] += 1
            return base(**kwargs)[0]
        if self._compiled is None:
            self._compiled = torch.compile(base, dynamic=False)
        shape = tuple(input_ids.shape)
        new = shape not in self.shapes
        if new:
            _synchronize(input_ids.device)
        graphs = _graphs_compiled()
        start = time.perf_counter()
        # torch._dynamo's default recompile limit (8) would silently fall back to eager past it
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            hidden = self._compiled(**kwargs)[0]
        if new or _graphs_compiled() > graphs:
            _synchronize(input_ids.device)
            self.compile_seconds += time.perf_counter() - start
            if new:
                self.shapes.append(shape)
            else:
                self.calls["recompiled"] += 1
        self.calls["compiled"] += 1
        return hidden


def _graphs_compiled() -> int:
    """Graphs torch._dynamo has compiled in this process (it counts every compilation, first or not)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

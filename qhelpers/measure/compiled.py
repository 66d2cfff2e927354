"""The ``torch.compile`` path of :class:`~qhelpers.measure.scoring.Scorer` (``MeasureConfig(compile=True)``).

Shapes (``MeasureConfig.compile_shapes``):

* ``"dynamic"`` (default): graphs with symbolic batch and sequence sizes. The batches stay those of the
  eager path (least padding); a graph is compiled for the first shape and, once torch._dynamo sees sizes
  vary, one general graph (plus one for a batch of a single row, a size it always specialises).
* ``"static"``: a graph per input shape, so batches are cut to a handful of shapes: window lengths are
  rounded up to a *sequence bucket* (powers of two from 64, and the window length itself), windows of
  one bucket go into batches of a fixed number of rows (a power of two under the token budget), and
  the last, partial batch of a bucket is padded to the next power of two of its rows. That gives at
  most about two shapes per sequence bucket, each compiled once.

The time of the calls that compiled is counted apart (:attr:`CompiledForward.compile_seconds`).

Each decoder layer's ``forward`` is compiled (regional compilation, :class:`CompiledForward`); one
graph per layer class (and shape) serves every layer. The embeddings, the mask and the LM head's
matmul stay eager; the loss is compiled too (:meth:`CompiledForward.token_nll`). The graphs take the
parameters as inputs, so a resident :class:`~qhelpers.quant.engine.QuantEngine` (which swaps
``param.data``) is seen by them. Hooks on a decoder layer (a prefix-cache session's) run outside its
graph; a hook inside a layer (a streaming engine's, on its linear modules) does Python work a graph
cannot hold, so that layer runs eagerly.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Sequence

import torch
from torch import nn

from qhelpers.models.archs import decoder_layers

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


def _global_hooks() -> bool:
    from torch.nn.modules import module as nn_module

    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def _inner_hooks(layer: nn.Module) -> bool:
    """Whether a hook sits on a module *inside* ``layer`` (its own hooks run outside the compiled
    forward and do not count)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules() if m is not layer)


class CompiledForward:
    """The decoder stack with each decoder layer's ``forward`` under ``torch.compile`` (``dynamic``:
    symbolic sizes, else static shapes), compiled lazily: regional compilation.

    All layers of one class share one compiled function: torch.compile's graphs take a module's
    parameters as inputs (``inline_inbuilt_nn_modules``), so the 30 layers of SmolLM2 reuse the graph
    compiled for the first one and a new shape costs one layer's compilation, not the whole stack's
    (measured on an H200: ~9 s per shape for SmolLM2's whole stack). The embeddings, the attention
    mask, the rotary tables and the final norm stay eager (a few kernels per call).

    The compiled function is installed as each layer's instance ``forward`` for the duration of a call
    only, so the model is left as it was. A layer's own hooks then run outside the graph, as
    :mod:`qhelpers.quant.prefix_cache`'s do (which is why prefix caching and compile combine); a layer
    with a hook on a module inside it (a streaming engine's) runs eagerly, one whose ``forward`` is
    already replaced (a prefix-cache replay's stub) keeps it, and under a global hook the whole stack
    runs eagerly.

    Counts calls (``compiled``: every layer compiled; ``partial``: some; ``eager``: none) and the
    seconds spent in calls that compiled a graph: a new shape's first call, or a recompilation of a
    known shape because a guard failed (e.g. a parameter swapped for a tensor of another dtype or
    stride). ``calls["recompiled"]`` counts the latter: each one means compiled graphs are not being
    reused, and ``compile_seconds`` says what it cost.
    """

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module] | None = None, dynamic: bool = False) -> None:
        self.model = model
        #: Graphs with symbolic batch and sequence sizes (else one graph per input shape).
        self.dynamic = dynamic
        self.layers = list(decoder_layers(model) if layers is None else layers)
        self._compiled: dict[type, Any] = {}
        self._loss: Any = None
        #: Wall seconds of the calls that compiled a graph.
        self.compile_seconds = 0.0
        #: Input shapes seen so far, in order (static shapes: each compiled once).
        self.shapes: list[tuple[int, ...]] = []
        self.calls = {"compiled": 0, "partial": 0, "eager": 0, "recompiled": 0}

    def _layer_forward(self, layer: nn.Module) -> Any:
        cls = type(layer)
        if cls not in self._compiled:
            self._compiled[cls] = torch.compile(cls.forward, dynamic=self.dynamic)
        return functools.partial(self._compiled[cls], layer)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        base = self.model.base_model
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        regional = [] if _global_hooks() else [
            layer for layer in self.layers if "forward" not in layer.__dict__ and not _inner_hooks(layer)
        ]
        if not regional:
            self.calls["eager"] += 1
            return base(**kwargs)[0]
        shape = tuple(input_ids.shape)
        new = shape not in self.shapes
        if new:
            _synchronize(input_ids.device)
        graphs = _graphs_compiled()
        start = time.perf_counter()
        try:
            for layer in regional:
                layer.forward = self._layer_forward(layer)
            # torch._dynamo's default recompile limit (8) would silently fall back to eager past it
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                hidden = base(**kwargs)[0]
        finally:
            for layer in regional:
                layer.__dict__.pop("forward", None)
        if _graphs_compiled() > graphs:
            _synchronize(input_ids.device)
            self.compile_seconds += time.perf_counter() - start
            if not new:
                self.calls["recompiled"] += 1
        if new:
            self.shapes.append(shape)
        self.calls["compiled" if len(regional) == len(self.layers) else "partial"] += 1
        return hidden

    def token_nll(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-row cross-entropy (nats) of ``logits`` (the head's dtype) upcast to float32, compiled
        with a dynamic row count: the upcast fuses into the log-softmax's reductions. Eagerly,
        ``F.cross_entropy(logits.float(), ...)`` writes and reads a float32 copy of every logit and
        its log-softmax (for SmolLM2, 49k per token: more memory traffic than the decoder's)."""
        if self._loss is None:
            self._loss = torch.compile(_upcast_cross_entropy)
        if len(logits) > 1:  # a dimension of size 1 is always specialised
            torch._dynamo.mark_dynamic(logits, 0)
            torch._dynamo.mark_dynamic(targets, 0)
        graphs = _graphs_compiled()
        start = time.perf_counter()
        out = self._loss(logits, targets)
        if _graphs_compiled() > graphs:
            _synchronize(logits.device)
            self.compile_seconds += time.perf_counter() - start
        return out


def _upcast_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


def _graphs_compiled() -> int:
    """Graphs torch._dynamo has compiled in this process (it counts every compilation, first or not)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""Prefix caching: reuse decoder-layer inputs across configurations that share them.

A configuration of a sweep (a :class:`~qhelpers.quant.engine.Variant`) decides, tensor by tensor,
whether the forward pass sees the loaded weight or a quantized one. The input of decoder
layer ``k`` depends only on the token ids, the batch layout, the embedding-side tensors and
the tensors of layers ``0..k-1``. Two configurations that agree on all of those compute the
same hidden states at layer ``k``'s input, bit for bit: not only when those layers are
unquantized, but also when they are *identically quantized*. "Layer ``i`` protected, the rest
quantized" shares layers ``0..i-1`` with "all quantized", so with the latter's layer inputs
cached it only has to run layers ``i..n-1``.

Signatures
----------
:func:`prefix_signature` hashes, for each layer
boundary ``k = 0..n`` (``k`` = the input of layer ``k``; ``k = n`` = the output of the last
layer), the state of everything computed before it:

* the embedding-side globals: every parameter outside the decoder layers except those owned
  only by the final norm or an *untied* LM head (so ``embed_tokens``, ``embed_positions``,
  ``embed_norm``, a tied ``lm_head`` - it *is* the embedding tensor - and anything unusual
  such as OPT's ``project_in``/``project_out``, conservatively);
* the parameters of layers ``0..k-1``;

each either ``fp`` or ``(quant config, mask key)`` from the engine's plan (resident and
streaming modes give identical weights, so the mode is not part of it), plus a fingerprint of
the loaded tensor (storage pointer, version counter, shape, dtype and a sampled checksum), so
that weights changed in place (``load_state_dict``, ``param.copy_``) are not mistaken for the
ones cached. ``boundaries[k] = H(boundaries[k-1], state of layer k-1)``, so equal boundaries at
``k`` imply equal boundaries below ``k``. Boundary 0 is never reused (the embeddings are cheap
and a variant that quantizes them shares nothing with one that does not).

Cache
-----
:class:`PrefixCache` keeps, per :class:`~qhelpers.measure.scoring.Scorer` batch index (batches are
fixed once tokenized) and boundary signature, the hidden states that entered layer ``k``,
within a byte budget. A :class:`_Session` (one per ``Scorer.score`` call) captures them with
forward pre-hooks (``with_kwargs=True``: ``args[0]`` or ``kwargs["hidden_states"]``) and, for
``k = n``, a forward hook on the last layer; it replays from the deepest cached boundary by
overriding ``forward`` on the instances of layers ``0..k-1`` with a stub that returns the cached
tensor in the layer's own output format (a tensor; a tuple for BLOOM, whose block returns
``(hidden, attention_probs)``: the stub returns ``(hidden, None, ...)``, recorded while
capturing), and restores every ``forward`` afterwards (``try/finally``).

With a *plan* (``run_sweep`` computes every signature first, see :meth:`PrefixCache.plan`),
only boundaries that a later configuration will start from are captured, and each is dropped
once its last consumer has run; when the budget is short, entries worth the most skipped
layers (depth x remaining uses) are kept. Without a plan (a hand-written loop calling
``Scorer.score(prefix=engine)``), every computed boundary is captured and the least recently
used entries of earlier passes are evicted (a pass never evicts its own captures, so that
it keeps the states of its first batches rather than cycling through all of them); call
:meth:`PrefixCache.plan` first to get the planned behaviour in such a loop too.

Which architectures
-------------------
Replay is exact only if each decoder layer's output is fed, unchanged, to the next layer and
nothing else reads it. In transformers 5.23 the decoder loops of gpt2 (``GPT2Model``), opt
(``OPTDecoder``), gpt_neox, llama, qwen2 and gemma3_text are
``hidden_states = layer(hidden_states, ...)``; bloom's is ``outputs = block(...);
hidden_states = outputs[0]`` (``outputs[1]`` only read with ``output_attentions``, which
the Scorer never asks for). Everything else in those loops (masks, rotary embeddings, ALiBi)
is computed before the loop from the ids and the attention mask. All seven are supported.
Every capture also checks this at run time: layers must run in order ``0..n-1``, once each,
and the tensor entering layer ``k`` must be the very object layer ``k-1`` returned (and must
not be modified in place afterwards); if not, the cache is disabled for that model with a
warning and the batch is recomputed without it. Model types in :data:`UNSUPPORTED_ARCHS`
never use the cache.

Limitations: a checkpoint whose weights are edited through ``param.data`` in place (which
bypasses the version counter) may escape the sampled checksum; call
:meth:`PrefixCache.clear` after such edits. Cached tensors live on the model's device.
"""
from __future__ import annotations

import hashlib
import warnings
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from qhelpers.models.archs import decoder_layers, get_module
from qhelpers.util.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from qhelpers.quant.engine import QuantEngine, Variant

__all__ = [
    "UNSUPPORTED_ARCHS",
    "PrefixSignature",
    "PrefixCache",
    "prefix_signature",
    "prefix_signatures",
    "run_order",
    "default_budget",
]

#: ``config.model_type`` values for which prefix caching is never used (add to it for an
#: architecture whose decoder loop does work between layers).
UNSUPPORTED_ARCHS: set[str] = set()

_SAMPLE = 64  # elements read per tensor for the fingerprint checksum


# ----------------------------------------------------------------------------- signatures


@dataclass(frozen=True)
class PrefixSignature:
    """Per layer boundary ``k = 0..n``: a digest of everything computed before layer ``k``.

    Only ``boundaries`` takes part in equality and hashing; ``quantized_layers`` (one flag
    per decoder layer: does the configuration quantize any tensor of it) and ``model_id``
    are bookkeeping.
    """

    boundaries: tuple[bytes, ...]
    quantized_layers: tuple[bool, ...] = field(default=(), compare=False)
    model_id: int = field(default=0, compare=False)

    @property
    def n_layers(self) -> int:
        return len(self.boundaries) - 1

    def common_depth(self, other: "PrefixSignature") -> int:
        """Deepest boundary ``k`` at which both configurations compute the same hidden states
        (0 when they already differ in the embeddings, or when even boundary 0 differs)."""
        depth = 0
        for k, (a, b) in enumerate(zip(self.boundaries, other.boundaries)):
            if a != b:
                break
            depth = k
        return depth


@dataclass
class _Layout:
    layers: list[list[str]]  # canonical parameter names per decoder layer
    pre: list[str]  # globals that influence the layers' inputs


#: each engine's layout, computed once (it depends only on the model's module tree)
_LAYOUTS: "weakref.WeakKeyDictionary[QuantEngine, _Layout]" = weakref.WeakKeyDictionary()


def _layout(engine: "QuantEngine") -> _Layout:
    cached = _LAYOUTS.get(engine)
    if cached is not None:
        return cached
    model, arch = engine.model, engine.arch
    layers = decoder_layers(model, arch)
    layer_of_module: dict[int, int] = {}
    for index, layer in enumerate(layers):
        for module in layer.modules():
            layer_of_module.setdefault(id(module), index)
    post_modules: set[int] = set()
    for path in (arch.final_norm, arch.lm_head):
        try:
            root = get_module(model, path)
        except ConfigError:
            continue
        post_modules.update(id(m) for m in root.modules())
    per_layer: list[list[str]] = [[] for _ in layers]
    pre: list[str] = []
    for name in engine.params:
        owners = engine.owners.get(name, [])
        indices = [layer_of_module[id(m)] for m, _ in owners if id(m) in layer_of_module]
        if indices:
            per_layer[min(indices)].append(name)
        elif owners and all(id(m) in post_modules for m, _ in owners):
            continue  # final norm, untied LM head: applied after the last layer
        else:
            pre.append(name)
    layout = _Layout([sorted(names) for names in per_layer], sorted(pre))
    _LAYOUTS[engine] = layout
    return layout


def _fingerprints(engine: "QuantEngine", names: list[str]) -> dict[str, tuple]:
    """(pointer, version, shape, dtype, device, sampled checksums) of each loaded tensor.

    The version counter is the parameter's own (``param.data`` aliases do not share it, and
    the engine's swaps leave it alone); pointer and samples are the loaded tensor's. The
    samples of all tensors travel to the CPU in one copy.
    """
    if not names:
        return {}
    originals = [engine.original_tensor(n) for n in names]
    samples = []
    for t in originals:
        flat = t.detach().reshape(-1)
        samples.append(flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE])
    values = torch.cat(samples).detach().cpu().double()
    out: dict[str, tuple] = {}
    start = 0
    for name, t, sample in zip(names, originals, samples):
        chunk = values[start : start + sample.numel()]
        start += sample.numel()
        weights = torch.arange(1, chunk.numel() + 1, dtype=torch.float64)
        out[name] = (
            t.data_ptr(), engine.params[name]._version, tuple(t.shape), str(t.dtype), str(t.device),
            float(chunk.sum()), float((chunk * weights).sum()),
        )
    return out


def prefix_signature(engine: "QuantEngine", variant: "Variant | None" = None) -> PrefixSignature:
    """The :class:`PrefixSignature` of ``variant`` (default: the engine's active variant, or
    the full-precision baseline when none is applied) on the engine's model."""
    if variant is None:
        variant = engine.active
    return prefix_signatures(engine, [variant])[0]


def prefix_signatures(engine: "QuantEngine", variants: Sequence["Variant | None"]) -> list[PrefixSignature]:
    """:func:`prefix_signature` of several variants (the weights are fingerprinted once)."""
    layout = _layout(engine)
    names = layout.pre + [n for names in layout.layers for n in names]
    prints = _fingerprints(engine, names)
    return [_signature(engine, layout, prints, variant) for variant in variants]


def _signature(engine: "QuantEngine", layout: _Layout, prints: dict[str, tuple], variant: "Variant | None") -> PrefixSignature:
    plan = None if variant is None or variant.is_baseline else engine.plan(variant)
    quant_key = "" if plan is None else repr(variant.quant)

    def state(name: str) -> bytes:
        tplan = plan.tensors.get(name) if plan is not None else None
        if tplan is None:
            return repr((name, "fp", prints[name])).encode()
        return repr((name, "q", quant_key, tplan.mask_key, prints[name])).encode()

    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(("prefix-v1", engine.model.config.model_type, len(layout.layers))).encode())
    for name in layout.pre:
        digest.update(state(name))
    boundaries = [digest.digest()]
    flags = []
    for names in layout.layers:
        digest = hashlib.blake2b(boundaries[-1], digest_size=16)
        for name in names:
            digest.update(state(name))
        boundaries.append(digest.digest())
        flags.append(plan is not None and any(n in plan.tensors for n in names))
    return PrefixSignature(tuple(boundaries), tuple(flags), id(engine.model))


def run_order(signatures: Sequence[PrefixSignature], baseline: int | None = 0) -> list[int]:
    """An order of the configurations that makes the most of the cache: the baseline first,
    then configurations quantizing the most layers (those that share their prefixes with many
    others, e.g. "all quantized" before every "layer i protected"); ties keep the given order.
    Returns indices into ``signatures``."""
    indices = list(range(len(signatures)))
    rest = [i for i in indices if i != baseline]
    rest.sort(key=lambda i: -sum(signatures[i].quantized_layers))
    return ([baseline] if baseline is not None and baseline in indices else []) + rest


def default_budget(model: nn.Module, device: torch.device) -> int:
    """Default cache budget in bytes: half the fp32 size of the model on CPU; on CUDA a
    quarter of the free GPU memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.25)
    return int(0.5 * 4 * sum(p.numel() for p in model.parameters()))


# ----------------------------------------------------------------------------- cache


@dataclass
class _Cached:
    tensor: torch.Tensor
    depth: int
    version: int
    session: int = 0

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


class PrefixCache:
    """Hidden states at layer boundaries, per batch index, within ``budget_bytes``.

    Owned by a :class:`~qhelpers.measure.scoring.Scorer` (``scorer.enable_prefix_cache()``); its
    batches index the entries, so a cache is cleared when it is used by another scorer or
    when the scorer re-batches (after an out-of-memory retry).
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ConfigError(f"prefix cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[tuple[bytes, int], _Cached] = OrderedDict()
        self.nbytes = 0
        self.peak_bytes = 0
        self._pending: Counter[bytes] | None = None  # plan: remaining consumers per boundary
        self._consumes: dict[PrefixSignature, list[bytes | None]] = {}
        self._owner: Any = None
        self.formats: dict[int, Any] = {}  # layer index -> output format ("tensor" | tuple length)
        self.disabled: str | None = None
        self.stats: Counter[str] = Counter()
        self._session = 0  # id of the scoring pass in progress

    # -------------------------------------------------------------- bookkeeping
    def __len__(self) -> int:
        return len(self._entries)

    def bind(self, owner: Any) -> None:
        """Tie the entries to a batch layout (``owner`` compares equal while it is the same)."""
        if self._owner != owner:
            self.clear(keep_plan=True)
            self._owner = owner

    def clear(self, keep_plan: bool = False) -> None:
        """Drop every cached tensor (and the plan unless ``keep_plan``)."""
        self._entries.clear()
        self.nbytes = 0
        if not keep_plan:
            self._pending = None
            self._consumes = {}

    def disable(self, reason: str) -> None:
        """Stop using the cache (drops its contents) and say why."""
        if self.disabled is None:
            warnings.warn(f"prefix cache disabled: {reason}", RuntimeWarning, stacklevel=3)
        self.disabled = reason
        self.clear()

    # -------------------------------------------------------------- planning
    def plan(self, signatures: Sequence[PrefixSignature]) -> list[int]:
        """Announce the configurations about to be scored, in order. Each will start from the
        deepest boundary shared with an earlier one; only those boundaries are captured, and
        each is dropped after its last consumer (:meth:`finish`). Returns the planned start
        depth of each configuration (0: from the embeddings)."""
        self._pending = Counter()
        self._consumes = {}
        self.peak_bytes = self.nbytes
        produced: set[bytes] = set()
        starts = []
        for sig in signatures:
            start = 0
            for k in range(sig.n_layers, 0, -1):
                if sig.boundaries[k] in produced:
                    start = k
                    break
            starts.append(start)
            key = sig.boundaries[start] if start else None
            if key is not None:
                self._pending[key] += 1
            self._consumes.setdefault(sig, []).append(key)
            produced.update(sig.boundaries[1:])
        return starts

    def end_plan(self) -> None:
        """Forget the plan and drop its entries."""
        self.clear()

    def finish(self, signature: PrefixSignature) -> None:
        """A configuration finished scoring: release what it was planned to consume."""
        if self._pending is None:
            return
        queue = self._consumes.get(signature)
        if not queue:
            return
        key = queue.pop(0)
        if key is not None:
            self._pending[key] -= 1
            if self._pending[key] <= 0:
                del self._pending[key]
                self._drop_boundary(key)

    def _drop_boundary(self, key: bytes) -> None:
        for entry_key in [k for k in self._entries if k[0] == key]:
            self.nbytes -= self._entries.pop(entry_key).nbytes

    # -------------------------------------------------------------- lookup / store
    def start(self, signature: PrefixSignature, batch: int) -> tuple[int, _Cached | None]:
        """Deepest cached boundary of ``signature`` for ``batch`` (0, None if none)."""
        if self.disabled is not None:
            return 0, None
        for k in range(signature.n_layers, 0, -1):
            entry = self._entries.get((signature.boundaries[k], batch))
            if entry is not None:
                self._entries.move_to_end((signature.boundaries[k], batch))
                return k, entry
        return 0, None

    def wants(self, key: bytes, batch: int) -> bool:
        if self.disabled is not None or (key, batch) in self._entries:
            return False
        return self._pending is None or self._pending.get(key, 0) > 0

    def _value(self, key: bytes, depth: int) -> int:
        return depth * (self._pending.get(key, 0) if self._pending is not None else 1)

    def store(self, key: bytes, depth: int, batch: int, tensor: torch.Tensor) -> bool:
        """Keep ``tensor`` as the input of layer ``depth`` for ``batch``; False if it did not fit."""
        size = tensor.numel() * tensor.element_size()
        if size > self.budget_bytes:
            self.stats["skipped"] += 1
            return False
        if self.nbytes + size > self.budget_bytes:
            if self._pending is None:
                # least recently used first, but never this pass's own captures: a pass over the
                # batches would otherwise evict its first batches' states to store its last ones
                victims = [k for k, e in self._entries.items() if e.session != self._session]
            else:  # least valuable first (depth x remaining consumers), oldest among equals
                value = self._value(key, depth)
                victims = sorted(
                    (k for k, e in self._entries.items() if self._value(k[0], e.depth) < value),
                    key=lambda k: self._value(k[0], self._entries[k].depth),
                )
            freed = 0
            chosen = []
            for victim in victims:
                if self.nbytes - freed + size <= self.budget_bytes:
                    break
                chosen.append(victim)
                freed += self._entries[victim].nbytes
            if self.nbytes - freed + size > self.budget_bytes:
                self.stats["skipped"] += 1
                return False
            for victim in chosen:
                self.nbytes -= self._entries.pop(victim).nbytes
                self.stats["evicted"] += 1
        if tensor.untyped_storage().nbytes() > size:  # a view: do not keep its base alive
            tensor = tensor.clone()
        self._entries[(key, batch)] = _Cached(tensor, depth, tensor._version, self._session)
        self.nbytes += size
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        self.stats["captured"] += 1
        return True

    def discard(self, key: bytes, batch: int) -> None:
        entry = self._entries.pop((key, batch), None)
        if entry is not None:
            self.nbytes -= entry.nbytes

    # -------------------------------------------------------------- running
    def session(self, model: nn.Module, signature: PrefixSignature) -> "_Session":
        """Hooks for one scoring pass of ``model`` under ``signature`` (a context manager)."""
        self._session += 1
        return _Session(self, model, signature)


def _hidden_of(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _format_of(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return "tensor"
    if type(output) is tuple and output and isinstance(output[0], torch.Tensor):
        return len(output)
    return None


class _Session:
    """Capture and replay hooks for one ``Scorer.score`` call (see the module docstring)."""

    def __init__(self, cache: PrefixCache, model: nn.Module, signature: PrefixSignature) -> None:
        self.cache = cache
        self.model = model
        self.signature = signature
        self.layers = list(decoder_layers(model))
        self.n = len(self.layers)
        if signature.n_layers != self.n:
            raise ConfigError(
                f"the prefix signature covers {signature.n_layers} layers but the model has {self.n}; "
                "was it computed on another model?"
            )
        self._handles: list[Any] = []
        self.batch_index = -1
        self.start_depth = 0
        self._next = 0
        self._last: torch.Tensor | None = None
        self._captured: list[tuple[bytes, int, torch.Tensor]] = []
        self._replayed: _Cached | None = None
        self.error: str | None = None

    # -------------------------------------------------------------- hooks
    def __enter__(self) -> "_Session":
        try:
            for index, layer in enumerate(self.layers):
                self._handles.append(layer.register_forward_pre_hook(self._pre_hook(index), with_kwargs=True))
                self._handles.append(layer.register_forward_hook(self._post_hook(index), always_call=True))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason

    def _pre_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.error is not None:
                return
            if index != self._next:
                self._fail(f"decoder layer {index} ran when layer {self._next} was expected")
                return
            self._next = index + 1
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(hidden, torch.Tensor):
                self._fail(f"decoder layer {index} got no hidden_states tensor")
                return
            if index > 0 and hidden is not self._last:
                self._fail(
                    f"the input of decoder layer {index} is not the output of layer {index - 1} "
                    f"({type(self.model).__name__} does work between layers)"
                )
                return
            if index > self.start_depth:
                self._capture(index, hidden)

        return hook

    def _post_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self.error is not None:
                return
            fmt = _format_of(output)
            if fmt is None:
                self._fail(f"decoder layer {index} returned {type(output).__name__}, not a tensor or a tuple")
                return
            known = self.cache.formats.setdefault(index, fmt)
            if known != fmt:
                self._fail(f"decoder layer {index} changed its output format ({known} -> {fmt})")
                return
            self._last = _hidden_of(output)
            if index == self.n - 1 and self.n > self.start_depth:
                self._capture(self.n, self._last)

        return hook

    def _capture(self, depth: int, hidden: torch.Tensor) -> None:
        key = self.signature.boundaries[depth]
        if self.cache.wants(key, self.batch_index) and self.cache.store(key, depth, self.batch_index, hidden):
            self._captured.append((key, self.batch_index, self.cache._entries[(key, self.batch_index)].tensor))

    # -------------------------------------------------------------- one batch
    def run_batch(self, batch_index: int, forward):
        """``forward()`` for one batch, replaying from the deepest cached boundary.

        If a guard fails, the cache is disabled and the batch is computed again without it.
        """
        self.batch_index = batch_index
        self._next = 0
        self._last = None
        self._captured = []
        if self.cache.disabled is not None:  # a guard failed earlier: plain forward, hooks idle
            self.error = self.cache.disabled
            return forward(), 0
        self.error = None
        depth, entry = self.cache.start(self.signature, batch_index)
        if depth and any(self.cache.formats.get(j) is None for j in range(depth)):
            depth, entry = 0, None  # output formats unknown: never seen these layers run
        self.start_depth = depth
        self._replayed = entry
        saved: list[tuple[nn.Module, Any]] = []
        try:
            for j in range(depth):
                layer = self.layers[j]
                saved.append((layer, layer.__dict__.get("forward", _MISSING)))
                layer.forward = self._stub(self.cache.formats[j], entry.tensor)
            result = forward()
        finally:
            for layer, previous in reversed(saved):
                if previous is _MISSING:
                    layer.__dict__.pop("forward", None)
                else:
                    layer.forward = previous
        self._check(depth)
        if self.error is not None:
            for key, batch, _ in self._captured:
                self.cache.discard(key, batch)
            self.cache.disable(self.error)
            self.start_depth = 0
            return forward(), 0
        self.cache.stats["layers_skipped"] += depth
        self.cache.stats["layers_run"] += self.n - depth
        if depth:
            self.cache.stats["hits"] += 1
        return result, depth

    def _check(self, depth: int) -> None:
        if self.error is not None:
            return
        if self._next != self.n:
            self._fail(f"{self._next} of {self.n} decoder layers ran")
        elif self._replayed is not None and self._replayed.tensor._version != self._replayed.version:
            self._fail("a cached hidden state was modified in place during the forward pass")
        else:
            for key, batch, tensor in self._captured:
                entry = self.cache._entries.get((key, batch))
                if entry is not None and entry.tensor._version != entry.version:
                    self._fail("a captured hidden state was modified in place after its layer returned")
                    break

    @staticmethod
    def _stub(fmt: Any, hidden: torch.Tensor):
        if fmt == "tensor":
            return lambda *args, **kwargs: hidden
        rest = (None,) * (fmt - 1)
        return lambda *args, **kwargs: (hidden, *rest)


_MISSING = object()

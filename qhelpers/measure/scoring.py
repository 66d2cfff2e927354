"""Per-text negative log-likelihood, token and byte counts, batched and windowed.

The unit of measurement is a text: its summed NLL (nats) over scored tokens, the number
of scored tokens and its UTF-8 byte count. Perplexity and bits per byte per language are
aggregates of those (see :mod:`qhelpers.stats.scores`). Texts longer than the context go through
a sliding window; batches are formed from length-sorted windows under a token budget.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from qhelpers.measure.compiled import CompiledForward, bucket_batches, pad_to_shape, padded_shape
from qhelpers.measure.divergence import token_kl
from qhelpers.models.loaded import as_module
from qhelpers.stats.quantities import KL_HIST_EDGES
from qhelpers.util.errors import ConfigError, MeasurementError
from qhelpers.quant.strategies import PROTOCOLS
from qhelpers.text.encoding import CPU_BATCH_TOKENS, batch_overhead_tokens, encode_text, length_batches, pad_batch
from qhelpers.util.progress import progress_bar

MAX_DEFAULT_CONTEXT = 1024
LOGIT_BUDGET = 1 << 25  # logits elements materialised at once (128 MB in fp32)
#: The same on CUDA: at 2^25 a 128k-token batch of SmolLM2 (49k vocabulary) took ~190 head calls of 682
#: rows, each a few small kernels; 2^27 (0.5 GB in fp32) makes it ~47.
CUDA_LOGIT_BUDGET = 1 << 27
#: Share of the free GPU memory (at Scorer creation) that automatic batch sizing may fill with
#: activations; the prefix cache's default budget takes another quarter (qhelpers.quant.prefix_cache).
CUDA_ACTIVATION_FRACTION = 0.5
#: Texts per batch on CPU when ``MeasureConfig.max_batch`` is None (the value every CPU result so far
#: was computed with: batches, hence fp32 rounding, stay as they were).
CPU_MAX_BATCH = 64
#: Upper bound of the automatic CUDA token budget when no ``max_batch`` caps it: 128k tokens a call
#: keep an H200 busy on 100M-parameter models; larger calls only add padding and memory.
CUDA_MAX_BATCH_TOKENS = 1 << 17
#: What one more forward call costs on CUDA, in padded tokens, for the least-padding batching
#: (launches and Python of a ~30-layer eager forward, ~5 ms, at ~0.7M tokens/s). Pricing a call
#: like a full budget (what :func:`qhelpers.text.encoding.batch_overhead_tokens` does for the
#: capture loops) would, with a large budget, put short and long windows in one batch padded to the
#: longest.
CUDA_CALL_OVERHEAD_TOKENS = 4096


#: Values of ``MeasureConfig.compile_shapes``.
COMPILE_SHAPES = ("dynamic", "static")


@dataclass(frozen=True)
class MeasureConfig:
    """How texts are tokenized, windowed and batched.

    Args:
        max_length: tokens per forward window (None: the model's context, at most 1024).
        stride: new tokens scored per window when a text is longer than ``max_length``
            (None: ``max_length // 2``); each scored token sees up to ``max_length - 1``
            tokens of context.
        truncate: cut texts at ``max_length`` instead of sliding (the seeds' behaviour).
        prepend_bos: put the BOS (or EOS) token in front so the first real token is
            scored too. None: only when the tokenizer does not add one itself.
        batch_tokens: token budget of one padded batch (None: 2048 on CPU; on CUDA chosen
            from the free GPU memory, see :func:`auto_batch_tokens`). On CUDA an out-of-memory
            error while scoring halves it and retries (with a warning).
        max_batch: upper bound on windows per batch. None: 64 on CPU; on CUDA no bound (the
            token budget alone fills the card; a count cap left the forward calls of short texts
            launch-bound).
        compile: run each decoder layer's forward and the loss under ``torch.compile``
            (:mod:`qhelpers.measure.compiled`; compile time in ``Scorer.compile_seconds``). NLL
            equals the eager path's within floating-point rounding, not bit for bit. A layer with a
            hook inside it (a streaming engine's) runs eagerly; prefix caching combines with it.
            Refused for bf16 models (its rounding measured twice eager's); fp16 and fp32 only.
        compile_shapes: with ``compile``: ``"dynamic"`` (default) compiles graphs with symbolic
            batch and sequence sizes, so the batches stay the eager path's (about two graphs in
            all); ``"static"`` pads batches to a few bucketed shapes and compiles a graph for each.
        damage: in a sweep (:func:`qhelpers.measure.sweep.run_sweep`), also measure every
            variant's divergence from the full model per text (the damage card: summed KL,
            top-1 agreement, a histogram of per-token KL); see :meth:`Scorer.score`.
    """

    max_length: int | None = None
    stride: int | None = None
    truncate: bool = False
    prepend_bos: bool | None = None
    batch_tokens: int | None = None
    max_batch: int | None = None
    damage: bool = True
    compile: bool = False
    compile_shapes: str = "dynamic"

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2 tokens, got {self.max_length}")
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"stride must be >= 1, got {self.stride}")
        if self.stride is not None and self.max_length is not None and self.stride > self.max_length - 1:
            raise ConfigError(
                f"stride {self.stride} leaves tokens unscored: it must be at most max_length - 1 = {self.max_length - 1}"
            )
        if self.batch_tokens is not None and self.batch_tokens < 2:
            raise ConfigError(f"batch_tokens must be >= 2, got {self.batch_tokens}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1 (or None for the device's default), got {self.max_batch}")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be True or False, got {self.compile!r}")
        if self.compile_shapes not in COMPILE_SHAPES:
            raise ConfigError(f"compile_shapes must be one of {', '.join(COMPILE_SHAPES)}, got {self.compile_shapes!r}")

    @classmethod
    def seed(cls) -> "MeasureConfig":
        """The seeds' protocol: tokenizer output as is, truncated at 256 tokens, one text per forward."""
        return cls(max_length=256, truncate=True, prepend_bos=False, max_batch=1)


#: Memory the damage card may use to keep the full model's last hidden states (one row per
#: scored token) between the baseline and the variants.
DAMAGE_REFERENCE_BUDGET = 4 << 30
#: The modes of ``Scorer.score(damage=...)``.
DAMAGE_MODES = ("reference", "compare")


@dataclass(frozen=True)
class _Window:
    row: int  # index of the text
    ids: tuple[int, ...]
    first_target: int  # position (in ids) of the first scored target token
    start: int = 0  # position of ids[0] in the text's tokens

    @property
    def key(self) -> tuple[int, int]:
        """(text, start): identifies the window whatever batch it lands in."""
        return self.row, self.start


def _windows(row: int, ids: list[int], max_length: int, stride: int, truncate: bool) -> list[_Window]:
    """Split a long token sequence into overlapping windows; each token is scored once."""
    n = len(ids)
    if n <= max_length or truncate:
        return [_Window(row, tuple(ids[:max_length]), 1)]
    out: list[_Window] = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        out.append(_Window(row, tuple(ids[begin:end]), max(prev_end, 1) - begin, begin))
        prev_end = end
        if end == n:
            break
    return out


def context_length(model: nn.Module) -> int:
    """The model's maximum sequence length (capped at 1024 for measurement)."""
    config = model.config
    for attr in ("n_positions", "max_position_embeddings", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return min(value, MAX_DEFAULT_CONTEXT)
    return MAX_DEFAULT_CONTEXT


def _config_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def activation_bytes_per_token(model: nn.Module, max_length: int) -> int:
    """Rough upper bound on the activation memory of one token in a no-grad forward pass.

    ``elem * (8 * hidden + 3 * intermediate)`` for the residual stream, norms and MLP
    temporaries, plus ``heads * max_length * (2 * elem + 4)`` for attention scores and
    fp32 softmax in case the attention materialises them (eager attention, BLOOM's ALiBi).
    """
    config = model.config
    elem = next(model.parameters()).element_size()
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model") or 1024
    inter = _config_int(config, "intermediate_size", "ffn_dim", "n_inner") or 4 * hidden
    heads = _config_int(config, "num_attention_heads", "n_head") or 1
    return elem * (8 * hidden + 3 * inter) + heads * max_length * (2 * elem + 4)


def logit_budget(device: torch.device) -> int:
    """Logit elements the scorer materialises at once on ``device``: :data:`CUDA_LOGIT_BUDGET` on
    CUDA, :data:`LOGIT_BUDGET` elsewhere."""
    return CUDA_LOGIT_BUDGET if device.type == "cuda" else LOGIT_BUDGET


def logits_bytes(model: nn.Module) -> int:
    """Memory of the chunked logits in :meth:`Scorer._forward`: at most :func:`logit_budget`
    elements at once, as head output (model dtype), fp32 copy, fp32 log-softmax and fp32
    per-token losses/temporaries."""
    param = next(model.parameters())
    return logit_budget(param.device) * (param.element_size() + 4 + 4 + 4)


def auto_batch_tokens(
    model: nn.Module, max_length: int, max_batch: int | None, device: torch.device,
    fraction: float = CUDA_ACTIVATION_FRACTION,
) -> int:
    """Token budget of a batch on CUDA from ``torch.cuda.mem_get_info``: ``fraction`` of the
    free memory, less the logits chunk (:func:`logits_bytes`), divided by
    :func:`activation_bytes_per_token`; at most ``max_batch * max_length`` (no batch can hold
    more; :data:`CUDA_MAX_BATCH_TOKENS` when ``max_batch`` is None) and at least one window
    (``max_length``), in multiples of 64 tokens."""
    free, _ = torch.cuda.mem_get_info(device)
    usable = fraction * free - logits_bytes(model)
    tokens = int(usable // activation_bytes_per_token(model, max_length))
    tokens = min(tokens, CUDA_MAX_BATCH_TOKENS if max_batch is None else max_batch * max_length)
    tokens = max(tokens - tokens % 64, max_length, 2)
    return tokens


_NO_PREFIX = object()


def output_head(model: nn.Module) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        return head, lambda logits: torch.tanh(logits / cap) * cap
    return head, lambda logits: logits


class Scorer:
    """Scores many texts on one model; tokenization and batching are done once.

    Use :meth:`score` after each configuration change (the engine's hooks act during
    the forward passes). ``score(prefix=engine)`` reuses the decoder-layer inputs that an
    earlier call computed under identical weights (:mod:`qhelpers.quant.prefix_cache`; ``run_sweep`` does
    this by default).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any | None = None,
        texts: Sequence[str] = (),
        config: MeasureConfig = MeasureConfig(),
        keys: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        self.model: nn.Module = as_module(model)
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if not texts:
            raise MeasurementError("no texts to score; pass a non-empty list (or a corpus with texts)")
        self.texts = list(texts)
        self.keys = list(keys) if keys is not None else [{"text_index": i} for i in range(len(self.texts))]
        if len(self.keys) != len(self.texts):
            raise ConfigError(f"{len(self.keys)} keys for {len(self.texts)} texts")
        self.device = next(self.model.parameters()).device
        # never longer than the model's positions (a tiny model has 256)
        max_length = min(config.max_length or context_length(self.model), context_length(self.model))
        stride = config.stride or max(1, max_length // 2)
        stride = min(stride, max_length - 1)
        max_batch = config.max_batch
        if max_batch is None and self.device.type != "cuda":
            max_batch = CPU_MAX_BATCH
        batch_tokens = config.batch_tokens
        if batch_tokens is None:
            if self.device.type == "cuda":
                batch_tokens = auto_batch_tokens(self.model, max_length, max_batch, self.device)
            else:
                batch_tokens = CPU_BATCH_TOKENS
        self.config = replace(config, max_length=max_length, stride=stride, batch_tokens=batch_tokens,
                              max_batch=max_batch)
        #: The compiled decoder stack (``config.compile``), None otherwise; see :attr:`compile_seconds`.
        self.compiled = None
        if config.compile:
            if next(self.model.parameters()).dtype == torch.bfloat16:
                # measured on an H200 (SmolLM2, 2026-12-04): the compiled bf16 forward strayed from fp32
                # 0.043 nats per token on a text, 2.2x what eager bf16 strays (0.020); fp16 stayed in bounds
                raise ConfigError("MeasureConfig(compile=True) is refused in bf16: the compiled forward's "
                                  "rounding was twice eager bf16's on SmolLM2. Load the model in fp16 "
                                  "(dtype='fp16') or score without compile")

            self.compiled = CompiledForward(self.model, dynamic=config.compile_shapes == "dynamic")
        self.n_bytes = np.array([len(t.encode("utf-8")) for t in self.texts], dtype=np.int64)
        windows: list[_Window] = []
        for row, text in enumerate(self.texts):
            try:
                ids = encode_text(self.tokenizer, text, config.prepend_bos)
            except MeasurementError as err:
                raise MeasurementError(f"{self.keys[row]}: {err}") from None
            windows.extend(_windows(row, ids, max_length, stride, config.truncate))
        self.n_tokens = np.zeros(len(self.texts), dtype=np.int64)
        for w in windows:
            self.n_tokens[w.row] += len(w.ids) - w.first_target
        self._windows = windows
        self.batches = self._batch(windows)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        #: :class:`~qhelpers.quant.prefix_cache.PrefixCache` used by ``score(prefix=...)`` (None until
        #: :meth:`enable_prefix_cache` or the first such call).
        self.prefix_cache = None
        self._reference: dict[tuple[int, int], torch.Tensor] = {}  # window key -> its scored hidden rows
        self._reference_device = torch.device("cpu")
        self._layout = 0  # bumped whenever self.batches changes (prefix cache entries are per batch)

    def _batch(self, windows: list[_Window]) -> list[list[_Window]]:
        lengths = [len(w.ids) for w in windows]
        budget, max_batch = self.config.batch_tokens, self.config.max_batch
        if self.compiled is not None and not self.compiled.dynamic:
            groups = bucket_batches(lengths, budget, max_batch, self.config.max_length)
        else:
            overhead = batch_overhead_tokens(self.device, budget)
            if self.device.type == "cuda":
                overhead = min(overhead, CUDA_CALL_OVERHEAD_TOKENS)
            groups = length_batches(lengths, budget, max_batch or max(1, len(windows)), overhead)
        return [[windows[i] for i in group] for group in groups]

    @property
    def compile_seconds(self) -> float:
        """Seconds spent in the first call of each compiled shape (0 without ``compile``)."""
        return self.compiled.compile_seconds if self.compiled is not None else 0.0

    @property
    def total_tokens(self) -> int:
        """Tokens fed through the model per :meth:`score` (padding excluded)."""
        return sum(len(w.ids) for batch in self.batches for w in batch)

    # ------------------------------------------------------------------ prefix caching
    def enable_prefix_cache(self, budget_bytes: int | None = None):
        """The :class:`~qhelpers.quant.prefix_cache.PrefixCache` of this scorer (created on first use).

        ``budget_bytes``: memory for cached hidden states (None: half the fp32 model size on
        CPU, a quarter of the free GPU memory on CUDA; see :func:`qhelpers.quant.prefix_cache.default_budget`).
        """
        from qhelpers.quant.prefix_cache import PrefixCache, default_budget

        if self.prefix_cache is None:
            budget = default_budget(self.model, self.device) if budget_bytes is None else budget_bytes
            self.prefix_cache = PrefixCache(budget)
        elif budget_bytes is not None:
            self.prefix_cache.budget_bytes = int(budget_bytes)
        return self.prefix_cache

    def _signature(self, prefix: Any):
        from qhelpers.quant.engine import QuantEngine
        from qhelpers.quant.prefix_cache import PrefixSignature, prefix_signature

        if prefix is None:
            return None
        if isinstance(prefix, PrefixSignature):
            signature = prefix
        elif isinstance(prefix, QuantEngine):
            if prefix.model is not self.model:
                raise ConfigError("prefix=engine: the engine works on another model than this scorer")
            signature = prefix_signature(prefix)
        else:
            raise ConfigError(
                f"prefix must be None, a QuantEngine or a PrefixSignature, got {type(prefix).__name__}"
            )
        if signature.model_id and signature.model_id != id(self.model):
            raise ConfigError("the prefix signature was computed on another model than this scorer's")
        return signature

    @staticmethod
    def _is_prefix(value: Any) -> bool:
        from qhelpers.quant.engine import QuantEngine
        from qhelpers.quant.prefix_cache import PrefixSignature

        return value is None or isinstance(value, (PrefixSignature, QuantEngine))

    # ------------------------------------------------------------------ scoring
    def score_nll(self, progress: bool = False, prefix: Any = None) -> np.ndarray:
        """Summed NLL (nats) of each text, in input order.

        ``prefix``: None (no caching), a :class:`~qhelpers.quant.engine.QuantEngine` (the signature
        of its active variant is computed) or a :class:`~qhelpers.quant.prefix_cache.PrefixSignature`:
        layer inputs cached under the same signature by an earlier call are reused instead of
        recomputed, and those of this call are cached (see :mod:`qhelpers.quant.prefix_cache`).

        On CUDA, an out-of-memory error halves the batch token budget, re-batches and scores
        again (with a warning) until a batch holds a single window.
        """
        return self._score_batches(progress, self._signature(prefix), None)["nll"]

    @torch.no_grad()
    def _score_batches(self, progress: bool, signature: Any, damage: str | None) -> dict[str, np.ndarray]:
        """Per-text sums over every batch (see :meth:`_score`), halving the batch token
        budget and retrying on a CUDA out-of-memory error. Under ``no_grad`` whatever the caller's
        grad mode: torch.compile guards on it, so a graph compiled by ``score_nll`` would otherwise be
        compiled again for ``score`` (every shape, once per mode)."""
        while True:
            try:
                return self._score(progress, signature, damage)
            except torch.cuda.OutOfMemoryError as err:
                if not self._can_shrink():
                    raise
                reason = (str(err).strip().splitlines() or ["out of memory"])[0][:200]
            self._shrink(reason)

    def _can_shrink(self) -> bool:
        return self.config.batch_tokens > 2 and any(len(batch) > 1 for batch in self.batches)

    def _shrink(self, reason: str) -> None:
        old = self.config.batch_tokens
        new = max(2, old // 2)
        warnings.warn(
            f"out of GPU memory while scoring with batch_tokens={old} ({reason}); "
            f"halving the batch token budget to {new} and retrying",
            RuntimeWarning,
            stacklevel=3,
        )
        self.config = replace(self.config, batch_tokens=new)
        self.batches = self._batch(self._windows)
        self._layout += 1
        if self.prefix_cache is not None:
            self.prefix_cache.clear(keep_plan=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _score(self, progress: bool, signature: Any, damage: str | None) -> dict[str, np.ndarray]:
        """Per-text ``nll`` (and with ``damage``: ``kl_nats``, ``top1_agree`` counts and
        ``kl_hist`` rows) summed over every batch."""
        from qhelpers.quant.prefix_cache import UNSUPPORTED_ARCHS

        n = len(self.texts)
        sums: dict[str, np.ndarray] = {"nll": np.zeros(n, dtype=np.float64)}
        if damage is not None:
            sums.update(
                kl_nats=np.zeros(n, dtype=np.float64),
                top1_agree=np.zeros(n, dtype=np.int64),
                kl_hist=np.zeros((n, len(KL_HIST_EDGES) - 1), dtype=np.int64),
            )
            forward = lambda batch: self._forward_damage(batch, damage)  # noqa: E731
        else:
            forward = self._forward
        batches: Iterable = list(enumerate(self.batches))
        if progress:
            batches = progress_bar(batches, desc="batches", leave=False)
        cache = session = None
        if signature is not None and getattr(self.model.config, "model_type", None) not in UNSUPPORTED_ARCHS:
            cache = self.enable_prefix_cache()
            if cache.disabled is None:
                cache.bind((id(self), self._layout))
                session = cache.session(self.model, signature)
        with session if session is not None else contextlib.nullcontext():
            for index, batch in batches:
                if session is not None:
                    values, _ = session.run_batch(index, lambda: forward(batch))
                else:
                    values = forward(batch)
                for window, value in zip(batch, values):
                    if damage is None:
                        sums["nll"][window.row] += value
                    else:
                        for key, part in value.items():
                            sums[key][window.row] += part
        if cache is not None:
            cache.finish(signature)
        return sums

    def _hidden(self, batch: list[_Window]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Last hidden states of a padded batch, and the (row, position) of each scored token
        with its target id."""
        ids, mask = pad_batch([w.ids for w in batch], self.pad_id)
        static = self.compiled is not None and not self.compiled.dynamic
        if static:
            shape = padded_shape([len(w.ids) for w in batch], self.config.batch_tokens, self.config.max_batch,
                                 self.config.max_length)
            ids, mask = pad_to_shape(ids, mask, shape, self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        if not static and len(batch) == 1:
            mask = None
        if self.compiled is not None:
            hidden = self.compiled(ids, mask)
        else:
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)[0]
        rows = torch.cat([torch.full((len(w.ids) - w.first_target,), i) for i, w in enumerate(batch)]).to(self.device)
        positions = torch.cat([torch.arange(w.first_target - 1, len(w.ids) - 1) for w in batch]).to(self.device)
        return hidden, rows, positions, ids[rows, positions + 1]

    def _selected_logits(
        self, hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, upcast: bool = True
    ) -> Iterator[torch.Tensor]:
        """Logits of the scored positions (float32 unless ``upcast`` is False), in consecutive
        chunks of rows."""
        head, finish = output_head(self.model)
        vocab = head.weight.shape[0]
        budget = logit_budget(self.device)
        cast = (lambda x: x.float()) if upcast else (lambda x: x)  # noqa: E731
        if hidden.shape[0] * hidden.shape[1] * vocab <= budget:
            # the same head matmul as the model's own forward, so logits match it bit for bit
            yield cast(finish(head(hidden)))[rows, positions]
            return
        selected = hidden[rows, positions]
        chunk = max(1, budget // vocab)
        for s in range(0, len(rows), chunk):
            yield cast(finish(head(selected[s : s + chunk])))

    def _forward(self, batch: list[_Window]) -> list[float]:
        hidden, rows, positions, targets = self._hidden(batch)
        token_nll, start = [], 0
        compiled = self.compiled is not None
        for logits in self._selected_logits(hidden, rows, positions, upcast=not compiled):
            chunk_targets = targets[start : start + len(logits)]
            if compiled:
                token_nll.append(self.compiled.token_nll(logits, chunk_targets))
            else:
                token_nll.append(F.cross_entropy(logits, chunk_targets, reduction="none"))
            start += len(logits)
        sums = torch.zeros(len(batch), dtype=torch.float64, device=self.device)
        sums.index_add_(0, rows, torch.cat(token_nll).double())
        return sums.tolist()

    def _forward_damage(self, batch: list[_Window], damage: str) -> list[dict[str, Any]]:
        """Per window: summed NLL (computed exactly as :meth:`_forward` does) and, against the
        full model's reference, summed KL, top-1 agreements and the per-token KL histogram.

        The reference's logits come from the same head on a tensor of the same shape (its kept
        hidden rows scattered into zeros), so a variant equal to the full model gives exactly
        KL 0 and full agreement. In ``"reference"`` mode (the full model itself) the last hidden
        rows are kept for later ``"compare"`` calls, and KL is 0 and agreement full by definition.
        """
        hidden, rows, positions, targets = self._hidden(batch)
        counts = [len(w.ids) - w.first_target for w in batch]
        n_bins = len(KL_HIST_EDGES) - 1
        if damage == "reference":
            selected = hidden[rows, positions]
            for window, part in zip(batch, selected.split(counts)):
                self._reference[window.key] = part.detach().to(self._reference_device, copy=True)
            reference_logits = None
        else:
            missing = [w for w in batch if w.key not in self._reference]
            if missing:
                raise MeasurementError(
                    f"no full-model reference for {self.keys[missing[0].row]}: score the baseline with "
                    "damage='reference' before damage='compare' (run_sweep does this)"
                )
            reference = torch.zeros_like(hidden)
            reference[rows, positions] = torch.cat([self._reference[w.key] for w in batch]).to(
                device=self.device, dtype=hidden.dtype
            )
            reference_logits = self._selected_logits(reference, rows, positions)
        vocab = output_head(self.model)[0].weight.shape[0]
        # log-softmaxes of both models, their difference and product live at once; on CUDA memory is
        # ample and small pieces would make the card launch-bound
        sub = max(1, logit_budget(self.device) // (vocab if self.device.type == "cuda" else 4 * vocab))
        token_nll, token_kl_parts, agree_parts, start = [], [], [], 0
        for logq32 in self._selected_logits(hidden, rows, positions):
            logp32 = next(reference_logits) if reference_logits is not None else None
            if logp32 is not None:
                agree_parts.append(logp32.argmax(dim=-1) == logq32.argmax(dim=-1))
            for s in range(0, len(logq32), sub):
                # cross_entropy is log_softmax + nll_loss: the same NLL as _forward, bit for bit,
                # and the log-probabilities serve the KL too. float32 log-softmaxes summed in float64
                # (token_kl) round by about 1e-7 nats per token, far below any quantization damage.
                logq = torch.log_softmax(logq32[s : s + sub], dim=-1)
                token_nll.append(F.nll_loss(logq, targets[start + s : start + s + len(logq)], reduction="none"))
                if logp32 is not None:
                    token_kl_parts.append(token_kl(torch.log_softmax(logp32[s : s + sub], dim=-1), logq))
            start += len(logq32)
        if reference_logits is None:
            kl = torch.zeros(len(targets), dtype=torch.float64, device=self.device)
            agree = torch.ones(len(targets), dtype=torch.bool, device=self.device)
        else:
            kl, agree = torch.cat(token_kl_parts), torch.cat(agree_parts)
        kl = kl.clamp_min(0.0)  # rounding leaves nearly identical rows a hair below 0
        edges = torch.as_tensor(KL_HIST_EDGES[1:-1], dtype=torch.float64, device=self.device)
        bins = torch.bucketize(kl, edges, right=True)
        hist = torch.bincount(rows * n_bins + bins, minlength=len(batch) * n_bins).reshape(len(batch), n_bins)
        zeros = lambda dtype: torch.zeros(len(batch), dtype=dtype, device=self.device)  # noqa: E731
        out_nll = zeros(torch.float64).index_add_(0, rows, torch.cat(token_nll).double())
        out_kl = zeros(torch.float64).index_add_(0, rows, kl)
        out_agree = zeros(torch.int64).index_add_(0, rows, agree.long())
        return [
            {"nll": a, "kl_nats": b, "top1_agree": c, "kl_hist": h}
            for a, b, c, h in zip(out_nll.tolist(), out_kl.tolist(), out_agree.tolist(), hist.cpu().numpy())
        ]

    def reference_bytes(self) -> int:
        """Memory the damage card's full-model reference takes: one hidden row per scored token."""
        hidden = self.model.get_output_embeddings().weight.shape[1]
        elem = next(self.model.parameters()).element_size()
        return int(self.n_tokens.sum()) * hidden * elem

    def score(
        self, progress: bool = False, prefix: Any = _NO_PREFIX, damage: str | None = None, **columns: Any
    ) -> pd.DataFrame:
        """One row per text: its keys, ``nll``, ``n_tokens``, ``n_bytes`` (+ constant ``columns``).

        ``damage="reference"`` (the full model) / ``"compare"`` (a variant, after a reference
        call on the same scorer) adds the damage card's columns: ``kl_nats`` (summed per-token
        ``KL(p_full || p_variant)`` over the full vocabulary), ``top1_agree`` (share of scored
        tokens whose argmax agrees with the full model's) and ``kl_hist`` (counts of per-token
        KL over :data:`~qhelpers.stats.quantities.KL_HIST_EDGES`, for tail quantiles). NLL stays
        exactly what it is without ``damage``.

        ``prefix``: prefix caching, as in :meth:`score_nll` (e.g. ``scorer.score(prefix=engine)``
        inside ``with engine.applied(variant):``). A value that is not None, an engine or a
        :class:`~qhelpers.quant.prefix_cache.PrefixSignature` is taken as a constant column named
        ``prefix``, as before prefix caching existed.
        """
        if damage is not None and damage not in DAMAGE_MODES:
            raise ConfigError(f"damage must be None, 'reference' or 'compare', got {damage!r}")
        if prefix is _NO_PREFIX:
            prefix = None
        elif not self._is_prefix(prefix):
            columns = {"prefix": prefix, **columns}
            prefix = None
        if damage == "reference":
            need = self.reference_bytes()
            if need > DAMAGE_REFERENCE_BUDGET:
                raise MeasurementError(
                    f"the damage card keeps the full model's last hidden state of every scored token "
                    f"({need / 2**30:.1f} GiB > {DAMAGE_REFERENCE_BUDGET / 2**30:.0f} GiB); score fewer texts, "
                    "or pass MeasureConfig(damage=False) to measure NLL only"
                )
            self._reference = {}
            # on CUDA the reference stays on the GPU when it takes under a quarter of the free memory:
            # copying it to the host and back each batch made the card CPU-bound (1.9x on an H200)
            self._reference_device = torch.device("cpu")
            if self.device.type == "cuda" and need < 0.25 * torch.cuda.mem_get_info(self.device)[0]:
                self._reference_device = self.device
        sums = self._score_batches(progress, self._signature(prefix), damage)
        nll = sums["nll"]
        if not np.all(np.isfinite(nll)):
            bad = [self.keys[i] for i in np.flatnonzero(~np.isfinite(nll))[:3]]
            raise MeasurementError(
                f"non-finite NLL for {bad}: the model produced inf/NaN logits "
                "(check the weights for NaN/inf, or use fp32 instead of fp16)"
            )
        frame = pd.DataFrame(self.keys)
        frame["nll"] = nll
        frame["n_tokens"] = self.n_tokens
        frame["n_bytes"] = self.n_bytes
        if damage is not None:
            frame["kl_nats"] = sums["kl_nats"]
            frame["top1_agree"] = sums["top1_agree"] / np.maximum(self.n_tokens, 1)
            frame["kl_hist"] = [row.tolist() for row in sums["kl_hist"]]
        for key, value in columns.items():
            frame[key] = value
        return frame


def corpus_scorer(loaded: Any, corpus: Any, config: MeasureConfig = MeasureConfig(), tokenizer: Any | None = None) -> Scorer:
    """A :class:`Scorer` over every (lang, text_id, text) of a corpus (``loaded``: a
    LoadedModel, or a bare causal LM together with ``tokenizer``)."""
    keys, texts = [], []
    for lang, text_id, text in corpus.items():
        keys.append({"lang": lang, "text_id": text_id})
        texts.append(text)
    return Scorer(loaded, tokenizer if tokenizer is not None else getattr(loaded, "tokenizer", None), texts, config, keys)


def protocol_measure(protocol: str, max_length: int | None = None, context_length: int | None = None) -> MeasureConfig:
    """How texts are measured under a protocol.

    ``seed``: :meth:`MeasureConfig.seed` (tokenizer output as is, truncated at 256 tokens, one
    text per forward); ``sound``: sliding windows of ``max_length`` tokens. Either is capped at
    ``context_length`` (e.g. ``LoadedModel.context_length``) when that is smaller.
    """
    if protocol == "seed":
        config = MeasureConfig.seed()
    elif protocol == "sound":
        config = MeasureConfig(max_length=max_length)
    else:
        raise ConfigError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    if context_length is not None and config.max_length is not None and config.max_length > context_length:
        config = replace(config, max_length=int(context_length))
    return config

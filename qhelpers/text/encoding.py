"""Token encoding and least-padding batching: the one path every measurement and activation
analysis uses to turn corpus texts into padded batches."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Sequence

import torch

from qhelpers.util.errors import ConfigError, MeasurementError


GPU_BATCH_TOKENS = 16384  # default token budget of the capture loops on CUDA (Scorer sizes its own)

CPU_BATCH_OVERHEAD = 64  # padded tokens one more forward call is worth on CPU (see batch_overhead_tokens)

CPU_BATCH_TOKENS = 2048


def tokenize(tokenizer: Any, text: str, **kwargs: Any) -> Any:
    """``tokenizer(text, **kwargs)`` without transformers' warning that the text is longer than the
    model's maximum length: qhelpers cuts whole texts into windows itself, so that is expected. Other
    tokenizers (any callable returning ``input_ids``) are called as given."""
    transformers = sys.modules.get("transformers")  # not imported: the tokenizer cannot be one of its
    if transformers is not None and isinstance(tokenizer, transformers.PreTrainedTokenizerBase):
        kwargs.setdefault("verbose", False)
    return tokenizer(text, **kwargs)


def encode_text(tokenizer: Any, text: str, prepend_bos: bool | None = None) -> list[int]:
    """Token ids of ``text`` as qhelpers scores them (optionally with a leading BOS)."""
    if not isinstance(text, str) or not text.strip():
        raise MeasurementError(f"cannot score an empty or whitespace-only text ({text!r}); remove it from the corpus")
    ids = list(tokenize(tokenizer, text, add_special_tokens=True)["input_ids"])
    bos = bos_id(tokenizer)
    adds_bos = bool(ids) and bos is not None and ids[0] == bos
    if prepend_bos is None:
        prepend_bos = not adds_bos and bos is not None
    if prepend_bos and not adds_bos:
        if bos is None:
            raise MeasurementError("prepend_bos=True but the tokenizer has neither a BOS nor an EOS token")
        ids = [bos] + ids
    if len(ids) < 2:
        raise MeasurementError(
            f"text {text!r} has fewer than 2 tokens, so no token can be scored; "
            "use a longer text or prepend_bos=True"
        )
    return ids


def bos_id(tokenizer: Any) -> int | None:
    """The id qhelpers prepends as BOS: the tokenizer's BOS, else its EOS (GPT-2 style)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


@dataclass(frozen=True)
class EncodedText:
    """One corpus text as the activation analyses feed it: ``ids`` cut at the length limit,
    ``first`` the position of the first token of the text (1 after a leading BOS)."""

    lang: str
    text_id: str
    text: str
    ids: tuple[int, ...]
    first: int
    truncated: bool


def encode_corpus(
    tokenizer: Any, corpus: Any, max_length: int, prepend_bos: bool | None = None
) -> list[EncodedText]:
    """Every text of ``corpus`` encoded by :func:`encode_text` and cut at ``max_length`` tokens;
    errors name the text."""
    from qhelpers.text.corpora import corpus_items

    bos = bos_id(tokenizer)
    out = []
    for lang, text_id, text in corpus_items(corpus):
        try:
            ids = encode_text(tokenizer, text, prepend_bos)
        except MeasurementError as err:
            raise MeasurementError(f"{lang}/{text_id}: {err}") from None
        truncated = len(ids) > max_length
        ids = ids[:max_length]
        first = 1 if (bos is not None and ids[0] == bos and len(ids) > 1) else 0
        out.append(EncodedText(lang, text_id, text, tuple(int(i) for i in ids), first, truncated))
    return out


def length_batches(
    lengths: Sequence[int],
    batch_tokens: int | None = None,
    max_batch: int = 64,
    overhead_tokens: int = CPU_BATCH_OVERHEAD,
) -> list[list[int]]:
    """Indices grouped into right-padded batches with the least padding.

    Sequences are taken longest first (ties by index) and cut into consecutive groups that
    minimise ``padded tokens + overhead_tokens x number of batches``, exactly (dynamic
    programming over the sorted order, where the optimal groups lie). A batch holds at most
    ``max_batch`` sequences and at most ``batch_tokens`` padded tokens (None: no token
    budget); a single sequence longer than the budget gets a batch of its own.
    ``overhead_tokens`` is what one more forward call costs, in padded tokens: see
    :func:`batch_overhead_tokens` (small on CPU, where padding dominates; large on a GPU,
    where the number of calls does).
    """
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    widths = [int(lengths[i]) for i in order]
    n = len(order)
    cost = [0.0] + [math.inf] * n  # cost[j]: best cost of the first j sequences
    start = [0] * (n + 1)  # start[j]: where the last batch of that best solution starts
    for j in range(1, n + 1):
        for i in range(j - 1, max(-1, j - 1 - max_batch), -1):
            size = j - i
            if size > 1 and batch_tokens is not None and widths[i] * size > batch_tokens:
                break  # widths[i] only grows as i falls, so every smaller i is over budget too
            total = cost[i] + widths[i] * size + overhead_tokens
            if total < cost[j]:
                cost[j], start[j] = total, i
    batches: list[list[int]] = []
    j = n
    while j > 0:
        batches.append(order[start[j]:j])
        j = start[j]
    return batches[::-1]


def batch_overhead_tokens(device: torch.device | str, batch_tokens: int | None = None) -> int:
    """What one more batch costs, in padded tokens, for :func:`length_batches`.

    On CPU a forward call of a small model costs about as much as 40 tokens (measured on
    SmolLM2-135M: ~60 ms per call, ~1.7 ms per token), so padding is what to cut. On a GPU a
    call is latency-bound and a padded token nearly free: one batch is priced like a full
    batch of tokens, so batches are as few as the budget allows and padding is cut among those.
    """
    if torch.device(device).type == "cpu":
        return CPU_BATCH_OVERHEAD
    return int(batch_tokens or default_batch_tokens(device))


def default_batch_tokens(device: torch.device | str) -> int:
    """Token budget of one padded batch when the caller gives none: 2048 on CPU, 16384 on CUDA."""
    return CPU_BATCH_TOKENS if torch.device(device).type == "cpu" else GPU_BATCH_TOKENS


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` ([batch, longest]) of token sequences."""
    width = max(len(seq) for seq in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


class PaddedBatch(NamedTuple):
    """One batch of :func:`iter_padded_batches`: ``index`` lists the positions (in the
    sequences given) of its rows; ``input_ids`` and ``attention_mask`` are ``[batch, longest]``
    as :func:`pad_batch` makes them."""

    index: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def iter_padded_batches(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str,
    batch_tokens: int | None,
    max_batch: int,
    *,
    progress: bool = False,
    desc: str = "batches",
) -> Iterator[PaddedBatch]:
    """Token sequences in the least-padding batches of :func:`length_batches`, right-padded.

    ``batch_tokens`` and ``max_batch`` bound a batch as in :func:`length_batches` (``None``:
    no token budget); what one more batch costs comes from :func:`batch_overhead_tokens` for
    ``device`` (the device the forward runs on). Batches come longest first, the tensors stay
    on the CPU. ``progress`` shows a progress bar labelled ``desc`` over the batches.
    """
    groups = length_batches([len(seq) for seq in sequences], batch_tokens, max_batch,
                            batch_overhead_tokens(device, batch_tokens))
    if progress:
        from qhelpers.util.progress import progress_bar

        groups = progress_bar(groups, desc=desc, leave=False)
    for index in groups:
        input_ids, attention_mask = pad_batch([sequences[i] for i in index], pad_id)
        yield PaddedBatch(index, input_ids, attention_mask)

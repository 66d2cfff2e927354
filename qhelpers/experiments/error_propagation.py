"""Error propagation through the residual stream (seed 004, Gap 2: T-004 / H2.1, T-006 / H2.3).

Both experiments load the model once and, batch by batch, run the full-precision (FP)
forward and then every quantization configuration (a :class:`~qhelpers.quant.engine.Variant`
applied through :class:`~qhelpers.quant.engine.QuantEngine` and restored), comparing each with FP
on the same tokens.

T-004, residual stream theory (:func:`residual_propagation`)
    Configurations (:func:`propagation_variants`, seed 000's names): ``all_quantized``,
    ``last_protected``, ``gateway_protected`` (L0 + L_last) and ``first_protected``. For every
    text, configuration and decoder layer ``l``, against FP:

    * ``cosine``: the mean over the text's tokens of the per-token cosine similarity of the
      residual stream after block ``l`` (:func:`text_cosine`);
    * ``rel_l2``: the mean over the text's tokens of ``||a_q - a_fp|| / ||a_fp||`` per token
      (:func:`text_relative_error`), and ``rel_l2_fro``, the same pooled over the text
      (Frobenius norms; dominated by tokens with massive activations);

    and at the output, ``kl``: the mean over the text's predictions of ``KL(p_fp || p_q)``
    (nats per token, :func:`qhelpers.measure.divergence.kl_divergence`), with ``kl_bpb`` = the
    summed KL in bits per UTF-8 byte of the text (comparable across languages, unlike
    per-token quantities).

T-006, error cancellation (:func:`error_interaction`)
    Configurations (:func:`error_variants`): only layer ``k`` quantized for each ``k`` in a set
    of layers (default 0, 25 %, 50 %, 75 % depth and the last), and only the pair
    (default L0 + L_last) quantized together. Errors are ``e = out(config) - out(fp)`` at two
    sites: ``hidden``, the residual stream after the last block (the raw block output, before
    the final norm), over the text's tokens; ``logprobs``, the log-probabilities of the next
    token over the vocabulary at the positions that predict the text's tokens. Per text:
    Pearson ``r`` of two errors over all their elements (:func:`error_correlation`, seed
    004's ``corrcoef``), for every pair of layers at ``hidden`` and for the pair at
    ``logprobs``; and the additivity of the pair (:func:`error_additivity`)::

        ||e_both||^2  vs  ||e_a||^2 + ||e_b||^2 + 2 <e_a, e_b>  (= ||e_a + e_b||^2),
        interaction = e_both - (e_a + e_b)

    Quantizing only the last layer leaves every activation before it equal to FP (the engine
    changes only that block's weights), so its error is zero before L_last and a correlation
    with it is defined only at or after L_last: that is why both sites are at the output.
    ``before_last`` records the largest difference per layer, absolute and relative to the FP
    activations' largest magnitude. It is exactly 0 where the CPU's kernels are deterministic
    (every machine here); one CI machine gave 2.75e-07 in float32 on the T-006 notebook (two
    forwards of the same batch differed in the last bits there; cause not traced), so the check
    (:meth:`ErrorInteraction.before_last_matches`) allows float rounding, far below what a
    quantization error leaking into an earlier layer would leave (~1e-2 at 4 bits).

Texts are tokenized like :class:`qhelpers.measure.scoring.Scorer` (a leading BOS added when the
tokenizer adds none) and cut at ``max_length`` tokens. The BOS token is run through the model
but left out of the activation metrics (its residual stream is a large, text-independent
attention sink); predictions are those that perplexity scores (BOS position up to the
second-to-last token). Texts are batched by length with right padding and an attention mask;
FP and every configuration see exactly the same batches. By default (``prefix=True``) a
configuration starts from the deepest layer input it shares bit for bit with one run before it
(:mod:`qhelpers.quant.prefix_cache`): "L_last protected" recomputes only the last block after "all
quantized", and the skipped blocks' values are those of the configuration that computed them
(identical results, tested; about 40 % fewer block evaluations for T-004 on a 30-layer model).

Summaries (:func:`text_contrast`, :func:`text_means`, :func:`text_mean`): per-text values
(or per-text contrasts between configurations, paired by construction) averaged over texts
per language, pooled over languages (the mean of the language means) and, given groups, as
the LR-minus-HR difference, each with a bootstrap CI over texts: the interval method of
:mod:`qhelpers.stats` (studentized, with delta-method standard errors, by default; percentile
intervals of a mean undercover at small n). For a parallel corpus (the same text ids in every
language, as UDHR) one resample of text ids serves every language, so pooled and LR-minus-HR
intervals are paired across languages too.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from itertools import combinations
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence, TypedDict

import numpy as np
import pandas as pd
import torch

from qhelpers import stats as _stats
from qhelpers.measure.activations import capture_residual
from qhelpers.measure.divergence import KLReference
from qhelpers.measure.scoring import context_length
from qhelpers.models.archs import decoder_layers, get_arch, resolve_layers
from qhelpers.models.loaded import as_module
from qhelpers.quant.engine import QuantEngine, Variant
from qhelpers.quant.strategies import exp005_variants, quantize_only_variant
from qhelpers.text.encoding import encode_corpus, iter_padded_batches
from qhelpers.util.errors import ConfigError, MeasurementError

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "PROPAGATION_CONFIGS",
    "SITES",
    "text_cosine",
    "text_relative_error",
    "error_correlation",
    "error_additivity",
    "propagation_variants",
    "error_variants",
    "depth_layers",
    "rounding_tolerance",
    "Propagation",
    "residual_propagation",
    "ErrorInteraction",
    "error_interaction",
    "RunOptions",
    "text_contrast",
    "text_means",
    "TextMeansOptions",
    "text_mean",
    "plot_error_growth",
    "plot_language_growth",
    "T004_MIN_EFFECTS",
    "T004_CONTRASTS",
    "t004_claims",
]

#: T-004's configurations (seed 000's names) and what each protects.
PROPAGATION_CONFIGS: dict[str, str] = {
    "all_quantized": "every decoder layer quantized",
    "last_protected": "only L_last protected",
    "gateway_protected": "L0 + L_last protected",
    "first_protected": "only L0 protected",
}
#: Where T-006 measures errors.
SITES: tuple[str, ...] = ("hidden", "logprobs")
BASELINE = "fp"


# ----------------------------------------------------------------------------- per-text metrics


def _f64(x: Any) -> torch.Tensor:
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)


def _check_pair(a: torch.Tensor, b: torch.Tensor, mask: Any) -> torch.Tensor:
    if a.dim() != 3 or a.shape != b.shape:
        raise ConfigError(
            f"activations must be two [batch, seq, hidden] tensors of the same shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    if mask is None:
        return torch.ones(a.shape[:2], dtype=torch.float64)
    m = _f64(mask)
    if tuple(m.shape) != tuple(a.shape[:2]):
        raise ConfigError(f"mask shape {tuple(m.shape)} does not match [batch, seq] = {tuple(a.shape[:2])}")
    if not bool(((m == 0) | (m == 1)).all()):
        raise ConfigError("mask must hold only 0 (left out: padding, BOS) and 1 (a token of the text)")
    if bool((m.sum(dim=1) == 0).any()):
        empty = torch.nonzero(m.sum(dim=1) == 0).flatten().tolist()
        raise MeasurementError(f"sequences {empty} have no token in the mask; nothing to compare")
    return m


def _divergence(a: Any, b: Any, mask: Any, eps: float = 1e-30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(text_cosine, text_relative_error, text_relative_error(pooled=True)) from one float64
    conversion."""
    xa, xb = _f64(a), _f64(b)
    m = _check_pair(xa, xb, mask)
    count = m.sum(dim=1)
    dot = (xa * xb).sum(dim=-1)
    saa, sbb = (xa * xa).sum(dim=-1), (xb * xb).sum(dim=-1)
    cos = dot / torch.sqrt(saa * sbb).clamp_min(eps)
    cos = (cos * m).sum(dim=1) / count
    # ||a - b||^2 per token, computed directly (not as saa + sbb - 2 dot, which cancels)
    diff = ((xa - xb) ** 2).sum(dim=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tok = torch.sqrt(diff) / torch.sqrt(sbb)
        tok = torch.where(diff == 0, torch.zeros_like(tok), tok)  # 0/0: no error
        rel = (torch.where(m > 0, tok, torch.zeros_like(tok))).sum(dim=1) / count
        num, den = torch.sqrt((diff * m).sum(dim=1)), torch.sqrt((sbb * m).sum(dim=1))
        fro = (num / den).numpy()
    fro[(num == 0).numpy()] = 0.0
    return cos.numpy(), rel.numpy(), fro


def text_cosine(a: Any, b: Any, mask: Any = None, eps: float = 1e-30) -> np.ndarray:
    """Per sequence: the mean over masked tokens of the cosine similarity of ``a`` and ``b``
    along the hidden dimension.

    ``a``, ``b``: ``[batch, seq, hidden]``; ``mask``: ``[batch, seq]`` of 0/1 (None: every
    token). Returns a float64 array ``[batch]``. Computed in float64 as
    ``<a, b> / sqrt(|a|^2 |b|^2)``, so identical inputs give exactly 1; a zero vector has
    cosine 0 with everything (denominator clamped at ``eps``), as in
    :func:`qhelpers.measure.activations.cosine_similarity`.
    """
    return _divergence(a, b, mask, eps)[0]


def text_relative_error(a: Any, b: Any, mask: Any = None, pooled: bool = False) -> np.ndarray:
    """Per sequence, the relative L2 error of ``a`` against the reference ``b`` over its
    masked tokens (float64 ``[batch]``).

    Default: the mean over tokens of ``||a_t - b_t|| / ||b_t||`` (0 for an exact token, inf
    where only ``b_t`` is zero). ``pooled=True``: ``||a - b||_F / ||b||_F`` over all masked
    tokens and hidden units, as :func:`qhelpers.measure.activations.residual_divergence`. The pooled
    form is dominated by tokens with massive activations (in SmolLM2 the first token after BOS
    of a Hebrew text carries over 99 % of the squared norm from the middle layers on), so the
    per-token mean is the default, like the cosine.
    """
    cos, rel, fro = _divergence(a, b, mask)
    return fro if pooled else rel


def _flat64(x: Any) -> torch.Tensor:
    return _f64(x).reshape(-1).contiguous()


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    sxx, syy = float(xc.dot(xc)), float(yc.dot(yc))
    if sxx == 0.0 or syy == 0.0:
        return math.nan
    return float(np.clip(float(xc.dot(yc)) / math.sqrt(sxx * syy), -1.0, 1.0))


def error_correlation(e1: Any, e2: Any) -> float:
    """Pearson correlation of two error tensors over all their elements (seed 004's
    ``torch.corrcoef(e1.flatten(), e2.flatten())``), in float64. NaN when either error is
    constant (e.g. identically zero: quantizing L_last alone leaves earlier layers unchanged)."""
    x, y = _flat64(e1), _flat64(e2)
    if x.shape != y.shape or x.numel() < 2:
        raise ConfigError(f"errors must have the same number (>= 2) of elements, got {x.numel()} and {y.numel()}")
    return _pearson(x, y)


def error_additivity(e_a: Any, e_b: Any, e_both: Any) -> dict[str, float]:
    """How the error of quantizing two layers together relates to the two separate errors.

    With ``n_a = ||e_a||^2``, ``n_b = ||e_b||^2``, ``cross = 2 <e_a, e_b>``,
    ``n_both = ||e_both||^2`` and the interaction ``i = e_both - (e_a + e_b)``:

    * ``additive = n_a + n_b + cross`` (= ``||e_a + e_b||^2``: the energy if errors just add);
    * ``energy_ratio = n_both / (n_a + n_b)``: below 1, the joint error is smaller than two
      independent errors would be (partial cancellation); 1 for orthogonal additive errors;
    * ``cross_share = cross / (n_a + n_b)`` in [-1, 1]: negative when the separate errors
      point in opposite directions;
    * ``interaction = ||i||^2`` and ``interaction_share = ||i|| / ||e_both||``: 0 when the
      joint error is exactly the sum of the separate ones;
    * ``r``: :func:`error_correlation` of ``e_a`` and ``e_b``.

    Identity (tested): ``n_both = additive + 2 <e_a + e_b, i> + interaction``.
    """
    a, b, ab = _flat64(e_a), _flat64(e_b), _flat64(e_both)
    if not (a.shape == b.shape == ab.shape):
        raise ConfigError(f"errors must have the same size, got {a.numel()}, {b.numel()} and {ab.numel()}")
    n_a, n_b = float(a.dot(a)), float(b.dot(b))
    cross = 2.0 * float(a.dot(b))
    n_both = float(ab.dot(ab))
    inter = ab - a - b
    n_i = float(inter.dot(inter))
    sep = n_a + n_b
    return {
        "n_a": n_a,
        "n_b": n_b,
        "cross": cross,
        "n_both": n_both,
        "additive": n_a + n_b + cross,
        "interaction": n_i,
        "energy_ratio": n_both / sep if sep > 0 else math.nan,
        "cross_share": cross / sep if sep > 0 else math.nan,
        "interaction_share": math.sqrt(n_i / n_both) if n_both > 0 else math.nan,
        "r": _pearson(a, b) if a.numel() >= 2 else math.nan,
    }


# ----------------------------------------------------------------------------- configurations


def propagation_variants(n_layers: int, protocol: str = "sound", bits: int = 4) -> dict[str, Variant]:
    """T-004's four configurations (:data:`PROPAGATION_CONFIGS`), taken from
    :func:`qhelpers.quant.strategies.exp005_variants` (under ``protocol="seed"`` per-tensor INT-b on
    every weight of the decoder layers; embeddings, final norm and LM head stay FP)."""
    every = exp005_variants(n_layers, protocol=protocol, bits=bits)
    return {name: every[name] for name in PROPAGATION_CONFIGS}


def rounding_tolerance(dtype: str | torch.dtype) -> float:
    """Largest relative difference that two evaluations of the same layers may show from float
    rounding alone (kernels that sum in another order): 1000 units in the last place of ``dtype``,
    at most 1e-3 (float32 1.2e-4, float64 2.2e-13, bf16 and fp16 1e-3). A 4-bit quantization
    error reaching a layer changes it by ~1e-2 relative, above every one of these."""
    if isinstance(dtype, str):
        name, dtype = dtype, getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError(f"not a floating-point torch dtype name: {name!r} (e.g. 'float32')")
    return min(1000 * torch.finfo(dtype).eps, 1e-3)


def depth_layers(n_layers: int, fractions: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> list[int]:
    """Layers at the given fractions of depth, ``f * (n_layers - 1)`` rounded half up,
    de-duplicated and ascending (default: 0, 25 %, 50 %, 75 %, last; for 30 layers
    0, 7, 15, 22, 29)."""
    if n_layers < 1:
        raise ConfigError(f"the model needs at least one decoder layer, got {n_layers}")
    bad = [f for f in fractions if not 0.0 <= float(f) <= 1.0]
    if bad or not len(fractions):
        raise ConfigError(f"depth fractions must be a non-empty list of numbers in [0, 1], got {list(fractions)}")
    return sorted({int(math.floor(float(f) * (n_layers - 1) + 0.5)) for f in fractions})


def _only_name(layers: Sequence[int]) -> str:
    return "quantize_" + "+".join(f"L{i}" for i in layers)


def error_variants(
    n_layers: int,
    layers: Iterable[int] | None = None,
    pair: Sequence[int] | None = None,
    protocol: str = "sound",
    bits: int = 4,
) -> dict[str, Variant]:
    """T-006's configurations: ``quantize_L{k}`` (only layer ``k`` quantized) for every ``k``
    in ``layers`` and in ``pair``, and ``quantize_L{a}+L{b}`` (only the pair quantized).

    ``layers`` default :func:`depth_layers`; ``pair`` default ``(0, n_layers - 1)``. Only
    decoder-layer weights are quantized, under either protocol.
    """
    chosen = depth_layers(n_layers) if layers is None else resolve_layers(list(layers), n_layers)
    a, b = _resolve_pair(pair, n_layers)
    out: dict[str, Variant] = {}
    for k in sorted(set(chosen) | {a, b}):
        out[_only_name([k])] = quantize_only_variant(_only_name([k]), [k], n_layers, protocol, bits)
    out[_only_name([a, b])] = quantize_only_variant(_only_name([a, b]), [a, b], n_layers, protocol, bits)
    return out


def _resolve_pair(pair: Sequence[int] | None, n_layers: int) -> tuple[int, int]:
    if n_layers < 2:
        raise ConfigError(f"an error pair needs at least 2 decoder layers, the model has {n_layers}")
    if pair is None:
        return 0, n_layers - 1
    if isinstance(pair, (str, bytes)) or len(pair) != 2:
        raise ConfigError(f"pair must be two layer indices such as (0, -1), got {pair!r}")
    a, b = resolve_layers([pair[0]], n_layers)[0], resolve_layers([pair[1]], n_layers)[0]
    if a == b:
        raise ConfigError(f"pair must name two different layers, got {pair!r} (both layer {a})")
    return min(a, b), max(a, b)


# ----------------------------------------------------------------------------- tokenization


@dataclass(frozen=True)
class _Text:
    lang: str
    text_id: str
    ids: tuple[int, ...]
    first: int  # position of the first token of the text (1 after a BOS that is left out)
    n_bytes: int
    truncated: bool


def _encode(loaded: Any, corpus: Any, max_length: int | None, prepend_bos: bool | None) -> list[_Text]:
    model = as_module(loaded)
    tokenizer = getattr(loaded, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("propagation needs a tokenizer: pass the LoadedModel of load_model(...)")
    if max_length is not None and int(max_length) < 3:
        raise ConfigError(f"max_length must be >= 3 tokens (BOS + 2 tokens of text) or None, got {max_length}")
    limit = context_length(model)
    max_length = limit if max_length is None else min(int(max_length), limit)
    texts = []
    for t in encode_corpus(tokenizer, corpus, max_length, prepend_bos):
        if len(t.ids) - t.first < 2:
            raise MeasurementError(f"{t.lang}/{t.text_id} has fewer than 2 tokens of text; remove it from the corpus")
        if t.truncated:  # bytes of the kept tokens (byte-level BPE may split a character at the cut)
            n_bytes = len(tokenizer.decode(list(t.ids[t.first:])).encode("utf-8"))
        else:
            n_bytes = len(t.text.encode("utf-8"))
        texts.append(_Text(t.lang, t.text_id, t.ids, t.first, max(n_bytes, 1), t.truncated))
    return texts


@dataclass
class _Batch:
    rows: list[_Text]
    ids: torch.Tensor
    attention: torch.Tensor
    text_mask: torch.Tensor  # tokens of the text (BOS and padding left out)


class RunOptions(TypedDict, total=False):
    """How :func:`residual_propagation` and :func:`error_interaction` run (defaults in brackets).

    ``max_length``: tokens per text, BOS included, at most the model's context [256; None: the
    context]. ``prepend_bos``: as :func:`qhelpers.text.encoding.encode_text` [None].
    ``batch_tokens``: padded tokens per batch [1024 on CPU, 8192 on CUDA, fewer for a large
    vocabulary so that a batch's float64 log-probabilities stay within
    :data:`qhelpers.measure.scoring.LOGIT_BUDGET` elements]. ``max_batch``: texts per batch
    [64]. ``engine``: the :class:`~qhelpers.quant.engine.QuantEngine` of the model [a new one].
    ``prefix``: reuse the layers a configuration shares with one run before it [True; see
    :class:`_Runner`; results are identical, tested]. ``progress``: a progress bar over the
    batches [False].
    """

    max_length: int | None
    prepend_bos: bool | None
    batch_tokens: int | None
    max_batch: int
    engine: QuantEngine | None
    prefix: bool
    progress: bool


class _Runner:
    """One model, its engine, its texts' encoding and batching (:class:`RunOptions`), and
    forwards that capture block outputs and log-probabilities.

    With ``prefix`` (default), configurations run in :func:`qhelpers.quant.prefix_cache.run_order` and
    each starts from the deepest layer input it shares, bit for bit, with a configuration run
    before it on the same batch (:class:`qhelpers.quant.prefix_cache.PrefixCache`): e.g. "L_last
    protected" only recomputes the last layer after "all quantized". The blocks it skips
    returned exactly what they returned for that earlier configuration (same weights, same
    inputs), so their values are taken from it (:meth:`producer`).
    """

    def __init__(self, loaded: Any, *, max_length: int | None = 256, prepend_bos: bool | None = None,
                 batch_tokens: int | None = None, max_batch: int = 64, engine: QuantEngine | None = None,
                 prefix: bool = True, progress: bool = False) -> None:
        from qhelpers.measure.scoring import LOGIT_BUDGET, output_head
        from qhelpers.quant.prefix_cache import (
            UNSUPPORTED_ARCHS,
            PrefixCache,
            default_budget,
        )

        self.loaded = loaded
        self.max_length, self.prepend_bos, self.progress = max_length, prepend_bos, progress
        self.model = as_module(loaded)
        self.arch = get_arch(self.model)
        self.n_layers = len(decoder_layers(self.model, self.arch))
        self.engine = engine or QuantEngine(loaded)
        if self.engine.model is not self.model:
            raise ConfigError("engine was built for another model; pass QuantEngine(loaded) of this LoadedModel")
        if self.engine.active is not None:
            raise ConfigError(f"variant {self.engine.active.name!r} is still applied to the engine; restore() it first")
        self.head, self.finish = output_head(self.model)
        self.tokenizer = getattr(loaded, "tokenizer", None)
        self.device = device = next(self.model.parameters()).device
        vocab = int(self.head.weight.shape[0])
        # float64 log-probabilities of a batch stay within LOGIT_BUDGET elements
        default = min(8192 if device.type == "cuda" else 1024, max(64, LOGIT_BUDGET // vocab))
        self.budget = int(batch_tokens or default)
        if self.budget < 1 or max_batch < 1:
            raise ConfigError(f"batch_tokens and max_batch must be >= 1, got {batch_tokens} and {max_batch}")
        self.max_batch = int(max_batch)
        use = prefix and self.model.config.model_type not in UNSUPPORTED_ARCHS
        self.cache = PrefixCache(default_budget(self.model, device)) if use else None
        self.order: list[str] = []
        self.variants: dict[str, Variant] = {}
        self.signatures: dict[str, Any] = {}
        self.layers_run = 0

    def encode(self, corpus: Any) -> list[_Text]:
        """The texts of ``corpus`` encoded and cut at ``max_length`` tokens."""
        return _encode(self.loaded, corpus, self.max_length, self.prepend_bos)

    def batches(self, texts: list[_Text], desc: str) -> Iterator[_Batch]:
        """``texts`` in least-padding batches under this runner's token budget (a progress
        bar labelled ``desc`` if ``progress``)."""
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for index, ids, attention in iter_padded_batches([t.ids for t in texts], pad_id, self.device, self.budget,
                                                         self.max_batch, progress=self.progress, desc=desc):
            rows = [texts[i] for i in index]
            text_mask = attention.clone()
            for r, t in enumerate(rows):
                text_mask[r, : t.first] = 0
            yield _Batch(rows, ids, attention, text_mask)

    def plan(self, variants: Mapping[str, Variant]) -> list[str]:
        """Run order (FP first) and prefix signatures of ``{name: variant}`` plus FP."""
        from qhelpers.quant.prefix_cache import prefix_signatures, run_order

        self.variants = {BASELINE: Variant(BASELINE), **variants}
        names = list(self.variants)
        sigs = prefix_signatures(self.engine, list(self.variants.values()))
        self.signatures = dict(zip(names, sigs))
        self.order = [names[i] for i in run_order(sigs, baseline=0)] if self.cache is not None else names
        return self.order

    def producer(self, name: str, depth: int) -> str:
        """The first configuration run before ``name`` that computes the same input of layer
        ``depth`` (so the same outputs of layers ``0..depth-1``)."""
        key = self.signatures[name].boundaries[depth]
        for other in self.order[: self.order.index(name)]:
            if self.signatures[other].boundaries[depth] == key:
                return other
        raise MeasurementError(f"no configuration before {name!r} shares layer {depth}'s input")  # pragma: no cover

    def run(self, index: int, batch: _Batch, name: str, layers: list[int], logprobs: bool,
            replay: bool = True) -> tuple[dict[int, torch.Tensor], list[torch.Tensor] | None, int]:
        """:meth:`forward` under configuration ``name``; also returns the number of leading
        blocks replayed from the cache (their captured values are NOT their outputs: take
        layers ``< depth - 1`` from :meth:`producer`)."""
        with self.engine.applied(self.variants[name]):
            if self.cache is None or not replay:
                acts, logp = self.forward(batch, layers, logprobs)
                depth = 0
            else:
                with self.cache.session(self.model, self.signatures[name]) as session:
                    (acts, logp), depth = session.run_batch(index, lambda: self.forward(batch, layers, logprobs))
        self.layers_run += self.n_layers - depth
        return acts, logp, depth

    def end_batch(self) -> None:
        if self.cache is not None:
            self.cache.clear()

    def forward(self, batch: _Batch, layers: list[int], logprobs: bool) -> tuple[dict[int, torch.Tensor], list[torch.Tensor] | None]:
        """Block outputs of ``layers`` (fp32 CPU) and, if asked, per text the float64 CPU
        log-probabilities ``[n_predictions, vocab]`` at the positions that predict its tokens
        (float64 so that small KL divergences and log-probability errors keep their digits)."""
        box: dict[str, torch.Tensor] = {}
        handle = self.head.register_forward_hook(lambda m, a, out: box.__setitem__("logits", out)) if logprobs else None
        try:
            acts = capture_residual(self.model, batch.ids, batch.attention, layers=layers, arch=self.arch,
                                    stop_early=not logprobs)
        finally:
            if handle is not None:
                handle.remove()
        if not logprobs:
            return acts, None
        if "logits" not in box:
            raise MeasurementError("the LM head never ran in the forward pass; check model.get_output_embeddings()")
        logits = box.pop("logits")
        out = []
        for r, t in enumerate(batch.rows):
            rows = logits[r, : len(t.ids) - 1]
            out.append(torch.log_softmax(self.finish(rows).to(device="cpu", dtype=torch.float64), dim=-1))
        return acts, out


def _check_variants(variants: Mapping[str, Variant]) -> dict[str, Variant]:
    if not isinstance(variants, Mapping) or not variants:
        raise ConfigError("variants must be a non-empty dict name -> Variant (e.g. propagation_variants(n_layers))")
    for name, v in variants.items():
        if not isinstance(v, Variant):
            raise ConfigError(f"variant {name!r} must be a qhelpers.quant.engine.Variant, got {type(v).__name__}")
        if name == BASELINE:
            raise ConfigError(f"{BASELINE!r} names the FP reference, which is always run; give the variant another name")
    return dict(variants)


# ----------------------------------------------------------------------------- T-004


@dataclass
class Propagation:
    """Per-text divergence from FP of every configuration (T-004).

    ``layers``: one row per (lang, text_id, config, layer) with ``cosine``, ``rel_l2`` (mean
    per-token relative error), ``rel_l2_fro`` (pooled over the text, see
    :func:`text_relative_error`) and ``n_tokens``. ``logits``: one row per (lang, text_id, config) with ``kl`` (mean KL(fp||q)
    per prediction, nats), ``kl_sum`` (nats), ``kl_bpb`` (``kl_sum / ln 2 / n_bytes``),
    ``n_predictions``, ``n_bytes`` and ``truncated``.
    """

    layers: pd.DataFrame
    logits: pd.DataFrame
    variants: dict[str, Variant]
    n_layers: int
    seconds: float = 0.0
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def last(self) -> int:
        return self.n_layers - 1

    def curve(self, metric: str = "rel_l2", **options: Unpack[TextMeansOptions]) -> pd.DataFrame:
        """The error growth curve: :func:`text_means` of ``metric`` (``rel_l2``, ``rel_l2_fro``
        or ``cosine``) by config and layer (``options``: :class:`TextMeansOptions`)."""
        if metric not in ("rel_l2", "rel_l2_fro", "cosine"):
            raise ConfigError(f"metric must be 'rel_l2', 'rel_l2_fro' or 'cosine', got {metric!r}")
        return text_means(self.layers, metric, by=["config", "layer"], **options)

    def layer_contrast(self, weights: Mapping[str, float], metric: str = "cosine",
                       **options: Unpack[TextMeansOptions]) -> pd.DataFrame:
        """At every measured layer, :func:`text_means` of the per-text contrast
        ``sum_c weights[c] * metric(c)`` (:func:`text_contrast`); e.g.
        ``{"gateway_protected": 1, "last_protected": -1}`` is the gain from protecting L0 too.
        The contrast's columns are named ``value``; ``options``: :class:`TextMeansOptions`."""
        frames = [text_contrast(self.layers, metric, weights, layer=layer).assign(layer=layer)
                  for layer in sorted(set(self.layers["layer"]))]
        return text_means(pd.concat(frames, ignore_index=True), "value", by=["layer"], **options)


def residual_propagation(
    loaded: Any,
    corpus: Any,
    variants: Mapping[str, Variant] | None = None,
    *,
    protocol: str = "sound",
    bits: int = 4,
    layers: int | Iterable[int] | None = None,
    **run: Unpack[RunOptions],
) -> Propagation:
    """T-004: how far every configuration's residual stream and output drift from FP, per
    text and layer (see the module docstring).

    ``variants`` default :func:`propagation_variants` (``protocol``, ``bits``); any
    ``{name: Variant}`` works (a name other than ``"fp"``). ``layers``: the blocks measured
    (default every one). ``run``: text length, batching, engine and prefix reuse
    (:class:`RunOptions`).
    """
    start = time.perf_counter()
    runner = _Runner(loaded, **run)
    variants = _check_variants(variants if variants is not None else propagation_variants(runner.n_layers, protocol, bits))
    order = runner.plan(variants)
    chosen = resolve_layers(layers, runner.n_layers)
    texts = runner.encode(corpus)
    layer_rows: list[dict[str, Any]] = []
    logit_rows: list[dict[str, Any]] = []
    for batch_index, batch in enumerate(runner.batches(texts, "T-004 batches")):
        fp_acts, fp_logp, _ = runner.run(batch_index, batch, BASELINE, chosen, True)
        fp_parts = [KLReference(lp) for lp in fp_logp]
        del fp_logp
        ones, zeros = np.ones(len(batch.rows)), np.zeros(len(batch.rows))
        metrics: dict[str, dict[int, tuple[np.ndarray, ...]]] = {BASELINE: {l: (ones, zeros, zeros) for l in chosen}}
        for name in order[1:]:
            acts, logp, depth = runner.run(batch_index, batch, name, chosen, True)
            source = metrics[runner.producer(name, depth)] if depth else {}
            metrics[name] = {
                layer: source[layer] if layer < depth - 1 else _divergence(acts[layer], fp_acts[layer], batch.text_mask)
                for layer in chosen
            }
            for r, t in enumerate(batch.rows):
                n_tok = len(t.ids) - t.first
                for layer in chosen:
                    cos, rel, fro = metrics[name][layer]
                    layer_rows.append({"lang": t.lang, "text_id": t.text_id, "config": name, "layer": layer,
                                       "cosine": float(cos[r]), "rel_l2": float(rel[r]), "rel_l2_fro": float(fro[r]),
                                       "n_tokens": n_tok})
                kl = fp_parts[r].divergence(logp[r])
                kl_sum = float(kl.sum())
                logit_rows.append({"lang": t.lang, "text_id": t.text_id, "config": name, "kl": kl_sum / len(kl),
                                   "kl_sum": kl_sum, "kl_bpb": _stats.bits_per_byte(kl_sum, t.n_bytes), "n_predictions": len(kl),
                                   "n_bytes": t.n_bytes, "truncated": t.truncated})
            del acts, logp
        runner.end_batch()
    text_order = {(t.lang, t.text_id): i for i, t in enumerate(texts)}
    cfg = {name: i for i, name in enumerate(variants)}
    layer_df = pd.DataFrame(layer_rows, columns=["lang", "text_id", "config", "layer", "cosine", "rel_l2", "rel_l2_fro",
                                                 "n_tokens"])
    logit_df = pd.DataFrame(logit_rows, columns=["lang", "text_id", "config", "kl", "kl_sum", "kl_bpb",
                                                 "n_predictions", "n_bytes", "truncated"])
    layer_df = _sort(layer_df, text_order, cfg, ["layer"])
    logit_df = _sort(logit_df, text_order, cfg, [])
    params = {"protocol": protocol, "bits": bits, "max_length": runner.max_length, "layers": chosen,
              "run_order": order, "layers_run": runner.layers_run}
    return Propagation(layer_df, logit_df, variants, runner.n_layers, time.perf_counter() - start, params)


def _sort(df: pd.DataFrame, order: Mapping, cfg: Mapping, extra: list[str]) -> pd.DataFrame:
    key = pd.Series([order[(a, b)] for a, b in zip(df["lang"], df["text_id"])], index=df.index)
    df = df.assign(_text=key, _cfg=df["config"].map(cfg))
    return df.sort_values(["_cfg", *extra, "_text"], kind="stable").drop(columns=["_text", "_cfg"]).reset_index(drop=True)


# ----------------------------------------------------------------------------- T-006


@dataclass
class ErrorInteraction:
    """Per-text error correlations and additivity (T-006).

    ``pairs``: one row per (lang, text_id, site, layer_a, layer_b) with ``r``: every pair of
    ``layers`` at ``hidden``, and the ``pair`` at ``logprobs``. ``additivity``: one row per
    (lang, text_id, site) for the ``pair`` with the columns of :func:`error_additivity`.
    Both also hold ``r_scaled``: the correlation after dividing each token's (position's)
    errors by the norm of the FP vector there, so that a few tokens with massive activations
    do not dominate (``r`` is seed 004's statistic on the raw errors). ``before_last``: per
    layer below the last, the largest absolute difference from FP when only the last layer is
    quantized (``max_abs_diff``; ``rel_diff``: divided by that layer's largest FP magnitude), 0
    by construction, measured (see :meth:`before_last_matches`). ``rel_error``: per (lang,
    text_id, site, config) the mean over tokens (positions) of ``||e_t|| / ||out_fp_t||``.
    """

    pairs: pd.DataFrame
    additivity: pd.DataFrame
    before_last: pd.DataFrame
    rel_error: pd.DataFrame
    variants: dict[str, Variant]
    layers: list[int]
    pair: tuple[int, int]
    n_layers: int
    seconds: float = 0.0
    parameters: dict[str, Any] = field(default_factory=dict)

    def before_last_matches(self, tolerance: float | None = None) -> bool:
        """Whether every layer before L_last equals FP, up to ``tolerance`` relative to the FP
        activations' scale (``rel_diff``). None: :func:`rounding_tolerance` of the dtype the
        activations were computed in."""
        if tolerance is None:
            tolerance = rounding_tolerance(self.parameters.get("dtype", "float32"))
        return bool((self.before_last["rel_diff"] <= tolerance).all())

    def matrix(self, site: str = "hidden", lang: str | None = None, column: str = "r") -> pd.DataFrame:
        """Symmetric layer x layer matrix of the mean per-text ``column`` (``r`` or
        ``r_scaled``; over all texts, or one language's) for a figure (intervals:
        :meth:`matrix_table`). The diagonal (an error with itself, trivially 1) is NaN so
        that a colour scale fits the off-diagonal values."""
        df = self.pairs[self.pairs["site"] == site]
        if lang is not None:
            if lang not in set(df["lang"]):
                raise ConfigError(f"language {lang!r} not measured; languages: {sorted(set(df['lang']))}")
            df = df[df["lang"] == lang]
        layers = sorted(set(df["layer_a"]) | set(df["layer_b"]))
        if not layers:
            raise ConfigError(f"no pairs at site {site!r}; sites: {sorted(set(self.pairs['site']))}")
        m = pd.DataFrame(np.full((len(layers), len(layers)), np.nan), index=layers, columns=layers)
        means = df.groupby(["layer_a", "layer_b"])[column].mean()
        for (a, b), v in means.items():
            m.loc[a, b] = m.loc[b, a] = v
        m.index.name = m.columns.name = "layer"
        return m

    def _site(self, frame: pd.DataFrame, site: str) -> pd.DataFrame:
        if site not in SITES:
            raise ConfigError(f"site must be one of {SITES}, got {site!r}")
        return frame[frame["site"] == site]

    def matrix_table(self, site: str = "hidden", column: str = "r",
                     **options: Unpack[TextMeansOptions]) -> pd.DataFrame:
        """:func:`text_means` of ``column`` (``r`` or ``r_scaled``) for every pair of layers
        measured at ``site`` (``options``: :class:`TextMeansOptions`)."""
        return text_means(self._site(self.pairs, site), column, by=["layer_a", "layer_b"], **options)

    def summary(self, site: str = "hidden",
                columns: Sequence[str] = ("r", "r_scaled", "cross_share", "energy_ratio", "interaction_share"),
                **options: Unpack[TextMeansOptions]) -> pd.DataFrame:
        """The pair's additivity quantities at ``site``: one :func:`text_means` block per
        quantity (column ``quantity``), values in ``value``, ``value_ci_low``, ``value_ci_high``
        (``options``: :class:`TextMeansOptions`)."""
        df = self._site(self.additivity, site)
        out = []
        for q in columns:
            if q not in df.columns:
                raise ConfigError(f"unknown quantity {q!r}; choose from {list(df.columns[3:])}")
            t = text_means(df, q, **options)
            t = t.rename(columns={q: "value", f"{q}_ci_low": "value_ci_low", f"{q}_ci_high": "value_ci_high"})
            out.append(t.assign(quantity=q, site=site))
        cols = ["site", "quantity", "lang", "value", "value_ci_low", "value_ci_high", "n", "defined", "reason"]
        return pd.concat(out, ignore_index=True)[cols]

    def estimate(self, column: str = "r", site: str = "hidden", langs: Sequence[str] | None = None,
                 minus: Sequence[str] | None = None, *, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> _stats.Estimate:
        """:func:`text_mean` of one additivity quantity of the pair at ``site`` (for a verdict)."""
        df = self._site(self.additivity, site)
        if column not in df.columns:
            raise ConfigError(f"unknown quantity {column!r}; choose from {list(df.columns[3:])}")
        return text_mean(df, column, langs, minus, n_boot=n_boot, seed=seed, level=level)


def error_interaction(
    loaded: Any,
    corpus: Any,
    *,
    layers: int | Iterable[int] | None = None,
    pair: Sequence[int] | None = None,
    protocol: str = "sound",
    bits: int = 4,
    **run: Unpack[RunOptions],
) -> ErrorInteraction:
    """T-006: errors of quantizing single layers, their correlations, and the additivity of
    the ``pair`` (default L0 + L_last); see the module docstring and :func:`error_variants`.
    Arguments as in :func:`residual_propagation`. The configuration that quantizes only the
    last layer always runs every layer (no prefix reuse), so ``before_last`` is measured."""
    start = time.perf_counter()
    runner = _Runner(loaded, **run)
    n = runner.n_layers
    last = n - 1
    a, b = _resolve_pair(pair, n)
    chosen = depth_layers(n) if layers is None else resolve_layers(layers, n)
    if len(chosen) < 2:
        raise ConfigError(f"layers must name at least 2 layers for a correlation matrix, got {chosen}")
    variants = error_variants(n, chosen, (a, b), protocol, bits)
    single = {k: _only_name([k]) for k in sorted(set(chosen) | {a, b})}
    both = _only_name([a, b])
    texts = runner.encode(corpus)
    order = runner.plan(variants)
    early = list(range(last)) if last in single else []
    pair_rows: list[dict[str, Any]] = []
    add_rows: list[dict[str, Any]] = []
    rel_rows: list[dict[str, Any]] = []
    before: dict[int, float] = {i: 0.0 for i in early}
    scale: dict[int, float] = {i: 0.0 for i in early}
    for batch_index, batch in enumerate(runner.batches(texts, "T-006 batches")):
        fp_acts, fp_logp, _ = runner.run(batch_index, batch, BASELINE, early + [last], True)
        hidden: dict[str, torch.Tensor] = {}
        logp_err: dict[str, list[torch.Tensor]] = {}
        for name in order[1:]:
            want_logp = name in (single[a], single[b], both)
            check = name == single.get(last)
            # the last layer's output is right even when earlier blocks were replayed
            acts, logp, _ = runner.run(batch_index, batch, name, early + [last] if check else [last], want_logp,
                                       replay=not check)
            hidden[name] = acts[last].double() - fp_acts[last].double()
            if check:
                for i in early:
                    keep = batch.attention[..., None]
                    before[i] = max(before[i], float(((acts[i] - fp_acts[i]).abs() * keep).max()))
                    scale[i] = max(scale[i], float((fp_acts[i].abs() * keep).max()))
            if want_logp:
                logp_err[name] = [(q - p).float() for q, p in zip(logp, fp_logp)]  # float32 keeps memory low
            del acts, logp
        for r, t in enumerate(batch.rows):
            sl = slice(t.first, len(t.ids))
            e_hidden = {name: err[r, sl] for name, err in hidden.items()}
            e_logp = {name: err[r] for name, err in logp_err.items()}
            # errors of each token (position) relative to the FP vector's norm there
            norm_h = fp_acts[last][r, sl].double().norm(dim=-1, keepdim=True).clamp_min(1e-30)
            norm_l = fp_logp[r].norm(dim=-1, keepdim=True).clamp_min(1e-30)
            s_hidden = {name: e / norm_h for name, e in e_hidden.items()}
            s_logp = {name: e.double() / norm_l for name, e in e_logp.items()}
            key = {"lang": t.lang, "text_id": t.text_id}
            for name in variants:
                rel_rows.append({**key, "site": "hidden", "config": name,
                                 "rel_error": float(s_hidden[name].norm(dim=-1).mean())})
                if name in s_logp:
                    rel_rows.append({**key, "site": "logprobs", "config": name,
                                     "rel_error": float(s_logp[name].norm(dim=-1).mean())})
            for i, j in combinations(chosen, 2):
                pair_rows.append({**key, "site": "hidden", "layer_a": i, "layer_b": j,
                                  "r": error_correlation(e_hidden[single[i]], e_hidden[single[j]]),
                                  "r_scaled": error_correlation(s_hidden[single[i]], s_hidden[single[j]])})
            for site_name, e, sc in (("hidden", e_hidden, s_hidden), ("logprobs", e_logp, s_logp)):
                add_rows.append({**key, "site": site_name, **error_additivity(e[single[a]], e[single[b]], e[both]),
                                 "r_scaled": error_correlation(sc[single[a]], sc[single[b]])})
            pair_rows.append({**key, "site": "logprobs", "layer_a": a, "layer_b": b, "r": add_rows[-1]["r"],
                              "r_scaled": add_rows[-1]["r_scaled"]})
        del hidden, logp_err, fp_acts, fp_logp
        runner.end_batch()
    text_order = {(t.lang, t.text_id): i for i, t in enumerate(texts)}
    site = {s: i for i, s in enumerate(SITES)}

    def tidy(rows: list[dict[str, Any]], extra: list[str]) -> pd.DataFrame:
        df = pd.DataFrame(rows)
        df = df.assign(_t=[text_order[(x, y)] for x, y in zip(df["lang"], df["text_id"])], _s=df["site"].map(site))
        return df.sort_values(["_s", *extra, "_t"], kind="stable").drop(columns=["_t", "_s"]).reset_index(drop=True)

    pairs = tidy(pair_rows, ["layer_a", "layer_b"])
    additivity = tidy(add_rows, [])
    rel = tidy(rel_rows, [])
    before_df = pd.DataFrame({"layer": list(before), "max_abs_diff": list(before.values()),
                              "rel_diff": [d / scale[i] if scale[i] > 0 else d for i, d in before.items()]})
    dtype = str(next(as_module(loaded).parameters()).dtype).removeprefix("torch.")
    params = {"dtype": dtype, "protocol": protocol, "bits": bits, "max_length": runner.max_length, "layers": chosen,
              "pair": [a, b], "run_order": order, "layers_run": runner.layers_run}
    return ErrorInteraction(pairs, additivity, before_df, rel, variants, chosen, (a, b), n,
                            time.perf_counter() - start, params)


# ----------------------------------------------------------------------------- summaries


def text_contrast(
    frame: pd.DataFrame,
    value: str,
    weights: Mapping[str, float],
    key: str = "config",
    **where: Any,
) -> pd.DataFrame:
    """Per text, ``sum_c weights[c] * value(c)`` over the ``key`` values ``c`` (configs), after
    keeping the rows where each ``where`` column equals its value (e.g. ``layer=29``).

    E.g. ``{"gateway_protected": 1, "last_protected": -1}`` is the per-text difference
    between the two. Returns columns ``lang, text_id, value``; every text must have a row for
    every weighted config (else MeasurementError), so the contrast is paired.
    """
    if not isinstance(frame, pd.DataFrame):
        raise ConfigError(f"frame must be a DataFrame of per-text values, got {type(frame).__name__}")
    if not weights:
        raise ConfigError("weights must map at least one config to a number, e.g. {'a': 1, 'b': -1}")
    for col in ("lang", "text_id", key, value, *where):
        if col not in frame.columns:
            raise ConfigError(f"frame has no column {col!r}; columns: {list(frame.columns)}")
    df = frame
    for col, v in where.items():
        df = df[df[col] == v]
        if df.empty:
            raise ConfigError(f"no rows with {col} == {v!r}; values present: {sorted(set(frame[col]))[:10]}")
    missing = [c for c in weights if c not in set(df[key])]
    if missing:
        raise ConfigError(f"{key} values {missing} not in the frame; present: {list(dict.fromkeys(df[key]))}")
    df = df[df[key].isin(list(weights))]
    if df.duplicated(["lang", "text_id", key]).any():
        raise ConfigError(
            f"several rows per (lang, text_id, {key}); select one with where=..., e.g. layer=..., site=..."
        )
    wide = df.pivot(index=["lang", "text_id"], columns=key, values=value)
    if wide.isna().to_numpy().any() and not df[value].isna().any():
        raise MeasurementError("some texts lack a row for one of the weighted configs; the contrast must be paired")
    out = sum(float(w) * wide[c].astype(np.float64) for c, w in weights.items())
    order = list(dict.fromkeys(zip(df["lang"], df["text_id"])))
    out = out.reindex(pd.MultiIndex.from_tuples(order, names=["lang", "text_id"]))
    return out.rename("value").reset_index()


def _lang_values(frame: pd.DataFrame, value: str) -> dict[str, pd.Series]:
    for col in ("lang", "text_id", value):
        if col not in frame.columns:
            raise ConfigError(f"frame has no column {col!r}; columns: {list(frame.columns)}")
    if frame.duplicated(["lang", "text_id"]).any():
        raise ConfigError("several rows per (lang, text_id); group with by=[...] or filter the frame first")
    out: dict[str, pd.Series] = {}
    for lang, g in frame.groupby("lang", sort=False):
        s = pd.Series(g[value].to_numpy(dtype=np.float64), index=g["text_id"].astype(str).to_numpy())
        out[str(lang)] = s.sort_index()
    return out


def _replicates(values: Mapping[str, pd.Series], n_boot: int, seed: int) -> dict[str, "_stats.BootStat"]:
    """Each language's mean over texts as a :class:`~qhelpers.stats.BootStat` (point, bootstrap
    replicates and influence values); one shared resample, and one unit group, when every
    language has the same text ids (paired across languages), else one per language."""
    ids = [tuple(s.index) for s in values.values()]
    parallel = all(i == ids[0] for i in ids)
    counts = _stats.language_counts({lang: len(s) for lang, s in values.items()}, n_boot, seed, parallel)
    out = {}
    for lang, s in values.items():
        v = np.nan_to_num(s.to_numpy(dtype=np.float64), nan=0.0)
        out[lang] = _stats.BootStat.ratio_of_sums(v, np.ones(v.size), counts[lang], "texts" if parallel else lang)
    return out


def _estimate(values: Mapping[str, pd.Series], reps: Mapping[str, "_stats.BootStat"], plus: Sequence[str],
              minus: Sequence[str], level: float, method: str = _stats.DEFAULT_METHOD) -> _stats.Estimate:
    langs = [*plus, *minus]
    n = int(min(len(values[x]) for x in langs))
    bad = {x: list(values[x].index[~np.isfinite(values[x].to_numpy())]) for x in langs}
    bad = {x: v for x, v in bad.items() if v}
    if bad:
        shown = "; ".join(f"{x} texts {v[:3]}" for x, v in bad.items())
        return _stats.Estimate.undefined(f"non-finite: the value is NaN or inf for {shown}", n, level)
    if n < 2:
        return _stats.Estimate.undefined(f"too few: a bootstrap interval needs >= 2 texts per language, got {n}", n, level)
    stat = _stats.BootStat.mean([reps[x] for x in plus])
    if minus:
        stat = stat - _stats.BootStat.mean([reps[x] for x in minus])
    return _stats.stat_estimate(stat, n, level, method)


def _pick(present: Sequence[str], given: Sequence[str] | None, name: str) -> list[str]:
    if given is None:
        return []
    if isinstance(given, str):
        raise ConfigError(f"{name} must be a list of language codes, got the string {given!r}; e.g. [{given!r}]")
    out = [str(x) for x in given]
    absent = [x for x in out if x not in present]
    if absent:
        raise ConfigError(f"{name} {absent} were not measured (languages present: {list(present)}); "
                          "add them to LANGS or leave them out")
    return out


def _groups(present: Sequence[str], lr_langs, hr_langs) -> tuple[list[str], list[str]]:
    lr, hr = _pick(present, lr_langs, "lr_langs"), _pick(present, hr_langs, "hr_langs")
    both = sorted(set(lr) & set(hr))
    if both:
        raise ConfigError(f"languages {both} are in both lr_langs and hr_langs; put each in one group")
    return lr, hr


def text_mean(
    frame: pd.DataFrame,
    value: str = "value",
    langs: Sequence[str] | None = None,
    minus: Sequence[str] | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    method: str = _stats.DEFAULT_METHOD,
) -> _stats.Estimate:
    """Mean over ``langs`` (default every language) of each language's mean over texts of
    ``value``, minus the same over ``minus`` languages if given (e.g. LR minus HR), as an
    :class:`~qhelpers.stats.Estimate` with a bootstrap CI over texts (``method``: the interval
    method of :mod:`qhelpers.stats`, studentized by default; see the module docstring).
    Undefined with a reason when a value is not finite, a language has fewer than 2 texts, or
    the interval is unbounded (resamples that repeat one text). ``frame``: one row per
    (lang, text_id), e.g. from :func:`text_contrast`."""
    _stats.check_level(level)
    _stats.check_interval_method(method)
    values = _lang_values(frame, value)
    present = list(values)
    plus = present if langs is None else _pick(present, langs, "langs")
    minus_l = _pick(present, minus, "minus") if minus else []
    if not plus:
        raise ConfigError("langs is empty; pass None for every language or a list of codes")
    overlap = sorted(set(plus) & set(minus_l))
    if overlap:
        raise ConfigError(f"languages {overlap} are in both langs and minus")
    used = {x: values[x] for x in dict.fromkeys([*plus, *minus_l])}
    return _estimate(used, _replicates(used, n_boot, seed), plus, minus_l, level, method)


class TextMeansOptions(TypedDict, total=False):
    """Keyword options of :func:`text_means` that the summary methods of :class:`Propagation`
    and :class:`ErrorInteraction` pass on (defaults: those of :func:`text_means`)."""

    lr_langs: Sequence[str] | None
    hr_langs: Sequence[str] | None
    n_boot: int
    seed: int
    level: float
    method: str


def text_means(
    frame: pd.DataFrame,
    value: str = "value",
    *,
    by: Sequence[str] = (),
    lr_langs: Sequence[str] | None = None,
    hr_langs: Sequence[str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    method: str = _stats.DEFAULT_METHOD,
) -> pd.DataFrame:
    """Per group of the ``by`` columns: the mean of ``value`` over texts for each language,
    ``all`` (mean of the language means) and, when both groups are given, ``LR``, ``HR`` and
    ``LR-HR``, each with a bootstrap CI (:func:`text_mean`, same resample for every row).

    Columns: the ``by`` columns, ``lang``, ``value``, ``<value>_ci_low``, ``<value>_ci_high``
    (named after ``value``, for :func:`qhelpers.report.plots.estimate_bars`), ``n``, ``defined``,
    ``reason``.
    """
    _stats.check_level(level)
    by = [by] if isinstance(by, str) else list(by)
    for col in by:
        if col not in frame.columns:
            raise ConfigError(f"frame has no column {col!r} to group by; columns: {list(frame.columns)}")
    present = list(dict.fromkeys(frame["lang"].astype(str))) if "lang" in frame.columns else []
    lr, hr = _groups(present, lr_langs, hr_langs)
    groups = frame.groupby(by, sort=False) if by else [((), frame)]
    rows = []
    for keys, g in groups:
        keys = keys if isinstance(keys, tuple) else (keys,)
        values = _lang_values(g, value)
        reps = _replicates(values, n_boot, seed)
        langs = list(values)
        wanted: list[tuple[str, list[str], list[str]]] = [(x, [x], []) for x in langs] + [("all", langs, [])]
        if lr and hr:
            wanted += [("LR", lr, []), ("HR", hr, []), ("LR-HR", lr, hr)]
        for label, plus, minus in wanted:
            if any(x not in values for x in [*plus, *minus]):
                continue
            est = _estimate(values, reps, plus, minus, level, method)
            rows.append({**dict(zip(by, keys)), "lang": label, value: est.value, f"{value}_ci_low": est.ci_low,
                         f"{value}_ci_high": est.ci_high, "n": est.n, "defined": est.defined, "reason": est.reason or ""})
    return pd.DataFrame(rows, columns=[*by, "lang", value, f"{value}_ci_low", f"{value}_ci_high", "n", "defined", "reason"])


# ----------------------------------------------------------------------------- T-004's hypotheses

#: The smallest effects of practical size of T-004's hypotheses (``min_effect``), per quantity:
#: output KL 0.01 nats per predicted token (a few per cent of what INT4 costs a 135M model),
#: relative L2 error 0.01 (one per cent of the activation norm), KL in bits per byte 0.01 (the
#: project's bits-per-byte minimum effect). The cosine gain belongs to a sanity check: none.
T004_MIN_EFFECTS: dict[str, float] = {"kl": 0.01, "rel_l2": 0.01, "kl_bpb": 0.01, "cosine": 0.0}

#: T-004's per-text contrasts of configurations.
T004_CONTRASTS: dict[str, dict[str, float]] = {
    "l0_gain": {"gateway_protected": 1, "last_protected": -1},
    "l0_reduction": {"last_protected": 1, "gateway_protected": -1},
    "interaction": {"first_protected": 1, "gateway_protected": -1, "all_quantized": -1, "last_protected": 1},
}


def t004_claims(
    prop: "Propagation",
    lr_langs: Sequence[str],
    hr_langs: Sequence[str],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """T-004's hypotheses (seed 004, H2.1) from a :func:`residual_propagation` of the
    :func:`propagation_variants`: one dict of keyword arguments of
    :meth:`qhelpers.report.results.Hypothesis.evaluate` per hypothesis (the notebook evaluates
    them), each with its estimate and its role:

    * ``H2.1-interaction`` (primary): the seed's claim "without L0 protection, L_last protection
      is useless" in a form that more protection alone cannot make true, protecting L_last
      removes more output KL when L0 is protected than when it is quantized,
      ``[KL(L0) - KL(L0+L_last)] - [KL(all) - KL(L_last)] > 0``;
    * ``H2.1`` and ``H2.1-output``: sanity checks (``kind="sanity check"``). "Activations at
      L_last (or the output) are closer to FP when L0 is protected too" compares a configuration
      with one more full-precision layer against one with fewer, so it holds by construction up
      to rare error cancellation; they are reported apart, never as findings;
    * ``LR-error-L_last``, ``LR-error-output`` (family "LR vs HR"): with every layer quantized
      the LR languages' error exceeds the HR languages' (relative error at L_last; output KL per
      byte, which compares the same content).

    Minimum effects: :data:`T004_MIN_EFFECTS`.
    """
    last = prop.last
    est = dict(n_boot=n_boot, seed=seed)
    gain_cos = text_contrast(prop.layers, "cosine", T004_CONTRASTS["l0_gain"], layer=last)
    gain_kl = text_contrast(prop.logits, "kl", T004_CONTRASTS["l0_reduction"])
    interaction = text_contrast(prop.logits, "kl", T004_CONTRASTS["interaction"])
    err_last = text_contrast(prop.layers, "rel_l2", {"all_quantized": 1}, layer=last)
    err_out = text_contrast(prop.logits, "kl_bpb", {"all_quantized": 1})
    groups = dict(langs=list(lr_langs), minus=list(hr_langs), **est)
    by_construction = "one more full-precision layer: closer to FP by construction (up to rare error cancellation)"
    return [
        dict(id="H2.1-interaction",
             statement="protecting L_last removes more output error when L0 is protected than when L0 is quantized",
             estimate=text_mean(interaction, **est), threshold=0.0, direction=">",
             quantity="[KL(L0) - KL(L0+L_last)] - [KL(all) - KL(L_last)], nats per token",
             primary=True, min_effect=T004_MIN_EFFECTS["kl"]),
        dict(id="H2.1",
             statement="activations at L_last are more similar to FP when L0 is protected too (L0 + L_last vs L_last protected)",
             estimate=text_mean(gain_cos, **est), threshold=0.0, direction=">",
             quantity="cosine(L0+L_last) - cosine(L_last)", kind="sanity check", notes=by_construction),
        dict(id="H2.1-output",
             statement="the output distribution is closer to FP when L0 is protected too (L0 + L_last vs L_last protected)",
             estimate=text_mean(gain_kl, **est), threshold=0.0, direction=">",
             quantity="KL(L_last) - KL(L0+L_last)", kind="sanity check", notes=by_construction),
        dict(id="LR-error-L_last",
             statement="with every layer quantized, the LR languages' residual stream at L_last is further from FP than the HR languages'",
             estimate=text_mean(err_last, **groups), threshold=0.0, direction=">", quantity="rel_l2 LR - HR",
             family="LR vs HR", min_effect=T004_MIN_EFFECTS["rel_l2"]),
        dict(id="LR-error-output",
             statement="with every layer quantized, the LR languages' output diverges more from FP per byte of text than the HR languages'",
             estimate=text_mean(err_out, **groups), threshold=0.0, direction=">", quantity="KL bits per byte LR - HR",
             family="LR vs HR", min_effect=T004_MIN_EFFECTS["kl_bpb"]),
    ]


# ----------------------------------------------------------------------------- figures


def plot_error_growth(
    curve: pd.DataFrame,
    metric: str = "rel_l2",
    lang: str | Sequence[str] | None = "all",
    ax: Any = None,
    configs: Sequence[str] | None = None,
    log: bool = False,
    title: str | None = None,
    lines: str = "config",
    reference: float | None = None,
) -> Any:
    """``metric`` against the layer, one line per value of the ``lines`` column (default one
    per config) with its CI as a band, for the ``lang`` row(s) (default the pooled ``all``;
    None keeps every row). ``curve``: :meth:`Propagation.curve` or
    :meth:`Propagation.layer_contrast` (``metric="value"``, ``lines="lang"``,
    ``lang=["all", "LR", "HR"]``). ``reference`` draws a horizontal line."""
    from qhelpers.report.plots import new_axes

    for col in ("layer", "lang", lines, metric):
        if col not in curve.columns:
            raise ConfigError(f"curve has no column {col!r}; columns: {list(curve.columns)}")
    df = curve
    if lang is not None:
        wanted = [lang] if isinstance(lang, str) else list(lang)
        df = df[df["lang"].isin(wanted)]
        if df.empty:
            raise ConfigError(f"no rows for lang {lang!r}; present: {sorted(set(curve['lang']))}")
    fig, ax = new_axes(ax, figsize=(8, 4.5))
    for name in configs or list(dict.fromkeys(df[lines])):
        d = df[df[lines] == name].sort_values("layer")
        line, = ax.plot(d["layer"], d[metric], marker="o", markersize=3, label=str(name))
        lo, hi = f"{metric}_ci_low", f"{metric}_ci_high"
        if lo in d.columns and hi in d.columns:
            ax.fill_between(d["layer"], d[lo], d[hi], color=line.get_color(), alpha=0.2)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("decoder layer (output of block)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{metric} vs full precision ({lang})")
    fig.tight_layout()
    return fig


def plot_language_growth(
    curve: pd.DataFrame,
    config: str,
    metric: str = "rel_l2",
    ax: Any = None,
    lang_groups: Mapping[str, str] | None = None,
    log: bool = False,
    title: str | None = None,
) -> Any:
    """One line per language (coloured by resource group) of ``metric`` against the layer for
    one ``config``; a table from :meth:`Propagation.curve`."""
    from qhelpers.report.plots import GROUP_COLORS, new_axes, resource_group

    if config not in set(curve.get("config", [])):
        raise ConfigError(f"config {config!r} not in the curve; present: {sorted(set(curve.get('config', [])))}")
    df = curve[(curve["config"] == config) & ~curve["lang"].isin(["all", "LR", "HR", "LR-HR"])]
    fig, ax = new_axes(ax, figsize=(8, 4.5))
    styles = ["-", "--", ":", "-."]
    seen: dict[str, int] = {}
    for lang in dict.fromkeys(df["lang"]):
        d = df[df["lang"] == lang].sort_values("layer")
        group = resource_group(lang, lang_groups)
        k = seen.get(group, 0)
        seen[group] = k + 1
        ax.plot(d["layer"], d[metric], styles[k % len(styles)], color=GROUP_COLORS.get(group, "#555555"),
                label=f"{lang} ({group})")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("decoder layer (output of block)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{metric} per language: {config}")
    fig.tight_layout()
    return fig

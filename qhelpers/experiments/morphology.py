"""Grammatical agreement probed with minimal pairs, per layer through the logit lens
(seed 004, H3.2 / experiment T-008).

Data
----
``qhelpers/data/minimal_pairs.json``: hand-written agreement minimal pairs (subject-verb
number / gender / person, adjective, determiner, possessive and Swahili noun-class agreement)
in he, ar (the morphologically rich languages of the hypothesis) and the controls en, de, fr,
sw; at least 24 per language. Each pair is one sentence in a grammatical (``correct``) and an
agreement-violating (``wrong``) form that differ in exactly one whitespace token. Provenance:
*hand-written for qhelpers; not native-speaker validated* (:func:`minimal_pairs_info`). The
file is validated on every load (:func:`validate_pairs`).

Scoring
-------
A sentence's log-probability is the sum of its token log-probabilities given a leading BOS
(:func:`qhelpers.measure.scoring.encode_text`: the tokenizer's BOS, else its EOS, is put in front
when the tokenizer does not add one), so the first word is scored too. A pair is *solved* when
``logp(correct) > logp(wrong)`` (a tie counts as not solved); the ``margin`` is
``logp(correct) - logp(wrong)`` in nats. Accuracy = fraction of pairs solved.

Both sentences of a pair share their tokens up to the first differing token, and a causal
model gives those shared tokens identical log-probabilities (same context, same target) at
every layer; :func:`score_pairs` therefore scores each sentence from the first differing
token on (``from_divergence=True``, the default): the margin is exactly the full-sentence
difference at a fraction of the cost (``tests/test_morphology.py`` checks this).

Per layer, the **logit lens** (:func:`logit_lens`) reads the residual stream after block
``L`` (:func:`qhelpers.measure.activations.capture_residual`) through the model's own final norm and
LM head, found through the architecture registry (``ArchSpec.final_norm``, ``.lm_head``), and
scores the sentences the same way. After the last block the lens IS the model's output (the
tests check it against ``model(ids).logits`` for gpt2, llama, opt and bloom).

Why not the seed's code: its "agreement score per layer" never uses the layer (it scores the
full model's output at every iteration of the layer loop, so every layer gets the same
number), and it rests on one pair (one Hebrew sentence), which cannot support any claim.

Depth convention
----------------
``depth(L) = L / n_layers`` (the seed calls GPT-2's L9 of 12 "75 %"); :func:`depth_layer`
gives ``min(n_layers - 1, floor(depth * n_layers))`` (L9 of 12, L22 of 30, L3 of 4).

Statistics
----------
Percentile bootstrap over pairs. Within a language one resample of pair ids serves every
layer and every configuration (paired). Languages have different sentences, so each language
is resampled independently, with a generator seeded from ``seed`` and the language code (as
in :mod:`qhelpers.stats.scores`), so its resample does not depend on which other languages a call
involves. Group quantities (e.g. "MRL") average the per-language values (equal weight per
language).

Undefined estimates (``stats.Estimate`` with ``defined=False``; verdicts INCONCLUSIVE):

* ``"no signal: ..."`` (:func:`peak_depth`): the accuracy at the observed best layer has a
  CI that reaches down to chance (0.5): a model that cannot tell the pairs apart at any layer
  has no peak to locate. (The best layer is chosen on the same data, so this check is
  lenient; it only removes the clearly meaningless cases.)
* ``"chance: ..."`` (:func:`accuracy_contrast` with ``baseline``): a group's pooled accuracy
  under the baseline configuration does not exceed chance (CI lower bound <= 0.5), so
  quantization has nothing to lose there and a drop or recovery measures noise.
"""
from __future__ import annotations

import importlib.resources
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from qhelpers import stats
from qhelpers.measure.activations import iter_residual_batches
from qhelpers.measure.scoring import LOGIT_BUDGET
from qhelpers.models.archs import (
    ArchSpec,
    decoder_layers,
    get_arch,
    get_module,
    resolve_layers,
)
from qhelpers.models.loaded import as_module
from qhelpers.quant.engine import QuantEngine, Variant
from qhelpers.quant.protection import ProtectionSpec
from qhelpers.quant.strategies import protocol_settings
from qhelpers.text.corpora import LANGUAGES
from qhelpers.text.encoding import default_batch_tokens, encode_text
from qhelpers.util.errors import ConfigError, CorpusError, MeasurementError
from qhelpers.util.progress import progress_bar

__all__ = [
    "FEATURES",
    "CHANCE",
    "PAIR_FIELDS",
    "SCORE_COLUMNS",
    "DATA_FILE",
    "validate_pairs",
    "minimal_pairs_info",
    "load_minimal_pairs",
    "layer_depth",
    "depth_layer",
    "logit_lens",
    "sentence_logprobs",
    "score_pairs",
    "agreement_variants",
    "score_variants",
    "accuracy_table",
    "peak_depth",
    "peak_table",
    "accuracy_contrast",
    "language_contrast",
    "plot_layer_curves",
]

#: Agreement features a pair may violate (``class``: Bantu noun class).
FEATURES: tuple[str, ...] = ("number", "gender", "person", "class")
#: Accuracy of a model that cannot tell the two sentences of a pair apart.
CHANCE = 0.5
#: Keys every pair of the data file has.
PAIR_FIELDS: tuple[str, ...] = ("id", "lang", "feature", "phenomenon", "correct", "wrong", "gloss")
#: Columns of :func:`score_pairs`' table.
SCORE_COLUMNS: tuple[str, ...] = (
    "config", "lang", "pair_id", "feature", "phenomenon", "layer", "depth",
    "logp_correct", "logp_wrong", "margin", "solved", "n_scored_correct", "n_scored_wrong",
)
DATA_FILE = "minimal_pairs.json"
_TOP_KEYS = ("provenance", "pairs")


# ----------------------------------------------------------------------------- data


def _read_doc(path: str | Path | None) -> tuple[dict, str]:
    if path is None:
        resource = importlib.resources.files("qhelpers") / "data" / DATA_FILE
        text, source = resource.read_text(encoding="utf-8"), f"qhelpers/data/{DATA_FILE}"
    else:
        p = Path(path)
        if not p.is_file():
            raise CorpusError(f"minimal-pair file {p} not found; pass the path of a JSON file laid out like qhelpers/data/{DATA_FILE}")
        text, source = p.read_text(encoding="utf-8"), str(p)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise CorpusError(f"{source} is not valid JSON ({err}); fix the file (one object with 'provenance' and 'pairs')") from None
    return doc, source


def _differing_words(correct: str, wrong: str) -> list[int]:
    a, b = correct.split(), wrong.split()
    if len(a) != len(b):
        return [-1]
    return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


def validate_pairs(doc: Any, source: str = "minimal pairs") -> list[dict]:
    """Check a minimal-pair document and return its pairs (plain dicts, file order).

    The document is ``{"provenance": str, "pairs": [pair, ...], ...}``; each pair has exactly
    the keys :data:`PAIR_FIELDS`: a unique non-empty ``id``, a ``lang`` known to
    :data:`qhelpers.text.corpora.LANGUAGES`, a ``feature`` in :data:`FEATURES`, a non-empty
    ``phenomenon``, non-empty ``correct`` and ``wrong`` sentences that differ in exactly one
    whitespace-separated token (same number of tokens), and a string ``gloss`` (may be empty).
    Raises :class:`~qhelpers.util.errors.CorpusError` naming the pair and the fix.
    """
    if not isinstance(doc, Mapping):
        raise CorpusError(f"{source}: expected a JSON object with keys {list(_TOP_KEYS)}, got {type(doc).__name__}")
    missing = [k for k in _TOP_KEYS if k not in doc]
    if missing:
        raise CorpusError(f"{source}: missing top-level keys {missing}; add them (provenance: who wrote the pairs and how they were checked)")
    if not isinstance(doc["provenance"], str) or not doc["provenance"].strip():
        raise CorpusError(f"{source}: 'provenance' must be a non-empty string saying where the pairs come from")
    pairs = doc["pairs"]
    if not isinstance(pairs, list) or not pairs:
        raise CorpusError(f"{source}: 'pairs' must be a non-empty list of pair objects")
    seen: set[str] = set()
    out: list[dict] = []
    for index, pair in enumerate(pairs):
        where = f"{source}: pair #{index}"
        if not isinstance(pair, Mapping):
            raise CorpusError(f"{where} is a {type(pair).__name__}, not an object with keys {list(PAIR_FIELDS)}")
        where = f"{source}: pair {pair.get('id', '#' + str(index))!r}"
        lacking = [k for k in PAIR_FIELDS if k not in pair]
        extra = sorted(set(pair) - set(PAIR_FIELDS))
        if lacking or extra:
            raise CorpusError(
                f"{where} has missing keys {lacking} and unknown keys {extra}; a pair has exactly {list(PAIR_FIELDS)}"
            )
        for key in PAIR_FIELDS:
            if not isinstance(pair[key], str):
                raise CorpusError(f"{where}: {key!r} must be a string, got {type(pair[key]).__name__}")
        for key in ("id", "phenomenon", "correct", "wrong"):
            if not pair[key].strip():
                raise CorpusError(f"{where}: {key!r} is empty; write the {key} or remove the pair")
        if pair["id"] in seen:
            raise CorpusError(f"{where}: id used twice; give every pair its own id (e.g. '{pair['lang']}-NN')")
        seen.add(pair["id"])
        if pair["lang"] not in LANGUAGES:
            raise CorpusError(f"{where}: unknown language {pair['lang']!r}; use one of {', '.join(LANGUAGES)}")
        if pair["feature"] not in FEATURES:
            raise CorpusError(f"{where}: unknown feature {pair['feature']!r}; use one of {', '.join(FEATURES)}")
        diff = _differing_words(pair["correct"], pair["wrong"])
        if diff == [-1]:
            raise CorpusError(
                f"{where}: correct ({len(pair['correct'].split())} tokens) and wrong ({len(pair['wrong'].split())} "
                "tokens) have different numbers of whitespace tokens; a minimal pair changes exactly one word"
            )
        if len(diff) != 1:
            raise CorpusError(
                f"{where}: correct and wrong differ in {len(diff)} whitespace tokens (positions {diff}); "
                "a minimal pair differs in exactly one word, the agreeing one"
            )
        out.append({k: pair[k] for k in PAIR_FIELDS})
    return out


def minimal_pairs_info(path: str | Path | None = None) -> dict[str, Any]:
    """The data file's metadata (name, version, provenance, licence, description) and the
    number of pairs per language and feature. ``path=None``: the packaged file."""
    doc, source = _read_doc(path)
    pairs = validate_pairs(doc, source)
    info = {k: v for k, v in doc.items() if k not in ("pairs", "fields")}
    info["source"] = source
    info["n_pairs"] = {lang: sum(p["lang"] == lang for p in pairs) for lang in dict.fromkeys(p["lang"] for p in pairs)}
    info["features"] = {f: sum(p["feature"] == f for p in pairs) for f in FEATURES}
    return info


def load_minimal_pairs(
    langs: Sequence[str] | None = None,
    n_pairs: int | None = None,
    seed: int = 0,
    path: str | Path | None = None,
) -> pd.DataFrame:
    """The agreement minimal pairs as a DataFrame, validated.

    Columns: ``pair_id, lang, feature, phenomenon, correct, wrong, gloss, position`` (index of
    the differing whitespace token), ``correct_word, wrong_word``. Rows follow ``langs``
    (default: every language of the file, in file order), then file order.

    ``n_pairs``: at most this many pairs per language, drawn at random without replacement
    (generator seeded from ``seed`` and the language code), kept in file order; None: all.
    ``path``: another file with the same layout (default: the packaged one).
    """
    doc, source = _read_doc(path)
    pairs = validate_pairs(doc, source)
    available = list(dict.fromkeys(p["lang"] for p in pairs))
    if langs is None:
        langs = available
    elif isinstance(langs, str):
        langs = [langs]
    langs = list(langs)
    if not langs:
        raise ConfigError("langs is empty; pass None for every language or e.g. ['he', 'ar', 'en']")
    unknown = [lang for lang in langs if lang not in LANGUAGES]
    if unknown:
        raise CorpusError(f"unknown language codes {unknown}; known: {', '.join(LANGUAGES)}")
    absent = [lang for lang in langs if lang not in available]
    if absent:
        raise CorpusError(
            f"{source} has no minimal pairs for {absent}; languages with pairs: {', '.join(available)} "
            "(add pairs to the file or drop those languages)"
        )
    if len(set(langs)) != len(langs):
        raise ConfigError(f"langs lists a language twice: {langs}")
    if n_pairs is not None and (isinstance(n_pairs, bool) or int(n_pairs) != n_pairs or n_pairs < 1):
        raise ConfigError(f"n_pairs must be a positive int or None (every pair), got {n_pairs!r}")
    rows = []
    for lang in langs:
        mine = [p for p in pairs if p["lang"] == lang]
        if n_pairs is not None and n_pairs < len(mine):
            rng = stats.lang_rng(seed, lang)
            keep = sorted(rng.choice(len(mine), size=int(n_pairs), replace=False).tolist())
            mine = [mine[i] for i in keep]
        for p in mine:
            position = _differing_words(p["correct"], p["wrong"])[0]
            rows.append({
                "pair_id": p["id"], "lang": lang, "feature": p["feature"], "phenomenon": p["phenomenon"],
                "correct": p["correct"], "wrong": p["wrong"], "gloss": p["gloss"], "position": position,
                "correct_word": p["correct"].split()[position], "wrong_word": p["wrong"].split()[position],
            })
    frame = pd.DataFrame(rows)
    frame.attrs["provenance"] = doc["provenance"]
    return frame


# ----------------------------------------------------------------------------- depth


def layer_depth(layer: int | np.ndarray, n_layers: int) -> float | np.ndarray:
    """Relative depth ``layer / n_layers`` of the residual stream after block ``layer``
    (the seed's convention: GPT-2's L9 of 12 is "75 %")."""
    if int(n_layers) < 1:
        raise ConfigError(f"n_layers must be >= 1, got {n_layers}")
    if isinstance(layer, np.ndarray):
        return layer.astype(np.float64) / float(n_layers)
    return float(layer) / float(n_layers)


def depth_layer(n_layers: int, depth: float = 0.75) -> int:
    """The layer at relative ``depth``: ``min(n_layers - 1, floor(depth * n_layers))``
    (12 layers -> L9, 30 -> L22, 4 -> L3)."""
    if int(n_layers) < 1:
        raise ConfigError(f"n_layers must be >= 1, got {n_layers}")
    if not 0.0 <= float(depth) <= 1.0:
        raise ConfigError(f"depth must be a fraction in [0, 1] (e.g. 0.75), got {depth}")
    return min(int(n_layers) - 1, int(math.floor(float(depth) * int(n_layers) + 1e-9)))


# ----------------------------------------------------------------------------- logit lens


def _head(model: nn.Module, arch: ArchSpec) -> tuple[nn.Module, nn.Module, float | None]:
    norm = get_module(model, arch.final_norm)
    head = get_module(model, arch.lm_head)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return norm, head, (float(cap) if cap else None)


def logit_lens(model: Any, hidden: torch.Tensor, arch: ArchSpec | None = None) -> torch.Tensor:
    """Logits the model would produce if the residual stream ``hidden`` (``[..., hidden]``)
    were the last block's output: ``lm_head(final_norm(hidden))``, with the final logit
    soft-capping of models whose config has one (Gemma). Modules come from the registry
    (``ArchSpec.final_norm``, ``ArchSpec.lm_head``); ``hidden`` is moved to their device and
    dtype. Returns fp32 logits ``[..., vocab]``.

    Raises :class:`~qhelpers.util.errors.MeasurementError` when the head expects another width
    than the residual stream (e.g. OPT checkpoints with ``project_out``).
    """
    model = as_module(model)
    arch = arch or get_arch(model)
    norm, head, cap = _head(model, arch)
    weight = getattr(head, "weight", None)
    if weight is not None and weight.shape[-1] != hidden.shape[-1]:
        raise MeasurementError(
            f"the LM head takes width {weight.shape[-1]} but the residual stream has width {hidden.shape[-1]} "
            "(a projection between them, e.g. OPT's project_out, is not part of the logit lens); "
            "the logit lens needs a model whose head reads the residual stream directly"
        )
    h = hidden.to(device=weight.device if weight is not None else hidden.device,
                  dtype=weight.dtype if weight is not None else hidden.dtype)
    with torch.no_grad():
        logits = head(norm(h)).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass(frozen=True)
class _Seq:
    row: int
    ids: tuple[int, ...]
    first: int  # index (in ids) of the first scored target token


def _score_seqs(
    model: nn.Module,
    seqs: list[_Seq],
    layers: list[int],
    pad_id: int,
    batch_tokens: int | None,
    progress: bool,
) -> np.ndarray:
    """Summed log-prob (nats) of targets ``ids[first:]`` of each sequence, per layer's lens:
    ``[n_seqs, len(layers)]`` float64."""
    arch = get_arch(model)
    device = next(model.parameters()).device
    batch_tokens = int(batch_tokens or default_batch_tokens(device))
    if batch_tokens < 2:
        raise ConfigError(f"batch_tokens must be >= 2, got {batch_tokens}")
    out = np.zeros((len(seqs), len(layers)), dtype=np.float64)
    head = get_module(model, arch.lm_head)
    vocab = int(getattr(getattr(head, "weight", None), "shape", (0,))[0] or model.config.vocab_size)
    step = max(1, LOGIT_BUDGET // vocab)  # lens rows per head matmul (bounds the logits' memory)
    n_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    width = max((len(s.ids) for s in seqs), default=0)
    if n_positions and width > int(n_positions):
        raise MeasurementError(
            f"a sentence has {width} tokens, more than the model's {n_positions} positions; shorten it"
        )
    for index, ids, _, captured in iter_residual_batches(model, [s.ids for s in seqs], layers, pad_id,
                                                         batch_tokens=batch_tokens, max_batch=256,
                                                         progress=progress, desc="batches"):
        batch = [seqs[i] for i in index]
        rows = torch.cat([torch.full((len(s.ids) - s.first,), i) for i, s in enumerate(batch)])
        positions = torch.cat([torch.arange(s.first - 1, len(s.ids) - 1) for s in batch])
        targets = ids[rows, positions + 1]
        owner = torch.tensor([s.row for s in batch])[rows]
        for j, layer in enumerate(layers):
            selected = captured[layer][rows, positions]
            logp = []
            for start in range(0, len(targets), step):
                lp = F.log_softmax(logit_lens(model, selected[start : start + step], arch), dim=-1)
                t = targets[start : start + step].to(lp.device)
                logp.append(lp.gather(1, t[:, None]).squeeze(1).double().cpu())
            values = torch.cat(logp)
            if not bool(torch.isfinite(values).all()):
                raise MeasurementError(
                    f"non-finite log-probabilities at layer {layer}: the model produced inf/NaN logits "
                    "(check the weights for NaN/inf, or use fp32 instead of fp16)"
                )
            sums = np.zeros(len(seqs), dtype=np.float64)
            np.add.at(sums, owner.numpy(), values.numpy())
            for s in batch:
                out[s.row, j] = sums[s.row]
    return out


def _tokenizer_of(loaded: Any, tokenizer: Any) -> Any:
    tok = tokenizer if tokenizer is not None else getattr(loaded, "tokenizer", None)
    if tok is None:
        raise ConfigError("no tokenizer: pass a LoadedModel (load_model(...)) or tokenizer=...")
    return tok


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def sentence_logprobs(
    loaded: Any,
    texts: Sequence[str],
    layers: int | Iterable[int] | None = -1,
    *,
    tokenizer: Any | None = None,
    batch_tokens: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Log-probability (nats) of each whole text, ``[len(texts), n_selected_layers]``.

    Each text is tokenized by :func:`qhelpers.measure.scoring.encode_text` (a BOS, else EOS, in
    front unless the tokenizer adds one) and every token after it is scored. ``layers``:
    the logit lens after those blocks (default ``-1``, the last block, which equals the
    model's own output; None: every block; negative indices count from the end), columns in
    ascending layer order. Texts are batched by length under ``batch_tokens`` (default 2048
    on CPU, 16384 on CUDA).
    """
    model = as_module(loaded)
    tok = _tokenizer_of(loaded, tokenizer)
    if isinstance(texts, str) or not len(texts):
        raise ConfigError("texts must be a non-empty list of strings")
    wanted = resolve_layers(layers, len(decoder_layers(model)))
    seqs = [_Seq(i, tuple(encode_text(tok, t)), 1) for i, t in enumerate(texts)]
    return _score_seqs(model, seqs, wanted, _pad_id(tok), batch_tokens, progress)


def score_pairs(
    loaded: Any,
    pairs: pd.DataFrame,
    layers: int | Iterable[int] | None = -1,
    *,
    config: str = "fp",
    from_divergence: bool = True,
    tokenizer: Any | None = None,
    batch_tokens: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Score every minimal pair at the logit lens of each selected layer.

    ``pairs``: a :func:`load_minimal_pairs` table (columns ``pair_id, lang, correct, wrong``;
    ``feature`` and ``phenomenon`` are carried over when present). ``layers`` as in
    :func:`sentence_logprobs` (default: the last block = the model's output; None: every
    block). ``config`` labels the rows (e.g. the quantization variant in force).

    ``from_divergence=True`` scores each sentence from the first token where the two token
    sequences differ: the shared prefix has identical log-probabilities in both sentences at
    every layer, so ``margin`` equals the full-sentence difference exactly, while
    ``logp_correct``/``logp_wrong`` are then the log-probabilities of that suffix given the
    prefix. ``False`` scores whole sentences.

    Returns one row per (pair, layer) with :data:`SCORE_COLUMNS`: ``depth = layer /
    n_layers``, ``margin = logp_correct - logp_wrong``, ``solved = margin > 0``, and the
    number of scored tokens of each sentence.
    """
    model = as_module(loaded)
    tok = _tokenizer_of(loaded, tokenizer)
    if not isinstance(pairs, pd.DataFrame):
        raise ConfigError(f"pairs must be a DataFrame from load_minimal_pairs(), got {type(pairs).__name__}")
    need = ["pair_id", "lang", "correct", "wrong"]
    lacking = [c for c in need if c not in pairs.columns]
    if lacking:
        raise ConfigError(f"pairs lacks columns {lacking}; build it with load_minimal_pairs()")
    if pairs.empty:
        raise ConfigError("pairs is empty; load_minimal_pairs() gives at least one pair per language")
    if pairs["pair_id"].duplicated().any():
        dups = sorted(pairs.loc[pairs["pair_id"].duplicated(), "pair_id"].unique().tolist())
        raise ConfigError(f"pair ids {dups[:5]} appear more than once; score each pair once")
    n_layers = len(decoder_layers(model))
    wanted = resolve_layers(layers, n_layers)
    seqs: list[_Seq] = []
    for k, (pid, c_text, w_text) in enumerate(zip(pairs["pair_id"], pairs["correct"], pairs["wrong"])):
        c_ids = encode_text(tok, c_text)
        w_ids = encode_text(tok, w_text)
        if c_ids == w_ids:
            raise MeasurementError(
                f"pair {pid!r}: both sentences tokenize to the same ids (unknown-token tokenizer?); "
                "the model cannot tell them apart, drop the pair or use another tokenizer"
            )
        shared = 0
        for a, b in zip(c_ids, w_ids):
            if a != b:
                break
            shared += 1
        if shared == min(len(c_ids), len(w_ids)):
            raise MeasurementError(
                f"pair {pid!r}: one sentence's tokens are a prefix of the other's, so the shorter one wins "
                "by construction (nothing marks where it ends); end both sentences with punctuation, "
                "e.g. a full stop"
            )
        first = max(1, shared) if from_divergence else 1
        seqs.append(_Seq(2 * k, tuple(c_ids), first))
        seqs.append(_Seq(2 * k + 1, tuple(w_ids), first))
    logp = _score_seqs(model, seqs, wanted, _pad_id(tok), batch_tokens, progress)
    n_scored = np.array([len(s.ids) - s.first for s in seqs])
    records = []
    extra = {c: pairs[c].tolist() if c in pairs.columns else [""] * len(pairs) for c in ("feature", "phenomenon")}
    for k, (pid, lang) in enumerate(zip(pairs["pair_id"], pairs["lang"])):
        for j, layer in enumerate(wanted):
            lc, lw = logp[2 * k, j], logp[2 * k + 1, j]
            records.append({
                "config": config, "lang": lang, "pair_id": pid,
                "feature": extra["feature"][k], "phenomenon": extra["phenomenon"][k],
                "layer": int(layer), "depth": layer_depth(int(layer), n_layers),
                "logp_correct": lc, "logp_wrong": lw, "margin": lc - lw, "solved": bool(lc - lw > 0),
                "n_scored_correct": int(n_scored[2 * k]), "n_scored_wrong": int(n_scored[2 * k + 1]),
            })
    frame = pd.DataFrame(records, columns=list(SCORE_COLUMNS))
    frame.attrs["n_layers"] = n_layers
    return frame


# ----------------------------------------------------------------------------- quantization


def agreement_variants(n_layers: int, bits: int = 4, protocol: str = "sound", depth: float = 0.75) -> dict[str, Variant]:
    """The quantized configurations of T-008: ``all_quantized`` (every layer at INT-``bits``),
    ``gateway_protected`` (L0 and the last layer in full precision) and
    ``bottleneck_protected`` (the layer at ``depth``, :func:`depth_layer`, in full precision).
    ``protocol="sound"``: per-channel symmetric INT-b on the decoder blocks' linear weights
    (:func:`qhelpers.quant.strategies.protocol_settings`)."""
    if int(n_layers) < 2:
        raise ConfigError(f"the gateway configuration needs at least 2 decoder layers, the model has {n_layers}")
    quant, scope = protocol_settings(protocol, bits)
    last = int(n_layers) - 1
    k = depth_layer(n_layers, depth)
    return {
        "all_quantized": Variant("all_quantized", quant, ProtectionSpec(), scope),
        "gateway_protected": Variant("gateway_protected", quant, ProtectionSpec(layers=(0, last)), scope),
        "bottleneck_protected": Variant("bottleneck_protected", quant, ProtectionSpec(layers=(k,)), scope),
    }


def score_variants(
    loaded: Any,
    pairs: pd.DataFrame,
    variants: Mapping[str, Variant],
    layers: int | Iterable[int] | None = -1,
    *,
    baseline: str | None = "fp",
    baseline_scores: pd.DataFrame | None = None,
    engine: QuantEngine | None = None,
    progress: bool = False,
    **kwargs: Any,
) -> pd.DataFrame:
    """:func:`score_pairs` under full precision (``config=baseline``, unless ``baseline`` is
    None) and under each variant (applied with :meth:`QuantEngine.applied`, restored after),
    concatenated. ``baseline_scores``: full-precision scores already made (e.g. the per-layer
    logit-lens scores): their rows at ``layers`` are reused (relabelled ``baseline``) instead
    of scoring again; they must cover every pair. ``kwargs`` go to :func:`score_pairs`."""
    if not isinstance(variants, Mapping):
        raise ConfigError("variants must be a dict name -> Variant, e.g. agreement_variants(n_layers)")
    engine = engine or QuantEngine(loaded, resident=True)
    frames = []
    if baseline is not None and baseline_scores is not None:
        wanted = resolve_layers(layers, len(decoder_layers(as_module(loaded))))
        reuse = _check_scores(baseline_scores)
        reuse = reuse[reuse["layer"].isin(wanted)].assign(config=baseline).reset_index(drop=True)
        need = {(p, layer) for p in pairs["pair_id"] for layer in wanted}
        have = set(zip(reuse["pair_id"], reuse["layer"]))
        if need - have or len(set(baseline_scores["config"])) != 1:
            raise ConfigError(
                "baseline_scores must be one configuration's score_pairs() table covering every pair at the "
                f"requested layers {wanted}; score it with score_pairs(loaded, pairs, layers=None)"
            )
        frames.append(reuse[reuse["pair_id"].isin(set(pairs["pair_id"]))][list(SCORE_COLUMNS)])
    elif baseline is not None:
        frames.append(score_pairs(loaded, pairs, layers, config=baseline, **kwargs))
    names: Iterable = list(variants.items())
    if progress:
        names = progress_bar(names, desc="configurations")
    for name, variant in names:
        if not isinstance(variant, Variant):
            raise ConfigError(f"variant {name!r} is a {type(variant).__name__}, not a qhelpers.quant.engine.Variant")
        if baseline is not None and name == baseline:
            raise ConfigError(f"variant name {name!r} is the baseline's name; rename it")
        with engine.applied(variant):
            frames.append(score_pairs(loaded, pairs, layers, config=name, **kwargs))
    out = pd.concat(frames, ignore_index=True)
    out.attrs["n_layers"] = len(decoder_layers(as_module(loaded)))
    return out


# ----------------------------------------------------------------------------- statistics


def _check_scores(scores: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(scores, pd.DataFrame):
        raise ConfigError(f"scores must be the DataFrame of score_pairs(), got {type(scores).__name__}")
    need = ["config", "lang", "pair_id", "layer", "margin", "solved"]
    lacking = [c for c in need if c not in scores.columns]
    if lacking:
        raise ConfigError(f"scores lacks columns {lacking}; build it with score_pairs() or score_variants()")
    if scores.empty:
        raise ConfigError("scores is empty")
    if scores.duplicated(["config", "lang", "pair_id", "layer"]).any():
        raise ConfigError("scores has a (config, lang, pair_id, layer) twice; concatenate each configuration once")
    return scores


def _matrix(scores: pd.DataFrame, lang: str, column: str, keys: list[tuple[str, int]]) -> np.ndarray:
    """``[n_pairs, len(keys)]`` values of ``column`` for one language, rows = pair ids
    (sorted), columns = (config, layer) keys; every key must cover the same pairs."""
    sub = scores[scores["lang"] == lang]
    wide = sub.pivot(index="pair_id", columns=["config", "layer"], values=column)
    missing = [k for k in keys if k not in wide.columns]
    if missing:
        raise ConfigError(f"{lang}: no scores for (config, layer) {missing[:3]}; score them first")
    wide = wide[keys]
    if wide.isna().any().any():
        raise ConfigError(
            f"{lang}: the configurations/layers were scored on different pairs; score every configuration "
            "on the same pairs (a paired bootstrap needs them)"
        )
    return wide.to_numpy(dtype=np.float64)


def _counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    return stats.bootstrap_counts(n, stats.check_boot(n_boot), rng)


def _keys(scores: pd.DataFrame, configs: Sequence[str] | None = None, layers: Sequence[int] | None = None) -> list[tuple[str, int]]:
    frame = scores
    if configs is not None:
        frame = frame[frame["config"].isin(list(configs))]
    if layers is not None:
        frame = frame[frame["layer"].isin([int(x) for x in layers])]
    return list(dict.fromkeys(zip(frame["config"], frame["layer"].astype(int))))


def accuracy_table(scores: pd.DataFrame, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Accuracy and mean margin per (config, lang, layer), each with a percentile bootstrap
    CI over pairs (one resample per language shared by every config and layer).

    Columns: ``config, lang, layer, depth`` (when known), ``n`` (pairs), ``accuracy,
    accuracy_ci_low, accuracy_ci_high, margin, margin_ci_low, margin_ci_high``.
    """
    scores = _check_scores(scores)
    stats.check_level(level)
    keys = _keys(scores)
    rows = []
    for lang in dict.fromkeys(scores["lang"]):
        solved = _matrix(scores, lang, "solved", keys)
        margin = _matrix(scores, lang, "margin", keys)
        n = solved.shape[0]
        counts = _counts(n, n_boot, stats.lang_rng(seed, str(lang)))
        acc_boot = counts @ solved / n
        mar_boot = counts @ margin / n
        acc_lo, acc_hi = stats.percentile_interval(acc_boot, level)
        mar_lo, mar_hi = stats.percentile_interval(mar_boot, level)
        for j, (config, layer) in enumerate(keys):
            rows.append({
                "config": config, "lang": lang, "layer": layer, "n": n,
                "accuracy": solved[:, j].mean(), "accuracy_ci_low": acc_lo[j], "accuracy_ci_high": acc_hi[j],
                "margin": margin[:, j].mean(), "margin_ci_low": mar_lo[j], "margin_ci_high": mar_hi[j],
            })
    out = pd.DataFrame(rows)
    n_layers = scores.attrs.get("n_layers")
    if n_layers:
        out.insert(3, "depth", out["layer"] / float(n_layers))
    out.attrs["level"] = level
    return out


def _select_layer(scores: pd.DataFrame, layer: int | None) -> int:
    """The deepest scored layer (None) or ``layer`` (negative: from the end of the model)."""
    layers = sorted(int(x) for x in scores["layer"].unique())
    if layer is None:
        return layers[-1]
    layer = int(layer)
    if layer < 0 and scores.attrs.get("n_layers"):
        layer += int(scores.attrs["n_layers"])
    if layer not in layers:
        raise ConfigError(f"no scores at layer {layer}; scored layers: {layers}")
    return layer


def peak_depth(
    scores: pd.DataFrame,
    langs: Sequence[str],
    n_layers: int | None = None,
    *,
    config: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    tie: str = "first",
    require_signal: bool = True,
    offset: float = 0.0,
) -> stats.Estimate:
    """Relative depth (``layer / n_layers``) of the layer where agreement accuracy peaks,
    with a bootstrap CI over pairs.

    The accuracy curve over the scored layers is averaged over ``langs`` (equal weight per
    language; each language resampled independently); the peak is its argmax. ``tie``:
    which of several layers sharing the maximal accuracy is the peak, ``"first"`` (the
    shallowest: where agreement is first resolved as well as it ever is), ``"last"`` or
    ``"mean"`` (their mean depth). ``config``: which configuration (default: the only one
    in ``scores``). Undefined (``"no signal"``) when ``require_signal`` and the accuracy at
    the observed peak does not exceed chance (its CI lower bound <= 0.5). ``offset``: report
    ``depth - offset`` instead (value and CI), e.g. ``offset=0.75`` to judge
    ``|peak depth - 0.75| < 0.1`` with ``Hypothesis.evaluate(..., abs_value=True)``.
    """
    scores = _check_scores(scores)
    stats.check_level(level)
    if tie not in ("first", "last", "mean"):
        raise ConfigError(f"tie must be 'first', 'last' or 'mean', got {tie!r}")
    langs = [langs] if isinstance(langs, str) else list(langs)
    if not langs:
        raise ConfigError("langs is empty; name the languages whose accuracy curve to pool, e.g. ['he', 'ar']")
    absent = [lang for lang in langs if lang not in set(scores["lang"])]
    if absent:
        raise ConfigError(f"no scores for languages {absent}; scored: {sorted(set(scores['lang']))}")
    configs = list(dict.fromkeys(scores["config"]))
    if config is None:
        if len(configs) != 1:
            raise ConfigError(f"scores hold several configurations {configs}; pass config=... (e.g. 'fp')")
        config = configs[0]
    elif config not in configs:
        raise ConfigError(f"no scores for config {config!r}; scored: {configs}")
    n_layers = int(n_layers or scores.attrs.get("n_layers") or 0)
    if n_layers < 1:
        raise ConfigError("n_layers is unknown; pass n_layers=loaded.n_layers")
    keys = _keys(scores, [config])
    keys.sort(key=lambda k: k[1])
    layer_idx = np.array([k[1] for k in keys], dtype=np.float64)
    if len(keys) < 2:
        raise ConfigError("a peak needs scores at two or more layers; score_pairs(..., layers=None) scores every layer")
    curve = 0.0
    boot = 0.0
    n_min = None
    for lang in langs:
        solved = _matrix(scores, lang, "solved", keys)
        n = solved.shape[0]
        n_min = n if n_min is None else min(n_min, n)
        counts = _counts(n, n_boot, stats.lang_rng(seed, str(lang)))
        curve = curve + solved.mean(axis=0) / len(langs)
        boot = boot + (counts @ solved / n) / len(langs)

    def locate(acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(peak depth, column of the peak) per row of ``acc`` ([replicates, layers])."""
        acc = np.atleast_2d(acc)
        at_best = np.isclose(acc, acc.max(axis=1, keepdims=True), rtol=0.0, atol=1e-12)
        first = np.argmax(at_best, axis=1)
        if tie == "first":
            col = first
            idx = layer_idx[col]
        elif tie == "last":
            col = acc.shape[1] - 1 - np.argmax(at_best[:, ::-1], axis=1)
            idx = layer_idx[col]
        else:
            col = first
            idx = (at_best * layer_idx).sum(axis=1) / at_best.sum(axis=1)
        return idx / float(n_layers), col

    values, cols = locate(curve)
    value, col = float(values[0]), int(cols[0])
    reps, _ = locate(boot)
    if require_signal:
        lo_acc, hi_acc = stats.percentile_interval(boot[:, col], level)
        if not float(lo_acc) > CHANCE:
            return stats.Estimate.undefined(
                f"no signal: accuracy at the best layer L{int(layer_idx[col])} is {curve[col]:.3f} "
                f"({level:.0%} CI {float(lo_acc):.3f} to {float(hi_acc):.3f}), not above chance {CHANCE}",
                int(n_min), level, value=value - float(offset),
            )
    lo, hi = stats.percentile_interval(reps, level)
    off = float(offset)
    return stats.Estimate(value - off, float(lo) - off, float(hi) - off, int(n_min), level)


def peak_table(
    scores: pd.DataFrame,
    n_layers: int | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    *,
    config: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    tie: str = "first",
) -> pd.DataFrame:
    """:func:`peak_depth` for every language of ``scores`` and for each named group of
    languages (``{"MRL": ["he", "ar"]}``). Columns: ``langs, peak_depth, peak_depth_ci_low,
    peak_depth_ci_high, peak_layer, n, defined, reason``."""
    scores = _check_scores(scores)
    n_layers = int(n_layers or scores.attrs.get("n_layers") or 0)
    targets: dict[str, list[str]] = {lang: [lang] for lang in dict.fromkeys(scores["lang"])}
    for name, members in (groups or {}).items():
        targets[str(name)] = list(members)
    rows = []
    for name, members in targets.items():
        est = peak_depth(scores, members, n_layers, config=config, n_boot=n_boot, seed=seed, level=level, tie=tie)
        rows.append({
            "langs": name, "peak_depth": est.value, "peak_depth_ci_low": est.ci_low, "peak_depth_ci_high": est.ci_high,
            "peak_layer": est.value * n_layers if math.isfinite(est.value) else math.nan,
            "n": est.n, "defined": est.defined, "reason": est.reason or "",
        })
    out = pd.DataFrame(rows)
    out.attrs["level"] = level
    return out


def _weights(weights: Mapping[str, float], scores: pd.DataFrame) -> dict[str, float]:
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError("weights must be a non-empty dict config -> weight, e.g. {'fp': 1, 'all_quantized': -1}")
    configs = set(scores["config"])
    unknown = [c for c in weights if c not in configs]
    if unknown:
        raise ConfigError(f"no scores for configurations {unknown}; scored: {sorted(configs)}")
    return {str(c): float(w) for c, w in weights.items()}


def _contrast_per_lang(scores, lang, weights, layer, n_boot, seed):
    keys = [(c, layer) for c in weights]
    solved = _matrix(scores, lang, "solved", keys)
    w = np.array(list(weights.values()))
    n = solved.shape[0]
    counts = _counts(n, n_boot, stats.lang_rng(seed, str(lang)))
    return float(solved.mean(axis=0) @ w), (counts @ solved / n) @ w, n


def language_contrast(
    scores: pd.DataFrame,
    weights: Mapping[str, float],
    langs: Sequence[str] | None = None,
    *,
    layer: int | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Per language, ``sum_c weights[c] * accuracy(c)`` at ``layer`` (default: the deepest
    scored) with a paired bootstrap CI over pairs; e.g. ``{"fp": 1, "all_quantized": -1}`` is
    the accuracy drop under quantization. Columns ``lang, n, value, value_ci_low,
    value_ci_high``."""
    scores = _check_scores(scores)
    stats.check_level(level)
    w = _weights(weights, scores)
    layer = _select_layer(scores, layer)
    rows = []
    for lang in (langs or list(dict.fromkeys(scores["lang"]))):
        value, boot, n = _contrast_per_lang(scores, lang, w, layer, n_boot, seed)
        lo, hi = stats.percentile_interval(boot, level)
        rows.append({"lang": lang, "n": n, "value": value, "value_ci_low": float(lo), "value_ci_high": float(hi)})
    out = pd.DataFrame(rows)
    out.attrs["level"] = level
    return out


def accuracy_contrast(
    scores: pd.DataFrame,
    weights: Mapping[str, float],
    lr_langs: Sequence[str],
    hr_langs: Sequence[str],
    *,
    layer: int | None = None,
    baseline: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> stats.Estimate:
    """``mean over lr_langs - mean over hr_langs`` of the per-language contrast
    ``sum_c weights[c] * accuracy(c)`` (see :func:`language_contrast`), with a bootstrap CI
    (each language resampled independently, configurations paired within a language).

    E.g. ``{"fp": 1, "all_quantized": -1}``: how much more INT4 lowers agreement accuracy in
    the ``lr_langs`` than in the ``hr_langs`` (> 0: more). ``baseline`` (e.g. ``"fp"``):
    undefined (``"chance: ..."``) when either group's pooled accuracy under it does not
    exceed chance (CI lower bound <= 0.5).
    """
    scores = _check_scores(scores)
    stats.check_level(level)
    w = _weights(weights, scores)
    lr, hr = list(lr_langs), list(hr_langs)
    if not lr or not hr:
        raise ConfigError("lr_langs and hr_langs must both name at least one language, e.g. ['he', 'ar'] and ['en', 'de', 'fr']")
    overlap = sorted(set(lr) & set(hr))
    if overlap:
        raise ConfigError(f"languages {overlap} are in both groups; put each language in one group")
    absent = [lang for lang in lr + hr if lang not in set(scores["lang"])]
    if absent:
        raise ConfigError(f"no scores for languages {absent}; scored: {sorted(set(scores['lang']))}")
    layer = _select_layer(scores, layer)
    n_min = None
    parts = {}
    for lang in lr + hr:
        value, boot, n = _contrast_per_lang(scores, lang, w, layer, n_boot, seed)
        parts[lang] = (value, boot)
        n_min = n if n_min is None else min(n_min, n)
    if baseline is not None:
        if baseline not in set(scores["config"]):
            raise ConfigError(f"no scores for the baseline {baseline!r}")
        for name, group in (("lr_langs", lr), ("hr_langs", hr)):
            vals, boots = [], []
            for lang in group:
                value, boot, _ = _contrast_per_lang(scores, lang, {baseline: 1.0}, layer, n_boot, seed)
                vals.append(value)
                boots.append(boot)
            acc, acc_boot = float(np.mean(vals)), np.mean(boots, axis=0)
            lo, hi = stats.percentile_interval(acc_boot, level)
            if not float(lo) > CHANCE:
                return stats.Estimate.undefined(
                    f"chance: {name} {group} accuracy under {baseline!r} is {acc:.3f} ({level:.0%} CI "
                    f"{float(lo):.3f} to {float(hi):.3f}), not above chance {CHANCE}, so there is no agreement to lose",
                    int(n_min), level,
                )
    value = float(np.mean([parts[x][0] for x in lr]) - np.mean([parts[x][0] for x in hr]))
    boot = np.mean([parts[x][1] for x in lr], axis=0) - np.mean([parts[x][1] for x in hr], axis=0)
    lo, hi = stats.percentile_interval(boot, level)
    return stats.Estimate(value, float(lo), float(hi), int(n_min), level)


# ----------------------------------------------------------------------------- figure


def plot_layer_curves(
    table: pd.DataFrame,
    n_layers: int,
    *,
    config: str | None = None,
    reference_depth: float | None = 0.75,
    band: tuple[float, float] | None = (0.65, 0.85),
    ncols: int = 3,
    title: str | None = None,
):
    """One panel per language: agreement accuracy against relative depth (``layer /
    n_layers``) with its bootstrap CI band, chance (0.5) dashed, ``reference_depth`` as a
    vertical line and ``band`` shaded. ``table``: :func:`accuracy_table` of a per-layer
    scoring. Returns the Figure."""
    import matplotlib.pyplot as plt

    need = ["config", "lang", "layer", "accuracy", "accuracy_ci_low", "accuracy_ci_high"]
    lacking = [c for c in need if c not in table.columns]
    if lacking:
        raise ConfigError(f"plot_layer_curves: table lacks columns {lacking}; pass accuracy_table(scores)")
    if config is None:
        configs = list(dict.fromkeys(table["config"]))
        if len(configs) != 1:
            raise ConfigError(f"the table holds several configurations {configs}; pass config=...")
        config = configs[0]
    sub = table[table["config"] == config]
    langs = list(dict.fromkeys(sub["lang"]))
    ncols = max(1, min(int(ncols), len(langs)))
    nrows = int(math.ceil(len(langs) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), sharex=True, sharey=True, squeeze=False)
    for ax, lang in zip(axes.ravel(), langs):
        d = sub[sub["lang"] == lang].sort_values("layer")
        x = d["layer"].to_numpy(dtype=float) / float(n_layers)
        ax.fill_between(x, d["accuracy_ci_low"], d["accuracy_ci_high"], color="#1f77b4", alpha=0.25, linewidth=0)
        ax.plot(x, d["accuracy"], color="#1f77b4", marker="o", markersize=3)
        ax.axhline(CHANCE, color="grey", linestyle="--", linewidth=1)
        if band is not None:
            ax.axvspan(band[0], band[1], color="#d62728", alpha=0.08)
        if reference_depth is not None:
            ax.axvline(reference_depth, color="#d62728", linestyle=":", linewidth=1)
        n = int(d["n"].iloc[0]) if "n" in d.columns and len(d) else 0
        ax.set_title(f"{lang} (n = {n} pairs)", fontsize=10)
        ax.set_ylim(-0.02, 1.02)
    for ax in axes.ravel()[len(langs):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("depth (layer / n_layers)")
    for ax in axes[:, 0]:
        ax.set_ylabel("agreement accuracy")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig

"""T-001 (seed 004, H1.1): how much information each decoder layer's activations carry.

Seed 004's information-content hypothesis: *high-variance layers encode more information,
so losing precision costs more*. This module measures the "information" half per layer,
on token-level residual-stream activations of a corpus:

Capture
-------
:func:`capture_token_activations` runs the corpus through the model in length-sorted,
right-padded batches (:func:`qhelpers.measure.activations.iter_residual_batches` with the
attention mask; right padding never changes a real token's activation in a causal model) and keeps,
per text, at most ``max_tokens_per_text`` token rows. Candidate positions are the real
tokens from the second text token on (the BOS / first token is left out: its activation is
an attention sink with an outsized norm, and every kept row then has a real previous token
to decode). When a text has more candidates than the cap, the kept positions are drawn
without replacement by a generator seeded from ``(seed, lang, text_id)``, so a text's rows
do not depend on which other texts or languages are captured. Every row keeps its language,
text id, position, token id and previous token id.

Entropy (scale-invariant, see "Why not the histogram entropy")
--------------------------------------------------------------
:func:`gaussian_entropy`: the differential entropy of a Gaussian with the activations'
covariance, ``h = 0.5 * log det(2 pi e Sigma)`` (in bits), computed on **per-feature
standardized** activations by default, i.e. ``h = 0.5 * d * log2(2 pi e) + 0.5 * log2 det R``
with ``R`` the correlation matrix. ``-0.5 log det R`` is the Gaussian total correlation
(multi-information) of the features, so the standardized entropy is high when the hidden
units carry non-redundant (decorrelated) signals and low when they are redundant. Because
it is invariant to rescaling any hidden unit, it is not moved by the residual-stream norm,
which grows with depth, nor by the few "massive activation" dimensions. It is the maximum
entropy of any distribution with that correlation, hence an upper-bound-type summary, not
the true entropy of non-Gaussian activations. ``bias_correct=True`` (default) removes the
known downward bias of the plug-in log-determinant for Gaussian data (Wishart moments,
Ahmed & Gokhale 1989): ``E[log det S] = log det Sigma + d log(2/(n-1)) + sum_{i=1..d}
psi((n-i)/2)``; for the standardized version the same correction is applied to each
diagonal variance, so the estimate of ``log det R`` is unbiased for Gaussian data. It needs
more token rows than hidden units (``n > d``).

:func:`spectral_entropy`: the Shannon entropy (bits) of the normalized PCA spectrum
``p_i = l_i / sum l`` of the raw (centred, unstandardized) activations; ``2**H`` is the
effective rank (Roy & Vetterli 2007). Invariant to a global rescaling, but dominated by
large-variance directions; reported beside the Gaussian entropy.

Why not the histogram entropy: :func:`qhelpers.measure.activations.activation_entropy` bins all
values of a layer; with a data-driven range its value depends on the spread of the values
relative to the outliers, and with ``differential=True`` it grows by ``log2(c)`` when the
activations are multiplied by ``c`` -- so it tracks the residual norm, which grows with
depth in pre-norm transformers, rather than information.

Decoding probe ("can you decode the input from the activations")
-----------------------------------------------------------------
:func:`split_texts` splits TEXTS (never tokens, which would leak overlapping context of
one text into both sides) into ``fit`` / ``val`` / ``test``; on a parallel corpus a text
id goes to the same split in every language, so no translation of a test paragraph is
trained on. :class:`RidgeProbe` is a closed-form ridge regression from the standardized
layer-``L`` activation at position ``t`` to the one-hot identity of the token at ``t``
(target ``"current"``) or ``t - 1`` (``"previous"``, harder: the model must have moved it
there by attention). Only the ``k`` most frequent target ids of the training texts (fit and
val) are classes; rows whose target is not among them are DROPPED from training and
scoring (their number is reported). The penalty ``lambda = alpha * n_fit`` is chosen from
``alphas`` by accuracy on the ``val`` texts (ties: the larger alpha); the ridge scores are
turned into probabilities ``softmax(T * scores)`` with one temperature ``T`` fitted on
``val`` by minimum cross-entropy; then the probe is refitted on fit + val with the chosen
alpha and scored on the ``test`` texts: top-1 accuracy, cross-entropy in bits, the
cross-entropy of the training class frequencies (the "prior", what an activation-blind
decoder achieves) and their difference ``info_bits = prior - probe cross-entropy``: the
Barber-Agakov variational bound ``I(token; activation) >= H(token) - CE(probe)`` with the
entropy ``H`` replaced by the prior's held-out cross-entropy, i.e. the bits per token the
activations save over the best activation-blind decoder (restricted to the top-``k``
classes; an estimate, so it can come out slightly negative for an uninformative layer).
``chance`` is the accuracy of always answering the most frequent training class.

Intervals: percentile bootstrap over test texts (on a parallel corpus, over text ids,
jointly in all languages, like :mod:`qhelpers.stats.scores`); the same resample is used for every
layer, so layer-to-layer comparisons are paired.

Weight variance comes from :func:`qhelpers.measure.weight_stats.layer_table` (``variance_pooled``)
and criticality from :func:`qhelpers.measure.criticality.layer_criticality`; the notebook joins
them with :func:`layer_information`'s table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize_scalar
from scipy.special import digamma, logsumexp

from qhelpers import stats as _stats
from qhelpers.measure.activations import iter_residual_batches
from qhelpers.models.archs import decoder_layers, get_arch, resolve_layers
from qhelpers.models.loaded import as_module
from qhelpers.text.corpora import text_rng
from qhelpers.util.errors import ConfigError, MeasurementError
from qhelpers.util.threads import torch_threads

__all__ = [
    "TokenActivations",
    "capture_token_activations",
    "gaussian_entropy_from_cov",
    "gaussian_entropy",
    "spectral_entropy",
    "entropy_table",
    "split_texts",
    "top_k_classes",
    "RidgeProbe",
    "fit_ridge_probe",
    "ratio_bootstrap",
    "decoding_table",
    "LayerInformation",
    "layer_information",
    "DEFAULT_ALPHAS",
    "TARGETS",
    "plot_information_profile",
]

#: Ridge penalties tried, as ``lambda = alpha * n_fit`` on standardized features.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(10.0**e) for e in range(-4, 5))
#: Decoding targets: the token at ``t`` or at ``t - 1``.
TARGETS: tuple[str, ...] = ("current", "previous")
_TARGET_COL = {"current": "token_id", "previous": "prev_id"}


# ============================================================================ capture


@dataclass
class TokenActivations:
    """Token rows of a corpus and their residual-stream activations.

    ``acts[layer]`` is a float32 ``[n_rows, hidden]`` array whose row ``i`` belongs to
    ``rows.iloc[i]`` (columns ``lang, text_id, position, token_id, prev_id``). ``texts``
    has one row per text: ``lang, text_id, n_tokens`` (after truncation, BOS included),
    ``n_candidates`` (positions eligible), ``n_kept`` and ``truncated``.
    ``max_tokens_per_text`` is the cap (None: every candidate) and ``seed`` its draw.
    """

    acts: dict[int, np.ndarray]
    rows: pd.DataFrame
    texts: pd.DataFrame
    n_layers: int
    max_tokens_per_text: int | None
    seed: int
    max_length: int
    parallel: bool = False

    @property
    def layers(self) -> list[int]:
        """Captured layer indices, ascending."""
        return sorted(self.acts)

    @property
    def n_rows(self) -> int:
        """Number of token rows."""
        return int(len(self.rows))

    @property
    def hidden(self) -> int:
        """Width of the residual stream."""
        return int(next(iter(self.acts.values())).shape[1])

    def layer(self, index: int) -> np.ndarray:
        """The ``[n_rows, hidden]`` activations of one captured layer."""
        if int(index) not in self.acts:
            raise ConfigError(f"layer {index} was not captured (captured: {self.layers}); capture it first")
        return self.acts[int(index)]

    def describe(self) -> str:
        """One line: rows, texts, languages, layers and the cap."""
        cap = "no cap" if self.max_tokens_per_text is None else f"at most {self.max_tokens_per_text} rows per text"
        langs = list(dict.fromkeys(self.rows["lang"]))
        return (f"{self.n_rows} token rows from {len(self.texts)} texts in {langs} ({cap}, seed {self.seed}); "
                f"{len(self.acts)} layers of width {self.hidden}")


def _kept_positions(n_tokens: int, first: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Positions kept for a text of ``n_tokens`` tokens whose first text token is ``first``."""
    candidates = np.arange(first + 1, n_tokens)
    if cap is not None and candidates.size > cap:
        candidates = np.sort(rng.choice(candidates, size=cap, replace=False))
    return candidates


def capture_token_activations(
    loaded: Any,
    corpus: Any,
    layers: int | Iterable[int] | None = None,
    *,
    max_tokens_per_text: int | None = 64,
    max_length: int | None = 512,
    seed: int = 0,
    batch_tokens: int | None = None,
    max_batch: int = 16,
    progress: bool = True,
) -> TokenActivations:
    """Token-level residual-stream activations of ``corpus`` for ``layers`` (default all).

    ``loaded`` is a :class:`~qhelpers.models.loading.LoadedModel` (model and tokenizer). Texts are
    encoded as the scorer encodes them (:func:`qhelpers.measure.scoring.encode_text`, BOS prepended
    when the tokenizer adds none) and truncated to ``max_length`` tokens (capped at the
    model's context). Kept rows: see the module docstring (no BOS / first text token; at most
    ``max_tokens_per_text`` per text, drawn with a generator seeded by ``seed``, the
    language and the text id). Batches hold at most ``batch_tokens`` padded tokens (default
    2048 on CPU, 16384 on CUDA) and ``max_batch`` texts; the forward stops after the last
    requested layer.
    """
    from qhelpers.measure.scoring import context_length
    from qhelpers.text.encoding import default_batch_tokens, encode_corpus

    model = as_module(loaded)
    tokenizer = getattr(loaded, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("capture_token_activations needs a tokenizer: pass the LoadedModel from load_model")
    if max_tokens_per_text is not None and (isinstance(max_tokens_per_text, bool) or int(max_tokens_per_text) < 1):
        raise ConfigError(f"max_tokens_per_text must be an int >= 1 or None (no cap), got {max_tokens_per_text!r}")
    if max_length is not None and int(max_length) < 3:
        raise ConfigError(f"max_length must be >= 3 tokens (BOS, a previous and a current token) or None, got {max_length}")
    if int(max_batch) < 1:
        raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
    n_layers = len(decoder_layers(model, get_arch(model)))
    wanted = resolve_layers(layers, n_layers)
    limit = context_length(model)
    max_len = limit if max_length is None else min(int(max_length), limit)
    device = next(model.parameters()).device
    budget = int(batch_tokens or default_batch_tokens(device))
    if budget < 1:
        raise ConfigError(f"batch_tokens must be >= 1, got {batch_tokens}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cap = None if max_tokens_per_text is None else int(max_tokens_per_text)

    texts = encode_corpus(tokenizer, corpus, max_len)
    positions = [_kept_positions(len(t.ids), t.first, cap, text_rng(seed, t.lang, t.text_id)) for t in texts]
    text_rows = [{"lang": t.lang, "text_id": t.text_id, "n_tokens": len(t.ids),
                  "n_candidates": max(len(t.ids) - t.first - 1, 0), "n_kept": int(pos.size),
                  "truncated": bool(t.truncated)} for t, pos in zip(texts, positions)]
    offsets = np.concatenate([[0], np.cumsum([p.size for p in positions])]).astype(np.int64)
    n_rows = int(offsets[-1])
    if n_rows == 0:
        raise MeasurementError("no text has two tokens after its first one; use longer texts")

    acts: dict[int, np.ndarray] = {}
    for batch, _, _, captured in iter_residual_batches(model, [t.ids for t in texts], wanted, pad_id,
                                                       batch_tokens=budget, max_batch=int(max_batch),
                                                       progress=progress):
        for layer, hidden in captured.items():
            if layer not in acts:
                acts[layer] = np.empty((n_rows, hidden.shape[-1]), dtype=np.float32)
            h = hidden.numpy()
            for row, i in enumerate(batch):
                acts[layer][offsets[i] : offsets[i + 1]] = h[row, positions[i]]
        del captured

    meta = []
    for t, pos in zip(texts, positions):
        arr = np.asarray(t.ids, dtype=np.int64)
        meta.append(pd.DataFrame({"lang": t.lang, "text_id": t.text_id, "position": pos.astype(np.int64),
                                  "token_id": arr[pos], "prev_id": arr[pos - 1]}))
    rows = pd.concat(meta, ignore_index=True)
    parallel = bool(getattr(corpus, "parallel", False))
    return TokenActivations({k: acts[k] for k in sorted(acts)}, rows, pd.DataFrame(text_rows), n_layers,
                            cap, int(seed), max_len, parallel)


# ============================================================================ entropy


def _logdet_psd(cov: Any, what: str) -> float:
    """``log det`` of a symmetric positive definite matrix through its Cholesky factor."""
    c = torch.as_tensor(cov, dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(c)
    logdet = float(2.0 * torch.log(torch.diagonal(chol)).sum()) if int(info) == 0 else math.nan
    if not math.isfinite(logdet):
        raise MeasurementError(
            f"the {what} is singular (not positive definite), so its Gaussian entropy is -inf; "
            "use more token rows than hidden units (raise N_TEXTS or MAX_TOKENS_PER_TEXT) or check for constant units"
        )
    return float(logdet)


def gaussian_entropy_from_cov(cov: Any, base: float = 2.0) -> float:
    """Closed form ``h = 0.5 * log det(2 pi e Sigma)`` of ``N(mu, Sigma)``, in log-``base`` units
    (default bits; ``math.e`` gives nats, as ``scipy.stats.multivariate_normal.entropy``)."""
    c = np.asarray(cov, dtype=np.float64)
    if c.ndim == 0:
        c = c.reshape(1, 1)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] == 0:
        raise ConfigError(f"cov must be a square [d, d] matrix, got shape {c.shape}")
    if not np.allclose(c, c.T, rtol=1e-10, atol=1e-12 * max(1.0, float(np.abs(c).max()))):
        raise ConfigError("cov must be symmetric; pass (cov + cov.T) / 2 if it is only rounding")
    d = c.shape[0]
    nats = 0.5 * (d * math.log(2.0 * math.pi * math.e) + _logdet_psd(c, "covariance"))
    return nats / math.log(base)


def _as_rows(x: Any) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    a = a.astype(np.float64, copy=False)
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 1:
        raise ConfigError(f"activations must be an [n_rows, hidden] matrix with n_rows >= 2, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise MeasurementError("activations contain NaN or inf")
    return a


def _wishart_logdet_bias(n: int, d: int) -> float:
    """``E[log det S] - log det Sigma`` for the unbiased sample covariance of ``n`` Gaussian rows."""
    i = np.arange(1, d + 1, dtype=np.float64)
    return float(d * math.log(2.0 / (n - 1)) + digamma((n - i) / 2.0).sum())


def gaussian_entropy(
    x: Any,
    standardize: str | None = "feature",
    bias_correct: bool = True,
    base: float = 2.0,
    threads: int | None = 1,
) -> float:
    """Gaussian differential entropy (total, log-``base`` units) of the rows of ``x`` ``[n, d]``.

    ``standardize="feature"`` (default): of the per-feature standardized data (the
    correlation matrix; invariant to rescaling any feature). ``"global"``: of the data
    divided by its root mean variance (``tr S / d``; invariant to one global scale only).
    ``None``: of the raw covariance. ``bias_correct`` removes the Gaussian plug-in bias of
    the log-determinants (module docstring); the ``"global"`` trace is not corrected (its
    bias is O(1/(n d))). Needs ``n > d``; a constant feature raises
    :class:`~qhelpers.util.errors.MeasurementError` for ``"feature"``. ``threads``: torch threads
    for the linear algebra (1, the default, is the fastest on a shared CPU; None leaves
    torch's setting).
    """
    if standardize not in ("feature", "global", None):
        raise ConfigError(f"standardize must be 'feature', 'global' or None, got {standardize!r}")
    a = _as_rows(x)
    n, d = a.shape
    if n <= d:
        raise MeasurementError(
            f"{n} rows for {d} features: the sample covariance is singular; need more rows than features "
            "(raise N_TEXTS or MAX_TOKENS_PER_TEXT)"
        )
    with torch_threads(threads):
        t = torch.from_numpy(a)
        centred = t - t.mean(dim=0, keepdim=True)
        cov_t = centred.T @ centred / (n - 1)
        logdet = _logdet_psd(cov_t, "sample covariance")
    cov = cov_t.numpy()
    bias = _wishart_logdet_bias(n, d) if bias_correct else 0.0
    logdet -= bias
    if standardize == "feature":
        var = np.diag(cov)
        if (var <= 0).any():
            raise MeasurementError(
                f"features {np.flatnonzero(var <= 0)[:5].tolist()} are constant, so the correlation matrix is "
                "undefined; drop them or use standardize='global'"
            )
        diag_bias = (math.log(2.0 / (n - 1)) + float(digamma((n - 1) / 2.0))) if bias_correct else 0.0
        logdet -= float(np.log(var).sum()) - d * diag_bias
    elif standardize == "global":
        logdet -= d * math.log(float(np.trace(cov)) / d)
    nats = 0.5 * (d * math.log(2.0 * math.pi * math.e) + logdet)
    return nats / math.log(base)


def spectral_entropy(x: Any, base: float = 2.0, threads: int | None = 1) -> float:
    """Shannon entropy (log-``base``) of the normalized PCA spectrum of the centred rows of ``x``.

    ``p_i = l_i / sum(l)`` with ``l_i`` the squared singular values of the column-centred
    data; ``base**H`` is the effective rank. Zero variance raises MeasurementError.
    ``threads`` as in :func:`gaussian_entropy`.
    """
    a = _as_rows(x)
    with torch_threads(threads):
        t = torch.from_numpy(a)
        centred = t - t.mean(dim=0, keepdim=True)
        gram = centred.T @ centred if centred.shape[0] >= centred.shape[1] else centred @ centred.T
        lam = np.clip(torch.linalg.eigvalsh(gram).numpy(), 0.0, None)
    total = lam.sum()
    if total <= 0:
        raise MeasurementError("the activations have zero variance; their spectrum is undefined")
    p = lam[lam > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(base))


def entropy_table(
    token_acts: TokenActivations,
    standardize: str | None = "feature",
    bias_correct: bool = True,
    threads: int | None = 1,
) -> pd.DataFrame:
    """Per captured layer: ``entropy_bits`` (:func:`gaussian_entropy`, total bits),
    ``entropy_bits_per_dim``, ``spectral_entropy_bits``, ``effective_rank`` (2**spectral),
    ``n_rows`` and ``hidden``. ``threads``: torch threads for the linear algebra (1 is the
    fastest on a shared CPU; None leaves torch's setting)."""
    out = []
    for layer in token_acts.layers:
        x = token_acts.layer(layer)
        h = gaussian_entropy(x, standardize=standardize, bias_correct=bias_correct, threads=threads)
        s = spectral_entropy(x, threads=threads)
        out.append({"layer": layer, "entropy_bits": h, "entropy_bits_per_dim": h / x.shape[1],
                    "spectral_entropy_bits": s, "effective_rank": 2.0**s,
                    "n_rows": int(x.shape[0]), "hidden": int(x.shape[1])})
    return pd.DataFrame(out)


# ============================================================================ split


def split_texts(
    texts: pd.DataFrame,
    test_frac: float = 0.3,
    val_frac: float = 0.2,
    seed: int = 0,
    parallel: bool | None = None,
) -> pd.DataFrame:
    """Assign every text (``lang, text_id`` rows of ``texts``) to ``fit``, ``val`` or ``test``.

    Parallel (default: when every language has the same set of text ids): the ids are
    shuffled once and split, so a paragraph is in one split in every language. Otherwise
    each language's texts are split on their own (generator seeded by ``seed`` and the
    language). Counts per unit set of size ``n``: ``n_test = max(1, round(test_frac * n))``,
    ``n_val = max(1, round(val_frac * (n - n_test)))``, the rest fit (at least 1), so at
    least 3 texts per language are needed. Returns ``lang, text_id, split, unit`` where
    ``unit`` is the bootstrap unit (the text id when parallel, else ``lang/text_id``).
    """
    if not isinstance(texts, pd.DataFrame) or not {"lang", "text_id"} <= set(texts.columns):
        raise ConfigError("texts must be a DataFrame with columns lang and text_id (TokenActivations.texts)")
    if not 0.0 < float(test_frac) < 1.0 or not 0.0 < float(val_frac) < 1.0:
        raise ConfigError(f"test_frac and val_frac must be in (0, 1), e.g. 0.3 and 0.2; got {test_frac}, {val_frac}")
    df = texts[["lang", "text_id"]].astype(str).drop_duplicates().reset_index(drop=True)
    by_lang = {lang: sorted(g["text_id"]) for lang, g in df.groupby("lang", sort=False)}
    if parallel is None:
        sets = [tuple(v) for v in by_lang.values()]
        parallel = len(set(sets)) == 1
    if parallel and len({tuple(v) for v in by_lang.values()}) != 1:
        raise ConfigError("parallel=True but the languages have different text ids; pass parallel=False")

    def assign(ids: list[str], rng: np.random.Generator, where: str) -> dict[str, str]:
        n = len(ids)
        n_test = max(1, int(round(float(test_frac) * n)))
        n_val = max(1, int(round(float(val_frac) * (n - n_test))))
        if n - n_test - n_val < 1:
            raise ConfigError(
                f"{where} has {n} texts: too few for a fit / val / test split by text; "
                "use at least 3 texts per language (raise N_TEXTS)"
            )
        perm = [ids[i] for i in rng.permutation(n)]
        out = {t: "test" for t in perm[:n_test]}
        out.update({t: "val" for t in perm[n_test : n_test + n_val]})
        out.update({t: "fit" for t in perm[n_test + n_val :]})
        return out

    split = []
    if parallel:
        first = next(iter(by_lang.values()))
        mapping = assign(first, np.random.default_rng([int(seed), 7919]), "the corpus")
        for lang, text_id in zip(df["lang"], df["text_id"]):
            split.append((mapping[text_id], text_id))
    else:
        maps = {lang: assign(ids, _stats.lang_rng(seed, lang), f"language {lang!r}")
                for lang, ids in by_lang.items()}
        for lang, text_id in zip(df["lang"], df["text_id"]):
            split.append((maps[lang][text_id], f"{lang}/{text_id}"))
    df["split"] = [s for s, _ in split]
    df["unit"] = [u for _, u in split]
    return df


# ============================================================================ probe


def top_k_classes(targets: Any, k: int) -> np.ndarray:
    """The ``k`` most frequent values of ``targets`` (ties: smaller id first), most frequent first."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ConfigError(f"k must be an int >= 2 (number of token classes), got {k!r}")
    vals, counts = np.unique(np.asarray(targets, dtype=np.int64), return_counts=True)
    order = np.lexsort((vals, -counts))
    return vals[order][: int(k)]


@dataclass
class RidgeProbe:
    """A fitted ridge decoder: standardization, weights, class ids, penalty and temperature."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    intercept: np.ndarray
    classes: np.ndarray
    alpha: float
    temperature: float
    val_accuracy: float = math.nan
    val_table: pd.DataFrame = field(default_factory=pd.DataFrame)

    def scores(self, x: Any) -> np.ndarray:
        """Ridge scores ``[n, k]`` (one column per class)."""
        z = torch.from_numpy((_as_rows_any(x) - self.mean) / self.scale)
        return (z @ torch.from_numpy(self.weights)).numpy() + self.intercept

    def log_proba(self, x: Any) -> np.ndarray:
        """Natural-log probabilities ``log softmax(T * scores)``."""
        s = self.temperature * self.scores(x)
        return s - logsumexp(s, axis=1, keepdims=True)

    def predict(self, x: Any) -> np.ndarray:
        """Predicted token ids (argmax score; ties: the more frequent class)."""
        return self.classes[np.argmax(self.scores(x), axis=1)]


def _as_rows_any(x: Any) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 2:
        raise ConfigError(f"activations must be [n_rows, hidden], got shape {a.shape}")
    return a.astype(np.float64, copy=False)


class _RidgePath:
    """Ridge solutions ``(Z^T Z + lambda I)^-1 Z^T (Y - mean Y)`` for several penalties.

    One Cholesky factorization per penalty: for the handful of penalties tried this is
    cheaper than the eigendecomposition of a full regularization path."""

    def __init__(self, x: np.ndarray, y_idx: np.ndarray, k: int) -> None:
        self.mean = x.mean(axis=0)
        sd = x.std(axis=0)
        self.scale = np.where(sd > 0, sd, 1.0)
        z = torch.from_numpy((x - self.mean) / self.scale)
        counts = np.bincount(y_idx, minlength=k).astype(np.float64)
        self.y_mean = counts / x.shape[0]
        # Z^T (onehot - mean) = Z^T onehot, since the columns of Z are centred
        zty = torch.zeros((k, x.shape[1]), dtype=torch.float64)
        zty.index_add_(0, torch.from_numpy(y_idx), z)
        self.gram = z.T @ z
        self.zty = zty.T.contiguous()
        self.n = x.shape[0]

    def weights(self, alpha: float) -> np.ndarray:
        lam = float(alpha) * self.n
        a = self.gram + lam * torch.eye(self.gram.shape[0], dtype=torch.float64)
        return torch.cholesky_solve(self.zty, torch.linalg.cholesky(a)).numpy()

    def scores(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        z = torch.from_numpy((x - self.mean) / self.scale)
        return (z @ torch.from_numpy(w)).numpy() + self.y_mean


def _fit_temperature(scores: np.ndarray, y_idx: np.ndarray) -> float:
    def ce(log_t: float) -> float:
        s = math.exp(log_t) * scores
        return float(np.mean(logsumexp(s, axis=1) - s[np.arange(len(y_idx)), y_idx]))

    res = minimize_scalar(ce, bounds=(math.log(1e-3), math.log(1e4)), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(res.x))


def fit_ridge_probe(
    x_fit: Any,
    y_fit: Any,
    x_val: Any,
    y_val: Any,
    classes: Any,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    refit: bool = True,
    threads: int | None = 1,
) -> RidgeProbe:
    """Fit a closed-form ridge decoder from activations to token ids among ``classes``.

    Features are standardized with the training rows' mean and std (a constant feature
    gets scale 1). One-hot targets are centred (the intercept is not penalised); the
    penalty is ``lambda = alpha * n_rows``. ``alpha`` is chosen by accuracy on the
    validation rows (ties: the larger alpha), the softmax temperature by minimum
    validation cross-entropy at that alpha; with ``refit`` the weights are then refitted
    on fit + val rows with the chosen alpha. Every ``y`` must be in ``classes``
    (drop the other rows first). ``threads`` as in :func:`gaussian_entropy` (used while
    fitting; :meth:`RidgeProbe.scores` runs with torch's setting).
    """
    classes = np.asarray(classes, dtype=np.int64)
    k = classes.size
    if k < 2 or np.unique(classes).size != k:
        raise ConfigError("classes must hold at least 2 distinct token ids")
    alphas = [float(a) for a in alphas]
    if not alphas or any(not (a > 0 and math.isfinite(a)) for a in alphas):
        raise ConfigError(f"alphas must be positive finite penalties, e.g. {list(DEFAULT_ALPHAS)}; got {alphas}")
    xf, xv = _as_rows_any(x_fit), _as_rows_any(x_val)
    if xf.shape[1] != xv.shape[1]:
        raise ConfigError(f"fit and val activations differ in width: {xf.shape[1]} vs {xv.shape[1]}")
    index = {int(c): i for i, c in enumerate(classes)}

    def to_idx(y: Any, what: str) -> np.ndarray:
        y = np.asarray(y, dtype=np.int64).ravel()
        bad = [int(v) for v in y if int(v) not in index]
        if bad:
            raise ConfigError(f"{what} targets {bad[:5]} are not among the classes; drop those rows first")
        return np.array([index[int(v)] for v in y], dtype=np.int64)

    yf, yv = to_idx(y_fit, "fit"), to_idx(y_val, "val")
    if len(yf) != xf.shape[0] or len(yv) != xv.shape[0]:
        raise ConfigError("each activation row needs exactly one target")
    if xf.shape[0] < 2 or xv.shape[0] < 1:
        raise MeasurementError(f"too few rows to fit a probe: {xf.shape[0]} fit, {xv.shape[0]} val; use more texts")
    with torch_threads(threads):
        path = _RidgePath(xf, yf, k)
        rows = []
        best = None
        for a in sorted(alphas):
            w = path.weights(a)
            s = path.scores(xv, w)
            acc = float(np.mean(np.argmax(s, axis=1) == yv))
            rows.append({"alpha": a, "val_accuracy": acc})
            if best is None or acc >= best[1]:
                best = (a, acc, s)
        alpha, val_acc, s_val = best
        temperature = _fit_temperature(s_val, yv)
        if refit:
            path = _RidgePath(np.vstack([xf, xv]), np.concatenate([yf, yv]), k)
        w = path.weights(alpha)
    return RidgeProbe(path.mean, path.scale, w, path.y_mean, classes, alpha, temperature, val_acc, pd.DataFrame(rows))


# ============================================================================ bootstrap


def ratio_bootstrap(
    num: Any,
    den: Any,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> _stats.Estimate:
    """``sum(num) / sum(den)`` over units with a percentile bootstrap CI over units.

    ``num[u]`` and ``den[u]`` are a unit's totals (e.g. correct predictions and rows of one
    test text). Replicates use :func:`qhelpers.stats.bootstrap_counts` with
    ``np.random.default_rng(seed)``, so two calls with the same seed and number of units
    use the same resamples (paired across layers). Replicates with a zero denominator are
    skipped.
    """
    num = np.asarray(num, dtype=np.float64).ravel()
    den = np.asarray(den, dtype=np.float64).ravel()
    if num.shape != den.shape or num.size == 0:
        raise ConfigError(f"num and den must be non-empty and of equal length, got {num.size} and {den.size}")
    n = int(num.size)
    total = den.sum()
    if total <= 0:
        return _stats.Estimate.undefined("too few: no rows to score", n, level)
    value = float(num.sum() / total)
    if n < 2:
        return _stats.Estimate.undefined("too few: one test text gives no interval", n, level, value)
    counts = _stats.bootstrap_counts(n, int(n_boot), np.random.default_rng(int(seed)))
    with np.errstate(all="ignore"):
        reps = (counts @ num) / (counts @ den)
    lo, hi = _stats.percentile_interval(reps, level)
    return _stats.Estimate(value, float(lo), float(hi), n, level)


# ============================================================================ decoding


def _unit_sums(units: np.ndarray, order: np.ndarray, *values: np.ndarray) -> list[np.ndarray]:
    """Sum each of ``values`` per unit, in the order of ``order`` (all units, zeros if absent)."""
    pos = {u: i for i, u in enumerate(order)}
    idx = np.array([pos[u] for u in units], dtype=np.int64)
    return [np.bincount(idx, weights=v.astype(np.float64), minlength=len(order)) for v in values]


def decoding_table(
    token_acts: TokenActivations,
    split: pd.DataFrame,
    *,
    target: str = "current",
    k: int = 256,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    layers: Iterable[int] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    threads: int | None = 1,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decode the ``target`` token from each layer's activations; see the module docstring.

    ``split`` is :func:`split_texts`'s table. Returns ``(per_layer, per_language)``:

    * per layer: ``layer, target, k, n_classes, alpha, temperature, val_accuracy,
      accuracy`` (+ ``_ci_low``/``_ci_high``), ``ce_bits``, ``prior_bits``, ``info_bits``
      (+ CI), ``chance`` (majority-class accuracy on the test rows), ``n_train_rows``,
      ``n_test_rows``, ``n_dropped_rows`` (rows of any split whose target is not a class),
      ``coverage`` (share of the test rows scored), ``n_test_texts`` (bootstrap units);
    * per language: ``layer, target, lang, accuracy`` (+ CI), ``info_bits`` (+ CI),
      ``chance``, ``n_test_rows``, ``n_test_texts`` and ``coverage`` (the share of the
      language's test rows whose target is one of the ``k`` classes: the rows scored).

    ``threads``: torch threads for the linear algebra (1 is the fastest on a shared CPU;
    None leaves torch's setting).
    """
    if target not in TARGETS:
        raise ConfigError(f"target must be one of {TARGETS}, got {target!r}")
    rows = token_acts.rows
    keys = split.set_index(["lang", "text_id"])
    try:
        info = keys.loc[list(zip(rows["lang"].astype(str), rows["text_id"].astype(str)))]
    except KeyError:
        raise ConfigError("split lacks some texts of token_acts; build it with split_texts(token_acts.texts)") from None
    which = info["split"].to_numpy()
    units = info["unit"].to_numpy()
    y_all = rows[_TARGET_COL[target]].to_numpy(dtype=np.int64)
    train = np.isin(which, ["fit", "val"])
    classes = top_k_classes(y_all[train], k)
    keep = np.isin(y_all, classes)
    fit_m, val_m, test_m = (which == "fit") & keep, (which == "val") & keep, (which == "test") & keep
    if fit_m.sum() < 2 or val_m.sum() < 1 or test_m.sum() < 1:
        raise MeasurementError(
            f"after keeping the top-{k} {target} tokens there are {int(fit_m.sum())} fit, {int(val_m.sum())} val and "
            f"{int(test_m.sum())} test rows; use more texts (N_TEXTS) or rows per text"
        )
    index = {int(c): i for i, c in enumerate(classes)}
    y_test_idx = np.array([index[int(v)] for v in y_all[test_m]], dtype=np.int64)
    train_counts = np.bincount([index[int(v)] for v in y_all[fit_m | val_m]], minlength=classes.size).astype(np.float64)
    prior = train_counts / train_counts.sum()
    prior_loss = -np.log2(prior[y_test_idx])
    majority = int(np.argmax(train_counts))
    majority_hit = (y_test_idx == majority).astype(np.float64)
    test_units = units[test_m]
    test_langs = rows["lang"].astype(str).to_numpy()[test_m]
    all_test_langs = rows["lang"].astype(str).to_numpy()[which == "test"]
    langs = list(dict.fromkeys(all_test_langs))
    lang_test_rows = {lang: int((all_test_langs == lang).sum()) for lang in langs}

    per_layer, per_lang = [], []
    for layer in resolve_layers(None if layers is None else list(layers), token_acts.n_layers):
        x = token_acts.layer(layer)
        probe = fit_ridge_probe(x[fit_m], y_all[fit_m], x[val_m], y_all[val_m], classes, alphas, threads=threads)
        with torch_threads(threads):
            scores = probe.scores(x[test_m])
        s = probe.temperature * scores
        logp = s - logsumexp(s, axis=1, keepdims=True)
        pred_idx = np.argmax(scores, axis=1)
        hit = (pred_idx == y_test_idx).astype(np.float64)
        loss = _stats.nats_to_bits(-logp[np.arange(len(y_test_idx)), y_test_idx])
        gain = prior_loss - loss
        ones = np.ones_like(hit)

        def estimates(mask: np.ndarray) -> dict[str, Any]:
            if not mask.any():  # no test row of this language has a target among the classes
                return {"accuracy": math.nan, "accuracy_ci_low": math.nan, "accuracy_ci_high": math.nan,
                        "info_bits": math.nan, "info_bits_ci_low": math.nan, "info_bits_ci_high": math.nan,
                        "chance": math.nan, "n_test_rows": 0, "n_test_texts": 0}
            order = np.array(sorted(set(test_units[mask])))
            h, g, c, n = _unit_sums(test_units[mask], order, hit[mask], gain[mask], majority_hit[mask], ones[mask])
            acc = ratio_bootstrap(h, n, n_boot, seed, level)
            inf = ratio_bootstrap(g, n, n_boot, seed, level)
            return {"accuracy": acc.value, "accuracy_ci_low": acc.ci_low, "accuracy_ci_high": acc.ci_high,
                    "info_bits": inf.value, "info_bits_ci_low": inf.ci_low, "info_bits_ci_high": inf.ci_high,
                    "chance": float(c.sum() / n.sum()), "n_test_rows": int(n.sum()), "n_test_texts": int(len(order))}

        all_est = estimates(np.ones_like(hit, dtype=bool))
        per_layer.append({
            "layer": layer, "target": target, "k": int(k), "n_classes": int(classes.size),
            "alpha": probe.alpha, "temperature": probe.temperature, "val_accuracy": probe.val_accuracy,
            **{key: all_est[key] for key in ("accuracy", "accuracy_ci_low", "accuracy_ci_high")},
            "ce_bits": float(loss.mean()), "prior_bits": float(prior_loss.mean()),
            **{key: all_est[key] for key in ("info_bits", "info_bits_ci_low", "info_bits_ci_high", "chance")},
            "n_train_rows": int((fit_m | val_m).sum()), "n_test_rows": all_est["n_test_rows"],
            "n_dropped_rows": int((~keep).sum()), "coverage": all_est["n_test_rows"] / int((which == "test").sum()),
            "n_test_texts": all_est["n_test_texts"],
        })
        for lang in langs:
            est = estimates(test_langs == lang)
            per_lang.append({"layer": layer, "target": target, "lang": lang, **est,
                             "coverage": est["n_test_rows"] / lang_test_rows[lang]})
    return pd.DataFrame(per_layer), pd.DataFrame(per_lang)


# ============================================================================ all together


@dataclass
class LayerInformation:
    """The result of :func:`layer_information`.

    ``table``: one row per layer (entropy columns, then ``accuracy_current``,
    ``info_bits_current``, ... with CIs, for every target); ``decoding`` and
    ``per_language``: the long tables of :func:`decoding_table` for all targets;
    ``split``: the text split; ``settings``: the knobs used.
    """

    table: pd.DataFrame
    decoding: pd.DataFrame
    per_language: pd.DataFrame
    split: pd.DataFrame
    settings: dict[str, Any]

    def split_counts(self) -> pd.DataFrame:
        """Texts per language and split."""
        return self.split.groupby(["lang", "split"]).size().unstack("split", fill_value=0)


def layer_information(
    token_acts: TokenActivations,
    *,
    k: int = 256,
    targets: Sequence[str] = TARGETS,
    test_frac: float = 0.3,
    val_frac: float = 0.2,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    entropy_standardize: str | None = "feature",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    threads: int | None = 1,
) -> LayerInformation:
    """Entropy and decoding probes for every captured layer (see the module docstring).

    The split is :func:`split_texts` on ``token_acts.texts`` (parallel when the corpus is);
    the bootstrap uses ``seed`` for every layer and target (paired). ``threads``: torch
    threads for the linear algebra (default 1, the fastest on a shared CPU).
    """
    targets = list(targets)
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ConfigError(f"targets must be a non-empty subset of {TARGETS}, got {targets}")
    split = split_texts(token_acts.texts, test_frac, val_frac, seed, parallel=token_acts.parallel or None)
    table = entropy_table(token_acts, standardize=entropy_standardize, threads=threads)
    table.insert(1, "depth", table["layer"] / max(token_acts.n_layers - 1, 1))
    decs, langs = [], []
    for target in targets:
        d, pl = decoding_table(token_acts, split, target=target, k=k, alphas=alphas, layers=token_acts.layers,
                               n_boot=n_boot, seed=seed, level=level, threads=threads)
        decs.append(d)
        langs.append(pl)
        wide = d.set_index("layer")[["accuracy", "accuracy_ci_low", "accuracy_ci_high", "info_bits",
                                     "info_bits_ci_low", "info_bits_ci_high", "ce_bits", "chance"]]
        wide.columns = [f"{c}_{target}" for c in wide.columns]
        table = table.merge(wide, left_on="layer", right_index=True, how="left")
    settings = {"k": int(k), "targets": targets, "test_frac": float(test_frac), "val_frac": float(val_frac),
                "alphas": [float(a) for a in alphas], "entropy_standardize": entropy_standardize,
                "n_boot": int(n_boot), "seed": int(seed), "level": float(level),
                "max_tokens_per_text": token_acts.max_tokens_per_text, "max_length": token_acts.max_length,
                "n_rows": token_acts.n_rows}
    return LayerInformation(table, pd.concat(decs, ignore_index=True), pd.concat(langs, ignore_index=True), split, settings)


# ============================================================================ plots


def plot_information_profile(
    table: pd.DataFrame,
    panels: Sequence[tuple[str, str]] = (
        ("entropy_bits_per_dim", "Gaussian entropy of standardized activations (bits / dim)"),
        ("accuracy_current", "decoding accuracy, token t"),
        ("accuracy_previous", "decoding accuracy, token t-1"),
        ("variance_pooled", "weight variance (pooled)"),
    ),
    axes: Any = None,
    x: str = "layer",
):
    """One panel per ``(column, title)`` against ``x``; a ``<column>_ci_low``/``_ci_high``
    pair, when present, is drawn as a band, and a ``chance_<target>`` column as a dotted line
    on accuracy panels. Columns absent from ``table`` are skipped."""
    import matplotlib.pyplot as plt

    panels = [(c, t) for c, t in panels if c in table.columns]
    if not panels:
        raise ConfigError(f"none of the panel columns is in the table (columns: {list(table.columns)})")
    if axes is None:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        axes = axes[0]
    else:
        axes = np.atleast_1d(axes)
        fig = axes[0].figure
    t = table.sort_values(x)
    for ax, (col, title) in zip(axes, panels):
        ax.plot(t[x], t[col], marker=".", color="#1f77b4")
        lo, hi = f"{col}_ci_low", f"{col}_ci_high"
        if lo in t.columns and hi in t.columns:
            ax.fill_between(t[x], t[lo].astype(float), t[hi].astype(float), alpha=0.25, color="#1f77b4", label="95% CI")
        if col.startswith("accuracy_") and f"chance_{col[len('accuracy_'):]}" in t.columns:
            ax.plot(t[x], t[f"chance_{col[len('accuracy_'):]}"], ":", color="grey", label="majority class")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(x)
    fig.tight_layout()
    return fig

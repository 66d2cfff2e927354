"""Predicting an adapter's concept class from its weights (seed 001): MLP classifiers,
repeated stratified splits, per-matrix ranking (Phase 1) and the ablation study (Phases 2-3).

Classifier (seed defaults, :class:`ClassifierConfig`): an MLP of ``n_layers`` = 3 linear
layers (in -> 512 -> 512 -> classes), ReLU, dropout 0.3 after each hidden layer, cross-
entropy, Adam lr 1e-3, ReduceLROnPlateau on the validation loss (factor 0.5, patience 10),
batch 32, at most 1000 epochs, early stopping when the validation loss has not improved for
20 epochs (the weights of the best validation epoch are restored). Features are z-scored
with the TRAINING rows' mean and std of each split. Inputs wider than ``max_dim`` (e.g. the
raveled weights of a whole zoo) are first rotated onto the span of the split's centred
training rows (an SVD of the training rows only; all their variance is kept, at most
n_train - 1 dimensions); a first linear layer only ever learns inside that span anyway.

Many models are trained at once: every (feature set, run) pair is one network in a stack of
parameters ``[G, ...]`` trained with batched matrix products, per-model Adam, per-model
learning-rate schedule and early stopping, and finished networks are dropped from the stack
(see :func:`qhelpers.experiments.lora.batched.fit_batched`). Phase 1 (one classifier per matrix and
run) is one such stack.

Splits (:func:`make_splits`): ``n_runs`` stratified train/val/test splits. Per class the
adapters are shuffled once and run k takes the next block of ``round(test_frac * n_c)`` of
them (cyclically) as its test set, so consecutive runs test different adapters and every
adapter is tested about equally often; the validation set (``round(val_frac * n_c)`` per
class, at least 1) is drawn at random from the rest, and the remainder trains. Every run
therefore has the same class counts, and every feature set sees the same splits (paired
comparisons).

Metrics per run: accuracy and macro-F1 (F1 per class ``2TP / (2TP + FP + FN)``, averaged
over the classes present in the true OR the predicted labels: scikit-learn's convention) on
train, val and test; mean and sample std (ddof 1) over runs as the seed reports them;
chance = the majority-class rate.

The interval of the test accuracy (:attr:`EvalResult.test_accuracy`): each adapter's test
accuracy is averaged over the runs in which it was a test adapter, and those per-adapter
values are resampled (percentile bootstrap, ``n_boot`` replicates) -- the adapter is the
independent unit, so repeated runs that test the same adapter are not counted as new
evidence. The value is the mean per-adapter accuracy (equal to the mean over runs when every
adapter is tested equally often). What it ignores: the variability from refitting the
classifier on other training sets beyond the runs done (the classic cross-validation
variance problem; no unbiased estimator exists), and any dependence between adapters of one
class (e.g. adapters trained on overlapping texts). When every tested adapter has the same
value v (e.g. all correct, or two representations that agree on every adapter) the bootstrap
collapses to a point; the interval is then ``v -+ u`` with ``u = 1 - (alpha/2)^(1/n)``, the
Clopper-Pearson upper limit for 0 deviating adapters out of n (for "all n correct" exactly
the Clopper-Pearson interval; for a paired difference the bound on the share of adapters on
which the two disagree), clipped to [0, 1] (accuracy) or [-1, 1] (difference).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from qhelpers.experiments.lora import batched
from qhelpers.experiments.lora import features as lf
from qhelpers.stats.bootstrap import Estimate, bootstrap_indices, percentile_interval
from qhelpers.util.errors import ConfigError

__all__ = [
    "ClassifierConfig",
    "EvalResult",
    "AblationResult",
    "accuracy",
    "macro_f1",
    "make_splits",
    "evaluate",
    "paired_difference",
    "rank_layers",
    "top_layers",
    "ablation_study",
    "format_results",
    "plot_layer_accuracy",
    "plot_ablation",
]


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ClassifierConfig:
    """MLP classifier, splits and interval settings (defaults: seed 001).

    ``n_layers`` counts linear layers (3: in-hidden-hidden-classes). ``train_frac`` +
    ``val_frac`` + ``test_frac`` must be 1. ``memory_mb`` bounds how many networks train at
    once (None: 512 MB on CPU, 4096 MB on CUDA); ``device`` None = CPU. ``n_boot``/``level``
    set the test-accuracy interval.
    """

    hidden: int = 512
    n_layers: int = 3
    dropout: float = 0.3
    lr: float = 1e-3
    lr_factor: float = 0.5
    lr_patience: int = 10
    batch_size: int = 32
    max_epochs: int = 1000
    patience: int = 20
    n_runs: int = 10
    train_frac: float = 0.6
    val_frac: float = 0.2
    test_frac: float = 0.2
    standardize: bool = True
    max_dim: int = 20000
    n_boot: int = 2000
    level: float = 0.95
    seed: int = 0
    memory_mb: float | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        batched.check_training_settings(self, {
            "hidden": 1, "n_layers": 1, "lr_patience": 0, "batch_size": 1, "max_epochs": 1, "patience": 1,
            "n_runs": 1, "max_dim": 1, "n_boot": 1,
        })
        if not 0 < float(self.lr_factor) < 1:
            raise ConfigError(f"ClassifierConfig.lr_factor must be in (0, 1), got {self.lr_factor}")
        fr = (float(self.train_frac), float(self.val_frac), float(self.test_frac))
        if min(fr) <= 0 or abs(sum(fr) - 1.0) > 1e-9:
            raise ConfigError(
                f"train_frac, val_frac, test_frac must be > 0 and sum to 1, got {fr} (sum {sum(fr):.4g}); "
                "e.g. 0.6, 0.2, 0.2"
            )
        if not 0 < float(self.level) < 1:
            raise ConfigError(f"ClassifierConfig.level must be in (0, 1), e.g. 0.95; got {self.level}")


# --------------------------------------------------------------------------- metrics


def _labels(y: Any) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(y)
    if a.ndim != 1 or a.size == 0:
        raise ConfigError(f"y must be a non-empty 1-D array of class labels, got shape {a.shape}")
    classes, codes = np.unique(a, return_inverse=True)
    return classes, codes.astype(np.int64)


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of equal labels."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.shape != p.shape or t.size == 0:
        raise ConfigError(f"y_true and y_pred must be non-empty and of equal length, got {t.shape} and {p.shape}")
    return float(np.mean(t == p))


def macro_f1(y_true: Any, y_pred: Any) -> float:
    """Unweighted mean over the classes present in ``y_true`` or ``y_pred`` of
    ``F1_c = 2 TP / (2 TP + FP + FN)`` (scikit-learn's ``f1_score(average="macro")``)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.shape != p.shape or t.size == 0:
        raise ConfigError(f"y_true and y_pred must be non-empty and of equal length, got {t.shape} and {p.shape}")
    scores = []
    for c in np.union1d(t, p):
        tp = np.sum((t == c) & (p == c))
        fp = np.sum((t != c) & (p == c))
        fn = np.sum((t == c) & (p != c))
        den = 2 * tp + fp + fn
        scores.append(2 * tp / den if den else 0.0)
    return float(np.mean(scores))


# --------------------------------------------------------------------------- splits


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def make_splits(y: Any, config: ClassifierConfig = ClassifierConfig()) -> np.ndarray:
    """``[n_runs, N]`` int array: 0 = train, 1 = validation, 2 = test (module docstring has
    the rotation rule). Deterministic given ``config.seed``."""
    classes, codes = _labels(y)
    if len(classes) < 2:
        raise ConfigError(f"y has a single class {classes.tolist()}; a classifier needs at least 2 classes (languages)")
    R, N = int(config.n_runs), codes.size
    out = np.zeros((R, N), dtype=np.int64)
    for ci, c in enumerate(classes):
        members = np.flatnonzero(codes == ci)
        n_c = members.size
        n_test = max(1, _round_half_up(config.test_frac * n_c))
        n_val = max(1, _round_half_up(config.val_frac * n_c))
        if n_c - n_test - n_val < 1:
            raise ConfigError(
                f"class {c.item()!r} has {n_c} adapters: too few for a train/val/test split ({n_test} test, {n_val} val, "
                "at least 1 train); add adapters (at least 3 per class) or change the split fractions"
            )
        perm = members[np.random.default_rng([int(config.seed), 0, ci]).permutation(n_c)]
        for r in range(R):
            test = perm[(r * n_test + np.arange(n_test)) % n_c]
            rest = np.setdiff1d(members, test)
            val = np.random.default_rng([int(config.seed), 1, r, ci]).choice(rest, n_val, replace=False)
            out[r, test] = 2
            out[r, val] = 1
    return out


# --------------------------------------------------------------------------- training


def _project_span(X: np.ndarray, train_rows: np.ndarray, width: int) -> np.ndarray:
    """Rotate standardised X onto the span of its centred training rows (training SVD only);
    zero-padded to ``width`` columns."""
    tr = X[train_rows]
    mu = tr.mean(0)
    _, s, vt = np.linalg.svd(tr - mu, full_matrices=False)
    k = int(np.sum(s > max(s.max(initial=0.0), 1e-300) * 1e-10)) if s.size else 0
    out = np.zeros((X.shape[0], width))
    out[:, :k] = (X - mu) @ vt[:k].T
    return out


def _zscore(X: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
    tr = X[train_rows]
    mu, sd = tr.mean(0), tr.std(0)
    sd = np.where(sd < 1e-12, 1.0, sd)
    return (X - mu) / sd


def _mlp_forward(P: Mapping[str, torch.Tensor], x: torch.Tensor, n_layers: int, p_drop: float,
                 train: bool, gen: torch.Generator | None) -> torch.Tensor:
    h = x
    for i in range(n_layers - 1):
        h = batched.dropout(torch.relu(batched.linear(P, f"l{i}", h)), p_drop, train, gen)
    return batched.linear(P, f"l{n_layers - 1}", h)


def _train_models(
    features: Sequence[np.ndarray],
    runs: Sequence[int],
    codes: np.ndarray,
    splits: np.ndarray,
    config: ClassifierConfig,
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Train one MLP per (features[i], splits[runs[i]]); return predictions [M, N] (codes)
    on every adapter and the epochs each model ran, [M]."""
    from qhelpers.models.loading import resolve_device

    device = resolve_device(config.device) if config.device is not None else torch.device("cpu")
    M, N = len(features), codes.size
    C = int(codes.max()) + 1
    preds = np.zeros((M, N), dtype=np.int64)
    epochs = np.zeros(M, dtype=np.int64)
    prepared: list[np.ndarray] = []
    for X, r in zip(features, runs):
        tr = np.flatnonzero(splits[r] == 0)
        Z = _zscore(X, tr) if config.standardize else np.asarray(X, dtype=np.float64)
        if Z.shape[1] > config.max_dim:
            Z = _project_span(Z, tr, tr.size)
        prepared.append(Z.astype(np.float32))
    by_dim: dict[int, list[int]] = {}
    for i, Z in enumerate(prepared):
        by_dim.setdefault(Z.shape[1], []).append(i)
    chunks = []
    for d, members in by_dim.items():
        widths = [d] + [config.hidden] * (config.n_layers - 1) + [C]
        n_par = sum(widths[i] * widths[i + 1] + widths[i + 1] for i in range(config.n_layers))
        for idx in batched.model_chunks(len(members), n_par, N * d, batched.memory_budget_mb(config.memory_mb, device)):
            chunks.append((widths, [members[i] for i in idx]))
    it: Iterable = chunks
    if progress:
        from qhelpers.util.progress import progress_bar

        it = progress_bar(chunks, desc=progress, unit="batch")
    y_t = torch.as_tensor(codes, device=device)
    for ci, (widths, members) in enumerate(it):
        gen = torch.Generator().manual_seed(int(config.seed) * 1_000_003 + ci)
        G = len(members)
        params: dict[str, torch.Tensor] = {}
        for i in range(config.n_layers):
            w, b = batched.init_linear(G, widths[i], widths[i + 1], gen)
            params[f"l{i}.w"], params[f"l{i}.b"] = w.to(device), b.to(device)
        X = torch.from_numpy(np.stack([prepared[m] for m in members])).to(device)
        tr = torch.as_tensor(np.stack([np.flatnonzero(splits[runs[m]] == 0) for m in members]), device=device)
        va = torch.as_tensor(np.stack([np.flatnonzero(splits[runs[m]] == 1) for m in members]), device=device)
        data = {"X": X, "train_rows": tr, "val_rows": va,
                "model": torch.as_tensor(np.asarray(members), device=device)}

        def loss_on(P, D, rows, train, g):
            x = torch.take_along_dim(D["X"], rows[..., None], dim=1)
            logits = _mlp_forward(P, x, config.n_layers, config.dropout, train, g)
            target = y_t[rows]
            return F.cross_entropy(logits.reshape(-1, C), target.reshape(-1), reduction="none").view(rows.shape).mean(1)

        def finish(P, Bf, D, local_ids, ep):
            logits = _mlp_forward(P, D["X"], config.n_layers, 0.0, False, None)
            pred = logits.argmax(-1).cpu().numpy()
            for j, m in enumerate(D["model"].cpu().numpy()):
                preds[m] = pred[j]
                epochs[m] = ep[j]

        spec = batched.FitSpec(
            train_loss=lambda P, Bf, D, rows, g: loss_on(P, D, rows, True, g),
            val_loss=lambda P, Bf, D: loss_on(P, D, D["val_rows"], False, None),
            finish=finish, lr=config.lr, max_epochs=config.max_epochs, patience=config.patience,
            batch_size=config.batch_size, lr_factor=config.lr_factor, lr_patience=config.lr_patience,
        )
        batched.fit_batched(params, {}, data, spec, gen)
    return preds, epochs


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class EvalResult:
    """Outcome of :func:`evaluate`: ``runs`` (one row per run: accuracy and macro-F1 on
    train/val/test, epochs), ``mean``/``std`` over runs (std: ddof 1), ``test_accuracy``
    (per-adapter bootstrap, see the module docstring), ``chance`` (majority-class rate),
    ``n`` adapters, ``n_classes``, ``n_features``, and the raw ``splits``/``predictions``
    ([n_runs, N], class codes) with ``y`` (codes) and ``classes`` (the original labels)."""

    n: int
    n_classes: int
    n_features: int
    chance: float
    runs: pd.DataFrame
    mean: dict[str, float]
    std: dict[str, float]
    test_accuracy: Estimate
    splits: np.ndarray = field(repr=False)
    predictions: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)
    classes: tuple = ()

    def per_adapter_accuracy(self) -> np.ndarray:
        """``[N]``: each adapter's accuracy over the runs that tested it (NaN if never tested)."""
        return _per_adapter(self.splits, self.predictions, self.y)

    def summary(self) -> dict[str, Any]:
        """Flat dict: n, n_classes, n_features, chance, <metric> and <metric>_std for every
        metric, test_ci_low, test_ci_high, test_n (tested adapters)."""
        out: dict[str, Any] = {"n": self.n, "n_classes": self.n_classes, "n_features": self.n_features,
                               "chance": self.chance}
        for k, v in self.mean.items():
            out[k] = v
            out[k + "_std"] = self.std[k]
        out.update(test_estimate=self.test_accuracy.value, test_ci_low=self.test_accuracy.ci_low,
                   test_ci_high=self.test_accuracy.ci_high, test_n=self.test_accuracy.n)
        return out


_METRICS = ("train_accuracy", "val_accuracy", "test_accuracy", "train_f1", "val_f1", "test_f1")


def _per_adapter(splits: np.ndarray, preds: np.ndarray, codes: np.ndarray) -> np.ndarray:
    tested = splits == 2
    hits = ((preds == codes[None, :]) & tested).sum(0)
    count = tested.sum(0)
    out = np.full(codes.size, np.nan)
    np.divide(hits, count, out=out, where=count > 0)
    return out


def _bootstrap_mean(values: np.ndarray, n_boot: int, level: float, seed: int, what: str,
                    bounds: tuple[float, float] = (0.0, 1.0)) -> Estimate:
    """Mean of the finite ``values`` with a percentile bootstrap interval; when every value is
    the same (a degenerate bootstrap) the interval is that value +- the Clopper-Pearson bound
    for 0 deviations in n, clipped to ``bounds`` (see the module docstring)."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return Estimate.undefined(f"too few: no adapter was ever {what}", 0, level)
    if np.ptp(v) == 0:
        u = 1.0 - (0.5 * (1.0 - level)) ** (1.0 / v.size)
        lo, hi = max(bounds[0], float(v[0]) - u), min(bounds[1], float(v[0]) + u)
        return Estimate(float(v[0]), lo, hi, int(v.size), level)
    idx = bootstrap_indices(v.size, int(n_boot), np.random.default_rng([int(seed), 2]))
    lo, hi = percentile_interval(v[idx].mean(1), level)
    return Estimate(float(v.mean()), float(lo), float(hi), int(v.size), level)


def _result(preds: np.ndarray, epochs: np.ndarray, splits: np.ndarray, codes: np.ndarray, classes: np.ndarray,
            n_features: int, config: ClassifierConfig) -> EvalResult:
    rows = []
    for r in range(splits.shape[0]):
        row: dict[str, Any] = {"run": r, "epochs": int(epochs[r])}
        for part, code in (("train", 0), ("val", 1), ("test", 2)):
            m = splits[r] == code
            row[f"{part}_accuracy"] = accuracy(codes[m], preds[r, m])
            row[f"{part}_f1"] = macro_f1(codes[m], preds[r, m])
        rows.append(row)
    runs = pd.DataFrame(rows)
    mean = {k: float(runs[k].mean()) for k in _METRICS}
    std = {k: float(runs[k].std(ddof=1)) if len(runs) > 1 else 0.0 for k in _METRICS}
    est = _bootstrap_mean(_per_adapter(splits, preds, codes), config.n_boot, config.level, config.seed, "tested")
    chance = float(np.bincount(codes).max() / codes.size)
    return EvalResult(int(codes.size), int(classes.size), int(n_features), chance, runs, mean, std, est,
                      splits, preds, codes, tuple(classes.tolist()))


def _check_X(X: Any, n: int, what: str = "X") -> np.ndarray:
    a = np.asarray(X, dtype=np.float64)
    if a.ndim not in (2, 3) or a.shape[-2] != n or a.shape[-1] < 1:
        raise ConfigError(
            f"{what} must be [N={n}, n_features] (or [n_runs, N, n_features] for features fitted per split), "
            f"got shape {a.shape}"
        )
    if not np.isfinite(a).all():
        raise ConfigError(f"{what} holds NaN/inf values; repair or drop those features before classifying")
    return a


def evaluate(X: Any, y: Any, config: ClassifierConfig = ClassifierConfig(), progress: bool = False) -> EvalResult:
    """Train ``config.n_runs`` MLPs on the splits of :func:`make_splits` and report accuracy
    and macro-F1 (train/val/test, mean +/- std over runs), chance and the test-accuracy
    interval. ``X`` is ``[N, d]``, or ``[n_runs, N, d]`` when the features were fitted per
    split (learned representations: run k uses ``X[k]``)."""
    if not isinstance(config, ClassifierConfig):
        raise ConfigError("config must be a ClassifierConfig")
    classes, codes = _labels(y)
    a = _check_X(X, codes.size)
    splits = make_splits(y, config)
    R = splits.shape[0]
    if a.ndim == 3 and a.shape[0] != R:
        raise ConfigError(f"X has features for {a.shape[0]} runs but config.n_runs = {R}; fit them on make_splits(y, config)")
    feats = [a[r] if a.ndim == 3 else a for r in range(R)]
    preds, epochs = _train_models(feats, list(range(R)), codes, splits, config, "classifiers" if progress else None)
    return _result(preds, epochs, splits, codes, classes, a.shape[-1], config)


def paired_difference(a: EvalResult, b: EvalResult, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Test accuracy of ``a`` minus that of ``b`` on the SAME splits: per adapter the
    difference of its accuracies over the runs that tested it, resampled over adapters
    (percentile bootstrap). Positive: ``a`` predicts better."""
    if not (isinstance(a, EvalResult) and isinstance(b, EvalResult)):
        raise ConfigError("paired_difference needs two EvalResults from evaluate()/ablation_study()")
    if not (np.array_equal(a.splits, b.splits) and np.array_equal(a.y, b.y)):
        raise ConfigError("the two results were not evaluated on the same splits and labels; use one ClassifierConfig "
                          "(same seed, n_runs and fractions) and the same y for both")
    diff = a.per_adapter_accuracy() - b.per_adapter_accuracy()
    return _bootstrap_mean(diff, n_boot, level, seed, "tested", bounds=(-1.0, 1.0))


# --------------------------------------------------------------------------- Phase 1


def rank_layers(
    matrices: Mapping[str, Any],
    y: Any,
    representation: str = "stats",
    config: ClassifierConfig = ClassifierConfig(),
    names: Iterable[str] | None = None,
    depth: Mapping[str, int] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Phase 1: one classifier per matrix (``n_runs`` each, all trained as one batched stack)
    on a per-matrix ``representation``; rows sorted by mean test accuracy (ties: macro-F1,
    then validation accuracy, then name). Columns: rank, layer (the matrix name, as in the
    seed's top_layers.json), kind (matrix type without layer numbers, e.g. "q_proj.lora_B"),
    depth (from ``depth``, else NaN), accuracy (mean test accuracy
    over runs), accuracy_std, f1, f1_std, val_accuracy, train_accuracy, ci_low/ci_high (the
    per-adapter bootstrap interval), n (tested adapters), chance, n_features."""
    rep = lf.get_representation(representation)
    if rep.kind != "matrix":
        raise ConfigError(
            f"rank_layers needs a per-matrix representation; {representation!r} is {rep.kind}. "
            f"Use one of {[k for k, v in lf.REPRESENTATIONS.items() if v.kind == 'matrix']}"
        )
    if not isinstance(config, ClassifierConfig):
        raise ConfigError("config must be a ClassifierConfig")
    names = lf.check_matrices(matrices, names)
    classes, codes = _labels(y)
    feats = lf.per_matrix_features(representation, matrices, names)
    for n, f in feats.items():
        _check_X(f, codes.size, f"features of {n!r}")
    splits = make_splits(y, config)
    R = splits.shape[0]
    flist = [feats[n] for n in names for _ in range(R)]
    runs = [r for _ in names for r in range(R)]
    preds, epochs = _train_models(flist, runs, codes, splits, config,
                                  f"Phase 1: {len(names)} matrices x {R} runs" if progress else None)
    rows = []
    for i, n in enumerate(names):
        res = _result(preds[i * R:(i + 1) * R], epochs[i * R:(i + 1) * R], splits, codes, classes,
                      feats[n].shape[1], config)
        rows.append({
            "layer": n, "kind": _matrix_kind(n),
            "depth": float(depth[n]) if depth is not None and n in depth else math.nan,
            "accuracy": res.mean["test_accuracy"], "accuracy_std": res.std["test_accuracy"],
            "f1": res.mean["test_f1"], "f1_std": res.std["test_f1"],
            "val_accuracy": res.mean["val_accuracy"], "train_accuracy": res.mean["train_accuracy"],
            "ci_low": res.test_accuracy.ci_low, "ci_high": res.test_accuracy.ci_high, "n": res.test_accuracy.n,
            "chance": res.chance, "n_features": res.n_features,
        })
    table = pd.DataFrame(rows).sort_values(["accuracy", "f1", "val_accuracy", "layer"],
                                           ascending=[False, False, False, True], kind="mergesort")
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table.reset_index(drop=True)


def top_layers(table: pd.DataFrame, k: int) -> list[str]:
    """The names of the ``k`` best rows of a :func:`rank_layers` table."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= k < len(table):
        raise ConfigError(f"k must be an integer in [0, {len(table) - 1}] (keep at least one matrix), got {k!r}")
    return [str(v) for v in table.sort_values("rank")["layer"].head(int(k))]


# --------------------------------------------------------------------------- Phases 2-3


@dataclass(frozen=True)
class AblationResult:
    """``table``: one row per (representation, setting in {"all", "ablated"}) with
    n_features, mean/std of every metric, the test-accuracy interval and chance;
    ``drops``: per representation, test accuracy with all matrices minus after ablation
    (paired over the same splits, per-adapter bootstrap); ``results``: the EvalResults keyed
    by (representation, setting); ``removed``: the ablated matrices."""

    table: pd.DataFrame
    drops: pd.DataFrame
    results: dict[tuple[str, str], EvalResult]
    removed: tuple[str, ...]

    def result(self, representation: str, setting: str = "all") -> EvalResult:
        """The EvalResult of one representation and setting ("all" or "ablated")."""
        try:
            return self.results[(representation, setting)]
        except KeyError:
            raise ConfigError(
                f"no result for ({representation!r}, {setting!r}); available: {sorted(self.results)}"
            ) from None


def ablation_study(
    matrices: Mapping[str, Any],
    y: Any,
    removed: Sequence[str],
    representations: Sequence[str] = lf.HANDCRAFTED + ("coupling",),
    config: ClassifierConfig = ClassifierConfig(),
    pairs: Sequence[tuple[str, str]] | None = None,
    ae_config: lf.AutoencoderConfig | None = None,
    progress: bool = True,
) -> AblationResult:
    """Phases 2-3: every representation on all matrices and after removing ``removed`` (a
    "coupling" pair is removed when either of its matrices is). Learned representations are
    fitted per split on the training adapters (``ae_config``, default AutoencoderConfig with
    ``config``'s seed and device) and computed once for both settings."""
    if not isinstance(config, ClassifierConfig):
        raise ConfigError("config must be a ClassifierConfig")
    reps = list(representations)
    if not reps:
        raise ConfigError(f"representations is empty; choose from {list(lf.REPRESENTATIONS)}")
    for r in reps:
        lf.get_representation(r)
    names = lf.check_matrices(matrices)
    removed = tuple(str(n) for n in removed)
    unknown = [n for n in removed if n not in matrices]
    if unknown:
        raise ConfigError(f"removed matrices {unknown} are not in matrices; pass names from rank_layers' 'layer' column")
    keep = [n for n in names if n not in set(removed)]
    if not keep:
        raise ConfigError("removing those matrices leaves none; ablate fewer (smaller TOP_K)")
    classes, codes = _labels(y)
    splits = make_splits(y, config)
    results: dict[tuple[str, str], EvalResult] = {}
    it: Iterable = reps
    if progress:
        from qhelpers.util.progress import progress_bar

        it = progress_bar(reps, desc="Phases 2-3: representations", unit="repr")
    for r in it:
        rep = lf.get_representation(r)
        if rep.kind == "learned":
            aec = ae_config or lf.AutoencoderConfig(seed=config.seed, device=config.device)
            codes_ = lf.learned_features(r, matrices, splits, aec, names)
            xs = {"all": np.concatenate([codes_[n] for n in names], axis=2),
                  "ablated": np.concatenate([codes_[n] for n in keep], axis=2)}
        elif rep.kind == "pair":
            if pairs is None:
                raise ConfigError("the 'coupling' representation needs pairs=[(A name, B name), ...] (Zoo.pairs())")
            per = lf.per_pair_features(matrices, pairs)
            kept = [p for p in per if p[0] not in set(removed) and p[1] not in set(removed)]
            if not kept:
                raise ConfigError("every LoRA pair contains an ablated matrix; ablate fewer or drop 'coupling'")
            xs = {"all": np.concatenate(list(per.values()), axis=1),
                  "ablated": np.concatenate([per[p] for p in kept], axis=1)}
        else:
            per = lf.per_matrix_features(r, matrices, names)
            xs = {"all": np.concatenate([per[n] for n in names], axis=1),
                  "ablated": np.concatenate([per[n] for n in keep], axis=1)}
        for setting, X in xs.items():
            a = _check_X(X, codes.size, f"{r} features")
            feats = [a[k] if a.ndim == 3 else a for k in range(splits.shape[0])]
            preds, epochs = _train_models(feats, list(range(splits.shape[0])), codes, splits, config)
            results[(r, setting)] = _result(preds, epochs, splits, codes, classes, a.shape[-1], config)
    rows, drops = [], []
    for (r, setting), res in results.items():
        rows.append({"representation": r, "setting": setting, **res.summary()})
    for r in reps:
        d = paired_difference(results[(r, "all")], results[(r, "ablated")], config.n_boot, config.seed, config.level)
        drops.append({"representation": r, "drop": d.value, "drop_ci_low": d.ci_low, "drop_ci_high": d.ci_high,
                      "n": d.n, "defined": d.defined})
    return AblationResult(pd.DataFrame(rows), pd.DataFrame(drops), results, removed)


# --------------------------------------------------------------------------- reporting


def format_results(ranking: pd.DataFrame, ablation: AblationResult, k: int) -> str:
    """The seed's human-readable results.txt: the top-k matrices and, per representation,
    test accuracy and macro-F1 (mean +/- std over runs, and the per-adapter 95 % interval)
    with all matrices and after ablation."""
    lines = [f"Top-{k} most predictive matrices (Phase 1)", ""]
    for _, row in ranking.head(k).iterrows():
        lines.append(f"  {int(row['rank']):3d}. {row['layer']:<48s} accuracy {row['accuracy']:.4f} "
                     f"+/- {row['accuracy_std']:.4f}  [{row['ci_low']:.3f}, {row['ci_high']:.3f}]")
    lines += ["", f"Removed: {', '.join(ablation.removed)}", ""]
    head = f"{'representation':<16s} {'setting':<8s} {'features':>8s}  {'test acc':>17s}  {'95% CI':>15s}  {'test F1':>17s}"
    lines += [head, "-" * len(head)]
    for _, row in ablation.table.iterrows():
        lines.append(
            f"{row['representation']:<16s} {row['setting']:<8s} {int(row['n_features']):>8d}  "
            f"{row['test_accuracy']:.4f} +/- {row['test_accuracy_std']:.4f}  "
            f"[{row['test_ci_low']:.3f}, {row['test_ci_high']:.3f}]  {row['test_f1']:.4f} +/- {row['test_f1_std']:.4f}"
        )
    chance = float(ablation.table["chance"].iloc[0]) if len(ablation.table) else math.nan
    lines += ["", f"chance (majority class) = {chance:.4f}; n adapters = {int(ablation.table['n'].iloc[0])}"]
    return "\n".join(lines) + "\n"


def _matrix_kind(name: str) -> str:
    """The matrix type of a zoo matrix name: its last two path components without layer
    numbers ("L7.model.layers.7.self_attn.q_proj.lora_B" -> "q_proj.lora_B")."""
    parts = [p for p in str(name).split(".") if p and not p.isdigit() and not re.fullmatch(r"L\d+", p)]
    return ".".join(parts[-2:]) if parts else str(name)



def plot_layer_accuracy(table: pd.DataFrame, ax=None, chance: float | None = None, title: str | None = None):
    """Per-matrix test accuracy (with its interval) against decoder-layer depth, one colour
    per matrix type (e.g. ``q_proj.lora_B``; a single colour beyond 12 types)."""
    from qhelpers.report.plots import new_axes

    fig, ax = new_axes(ax, figsize=(9, 4.5))
    kinds = table["kind"] if "kind" in table.columns else table["layer"].map(_matrix_kind)
    x = pd.to_numeric(table["depth"], errors="coerce")
    if x.isna().all():
        x = pd.Series(np.arange(len(table)), index=table.index)
    n_kinds = kinds.nunique()
    offsets = {k: (i - (n_kinds - 1) / 2) * 0.12 for i, k in enumerate(sorted(kinds.unique()))}
    for kind in sorted(kinds.unique()) if n_kinds <= 12 else [None]:
        sel = kinds == kind if kind is not None else kinds == kinds
        xs = x[sel] + (offsets[kind] if kind is not None else 0)
        acc = table.loc[sel, "accuracy"]
        err = [acc - table.loc[sel, "ci_low"], table.loc[sel, "ci_high"] - acc]
        ax.errorbar(xs, acc, yerr=np.clip(np.asarray(err, dtype=float), 0, None), fmt="o", ms=4, capsize=0,
                    elinewidth=0.8, alpha=0.75, label=kind)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("test accuracy (one matrix)")
    ax.set_ylim(-0.02, 1.02)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def plot_ablation(table: pd.DataFrame, ax=None, chance: float | None = None, title: str | None = None):
    """Grouped bars: test accuracy per representation with all matrices and after ablation,
    with the per-adapter bootstrap intervals as error bars."""
    from qhelpers.report.plots import new_axes

    fig, ax = new_axes(ax, figsize=(9, 4.5))
    reps = list(dict.fromkeys(table["representation"]))
    x = np.arange(len(reps))
    for j, (setting, color) in enumerate((("all", "#1f77b4"), ("ablated", "#ff7f0e"))):
        sub = table[table["setting"] == setting].set_index("representation").reindex(reps)
        val = sub["test_estimate"].to_numpy(dtype=float)
        lo, hi = sub["test_ci_low"].to_numpy(dtype=float), sub["test_ci_high"].to_numpy(dtype=float)
        ok = np.isfinite(val) & np.isfinite(lo) & np.isfinite(hi)
        ax.bar(x + (j - 0.5) * 0.38, np.nan_to_num(val), width=0.38, color=color, label=setting)
        ax.errorbar((x + (j - 0.5) * 0.38)[ok], val[ok], yerr=[val[ok] - lo[ok], hi[ok] - val[ok]], fmt="none",
                    ecolor="black", capsize=3)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(x, reps, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (per-adapter mean, 95% CI)")
    ax.set_ylim(0, 1.05)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig

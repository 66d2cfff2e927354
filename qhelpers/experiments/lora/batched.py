"""Many small networks trained at once (seed 001): ``G`` independent networks held as stacked
parameter tensors ``[G, ...]`` and trained together with batched matrix products
(:func:`torch.baddbmm`). The autoencoders of :mod:`qhelpers.experiments.lora.features` and the
classifiers of :mod:`qhelpers.experiments.lora.classify` are trained this way.

A model's parameters are entries ``"<layer>.w"`` ``[G, in, out]`` and ``"<layer>.b"``
``[G, 1, out]`` of a dict; :func:`fit_batched` trains every model of a stack with its own
data rows, early stopping and learning rate, and drops finished models from the stack.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qhelpers.util.errors import ConfigError


def check_training_settings(config: Any, whole_numbers: Mapping[str, int]) -> None:
    """Validate a batched-training config (raise ConfigError naming its class and field): each
    field of ``whole_numbers`` must be an integer >= its bound, and the settings every such
    config has must hold: ``dropout`` in [0, 1), ``lr`` > 0, ``memory_mb`` None or > 0."""
    owner = type(config).__name__
    for name, low in whole_numbers.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(f"{owner}.{name} must be an integer >= {low}, got {value!r}")
    if not 0 <= float(config.dropout) < 1:
        raise ConfigError(f"{owner}.dropout must be in [0, 1), got {config.dropout}")
    if not float(config.lr) > 0:
        raise ConfigError(f"{owner}.lr must be > 0, got {config.lr}")
    if config.memory_mb is not None and not float(config.memory_mb) > 0:
        raise ConfigError(f"{owner}.memory_mb must be > 0 (or None for the device default), got {config.memory_mb}")


def init_linear(G: int, fan_in: int, fan_out: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear's default init (uniform +-1/sqrt(fan_in)) for G independent layers: W [G, in, out], b [G, 1, out]."""
    bound = 1.0 / math.sqrt(fan_in)
    w = (torch.rand(G, fan_in, fan_out, generator=gen) * 2 - 1) * bound
    b = (torch.rand(G, 1, fan_out, generator=gen) * 2 - 1) * bound
    return w, b


def linear(params: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    """Layer ``name`` of every model: ``x [G, B, in] @ W [G, in, out] + b [G, 1, out]``."""
    return torch.baddbmm(params[name + ".b"], x, params[name + ".w"])


class Noise:
    """Random draws for a stack of models. Every draw is made for the whole original stack
    (``n_models``) on the CPU and then restricted to ``slots`` (the original positions of the
    models still training), so a model's random stream never depends on when the others
    stop, nor on the device."""

    def __init__(self, gen: torch.Generator, n_models: int, slots: torch.Tensor | None = None):
        self.gen = gen
        self.n_models = int(n_models)
        self.slots = torch.arange(self.n_models) if slots is None else slots.detach().cpu()

    def rand(self, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """Uniform [0, 1) draws, ``[len(slots), *shape]``."""
        return torch.rand(self.n_models, *shape, generator=self.gen)[self.slots].to(device)

    def randn(self, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """Standard normal draws, ``[len(slots), *shape]``."""
        return torch.randn(self.n_models, *shape, generator=self.gen)[self.slots].to(device)


def dropout(x: torch.Tensor, p: float, train: bool, noise: Noise | None) -> torch.Tensor:
    """Inverted dropout with each model's own draws from ``noise`` (identity unless ``train``)."""
    if not train or p <= 0:
        return x
    keep = noise.rand(x.shape[1:], x.device) >= p
    return x * keep / (1.0 - p)


def batchnorm(params, buffers, name, x, train: bool, momentum: float = 0.1, eps: float = 1e-5):
    """Batch norm over the sample axis of x [G, B, H], per model; running stats in ``buffers``."""
    if train:
        mean = x.mean(1, keepdim=True)
        var = x.var(1, unbiased=False, keepdim=True)
        with torch.no_grad():
            nb = x.shape[1]
            unbiased = var * nb / max(nb - 1, 1)
            buffers[name + ".mean"].mul_(1 - momentum).add_(momentum * mean.detach())
            buffers[name + ".var"].mul_(1 - momentum).add_(momentum * unbiased.detach())
    else:
        mean, var = buffers[name + ".mean"], buffers[name + ".var"]
    return (x - mean) / torch.sqrt(var + eps) * params[name + ".g"] + params[name + ".beta"]


_FUSED_OK: dict[tuple[str, torch.dtype], bool] = {}


def _fused_adam_available(like: torch.Tensor) -> bool:
    """Whether torch's fused Adam runs for tensors like ``like`` (probed once per device/dtype)."""
    key = (like.device.type, like.dtype)
    if key not in _FUSED_OK:
        try:
            from torch.optim.adam import adam

            p = torch.zeros(2, device=like.device, dtype=like.dtype)
            adam([p], [torch.ones_like(p)], [torch.zeros_like(p)], [torch.zeros_like(p)], [], [torch.tensor(0.0)],
                 fused=True, amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-3, weight_decay=0.0, eps=1e-8,
                 maximize=False)
            _FUSED_OK[key] = bool(torch.isfinite(p).all())
        except Exception:  # no fused kernel for this device, dtype or torch version
            _FUSED_OK[key] = False
    return _FUSED_OK[key]


class Adam:
    """Adam (torch defaults) over stacked parameters with a per-model learning rate [G];
    a model with lr 0 is frozen. Adam is element-wise, so each model's update equals that of
    its own optimizer. Models sharing a learning rate are updated by torch's fused kernel
    (``torch.optim.adam.adam(fused=True)``) where available, else by plain tensor ops."""

    def __init__(self, params: Mapping[str, torch.Tensor], lr: torch.Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = params
        self.lr = lr
        self.b1, self.b2 = betas
        self.eps = eps
        self.t = 0
        self.m = {k: torch.zeros_like(v) for k, v in params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in params.items()}
        self.fused = _fused_adam_available(next(iter(params.values())))

    @torch.no_grad()
    def step(self, grads: Mapping[str, torch.Tensor]) -> None:
        """One Adam step of every model with its learning rate."""
        self.t += 1
        lrs = self.lr.detach().cpu().numpy()
        if self.fused:
            self._fused_step(grads, lrs)
            return
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for k, p in self.params.items():
            g, m, v = grads[k], self.m[k], self.v[k]
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            buf = torch.sqrt(v).mul_(1 / math.sqrt(c2)).add_(self.eps)
            torch.div(m, buf, out=buf)
            buf.mul_(self.lr.view(-1, *([1] * (p.dim() - 1))) / c1)
            p.detach().sub_(buf)

    def _fused_step(self, grads: Mapping[str, torch.Tensor], lrs: np.ndarray) -> None:
        from torch.optim.adam import adam

        for value in np.unique(lrs):
            if value <= 0:
                continue
            idx = np.flatnonzero(lrs == value).tolist()
            ps, gs, ms, vs = [], [], [], []
            for k, p in self.params.items():
                for src, dst in ((p.detach(), ps), (grads[k], gs), (self.m[k], ms), (self.v[k], vs)):
                    views = src.unbind(0)
                    dst.extend(views[i] for i in idx)
            steps = [torch.tensor(float(self.t - 1)) for _ in ps]
            adam(ps, gs, ms, vs, [], steps, fused=True, amsgrad=False, beta1=self.b1, beta2=self.b2,
                 lr=float(value), weight_decay=0.0, eps=self.eps, maximize=False)

    def select(self, keep: torch.Tensor) -> None:
        """Keep the moments of the models at positions ``keep`` (the stack was compacted)."""
        self.m = {k: v[keep] for k, v in self.m.items()}
        self.v = {k: v[keep] for k, v in self.v.items()}


@dataclass
class FitSpec:
    """What :func:`fit_batched` needs: per-model data (dict of [G, ...] tensors, compacted
    together with the parameters), a per-model training loss, a per-model validation loss
    and what to do with the finished (best) models."""

    train_loss: Callable[[dict, dict, dict, torch.Tensor, Noise], torch.Tensor]
    val_loss: Callable[[dict, dict, dict], torch.Tensor]
    finish: Callable[[dict, dict, dict, np.ndarray, np.ndarray], None]
    lr: float
    max_epochs: int
    patience: int
    batch_size: int
    lr_factor: float | None = None
    lr_patience: int = 10
    lr_threshold: float = 1e-4


def fit_batched(params: dict, buffers: dict, data: dict, spec: FitSpec, gen: torch.Generator) -> None:
    """Train G models at once. ``data["train_rows"]`` [G, n_train] are each model's training
    rows. Each epoch: a fresh per-model permutation, minibatches of near-equal size (never a
    batch of 1 when n_train >= 2), Adam steps; then the validation loss per model, the
    optional ReduceLROnPlateau rule (torch's: relative threshold 1e-4, reduce when more than
    ``lr_patience`` epochs without improvement), best-state tracking and early stopping after
    ``patience`` epochs without a strictly lower validation loss. Finished models are handed
    to ``spec.finish`` with their best state and dropped from the batch (compaction)."""
    G = next(iter(params.values())).shape[0]
    device = next(iter(params.values())).device
    ids = np.arange(G)
    data.setdefault("slot", torch.arange(G, device=device))
    noise = Noise(gen, G)
    for p in params.values():
        p.requires_grad_(True)
    lr = torch.full((G,), float(spec.lr), device=device)
    opt = Adam(params, lr)
    best = {k: v.detach().clone() for k, v in {**params, **buffers}.items()}
    best_val = torch.full((G,), math.inf, device=device)
    sched_best = torch.full((G,), math.inf, device=device)
    wait = torch.zeros(G, dtype=torch.long, device=device)
    bad = torch.zeros(G, dtype=torch.long, device=device)
    epochs = np.zeros(G, dtype=np.int64)
    n_train = data["train_rows"].shape[1]
    n_batches = max(1, math.ceil(n_train / spec.batch_size))
    bounds = np.cumsum([0] + [len(c) for c in np.array_split(np.arange(n_train), n_batches)])

    def finish(local: np.ndarray) -> None:
        sel = torch.as_tensor(local, device=device)
        bp = {k: best[k][sel] for k in params}
        bb = {k: best[k][sel] for k in buffers}
        dd = {k: v[sel] for k, v in data.items()}
        with torch.no_grad():
            spec.finish(bp, bb, dd, ids[local], epochs[local])

    for epoch in range(spec.max_epochs):
        noise.slots = data["slot"].detach().cpu()
        perm = torch.argsort(noise.rand((n_train,)), dim=1).to(device)
        rows_all = torch.take_along_dim(data["train_rows"], perm, dim=1)
        for i in range(n_batches):
            rows = rows_all[:, bounds[i]:bounds[i + 1]]
            loss = spec.train_loss(params, buffers, data, rows, noise)
            grads = torch.autograd.grad(loss.sum(), list(params.values()))
            opt.step(dict(zip(params.keys(), grads)))
        epochs += 1
        with torch.no_grad():
            val = spec.val_loss(params, buffers, data)
            val = torch.where(torch.isfinite(val), val, torch.full_like(val, math.inf))
            improved = val < best_val
            if improved.any():
                sel = torch.nonzero(improved).flatten()
                for k, v in {**params, **buffers}.items():
                    best[k][sel] = v.detach()[sel]
                best_val = torch.where(improved, val, best_val)
            wait = torch.where(improved, torch.zeros_like(wait), wait + 1)
            if spec.lr_factor is not None:
                better = val < sched_best * (1 - spec.lr_threshold)
                sched_best = torch.where(better, val, sched_best)
                bad = torch.where(better, torch.zeros_like(bad), bad + 1)
                cut = bad > spec.lr_patience
                opt.lr.mul_(torch.where(cut, spec.lr_factor, 1.0))
                bad = torch.where(cut, torch.zeros_like(bad), bad)
        done = (wait >= spec.patience).cpu().numpy()
        if epoch == spec.max_epochs - 1:
            done[:] = True
        if done.any():
            finish(np.flatnonzero(done))
            if done.all():
                break
            keep_np = np.flatnonzero(~done)
            keep = torch.as_tensor(keep_np, device=device)
            ids, epochs = ids[keep_np], epochs[keep_np]
            for k in list(params):
                params[k] = params[k].detach()[keep].requires_grad_(True)
            for k in list(buffers):
                buffers[k] = buffers[k][keep]
            for k in list(data):
                data[k] = data[k][keep]
            best = {k: v[keep] for k, v in best.items()}
            opt.params = params
            opt.lr = opt.lr[keep]
            opt.select(keep)
            best_val, sched_best, wait, bad = best_val[keep], sched_best[keep], wait[keep], bad[keep]


def model_chunks(n_models: int, params_per_model: int, data_per_model: int, budget_mb: float) -> list[np.ndarray]:
    """Split model indices into chunks whose parameters (x6: weights, grads, two Adam moments,
    best copy, temporaries) and data fit ``budget_mb``."""
    per = (6 * params_per_model + 2 * data_per_model) * 4
    size = int(max(1, min(n_models, budget_mb * 2**20 // max(per, 1))))
    return [np.arange(i, min(i + size, n_models)) for i in range(0, n_models, size)]


def memory_budget_mb(memory_mb: float | None, device: torch.device, cpu_default: float = 512.0) -> float:
    """The memory budget of one stack of networks: the given one, else ``cpu_default`` on the
    CPU and 8 times that on a GPU (fewer, larger stacks: GPU time is kernel launches)."""
    if memory_mb is not None:
        return float(memory_mb)
    return cpu_default * (8.0 if torch.device(device).type == "cuda" else 1.0)


def standardize(X: torch.Tensor, train_rows: torch.Tensor) -> torch.Tensor:
    """Per-model, per-feature z-scores with the training rows' mean and std (std < 1e-12 -> 1)."""
    tr = torch.take_along_dim(X, train_rows[..., None], dim=1)
    mu = tr.mean(1, keepdim=True)
    sd = tr.std(1, unbiased=False, keepdim=True)
    sd = torch.where(sd < 1e-12, torch.ones_like(sd), sd)
    return (X - mu) / sd

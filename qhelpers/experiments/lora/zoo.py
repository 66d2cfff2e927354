"""LoRA adapters and a "zoo" of them, one concept class (= language) per adapter.

Seed 001 studies LoRA weight spaces: many adapters, each fine-tuned on one concept class,
and classifiers that predict the class from the adapter's weights. Here the class is the
**language** an adapter was trained on, so the question becomes: which layers' adaptations
carry language identity?

LoRA is implemented here (no ``peft`` dependency). A target module ``W`` (``nn.Linear`` or
GPT-2's ``Conv1D``) is wrapped so that

    y = W(x) + (alpha / r) * x @ A.T @ B.T,      A: [r, in],  B: [out, r]

with ``in``/``out`` the module's input/output features whatever the storage orientation of
``W`` (``Conv1D`` stores ``[in, out]``). As in PEFT, ``B`` starts at zero (the wrapped model
is the base model until trained) and ``A`` is Kaiming-uniform with ``a = sqrt(5)``, i.e.
uniform on ``[-1/sqrt(in), 1/sqrt(in)]``. LoRA matrices are float32 whatever the model dtype.

Targets are registry components (:mod:`qhelpers.models.archs`): ``q``, ``k``, ``v``, ``o``, ``up``,
``gate``, ``down`` (short names), ``attn_q`` ... ``mlp_out`` (registry names) or the groups
``attn``, ``attn_qkv``, ``mlp``, ``linear``. In architectures with a fused q/k/v projection
(GPT-2 ``c_attn``, BLOOM and GPT-NeoX ``query_key_value``) any of ``q``/``k``/``v`` adapts the
whole fused module once, as PEFT does with ``target_modules=["c_attn"]``.

On-disk zoo (PEFT-compatible, so real PEFT adapters can be loaded as well)::

    <zoo>/zoo.json                          manifest: model, configs, versions, created
    <zoo>/labels.csv                        header "adapter,label"
    <zoo>/<adapter>/adapter_model.safetensors
        base_model.model.<module_path>.lora_A.weight   [r, in]
        base_model.model.<module_path>.lora_B.weight   [out, r]
    <zoo>/<adapter>/adapter_config.json     PEFT fields + "qhelpers": {label, seed, text_ids, ...}

Only safetensors is read (never pickle). ``zoo.json`` is optional for :func:`load_zoo`
(a folder of PEFT adapters plus ``labels.csv`` is a zoo); it then finds each module's layer
from the first integer in its path.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from qhelpers.models.archs import (
    COMPONENT_GROUPS,
    get_module,
    resolve_layers,
    weight_out_dim,
)
from qhelpers.models.loaded import dtype_name
from qhelpers.text.encoding import pad_batch
from qhelpers.util.atomic import atomic_write_text
from qhelpers.util.cache import file_sha256, qhelpers_cache_dir
from qhelpers.util.errors import ConfigError

__all__ = [
    "TARGET_ALIASES",
    "LoraConfig",
    "ZooConfig",
    "ZooError",
    "LoraLinear",
    "TrainedAdapter",
    "AdapterPlan",
    "Zoo",
    "valid_targets",
    "resolve_targets",
    "attach_lora",
    "train_adapter",
    "zoo_plan",
    "build_zoo",
    "default_zoo_dir",
    "load_zoo",
]

#: Short target names and the registry component each stands for.
TARGET_ALIASES: dict[str, str] = {
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "o": "attn_out",
    "up": "mlp_in",
    "gate": "mlp_gate",
    "down": "mlp_out",
}

#: Registry components that are weight matrices (LoRA can adapt them).
_MATRIX_COMPONENTS = COMPONENT_GROUPS["linear"]
#: Groups of matrix components accepted as targets.
_TARGET_GROUPS = {
    name: comps for name, comps in COMPONENT_GROUPS.items() if comps and set(comps) <= set(_MATRIX_COMPONENTS)
}

FORMAT = "qhelpers-lora-zoo/1"
MANIFEST = "zoo.json"
LABELS = "labels.csv"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<ab>[AB])\.weight$")
_NAME = re.compile(r"^L(?P<layer>\d+)\.(?P<path>.+)\.lora_(?P<ab>[AB])$")
_MAX_LISTED = 8


class ZooError(ConfigError):
    """A LoRA zoo on disk is missing, malformed or inconsistent (the message names the
    adapters concerned and the fix)."""


def valid_targets() -> list[str]:
    """Every target name :class:`LoraConfig` accepts (short names, registry names, groups)."""
    return [*TARGET_ALIASES, *_MATRIX_COMPONENTS, *_TARGET_GROUPS]


def _listed(items: Sequence[Any], limit: int = _MAX_LISTED) -> str:
    items = [str(i) for i in items]
    head = ", ".join(items[:limit])
    return head + (f" ... ({len(items)} in all)" if len(items) > limit else "")


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class LoraConfig:
    """Which modules get a LoRA adapter and its size.

    Args:
        rank: r, 1..256.
        alpha: scaling numerator; the update is ``(alpha / rank) * B @ A``.
        targets: component names (see :func:`valid_targets`): ``q``, ``k``, ``v``, ``o``,
            ``up``, ``gate``, ``down``, registry names such as ``attn_q``/``mlp_out``, or
            groups ``attn``, ``attn_qkv``, ``mlp``, ``linear``.
        layers: decoder layer indices to adapt (negative counts from the end); None = all.
    """

    rank: int = 4
    alpha: float = 8.0
    targets: tuple[str, ...] = ("q", "v")
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.rank) or not 1 <= self.rank <= 256:
            raise ConfigError(f"LoraConfig.rank must be a whole number in 1..256, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
            math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise ConfigError(f"LoraConfig.alpha must be a positive finite number (e.g. 8.0 = 2 * rank), got {self.alpha!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else self.targets
        try:
            targets = tuple(targets)
        except TypeError:
            raise ConfigError(f"LoraConfig.targets must be a tuple of names, got {self.targets!r}") from None
        if not targets:
            raise ConfigError(f"LoraConfig.targets is empty; name at least one of: {', '.join(valid_targets())}")
        bad = [t for t in targets if not isinstance(t, str) or t not in valid_targets()]
        if bad:
            raise ConfigError(
                f"LoraConfig.targets has unknown component(s) {bad}; valid targets: {', '.join(valid_targets())}"
            )
        if len(set(targets)) != len(targets):
            raise ConfigError(f"LoraConfig.targets repeats a name: {list(targets)}; give each once")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        if self.layers is not None:
            layers = (self.layers,) if _is_int(self.layers) else self.layers
            try:
                layers = tuple(layers)
            except TypeError:
                raise ConfigError(f"LoraConfig.layers must be None or a tuple of layer indices, got {self.layers!r}") from None
            if not layers or not all(_is_int(i) for i in layers):
                raise ConfigError(
                    f"LoraConfig.layers must be None (every layer) or a non-empty tuple of integer layer "
                    f"indices, got {self.layers!r}"
                )
            object.__setattr__(self, "layers", tuple(int(i) for i in layers))

    @property
    def scaling(self) -> float:
        """``alpha / rank``."""
        return self.alpha / self.rank

    def components(self) -> tuple[str, ...]:
        """Registry components named by :attr:`targets`, expanded and de-duplicated, in order."""
        out: list[str] = []
        for t in self.targets:
            comps = _TARGET_GROUPS.get(t) or (TARGET_ALIASES.get(t, t),)
            out.extend(c for c in comps if c not in out)
        return tuple(out)


@dataclass(frozen=True)
class ZooConfig:
    """How a zoo is built: which languages, how many adapters, how each is trained.

    Each adapter trains on its own random subset of ``texts_per_adapter`` texts of its
    language (drawn with ``seed``, the language and the adapter's index), for ``steps``
    AdamW steps (``lr``, no weight decay) on batches of ``batch_size`` windows of at most
    ``max_length`` tokens.
    """

    langs: tuple[str, ...] = ("en", "de", "he", "sw")
    adapters_per_lang: int = 6
    texts_per_adapter: int = 4
    steps: int = 12
    lr: float = 1e-3
    batch_size: int = 2
    max_length: int = 128
    lora: LoraConfig = LoraConfig()
    seed: int = 0

    def __post_init__(self) -> None:
        langs = (self.langs,) if isinstance(self.langs, str) else tuple(self.langs)
        if len(langs) < 2 or not all(isinstance(l, str) and l for l in langs):
            raise ConfigError(
                f"ZooConfig.langs must name at least 2 languages (the classes to tell apart), got {self.langs!r}"
            )
        if len(set(langs)) != len(langs):
            raise ConfigError(f"ZooConfig.langs repeats a language: {list(langs)}; give each once")
        object.__setattr__(self, "langs", langs)
        for name, low in (("adapters_per_lang", 2), ("texts_per_adapter", 1), ("steps", 1), ("batch_size", 1),
                          ("max_length", 2)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                why = " (a class needs at least 2 adapters to be classified)" if name == "adapters_per_lang" else ""
                raise ConfigError(f"ZooConfig.{name} must be a whole number >= {low}{why}, got {value!r}")
            object.__setattr__(self, name, int(value))
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"ZooConfig.lr must be a positive finite number (e.g. 1e-3), got {self.lr!r}")
        object.__setattr__(self, "lr", float(self.lr))
        if isinstance(self.lora, Mapping):
            object.__setattr__(self, "lora", LoraConfig(**self.lora))
        if not isinstance(self.lora, LoraConfig):
            raise ConfigError(f"ZooConfig.lora must be a LoraConfig, got {type(self.lora).__name__}")
        if not _is_int(self.seed):
            raise ConfigError(f"ZooConfig.seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists); ``ZooConfig(**d)`` rebuilds it."""
        return json.loads(json.dumps(asdict(self)))


# ----------------------------------------------------------------------------- wrapping


class LoraLinear(nn.Module):
    """A linear module (``nn.Linear`` or ``Conv1D``) plus a LoRA update.

    ``forward(x) = base(x) + scaling * (x @ lora_A.T) @ lora_B.T``, computed in float32
    and cast to the base output's dtype. Attributes the wrapper lacks (``weight``,
    ``bias``, ``in_features``...) are read from ``base``.
    """

    def __init__(self, base: nn.Module, rank: int, scaling: float, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base = base
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32, device=device))
        self.scaling = float(scaling)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = self.base(x)
        h = x.to(self.lora_A.dtype)
        delta = torch.nn.functional.linear(torch.nn.functional.linear(h, self.lora_A), self.lora_B)
        return out + (delta * self.scaling).to(out.dtype)


def _features(module: nn.Module, path: str) -> tuple[int, int]:
    """(in_features, out_features) of a linear module of either orientation."""
    weight = getattr(module, "weight", None)
    if not isinstance(module, nn.Module) or not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ConfigError(
            f"module {path!r} ({type(module).__name__}) is not a linear layer with a 2-D weight; "
            "LoRA targets must be nn.Linear or Conv1D projections (choose other LoraConfig.targets)"
        )
    out_dim = weight_out_dim(module)
    return int(weight.shape[1 - out_dim]), int(weight.shape[out_dim])


def _check_loaded(loaded: Any) -> None:
    for attr in ("model", "tokenizer", "arch", "spec"):
        if not hasattr(loaded, attr):
            raise ConfigError(
                f"expected a LoadedModel (from qhelpers.models.loading.load_model), got {type(loaded).__name__}; "
                "load the model with load_model(spec) first"
            )


def resolve_targets(loaded: Any, lora: LoraConfig) -> list[tuple[int, str]]:
    """``(layer, module_path)`` of every module ``lora`` adapts in this model, sorted.

    Paths are relative to the causal LM (e.g. ``model.layers.3.self_attn.q_proj``). A
    component named on its own that the architecture lacks (``gate`` in GPT-2) is an error;
    inside a group (``mlp``) it is skipped. Fused q/k/v modules appear once.
    """
    _check_loaded(loaded)
    arch = loaded.arch
    model = loaded.model
    n_layers = loaded.n_layers
    try:
        layers = resolve_layers(lora.layers, n_layers)
    except ConfigError as exc:
        raise ConfigError(f"LoraConfig.layers: {exc}") from None
    explicit = {TARGET_ALIASES.get(t, t) for t in lora.targets if t not in _TARGET_GROUPS}
    missing = sorted(c for c in explicit if not arch.components.get(c))
    if missing:
        have = [t for t in valid_targets() if all(arch.components.get(c) for c in (_TARGET_GROUPS.get(t) or (TARGET_ALIASES.get(t, t),)))]
        raise ConfigError(
            f"{arch.model_type} has no {missing} projection; LoraConfig.targets valid for this architecture: "
            f"{', '.join(have)}"
        )
    rel_paths: list[str] = []
    for comp in lora.components():
        for rel in arch.components.get(comp, ()):
            if rel not in rel_paths:
                rel_paths.append(rel)
    if not rel_paths:
        raise ConfigError(f"LoraConfig.targets {list(lora.targets)} select no module of {arch.model_type}; choose others")
    out = []
    for layer in layers:
        for rel in rel_paths:
            path = f"{arch.layers}.{layer}.{rel}"
            _features(get_module(model, path), path)
            out.append((layer, path))
    return sorted(out)


def _pytorch_kaiming_a(rank: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """PEFT's initialisation of lora_A: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))."""
    a = torch.empty(rank, in_features, dtype=torch.float32)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


@contextlib.contextmanager
def attach_lora(
    loaded: Any,
    lora: LoraConfig,
    tensors: Mapping[str, tuple[Any, Any]] | None = None,
    *,
    seed: int = 0,
) -> Iterator[dict[str, LoraLinear]]:
    """Wrap the modules ``lora`` targets in :class:`LoraLinear` for the ``with`` block.

    ``tensors`` (``{module_path: (A [r, in], B [out, r])}``, numpy or torch) sets the
    matrices, and must cover exactly the targeted modules; without it ``A`` is PEFT's
    Kaiming-uniform draw (seeded by ``seed``) and ``B`` is zero. Yields
    ``{module_path: wrapper}``; the original modules are put back on exit (also on errors),
    so the model's parameters are never changed.
    """
    targets = resolve_targets(loaded, lora)
    model = loaded.model
    paths = [p for _, p in targets]
    if tensors is not None:
        given = set(tensors)
        if given != set(paths):
            raise ConfigError(
                f"tensors must have exactly the modules LoraConfig targets; missing {_listed(sorted(set(paths) - given))}, "
                f"extra {_listed(sorted(given - set(paths)))}. Use the LoraConfig the adapter was trained with."
            )
    gen = torch.Generator().manual_seed(int(seed))
    originals: list[tuple[nn.Module, str, nn.Module]] = []
    wrappers: dict[str, LoraLinear] = {}
    try:
        for path in paths:
            base = get_module(model, path)
            in_f, out_f = _features(base, path)
            wrapper = LoraLinear(base, lora.rank, lora.scaling, in_f, out_f)
            with torch.no_grad():
                if tensors is None:
                    wrapper.lora_A.copy_(_pytorch_kaiming_a(lora.rank, in_f, gen))
                else:
                    a, b = (torch.as_tensor(np.asarray(t) if not isinstance(t, torch.Tensor) else t) for t in tensors[path])
                    if tuple(a.shape) != (lora.rank, in_f) or tuple(b.shape) != (out_f, lora.rank):
                        raise ConfigError(
                            f"{path}: A has shape {tuple(a.shape)} and B {tuple(b.shape)}, expected "
                            f"A {(lora.rank, in_f)} and B {(out_f, lora.rank)} (rank {lora.rank}); "
                            "use the LoraConfig the adapter was trained with"
                        )
                    wrapper.lora_A.copy_(a.to(torch.float32))
                    wrapper.lora_B.copy_(b.to(torch.float32))
            parent_path, _, attr = path.rpartition(".")
            parent = get_module(model, parent_path)
            setattr(parent, attr, wrapper)
            originals.append((parent, attr, base))
            wrappers[path] = wrapper
        yield wrappers
    finally:
        for parent, attr, base in reversed(originals):
            setattr(parent, attr, base)


# ----------------------------------------------------------------------------- training


@dataclass
class TrainedAdapter:
    """One trained adapter.

    ``tensors``: ``{module_path: (A [r, in], B [out, r])}`` as float32 CPU torch tensors;
    ``layers``: ``{module_path: decoder layer}``; ``losses``: the training loss (mean
    cross-entropy per token, nats) of each step's batch before its update.
    """

    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    layers: dict[str, int]
    losses: list[float]
    seconds: float
    lora: LoraConfig
    seed: int
    n_windows: int
    n_tokens: int

    @property
    def final_loss(self) -> float:
        return self.losses[-1]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT-named tensors: ``base_model.model.<path>.lora_A.weight`` / ``lora_B.weight``."""
        out: dict[str, torch.Tensor] = {}
        for path, (a, b) in sorted(self.tensors.items()):
            out[f"base_model.model.{path}.lora_A.weight"] = a.contiguous()
            out[f"base_model.model.{path}.lora_B.weight"] = b.contiguous()
        return out


def _windows(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    from qhelpers.text.encoding import encode_text

    out: list[list[int]] = []
    for text in texts:
        ids = encode_text(tokenizer, text)
        out.extend(ids[i:i + max_length] for i in range(0, len(ids), max_length) if len(ids[i:i + max_length]) >= 2)
    return out


#: Parameter dtypes too narrow to backpropagate through: float16's range (max 65504) is
#: exceeded by the gradients of real models (SmolLM2 on a T4-like fp16 GPU gave NaN at step 1).
UPCAST_FOR_TRAINING = (torch.float16,)


@contextlib.contextmanager
def training_precision(model: nn.Module) -> Iterator[torch.dtype | None]:
    """Train through a float16 model in float32, then give it back bit-identical.

    Parameters in :data:`UPCAST_FOR_TRAINING` are cast to float32 for the duration (buffers,
    such as rotary frequencies, are left alone) and cast back afterwards; float16 -> float32
    -> float16 is exact. Yields the dtype that was upcast, or None when nothing was.
    """
    narrow = [(p, p.dtype) for p in model.parameters() if p.dtype in UPCAST_FOR_TRAINING]
    try:
        for p, _ in narrow:
            p.data = p.data.to(torch.float32)
        yield narrow[0][1] if narrow else None
    finally:
        for p, dtype in narrow:
            p.data = p.data.to(dtype)


def train_adapter(
    loaded: Any,
    texts: Sequence[str],
    lora: LoraConfig = LoraConfig(),
    *,
    steps: int = 12,
    lr: float = 1e-3,
    batch_size: int = 2,
    max_length: int = 128,
    seed: int = 0,
) -> TrainedAdapter:
    """Fine-tune a fresh LoRA adapter on ``texts`` (next-token cross-entropy) and return it.

    Texts are tokenized as qhelpers scores them (BOS in front) and cut into consecutive
    windows of at most ``max_length`` tokens; each step takes the next ``batch_size``
    windows of a seeded shuffle (reshuffled every pass). AdamW (no weight decay) updates the
    LoRA matrices only; the base model stays frozen and in eval mode (no dropout), and is
    bit-identical afterwards. A float16 model is trained through in float32
    (:func:`training_precision`): float16 gradients overflow. Same inputs and ``seed`` ->
    identical tensors (on one device).
    """
    _check_loaded(loaded)
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        raise ConfigError("texts must be a non-empty list of strings (the adapter's training texts)")
    if not isinstance(lora, LoraConfig):
        raise ConfigError(f"lora must be a LoraConfig, got {type(lora).__name__}")
    # reuse ZooConfig's checks of the training knobs
    ZooConfig(steps=steps, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed, lora=lora)
    windows = _windows(loaded.tokenizer, texts, max_length)
    if not windows:
        raise ConfigError("the texts give no window of 2 or more tokens to train on; pass longer texts")
    model = loaded.model
    device = loaded.device
    pad_id = loaded.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    rng = random.Random(f"lora-batches:{seed}")
    targets = resolve_targets(loaded, lora)
    layer_of = {p: l for l, p in targets}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    losses: list[float] = []
    start = time.perf_counter()
    order: list[int] = []
    try:
        model.requires_grad_(False)
        model.eval()
        with training_precision(model), attach_lora(loaded, lora, seed=seed) as wrappers, torch.enable_grad():
            params = [p for w in wrappers.values() for p in (w.lora_A, w.lora_B)]
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            for _ in range(steps):
                batch = []
                for _ in range(batch_size):
                    if not order:
                        order = list(range(len(windows)))
                        rng.shuffle(order)
                    batch.append(windows[order.pop()])
                ids, mask = pad_batch(batch, pad_id)
                ids, mask = ids.to(device), mask.to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits
                target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100
                )
                if not torch.isfinite(loss):
                    raise ConfigError(
                        f"LoRA training diverged (loss {loss.item()}) at step {len(losses)}; lower lr (now {lr})"
                    )
                losses.append(float(loss.item()))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            tensors = {
                p: (w.lora_A.detach().to("cpu", torch.float32).clone(), w.lora_B.detach().to("cpu", torch.float32).clone())
                for p, w in wrappers.items()
            }
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, False))
        model.train(was_training)
    return TrainedAdapter(
        tensors=tensors,
        layers=layer_of,
        losses=losses,
        seconds=time.perf_counter() - start,
        lora=lora,
        seed=int(seed),
        n_windows=len(windows),
        n_tokens=sum(len(w) for w in windows),
    )


# ----------------------------------------------------------------------------- building


@dataclass(frozen=True)
class AdapterPlan:
    """What one adapter of a zoo trains on: id, label (language), texts and seed."""

    adapter: str
    label: str
    index: int
    text_ids: tuple[str, ...]
    texts: tuple[str, ...] = field(repr=False)
    seed: int


def _adapter_seed(seed: int, lang: str, index: int) -> int:
    digest = hashlib.sha256(f"qhelpers-lora:{seed}:{lang}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def zoo_plan(corpus: Any, config: ZooConfig = ZooConfig()) -> list[AdapterPlan]:
    """The adapters :func:`build_zoo` trains, in order: ``{lang}_{k:02d}`` for each language
    and ``k < adapters_per_lang``, each with its own seeded draw of ``texts_per_adapter``
    texts of that language (kept in corpus order) and its own training seed."""
    if not isinstance(config, ZooConfig):
        raise ConfigError(f"config must be a ZooConfig, got {type(config).__name__}")
    plan = []
    for lang in config.langs:
        n = corpus.n_texts(lang)  # CorpusError names the languages the corpus has
        if config.texts_per_adapter > n:
            raise ConfigError(
                f"ZooConfig.texts_per_adapter={config.texts_per_adapter} but the corpus has only {n} "
                f"texts in {lang!r}; lower texts_per_adapter to at most {n} or load more texts (N_TEXTS)"
            )
        for k in range(config.adapters_per_lang):
            idx = sorted(random.Random(f"qhelpers-lora-texts:{config.seed}:{lang}:{k}").sample(range(n), config.texts_per_adapter))
            plan.append(
                AdapterPlan(
                    adapter=f"{lang}_{k:02d}",
                    label=lang,
                    index=k,
                    text_ids=tuple(corpus.ids[lang][i] for i in idx),
                    texts=tuple(corpus.texts[lang][i] for i in idx),
                    seed=_adapter_seed(config.seed, lang, k),
                )
            )
    return plan


def _texts_sha(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def _fingerprint(loaded: Any, config: ZooConfig, item: AdapterPlan) -> dict[str, Any]:
    """Everything that determines an adapter's weights (compared when resuming)."""
    return {
        "model": loaded.spec,
        "dtype": dtype_name(loaded.dtype),
        "lora": asdict(config.lora) | {"targets": list(config.lora.targets),
                                       "layers": None if config.lora.layers is None else list(config.lora.layers)},
        "steps": config.steps,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "max_length": config.max_length,
        "seed": item.seed,
        "label": item.label,
        "text_ids": list(item.text_ids),
        "texts_sha256": _texts_sha(item.texts),
    } | ({"train_dtype": "float32"} if loaded.dtype in UPCAST_FOR_TRAINING else {})


def _manifest_key(manifest: Mapping[str, Any]) -> dict[str, Any]:
    return {k: manifest.get(k) for k in ("format", "model", "dtype", "corpus", "zoo_config")}


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in ("qhelpers", "torch", "transformers", "safetensors", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ZooError(f"{what} {path} is not readable JSON ({exc}); delete it and rebuild (build_zoo)") from None
    if not isinstance(data, dict):
        raise ZooError(f"{what} {path} must hold a JSON object; delete it and rebuild (build_zoo)")
    return data


def _adapter_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _peft_config(loaded: Any, lora: LoraConfig, trained: TrainedAdapter, info: dict[str, Any]) -> dict[str, Any]:
    from transformers.pytorch_utils import Conv1D

    paths = sorted(trained.tensors)
    # block-relative paths ("self_attn.q_proj", "mlp.c_proj"): PEFT matches them as suffixes,
    # and unlike bare names they cannot also catch another module ("attn.c_proj" vs "mlp.c_proj")
    names = sorted({p[len(f"{loaded.arch.layers}.{trained.layers[p]}."):] for p in paths})
    fan_in_fan_out = any(isinstance(get_module(loaded.model, p), Conv1D) for p in paths)
    layers = sorted(set(trained.layers.values()))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": loaded.spec,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": names,
        "layers_to_transform": None if len(layers) == loaded.n_layers else layers,
        "layers_pattern": None if len(layers) == loaded.n_layers else loaded.arch.layers.rsplit(".", 1)[-1],
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "qhelpers": info,
    }


def _write_adapter(root: Path, adapter: str, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write one adapter folder atomically: a hidden temporary folder, then a rename."""
    from safetensors.torch import save_file

    tmp = root / f".tmp-{adapter}-{uuid.uuid4().hex[:8]}"
    final = root / adapter
    tmp.mkdir()
    try:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if isinstance(config.get("qhelpers"), dict):  # checked by load_zoo and when a build resumes
            config = {**config, "qhelpers": {**config["qhelpers"], "weights_sha256": file_sha256(tmp / WEIGHTS)}}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for f in (tmp / WEIGHTS, tmp / CONFIG):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            trash = root / f".trash-{adapter}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_labels(root: Path, labels: Mapping[str, str]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["adapter", "label"])
    for adapter in sorted(labels):
        writer.writerow([adapter, labels[adapter]])
    atomic_write_text(root / LABELS, buf.getvalue())


def _weights_problem(folder: Path, config: Mapping[str, Any]) -> str | None:
    """Why an adapter's weights file does not match the sha256 recorded when it was written (None: it
    does, or no hash was recorded, as for adapters not built by qhelpers)."""
    info = config.get("qhelpers")
    recorded = info.get("weights_sha256") if isinstance(info, Mapping) else None
    if not recorded:
        return None
    try:
        found = file_sha256(folder / WEIGHTS)
    except OSError as exc:
        return f"{WEIGHTS} is unreadable ({exc})"
    return None if found == recorded else f"{WEIGHTS} does not match the sha256 recorded when it was built"


def _adapter_complete(folder: Path, fingerprint: Mapping[str, Any]) -> bool | None:
    """True: complete with this fingerprint; False: complete with another; None: incomplete
    (or damaged: its weights no longer match their recorded sha256, so it is trained again)."""
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        return None
    try:
        cfg = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        found = cfg["qhelpers"]["train"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    problem = _weights_problem(folder, cfg)
    if problem:
        print(f"adapter {folder.name} in {folder.parent} is damaged ({problem}); training it again", flush=True)
        return None
    return found == json.loads(json.dumps(fingerprint))


def default_zoo_dir(loaded: Any, corpus: Any, config: ZooConfig = ZooConfig()) -> Path:
    """A cache folder for this zoo: ``$QHELPERS_CACHE/lora_zoos/<model>-<hash>``, else
    ``~/.cache/qhelpers/lora_zoos/...``. The hash covers the model spec and dtype, the
    :class:`ZooConfig` and every text the plan trains on, so ``build_zoo(loaded, corpus,
    default_zoo_dir(loaded, corpus, config), config)`` builds a zoo once and later runs
    (other notebooks, reruns) load it in seconds."""
    _check_loaded(loaded)
    plan = zoo_plan(corpus, config)
    key = {
        "format": FORMAT,
        "model": loaded.spec,
        "dtype": dtype_name(loaded.dtype),
        "zoo_config": config.to_dict(),
        "texts": [(item.adapter, list(item.text_ids), _texts_sha(item.texts)) for item in plan],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", loaded.spec).strip("_") or "model"
    return qhelpers_cache_dir("lora_zoos") / f"{slug}-{digest}"


def build_zoo(
    loaded: Any,
    corpus: Any,
    out_dir: str | os.PathLike,
    config: ZooConfig = ZooConfig(),
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> "Zoo":
    """Train the adapters of :func:`zoo_plan` and write them to ``out_dir``; return the zoo.

    Resumable: an adapter already on disk, complete and trained with the same settings,
    is skipped, and each adapter is written atomically (temporary folder, then rename), so a
    killed build never leaves half an adapter; run the same call again to finish it. A
    folder built with another model, dtype, corpus or :class:`ZooConfig` raises
    :class:`ZooError` unless ``overwrite=True``, which retrains every adapter (and removes
    adapter folders that are not part of the new plan).
    """
    _check_loaded(loaded)
    if not isinstance(config, ZooConfig):
        raise ConfigError(f"config must be a ZooConfig, got {type(config).__name__}")
    plan = zoo_plan(corpus, config)
    targets = resolve_targets(loaded, config.lora)  # fail on bad targets/layers before training
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise ZooError(f"zoo path {root} is a file; give build_zoo a folder path")
    root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT,
        "model": loaded.spec,
        "model_type": loaded.arch.model_type,
        "n_layers": loaded.n_layers,
        "dtype": dtype_name(loaded.dtype),
        "corpus": getattr(corpus, "name", None),
        "zoo_config": config.to_dict(),
        "modules": [p for _, p in targets],
        "versions": _versions(),
        "created": _now(),
    }
    old_path = root / MANIFEST
    if old_path.exists() and not overwrite:
        old = _read_json(old_path, "zoo manifest")
        if _manifest_key(old) != _manifest_key(manifest):
            diff = [k for k in _manifest_key(manifest) if _manifest_key(old)[k] != _manifest_key(manifest)[k]]
            raise ZooError(
                f"{root} holds a zoo built with different settings ({', '.join(diff)} differ); pass "
                "overwrite=True to rebuild it, or choose another out_dir"
            )
        manifest["created"] = old.get("created", manifest["created"])
    planned = {item.adapter for item in plan}
    for stale in root.iterdir():  # leftovers of a killed build
        if stale.is_dir() and stale.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(stale, ignore_errors=True)
    if overwrite:
        for folder in _adapter_dirs(root):
            if folder.name not in planned and ((folder / CONFIG).exists() or (folder / WEIGHTS).exists()):
                shutil.rmtree(folder)
        (root / LABELS).unlink(missing_ok=True)
    atomic_write_text(old_path, json.dumps(manifest, indent=2) + "\n")

    from qhelpers.util.progress import progress_bar

    trained_ids: list[str] = []
    skipped: list[str] = []
    start = time.perf_counter()
    bar = progress_bar(plan, desc="LoRA zoo", unit="adapter") if progress else plan
    for item in bar:
        fp = _fingerprint(loaded, config, item)
        folder = root / item.adapter
        state = None if overwrite or not folder.exists() else _adapter_complete(folder, fp)
        if state is True:
            skipped.append(item.adapter)
            continue
        if state is False:
            raise ZooError(
                f"adapter {item.adapter!r} in {root} was trained with other settings than this zoo's; "
                f"delete {folder} or pass overwrite=True"
            )
        trained = train_adapter(
            loaded, item.texts, config.lora, steps=config.steps, lr=config.lr, batch_size=config.batch_size,
            max_length=config.max_length, seed=item.seed,
        )
        info = {
            "label": item.label,
            "seed": item.seed,
            "text_ids": list(item.text_ids),
            "steps": config.steps,
            "losses": trained.losses,
            "final_loss": trained.final_loss,
            "seconds": round(trained.seconds, 3),
            "n_windows": trained.n_windows,
            "n_tokens": trained.n_tokens,
            "layers": {p: trained.layers[p] for p in sorted(trained.layers)},
            "train": fp,
        }
        _write_adapter(root, item.adapter, trained.state_dict(), _peft_config(loaded, config.lora, trained, info))
        trained_ids.append(item.adapter)
        if progress and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{trained.losses[0]:.2f}->{trained.final_loss:.2f}")
    _write_labels(root, {item.adapter: item.label for item in plan})
    manifest["completed"] = _now()
    manifest["last_build"] = {"trained": len(trained_ids), "skipped": len(skipped),
                              "seconds": round(time.perf_counter() - start, 2)}
    atomic_write_text(old_path, json.dumps(manifest, indent=2) + "\n")
    return load_zoo(root)


# ----------------------------------------------------------------------------- loading


def _layer_from_path(path: str, layers_prefix: str | None) -> int | None:
    if layers_prefix and path.startswith(layers_prefix + "."):
        head = path[len(layers_prefix) + 1:].split(".", 1)[0]
        if head.isdigit():
            return int(head)
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def _read_labels(root: Path) -> dict[str, str]:
    path = root / LABELS
    if not path.is_file():
        raise ZooError(
            f"zoo {root} has no {LABELS}; write one with header 'adapter,label' and one row per adapter folder "
            "(build_zoo writes it at the end of a complete build: rerun build_zoo to finish an interrupted one)"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ZooError(f"{path} is not readable UTF-8 text ({exc}); rewrite it as CSV 'adapter,label'") from None
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip() for f in (reader.fieldnames or [])]
    if "adapter" not in fields or "label" not in fields:
        raise ZooError(
            f"{path} must have columns 'adapter' and 'label' in its header row; found {fields or 'no header'}. "
            "Make the first line 'adapter,label'"
        )
    labels: dict[str, str] = {}
    dup: list[str] = []
    empty: list[str] = []
    for row in reader:
        row = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else v for k, v in row.items()}
        adapter, label = row.get("adapter") or "", row.get("label") or ""
        if not adapter:
            continue
        if not label:
            empty.append(adapter)
        if adapter in labels:
            dup.append(adapter)
        labels[adapter] = label
    if empty:
        raise ZooError(f"{path}: adapters with an empty label: {_listed(empty)}; give each adapter its class")
    if dup:
        raise ZooError(f"{path} lists adapters more than once: {_listed(sorted(set(dup)))}; keep one row per adapter")
    if not labels:
        raise ZooError(f"{path} has no rows; add one 'adapter,label' row per adapter folder")
    return labels


class Zoo:
    """A validated LoRA zoo loaded into memory (use :func:`load_zoo` or :func:`build_zoo`).

    Attributes:
        path: the zoo folder.
        adapters: adapter ids, sorted.
        labels: ``{adapter: class}``.
        classes: class names, sorted (``y()`` indexes into it).
        manifest: ``zoo.json`` (empty dict for a plain PEFT folder without one).
        configs: ``{adapter: adapter_config.json}``.
    """

    def __init__(
        self,
        path: Path,
        labels: dict[str, str],
        manifest: dict[str, Any],
        configs: dict[str, dict[str, Any]],
        data: dict[str, dict[str, np.ndarray]],
        layers: dict[str, int],
    ) -> None:
        self.path = path
        self.adapters: list[str] = sorted(labels)
        self.labels = dict(labels)
        self.classes: list[str] = sorted(set(labels.values()))
        self.manifest = manifest
        self.configs = configs
        self._data = data
        self._layers = layers  # module path -> layer
        self._names = sorted(
            (f"L{layers[p]}.{p}.lora_{ab}" for p in layers for ab in "AB"),
            key=lambda n: (layers[_NAME.match(n)["path"]], _NAME.match(n)["path"], n[-1]),
        )

    def __repr__(self) -> str:
        return f"Zoo({self.describe()})"

    def __len__(self) -> int:
        return len(self.adapters)

    def matrix_names(self) -> list[str]:
        """``L{layer}.{module_path}.lora_A`` / ``.lora_B``, sorted by (layer, path, A before B)."""
        return list(self._names)

    def pairs(self) -> list[tuple[str, str]]:
        """``(A name, B name)`` per adapted module, in :meth:`matrix_names` order."""
        names = self._names
        return [(names[i], names[i + 1]) for i in range(0, len(names), 2)]

    def modules(self) -> list[str]:
        """Adapted module paths, in :meth:`pairs` order."""
        return [_NAME.match(a)["path"] for a, _ in self.pairs()]

    def layers(self) -> list[int]:
        """Sorted decoder layers that have at least one adapted module."""
        return sorted(set(self._layers.values()))

    def _check_name(self, name: str) -> re.Match:
        m = _NAME.match(name) if isinstance(name, str) else None
        if m is None or m["path"] not in self._layers or int(m["layer"]) != self._layers[m["path"]]:
            raise ConfigError(
                f"{name!r} is not a matrix of this zoo; names look like {self._names[0]!r} "
                "(see Zoo.matrix_names())"
            )
        return m

    def layer_of(self, name: str) -> int:
        """Decoder layer index of a matrix name (or of a module path)."""
        if isinstance(name, str) and name in self._layers:
            return self._layers[name]
        return int(self._check_name(name)["layer"])

    def matrices(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """``{name: float32 array [n_adapters, rows, cols]}``, adapters in :attr:`adapters` order.

        ``lora_A`` matrices are ``[r, in]``, ``lora_B`` are ``[out, r]``. Default: every matrix.
        """
        if names is None:
            names = self._names
        elif isinstance(names, str):
            names = [names]
        out = {}
        for name in names:
            self._check_name(name)
            out[name] = np.stack([self._data[a][name] for a in self.adapters])
        return out

    def adapter_tensors(self, adapter: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{module_path: (A, B)}`` of one adapter (the form :func:`attach_lora` takes)."""
        if adapter not in self._data:
            raise ConfigError(f"no adapter {adapter!r} in this zoo; adapters: {_listed(self.adapters)}")
        return {
            _NAME.match(a)["path"]: (self._data[adapter][a], self._data[adapter][b]) for a, b in self.pairs()
        }

    def lora_config(self) -> LoraConfig | None:
        """The :class:`LoraConfig` the zoo was built with (None for a plain PEFT folder)."""
        cfg = self.manifest.get("zoo_config", {}).get("lora")
        return LoraConfig(**cfg) if cfg else None

    def scaling(self) -> dict[str, float]:
        """``{adapter: lora_alpha / r}`` from each adapter_config.json (NaN where absent)."""
        out = {}
        for a in self.adapters:
            c = self.configs[a]
            r, alpha = c.get("r"), c.get("lora_alpha")
            out[a] = float(alpha) / float(r) if r and alpha is not None else float("nan")
        return out

    def y(self) -> np.ndarray:
        """Integer class labels aligned with :attr:`adapters` (indices into :attr:`classes`)."""
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[self.labels[a]] for a in self.adapters], dtype=np.int64)

    def counts(self) -> dict[str, int]:
        """Adapters per class."""
        c = Counter(self.labels.values())
        return {k: c[k] for k in self.classes}

    def describe(self) -> str:
        """One-line summary."""
        shapes = {tuple(self._data[self.adapters[0]][n].shape) for n in self._names[:2]}
        rank = min(min(s) for s in shapes) if shapes else "?"
        model = self.manifest.get("model") or self.configs[self.adapters[0]].get("base_model_name_or_path") or "unknown model"
        counts = ", ".join(f"{k}: {v}" for k, v in self.counts().items())
        return (
            f"LoRA zoo {self.path}: {len(self.adapters)} adapters ({counts}), "
            f"{len(self._names) // 2} adapted modules in {len(self.layers())} layers, rank {rank}, base {model}"
        )


def load_zoo(path: str | os.PathLike) -> Zoo:
    """Read and validate a zoo folder (see the module docstring for the layout).

    Raises :class:`ZooError` (naming the adapters concerned and the fix) for: a missing
    folder or ``labels.csv``; labels without ``adapter``/``label`` columns; labels for
    adapters without a folder; adapter folders without a label or missing
    ``adapter_model.safetensors``/``adapter_config.json`` (or holding ``adapter_model.bin``);
    adapters whose matrix names or shapes differ from the others'; NaN/inf values; fewer
    than 2 classes or a class with fewer than 2 adapters.
    """
    root = Path(path)
    if not root.is_dir():
        raise ZooError(
            f"zoo folder {root} does not exist (or is not a folder); build one with "
            f"build_zoo(loaded, corpus, {str(root)!r}) or check the path"
        )
    manifest = _read_json(root / MANIFEST, "zoo manifest") if (root / MANIFEST).exists() else {}
    labels = _read_labels(root)
    folders = {p.name: p for p in _adapter_dirs(root)}
    no_folder = sorted(set(labels) - set(folders))
    if no_folder:
        raise ZooError(
            f"labels for missing adapters: {LABELS} lists {_listed(no_folder)} but {root} has no such folder; "
            "remove those rows or restore the adapter folders (rerun build_zoo)"
        )
    unlabeled = sorted(set(folders) - set(labels))
    if unlabeled:
        raise ZooError(
            f"adapter folders with no label in {LABELS}: {_listed(unlabeled)}; add an 'adapter,label' row for "
            "each or move the folders out of the zoo"
        )
    pickled = sorted(a for a in labels if not (folders[a] / WEIGHTS).exists() and
                     any((folders[a] / n).exists() for n in ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")))
    if pickled:
        raise ZooError(
            f"adapters {_listed(pickled)} store adapter_model.bin (pickle), which qhelpers never loads; convert "
            "each to adapter_model.safetensors (e.g. safetensors.torch.save_file(torch.load(p, weights_only=True), "
            "'adapter_model.safetensors') in a trusted environment, or re-save with PEFT's "
            "save_pretrained(safe_serialization=True))"
        )
    missing = {a: [n for n in (WEIGHTS, CONFIG) if not (folders[a] / n).is_file()] for a in sorted(labels)}
    missing = {a: m for a, m in missing.items() if m}
    if missing:
        detail = "; ".join(f"{a}: {', '.join(m)}" for a, m in list(missing.items())[:_MAX_LISTED])
        raise ZooError(
            f"missing adapter files ({len(missing)} adapters): {detail}. Rebuild those adapters (rerun build_zoo, "
            "which retrains incomplete ones) or remove them and their labels"
        )

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    layers_prefix = None
    if manifest.get("model_type"):
        try:
            from qhelpers.models.archs import get_arch

            layers_prefix = get_arch(manifest["model_type"]).layers
        except Exception:  # an unknown architecture still loads (first integer in the path)
            layers_prefix = None
    configs: dict[str, dict[str, Any]] = {}
    data: dict[str, dict[str, np.ndarray]] = {}
    layer_maps: dict[str, dict[str, int]] = {}
    nonfinite: list[str] = []
    for a in sorted(labels):
        configs[a] = _read_json(folders[a] / CONFIG, f"adapter {a!r} config")
        problem = _weights_problem(folders[a], configs[a])
        if problem:
            raise ZooError(
                f"adapter {a!r}: {problem}; the file is damaged. Delete {folders[a]} and rerun build_zoo "
                "(it trains that adapter again)"
            )
        try:
            state = load_file(str(folders[a] / WEIGHTS))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ZooError(
                f"adapter {a!r}: {WEIGHTS} is not a readable safetensors file ({exc}); rebuild it "
                "(delete the folder and rerun build_zoo)"
            ) from None
        pieces: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            m = _PEFT_KEY.match(key)
            if m is None:
                continue  # other PEFT entries (biases, modules_to_save) are not LoRA matrices
            pieces.setdefault(m["path"], {})[m["ab"]] = tensor
        if not pieces:
            raise ZooError(
                f"adapter {a!r} has no LoRA matrices (keys 'base_model.model.<module>.lora_A.weight'); "
                "it is not a LoRA adapter: remove it from the zoo"
            )
        mats: dict[str, np.ndarray] = {}
        lmap: dict[str, int] = {}
        for mpath, ab in sorted(pieces.items()):
            if set(ab) != {"A", "B"}:
                raise ZooError(
                    f"adapter {a!r}: module {mpath} has lora_{''.join(ab)} but not both lora_A and lora_B; "
                    "rebuild the adapter"
                )
            A, B = ab["A"], ab["B"]
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                raise ZooError(
                    f"adapter {a!r}: module {mpath} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; "
                    "expected A [r, in] and B [out, r] with the same r. Rebuild the adapter"
                )
            layer = _layer_from_path(mpath, layers_prefix)
            if layer is None:
                raise ZooError(
                    f"adapter {a!r}: cannot tell the decoder layer of module {mpath} (no layer index in its path); "
                    "only per-layer LoRA modules are supported"
                )
            lmap[mpath] = layer
            for part, t in (("A", A), ("B", B)):
                arr = t.to(torch.float32).numpy().copy()
                name = f"L{layer}.{mpath}.lora_{part}"
                if not np.isfinite(arr).all():
                    nonfinite.append(f"{a}:{name}")
                mats[name] = arr
        data[a] = mats
        layer_maps[a] = lmap
    if nonfinite:
        bad = sorted({x.split(":", 1)[0] for x in nonfinite})
        raise ZooError(
            f"NaN/inf values in adapters {_listed(bad)} (e.g. {nonfinite[0]}); training diverged or the file is "
            "corrupt: retrain them with a lower lr (delete the folders and rerun build_zoo) or remove them"
        )
    signatures = {a: tuple(sorted((n, m.shape) for n, m in data[a].items())) for a in data}
    common, _ = Counter(signatures.values()).most_common(1)[0]
    odd = sorted(a for a, s in signatures.items() if s != common)
    if odd:
        ref = dict(common)
        first = dict(signatures[odd[0]])
        lacks = sorted(set(ref) - set(first))
        extra = sorted(set(first) - set(ref))
        shapes = [f"{n} {first[n]} vs {ref[n]}" for n in sorted(set(ref) & set(first)) if ref[n] != first[n]]
        detail = "; ".join(x for x in (
            f"lacks {_listed(lacks, 3)}" if lacks else "",
            f"has extra {_listed(extra, 3)}" if extra else "",
            f"shapes differ: {_listed(shapes, 3)}" if shapes else "",
        ) if x)
        raise ZooError(
            f"adapters {_listed(odd)} have different matrix sets or shapes than the other "
            f"{len(data) - len(odd)} adapters (e.g. {odd[0]} {detail}); every adapter of a zoo must adapt the "
            "same modules with the same rank: retrain or remove them"
        )
    counts = Counter(labels.values())
    if len(counts) < 2:
        raise ZooError(
            f"zoo {root} has only {len(counts)} class ({_listed(sorted(counts))}) over adapters "
            f"{_listed(sorted(labels))}; a classifier needs at least 2 classes: add adapters of another class"
        )
    small = sorted(c for c, n in counts.items() if n < 2)
    if small:
        which = [f"{c} ({', '.join(a for a in sorted(labels) if labels[a] == c)})" for c in small]
        raise ZooError(
            f"classes with fewer than 2 adapters: {'; '.join(which)}; every class needs at least 2 adapters "
            "(train more for it or drop the class and its adapters)"
        )
    return Zoo(root, labels, manifest, configs, data, layer_maps[sorted(labels)[0]])

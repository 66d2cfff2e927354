"""Architecture registry: one table from ``config.model_type`` to module paths.

Every place in qhelpers that needs to find a layer, a projection or a norm asks this
table; nothing else in the package looks at class names. To support a new architecture,
call :func:`register_architecture` with an :class:`ArchSpec` (see README, "Adding an
architecture").

Module paths are dotted attribute paths. Global paths (``layers``, ``embed_tokens``,
``final_norm``, ``lm_head`` ...) are relative to the ``*ForCausalLM`` model; component
paths are relative to one decoder block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from qhelpers.util.errors import ConfigError, UnknownArchitectureError

#: Logical per-layer components and what they mean.
LAYER_COMPONENTS: dict[str, str] = {
    "attn_q": "attention query projection",
    "attn_k": "attention key projection",
    "attn_v": "attention value projection",
    "attn_out": "attention output projection",
    "mlp_in": "MLP input (up) projection",
    "mlp_gate": "MLP gate projection (gated MLPs only)",
    "mlp_out": "MLP output (down) projection",
    "norm": "every normalisation layer inside the block",
    "bias": "every bias inside the block",
}

#: Logical model-level components.
GLOBAL_COMPONENTS: dict[str, str] = {
    "embed_tokens": "token embedding matrix",
    "embed_positions": "learned position embeddings",
    "embed_norm": "normalisation applied right after the embeddings",
    "final_norm": "final normalisation before the LM head",
    "lm_head": "output projection to the vocabulary (may be tied to embed_tokens)",
}

#: Group names that expand to several per-layer components.
COMPONENT_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("attn_q", "attn_k", "attn_v", "attn_out"),
    "attn_qkv": ("attn_q", "attn_k", "attn_v"),
    "mlp": ("mlp_in", "mlp_gate", "mlp_out"),
    "linear": ("attn_q", "attn_k", "attn_v", "attn_out", "mlp_in", "mlp_gate", "mlp_out"),
    "embeddings": ("embed_tokens", "embed_positions"),
    "outside_layers": ("embed_tokens", "embed_positions", "embed_norm", "final_norm", "lm_head"),
}

LINEAR_COMPONENTS: tuple[str, ...] = COMPONENT_GROUPS["linear"]


@dataclass(frozen=True)
class FusedQKV:
    """A single projection that computes q, k and v together.

    ``layout`` is ``"concat"`` when the output features are ``[q | k | v]`` (GPT-2's
    ``c_attn``) and ``"per_head"`` when they are grouped by head as
    ``[h0: q k v, h1: q k v, ...]`` (BLOOM and GPT-NeoX ``query_key_value``).
    """

    module: str
    layout: str  # "concat" | "per_head"

    def __post_init__(self) -> None:
        if self.layout not in ("concat", "per_head"):
            raise ConfigError(f"FusedQKV.layout must be 'concat' or 'per_head', got {self.layout!r}")


@dataclass(frozen=True)
class ArchSpec:
    """Where everything lives in one architecture.

    ``components`` maps a logical per-layer component (keys of :data:`LAYER_COMPONENTS`,
    except ``bias``, which is derived) to module paths inside a decoder block. For a fused
    attention projection, ``attn_q``/``attn_k``/``attn_v`` all name the fused module and
    ``fused_qkv`` says how to split its output rows.
    """

    model_type: str
    layers: str
    components: Mapping[str, tuple[str, ...]]
    embed_tokens: str
    final_norm: str
    lm_head: str
    embed_positions: str | None = None
    embed_norm: str | None = None
    fused_qkv: FusedQKV | None = None
    heads_attr: str = "num_attention_heads"
    notes: str = ""
    aliases: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        unknown = set(self.components) - set(LAYER_COMPONENTS)
        if unknown:
            raise ConfigError(
                f"ArchSpec({self.model_type!r}) names unknown components {sorted(unknown)}; "
                f"use those of LAYER_COMPONENTS: {sorted(LAYER_COMPONENTS)}"
            )

    def global_path(self, component: str) -> str | None:
        """Module path of a model-level component, or None if the architecture lacks it."""
        if component not in GLOBAL_COMPONENTS:
            raise ConfigError(f"unknown global component {component!r}; known: {sorted(GLOBAL_COMPONENTS)}")
        return getattr(self, component)

    def has_component(self, component: str) -> bool:
        """True if the architecture has this per-layer or global component."""
        if component == "bias":
            return True
        if component in LAYER_COMPONENTS:
            return bool(self.components.get(component))
        if component in GLOBAL_COMPONENTS:
            return self.global_path(component) is not None
        return False

    def available_components(self) -> list[str]:
        """Every per-layer and global component this architecture has."""
        names = [c for c in LAYER_COMPONENTS if self.has_component(c)]
        return names + [c for c in GLOBAL_COMPONENTS if self.has_component(c)]


_REGISTRY: dict[str, ArchSpec] = {}


def register_architecture(spec: ArchSpec, *, overwrite: bool = False) -> ArchSpec:
    """Add an architecture to the registry (also under each of ``spec.aliases``)."""
    for key in (spec.model_type, *spec.aliases):
        if key in _REGISTRY and not overwrite:
            raise ConfigError(f"architecture {key!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[key] = spec
    return spec


def supported_architectures() -> list[str]:
    """Model types the registry knows."""
    return sorted(_REGISTRY)


def get_arch(model_or_type: nn.Module | str) -> ArchSpec:
    """The :class:`ArchSpec` of a model (or of a ``model_type`` string)."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type is None:
            raise UnknownArchitectureError(
                f"{type(model_or_type).__name__} has no config.model_type; qhelpers needs a "
                "Hugging Face causal LM (AutoModelForCausalLM)."
            )
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnknownArchitectureError(
            f"unknown architecture {model_type!r}. Supported: {', '.join(supported_architectures())}. "
            "To add one, call qhelpers.models.archs.register_architecture(ArchSpec(model_type=..., layers=..., "
            "components={...}, embed_tokens=..., final_norm=..., lm_head=...)); see README, "
            "'Adding an architecture'."
        ) from None


# ----------------------------------------------------------------------------- access


def get_module(root: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted ``path`` (raises a clear error if absent)."""
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            raise ConfigError(f"{type(root).__name__} has no module at {path!r} (missing {part!r})")
        module = getattr(module, part)
    return module


def decoder_layers(model: nn.Module, arch: ArchSpec | None = None) -> nn.ModuleList:
    """The model's list of decoder blocks."""
    arch = arch or get_arch(model)
    return get_module(model, arch.layers)  # type: ignore[return-value]


def num_layers(model: nn.Module, arch: ArchSpec | None = None) -> int:
    """Number of decoder blocks."""
    return len(decoder_layers(model, arch))


def normalize_layer_index(index: int, n_layers: int) -> int:
    """Map ``index`` (negative counts from the end) into ``range(n_layers)`` or raise."""
    if not isinstance(index, (int,)) or isinstance(index, bool):
        raise ConfigError(f"layer index must be an int, got {index!r}")
    if not -n_layers <= index < n_layers:
        raise ConfigError(
            f"layer index {index} is out of range: this model has {n_layers} decoder layers "
            f"(valid: 0..{n_layers - 1}, or -1..-{n_layers} from the end)"
        )
    return index % n_layers


def resolve_layers(layers, n_layers: int) -> list[int]:
    """Sorted, de-duplicated layer indices of a selection: None (every layer), one index or
    several (negative indices count from the end); out of range or empty raises ConfigError."""
    if layers is None:
        return list(range(n_layers))
    if not isinstance(layers, bool) and hasattr(layers, "__index__"):
        layers = [layers]
    out = sorted({normalize_layer_index(int(i) if hasattr(i, "__index__") and not isinstance(i, bool) else i, n_layers) for i in layers})
    if not out:
        raise ConfigError("layers is empty; pass None for every layer or a list of layer indices")
    return out


def weight_out_dim(module: nn.Module) -> int:
    """Dimension of ``module.weight`` that indexes output features.

    ``nn.Linear`` stores ``[out, in]``; GPT-2's ``Conv1D`` stores ``[in, out]``.
    """
    from transformers.pytorch_utils import Conv1D

    return 1 if isinstance(module, Conv1D) else 0


def qkv_rows(arch: ArchSpec, model: nn.Module, part: str, out_features: int) -> torch.Tensor:
    """Output-feature indices of ``part`` (``"q"``, ``"k"`` or ``"v"``) in a fused projection."""
    if arch.fused_qkv is None:
        raise ConfigError(f"{arch.model_type} has separate q/k/v projections; nothing to split")
    which = "qkv".index(part)
    if out_features % 3:
        raise ConfigError(f"fused qkv width {out_features} is not divisible by 3")
    width = out_features // 3
    if arch.fused_qkv.layout == "concat":
        return torch.arange(which * width, (which + 1) * width)
    n_heads = getattr(model.config, arch.heads_attr)
    head_dim = width // n_heads
    base = torch.arange(n_heads) * 3 * head_dim + which * head_dim
    return (base[:, None] + torch.arange(head_dim)[None, :]).reshape(-1)


# ----------------------------------------------------------------------------- table

_LLAMA_LIKE = dict(
    layers="model.layers",
    components={
        "attn_q": ("self_attn.q_proj",),
        "attn_k": ("self_attn.k_proj",),
        "attn_v": ("self_attn.v_proj",),
        "attn_out": ("self_attn.o_proj",),
        "mlp_in": ("mlp.up_proj",),
        "mlp_gate": ("mlp.gate_proj",),
        "mlp_out": ("mlp.down_proj",),
        "norm": ("input_layernorm", "post_attention_layernorm"),
    },
    embed_tokens="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
)

for _spec in (
    ArchSpec(
        model_type="gpt2",
        layers="transformer.h",
        components={
            "attn_q": ("attn.c_attn",),
            "attn_k": ("attn.c_attn",),
            "attn_v": ("attn.c_attn",),
            "attn_out": ("attn.c_proj",),
            "mlp_in": ("mlp.c_fc",),
            "mlp_out": ("mlp.c_proj",),
            "norm": ("ln_1", "ln_2"),
        },
        fused_qkv=FusedQKV("attn.c_attn", "concat"),
        embed_tokens="transformer.wte",
        embed_positions="transformer.wpe",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        notes="Conv1D weights are stored [in, out]; lm_head is tied to wte.",
    ),
    ArchSpec(
        model_type="opt",
        layers="model.decoder.layers",
        components={
            "attn_q": ("self_attn.q_proj",),
            "attn_k": ("self_attn.k_proj",),
            "attn_v": ("self_attn.v_proj",),
            "attn_out": ("self_attn.out_proj",),
            "mlp_in": ("fc1",),
            "mlp_out": ("fc2",),
            "norm": ("self_attn_layer_norm", "final_layer_norm"),
        },
        embed_tokens="model.decoder.embed_tokens",
        embed_positions="model.decoder.embed_positions",
        final_norm="model.decoder.final_layer_norm",
        lm_head="lm_head",
        notes="lm_head is tied to embed_tokens.",
    ),
    ArchSpec(
        model_type="bloom",
        layers="transformer.h",
        components={
            "attn_q": ("self_attention.query_key_value",),
            "attn_k": ("self_attention.query_key_value",),
            "attn_v": ("self_attention.query_key_value",),
            "attn_out": ("self_attention.dense",),
            "mlp_in": ("mlp.dense_h_to_4h",),
            "mlp_out": ("mlp.dense_4h_to_h",),
            "norm": ("input_layernorm", "post_attention_layernorm"),
        },
        fused_qkv=FusedQKV("self_attention.query_key_value", "per_head"),
        heads_attr="n_head",
        embed_tokens="transformer.word_embeddings",
        embed_norm="transformer.word_embeddings_layernorm",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        notes="ALiBi positions (no position embeddings); lm_head is tied.",
    ),
    ArchSpec(
        model_type="gpt_neox",
        layers="gpt_neox.layers",
        components={
            "attn_q": ("attention.query_key_value",),
            "attn_k": ("attention.query_key_value",),
            "attn_v": ("attention.query_key_value",),
            "attn_out": ("attention.dense",),
            "mlp_in": ("mlp.dense_h_to_4h",),
            "mlp_out": ("mlp.dense_4h_to_h",),
            "norm": ("input_layernorm", "post_attention_layernorm"),
        },
        fused_qkv=FusedQKV("attention.query_key_value", "per_head"),
        embed_tokens="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
        notes="Pythia family; untied lm_head (embed_out in older transformers).",
    ),
    ArchSpec(model_type="llama", notes="SmolLM2 uses this; tied embeddings there.", **_LLAMA_LIKE),
    ArchSpec(model_type="qwen2", notes="q/k/v carry biases.", **_LLAMA_LIKE),
    ArchSpec(
        model_type="gemma3_text",
        aliases=("gemma3",),
        layers="model.layers",
        components={
            **_LLAMA_LIKE["components"],
            "norm": (
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
                "self_attn.q_norm",
                "self_attn.k_norm",
            ),
        },
        embed_tokens="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        notes="RMSNorm weights are stored as (scale - 1); embeddings scaled by sqrt(d); tied lm_head.",
    ),
):
    register_architecture(_spec)

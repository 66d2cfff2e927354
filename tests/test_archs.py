"""The architecture registry (qhelpers/models/archs.py) checked against real transformers module trees.

Every architecture is instantiated as a ``tiny:<arch>`` model (random weights, the real
module classes of transformers), and every path of its ArchSpec is resolved.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qhelpers.models.archs import (
    GLOBAL_COMPONENTS,
    LINEAR_COMPONENTS,
    decoder_layers,
    get_arch,
    get_module,
    normalize_layer_index,
    num_layers,
    qkv_rows,
    supported_architectures,
    weight_out_dim,
)
from qhelpers.util.errors import ConfigError, UnknownArchitectureError

# Canonical model types (aliases such as "gemma3" resolve to one of these).
ARCHS = sorted({get_arch(t).model_type for t in supported_architectures()})
FUSED = [a for a in ARCHS if get_arch(a).fused_qkv is not None]


def test_registry_covers_expected_architectures():
    assert set(ARCHS) >= {"gpt2", "opt", "bloom", "gpt_neox", "llama", "qwen2", "gemma3_text"}
    assert get_arch("gemma3") is get_arch("gemma3_text")
    assert set(FUSED) == {"gpt2", "bloom", "gpt_neox"}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_component_resolves_in_every_layer(tiny_model, arch):
    lm = tiny_model(arch)
    spec = get_arch(lm.model)
    assert spec is lm.arch
    layers = decoder_layers(lm.model, spec)
    assert isinstance(layers, nn.ModuleList)
    assert len(layers) == num_layers(lm.model) == 4
    for i, layer in enumerate(layers):
        for component, paths in spec.components.items():
            assert paths, f"{arch}: empty path list for {component}"
            for path in paths:
                module = get_module(layer, path)
                if component in LINEAR_COMPONENTS:
                    assert isinstance(module, (nn.Linear, Conv1D)), f"{arch} layer {i} {path}"
                if component == "norm":
                    assert hasattr(module, "weight"), f"{arch} layer {i} {path} is not a norm"


@pytest.mark.parametrize("arch", ARCHS)
def test_global_components_resolve(tiny_model, arch):
    lm = tiny_model(arch)
    spec = lm.arch
    for component in GLOBAL_COMPONENTS:
        path = spec.global_path(component)
        if path is None:
            continue
        module = get_module(lm.model, path)
        assert isinstance(module, nn.Module)
    assert get_module(lm.model, spec.embed_tokens) is lm.model.get_input_embeddings()
    assert get_module(lm.model, spec.lm_head) is lm.model.get_output_embeddings()
    assert get_module(lm.model, spec.embed_tokens).weight.shape[0] == lm.model.config.vocab_size


@pytest.mark.parametrize("arch", ARCHS)
def test_norm_component_lists_every_norm_of_the_block(tiny_model, arch):
    """Nothing that normalises inside a block is missing from the ``norm`` component."""
    lm = tiny_model(arch)
    layer = decoder_layers(lm.model)[0]
    listed = {id(get_module(layer, p)) for p in lm.arch.components["norm"]}
    found = {name for name, m in layer.named_modules() if "norm" in type(m).__name__.lower()}
    assert found, arch
    for name in found:
        assert id(get_module(layer, name)) in listed, f"{arch}: norm {name} missing from ArchSpec.components['norm']"


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_out_dim_matches_out_features(tiny_model, arch):
    lm = tiny_model(arch)
    layer = decoder_layers(lm.model)[0]
    for component in LINEAR_COMPONENTS:
        for path in lm.arch.components.get(component, ()):
            module = get_module(layer, path)
            dim = weight_out_dim(module)
            if isinstance(module, Conv1D):
                assert arch == "gpt2"
                assert dim == 1
                out_features = module.nf
            else:
                assert dim == 0
                out_features = module.out_features
            assert module.weight.shape[dim] == out_features
            if getattr(module, "bias", None) is not None:
                assert module.bias.shape[0] == out_features
            # The out dim really is the output: y = f(x) has out_features columns.
            x = torch.randn(2, module.weight.shape[1 - dim])
            assert module(x).shape[-1] == out_features


def _split_qkv(arch: str, attn: nn.Module, out: torch.Tensor, n_heads: int, head_dim: int):
    """Split a fused projection's output exactly as the model's own attention code does."""
    if arch == "gpt2":
        # GPT2Attention.forward: self.c_attn(hidden_states).split(self.split_size, dim=2)
        return out.split(attn.split_size, dim=2)
    if arch == "bloom":
        # BloomAttention.forward: self._reshape(fused_qkv) views [b, s, n_heads, 3, head_dim]
        q, k, v = attn._reshape(out)
        return q, k, v
    if arch == "gpt_neox":
        # GPTNeoXAttention.forward: .view(*input_shape, -1, 3 * self.head_size).chunk(3, dim=-1)
        qkv = out.view(*out.shape[:-1], -1, 3 * attn.head_size)
        return qkv.chunk(3, dim=-1)
    raise AssertionError(f"no split recipe for {arch}")


@pytest.mark.parametrize("arch", FUSED)
def test_qkv_rows_select_exactly_q_k_v(tiny_model, arch):
    lm = tiny_model(arch)
    spec = lm.arch
    model = lm.model
    layer = decoder_layers(model)[0]
    fused = get_module(layer, spec.fused_qkv.module)
    attn = get_module(layer, spec.fused_qkv.module.rsplit(".", 1)[0])
    dim = weight_out_dim(fused)
    out_features = fused.weight.shape[dim]
    hidden = model.config.hidden_size
    n_heads = getattr(model.config, spec.heads_attr)
    assert out_features == 3 * hidden

    rows = {p: qkv_rows(spec, model, p, out_features) for p in "qkv"}
    everything = torch.cat([rows[p] for p in "qkv"])
    assert sorted(everything.tolist()) == list(range(out_features)), "q, k, v rows must partition the outputs"

    x = torch.randn(2, 7, hidden, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = _split_qkv(arch, attn, fused(x), n_heads, hidden // n_heads)
        for part in "qkv":
            # Zero every row that is NOT `part`: `part` must be untouched, the others zero.
            others = torch.cat([rows[p] for p in "qkv" if p != part])
            probe = copy.deepcopy(fused)
            probe.weight.index_fill_(dim, others, 0.0)
            if probe.bias is not None:
                probe.bias.index_fill_(0, others, 0.0)
            split = _split_qkv(arch, attn, probe(x), n_heads, hidden // n_heads)
            for j, p in enumerate("qkv"):
                if p == part:
                    torch.testing.assert_close(split[j], reference[j], rtol=0, atol=0)
                else:
                    assert torch.count_nonzero(split[j]) == 0, f"{arch}: rows for {p} leak into {part}"
            # And the reverse: zeroing only `part` zeroes exactly that slice.
            probe = copy.deepcopy(fused)
            probe.weight.index_fill_(dim, rows[part], 0.0)
            if probe.bias is not None:
                probe.bias.index_fill_(0, rows[part], 0.0)
            split = _split_qkv(arch, attn, probe(x), n_heads, hidden // n_heads)
            for j, p in enumerate("qkv"):
                if p == part:
                    assert torch.count_nonzero(split[j]) == 0
                else:
                    torch.testing.assert_close(split[j], reference[j], rtol=0, atol=0)


def test_qkv_rows_rejects_unfused_and_bad_width(tiny_model):
    llama = tiny_model("llama")
    with pytest.raises(ConfigError, match="separate"):
        qkv_rows(llama.arch, llama.model, "q", 192)
    gpt2 = tiny_model("gpt2")
    with pytest.raises(ConfigError, match="divisible"):
        qkv_rows(gpt2.arch, gpt2.model, "q", 193)


def test_unknown_model_type_message():
    with pytest.raises(UnknownArchitectureError) as info:
        get_arch("mamba")
    message = str(info.value)
    assert "'mamba'" in message
    for model_type in ("gpt2", "llama", "gemma3_text", "bloom"):
        assert model_type in message
    assert "register_architecture" in message


def test_unknown_model_object_raises():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "mistral", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, vocab_size=100, max_position_embeddings=32,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnknownArchitectureError, match="register_architecture"):
        get_arch(model)
    with pytest.raises(UnknownArchitectureError, match="config.model_type"):
        get_arch(nn.Linear(2, 2))


@pytest.mark.parametrize("index,expected", [(0, 0), (3, 3), (-1, 3), (-4, 0)])
def test_normalize_layer_index_in_range(index, expected):
    assert normalize_layer_index(index, 4) == expected


@pytest.mark.parametrize("index", [4, -5, 100, 1.0, True, "0"])
def test_normalize_layer_index_out_of_range(index):
    with pytest.raises(ConfigError):
        normalize_layer_index(index, 4)


def test_normalize_layer_index_message_states_range():
    with pytest.raises(ConfigError, match="4 decoder layers"):
        normalize_layer_index(7, 4)


def test_available_components():
    gpt2 = get_arch("gpt2").available_components()
    assert "embed_positions" in gpt2
    assert "mlp_gate" not in gpt2
    assert "embed_norm" not in gpt2
    llama = get_arch("llama").available_components()
    assert "mlp_gate" in llama
    assert "embed_positions" not in llama
    assert "embed_norm" in get_arch("bloom").available_components()
    assert "embed_positions" in get_arch("opt").available_components()


def test_get_module_missing_path_is_config_error(tiny_model):
    lm = tiny_model("gpt2")
    with pytest.raises(ConfigError, match="no module at"):
        get_module(lm.model, "transformer.h.0.attn.q_proj")

"""Tests of qhelpers.quant.bnb: the real bitsandbytes path, on a tiny random Llama on CPU."""
from __future__ import annotations

import sys

import pytest
import torch

from qhelpers.quant.quantizers import NF4_CODE, QuantConfig, fake_quantize, quantize
from qhelpers.util.errors import ConfigError, ModelLoadError

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed; the real NF4 path cannot be tested")
transformers = pytest.importorskip("transformers")

from qhelpers.quant.bnb import (  # noqa: E402
    bnb_available,
    dequantized_weights,
    load_bnb_model,
    resolve_skip_modules,
)

KEPT = {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"}


def _config(layers: int = 2):
    return transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config()).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path, safe_serialization=True)
    assert (path / "model.safetensors").exists()
    return path, model


@pytest.fixture(scope="module")
def cpu_ok():
    ok, reason = bnb_available("cpu")
    if not ok:
        pytest.skip(f"bitsandbytes cannot run on this CPU: {reason}")
    return reason


def test_bnb_available_reports_version_and_device(cpu_ok):
    assert cpu_ok.startswith(f"bitsandbytes {bnb.__version__} on cpu")


def test_bnb_available_explains_a_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    ok, reason = bnb_available("cpu")
    assert ok is False and "not installed" in reason


def test_bnb_available_explains_a_missing_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    ok, reason = bnb_available("cuda")
    assert ok is False and "no CUDA GPU" in reason


def test_nf4_load_keeps_requested_modules_and_matches_the_simulation(tiny_llama, cpu_ok):
    path, original = tiny_llama
    model = load_bnb_model(path, "nf4", keep_full_precision=["layers.0.mlp"], device="cpu")
    linear4 = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    plain = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert plain == KEPT | {"lm_head"}  # lm_head kept, as transformers does by default
    assert len(linear4) == 2 * 7 - 3
    assert not any(n.startswith("model.layers.0.mlp") for n in linear4)
    assert set(model.config.quantization_config.llm_int8_skip_modules) == KEPT | {"lm_head"}
    params = dict(original.named_parameters())
    for name in plain:
        assert torch.equal(model.get_submodule(name).weight, params[name + ".weight"])

    deq = dequantized_weights(model)
    assert set(deq) == linear4
    for name, weight in deq.items():
        assert weight.dtype == torch.float32
        assert torch.equal(weight, fake_quantize(params[name + ".weight"], QuantConfig(method="nf4"))), name

    # the whole forward pass equals an fp32 model whose weights were fake-quantized
    sim = transformers.LlamaForCausalLM(_config()).eval()
    sim.load_state_dict(original.state_dict())
    with torch.no_grad():
        for name in linear4:
            w = sim.get_submodule(name).weight
            w.copy_(fake_quantize(w, QuantConfig(method="nf4")))
        ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
        assert torch.equal(model(ids).logits, sim(ids).logits)
        assert not torch.equal(model(ids).logits, original(ids).logits)


def test_fp4_load_matches_the_simulation(tiny_llama, cpu_ok):
    path, original = tiny_llama
    model = load_bnb_model(path, "fp4", device="cpu", compute_dtype=torch.float32)
    params = dict(original.named_parameters())
    deq = dequantized_weights(model)
    assert len(deq) == 14  # every projection; lm_head kept by default
    for name, weight in deq.items():
        assert torch.equal(weight, fake_quantize(params[name + ".weight"], QuantConfig(method="fp4"))), name


def test_cpu_fused_bf16_path_uses_bf16_block_scales(tiny_llama, cpu_ok):
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks for the fused kernel here")
    path, original = tiny_llama
    model = load_bnb_model(path, "nf4", device="cpu", cpu_fused_bf16=True)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # the first forward repacks the weights
    params = dict(original.named_parameters())
    deq = dequantized_weights(model)
    assert len(deq) == 14
    for name, weight in deq.items():
        assert model.get_submodule(name).weight.quant_state.packing_format_for_cpu
        qt = quantize(params[name + ".weight"], QuantConfig(method="nf4"))
        bf16_scales = qt.scale.to(torch.bfloat16).float()
        expected = (NF4_CODE[qt.codes.long()].reshape(-1, 64) * bf16_scales.view(-1, 1)).reshape(weight.shape)
        assert torch.equal(weight, expected), name


def test_int8_load_dequantizes_within_half_a_step(tiny_llama, cpu_ok):
    path, original = tiny_llama
    model = load_bnb_model(path, "int8", device="cpu")
    params = dict(original.named_parameters())
    deq = dequantized_weights(model)
    assert len(deq) == 14
    for name, weight in deq.items():
        # bitsandbytes casts the weight to fp16, then quantizes each row to round(w * 127 / absmax)
        w = params[name + ".weight"].detach().half().float()
        step = w.abs().amax(dim=1, keepdim=True) / 127
        assert bool(((weight - w).abs() <= step / 2 * (1 + 1e-5)).all()), name
        # the row's absmax is a grid point (code +-127), up to fp32 rounding of 127 * s / 127
        torch.testing.assert_close(weight.abs().amax(dim=1), w.abs().amax(dim=1), rtol=3e-7, atol=0)


def test_keep_full_precision_typo_is_an_error(tiny_llama, cpu_ok):
    path, _ = tiny_llama
    with pytest.raises(ConfigError, match="'layers.0.mpl' matches no linear module"):
        load_bnb_model(path, "nf4", keep_full_precision=["layers.0.mpl"], device="cpu")
    with pytest.raises(ConfigError, match="unknown bitsandbytes mode 'nf3'"):
        load_bnb_model(path, "nf3")


def test_missing_folder_is_a_model_load_error(tmp_path, cpu_ok):
    with pytest.raises(ModelLoadError, match="does not exist or is not a folder"):
        load_bnb_model(tmp_path / "absent", "nf4", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="cannot read a model config"):
        load_bnb_model(tmp_path / "empty", "nf4", device="cpu")


def test_skip_patterns_match_on_module_boundaries():
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(_config(layers=12))
    names = resolve_skip_modules(model, ["layers.1.mlp", "self_attn.q_proj"], keep_default_modules=False)
    assert "model.layers.1.mlp.up_proj" in names
    assert not any(n.startswith("model.layers.10.") or n.startswith("model.layers.11.mlp") for n in names if "mlp" in n)
    assert sum(n.endswith("self_attn.q_proj") for n in names) == 12
    assert len(names) == 3 + 12
    assert "lm_head" not in names
    assert "lm_head" in resolve_skip_modules(model, [], keep_default_modules=True)


def test_gpt2_conv1d_weights_come_back_in_linear_layout(tmp_path, cpu_ok):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=64, bos_token_id=0, eos_token_id=0)
    original = transformers.GPT2LMHeadModel(config).eval()
    original.save_pretrained(tmp_path)
    model = load_bnb_model(tmp_path, "nf4", keep_full_precision=["h.0.attn"], device="cpu")
    deq = dequantized_weights(model)
    assert set(deq) == {f"transformer.h.{i}.mlp.{m}" for i in (0, 1) for m in ("c_fc", "c_proj")} | {
        "transformer.h.1.attn.c_attn",
        "transformer.h.1.attn.c_proj",
    }
    params = dict(original.named_parameters())
    for name, weight in deq.items():
        conv = params[name + ".weight"]  # Conv1D: [in, out]
        assert weight.shape == conv.shape[::-1]
        assert torch.equal(weight, fake_quantize(conv.t().contiguous(), QuantConfig(method="nf4"))), name

"""GGUF backend (qhelpers.quant.gguf), each test against an independent known answer.

Known answers: the GGUF files shipped with the embedded models (per-tensor types and bytes written
by llama-quantize), llama.cpp's published tensor-type counts for 7B llama models, gguf-py's
dequantizer, libgguf called directly, llama.cpp's bits per weight, and values derived by hand from
``src/llama-quant.cpp`` (commit 8784689f).
"""
from __future__ import annotations

import collections
import copy
import types

import numpy as np
import pytest
import torch

import gguf
import libgguf
from qhelpers.models import loading as models
from qhelpers.quant import gguf as G
from qhelpers.quant.engine import QuantEngine, Variant
from qhelpers.quant.methods import tensor_roles
from qhelpers.util.errors import ConfigError

GEMMA = "gemma-3-270m"

#: llama.cpp's bits per weight of each GGML type (block bytes x 8 / block size, as llama-quantize reports)
LLAMA_CPP_BPW = {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_0": 8.5,
                 "Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "IQ4_NL": 4.5, "IQ4_XS": 4.25}


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _llama_7b():
    """A Llama-2-7B-shaped model on the meta device (shapes only, no weights)."""
    from transformers import LlamaConfig

    return _meta_model(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                   tie_word_embeddings=False))


def _counts(model, preset, **kwargs):
    return dict(collections.Counter(G.preset_tensor_types(model, tensor_roles(model), preset, **kwargs).values()))


# ----------------------------------------------------------------------------- fixtures


def _gemma_available(cache_dir) -> bool:
    return models.embedded_available(GEMMA, cache_dir)


@pytest.fixture(scope="module")
def gemma(qhelpers_cache_dir):
    """``embedded:gemma-3-270m`` in float32 (dequantized from the shipped Q4_K_M GGUF)."""
    if not _gemma_available(qhelpers_cache_dir):
        pytest.skip(f"{models.EMBEDDED_MODELS[GEMMA]['pip_install']} is not installed and no converted cache exists")
    return models.load_model(f"embedded:{GEMMA}", device="cpu", dtype="fp32", cache_dir=qhelpers_cache_dir)


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory):
    """The shipped Gemma GGUF, assembled from its part packages and checked against its sha256."""
    try:
        return models.embedded_gguf_path(GEMMA, tmp_path_factory.mktemp("gemma_gguf"))
    except models.ModelLoadError as exc:
        pytest.skip(f"the shipped GGUF is not here: {exc}")


def _file_types_libgguf(path) -> dict[str, str]:
    return {t.name: t.qtype for t in libgguf.inspect_gguf(str(path), max_array_values=0).tensors}


def _assert_types_match(lm, file_types: dict[str, str], preset: str) -> None:
    roles = tensor_roles(lm.model)
    plan = G.preset_tensor_types(lm.model, roles, preset)
    mismatches, matched = [], set()
    for name, role in roles.items():
        gguf_name = G.llama_name(role)
        if gguf_name is None:  # norms: 1-D, kept F32 by llama.cpp
            assert lm.model.get_parameter(name).ndim == 1 and plan[name] == "F32", name
            continue
        matched.add(gguf_name)
        if file_types[gguf_name] != plan[name]:
            mismatches.append((gguf_name, file_types[gguf_name], plan[name]))
    assert mismatches == []
    quantized_in_file = {n for n, t in file_types.items() if t != "F32"}
    assert matched == quantized_in_file  # every quantized tensor of the file, and no other
    assert sum(t == "F32" for t in plan.values()) == sum(t == "F32" for t in file_types.values())


# ----------------------------------------------------------------------------- the shipped files


def test_q4_k_m_rules_choose_the_shipped_gemma_types(gemma, gemma_gguf):
    """All 127 quantized tensors of the shipped Gemma-3-270M Q4_K_M file: Q5_0 for attn_q/k, ffn_up/gate
    (Q4_K's fallback on rows of 640), Q8_0 / Q5_0 for attn_v (use_more_bits layers 0,1,4,7,10,13,15,16,17
    get Q6_K -> Q8_0), Q6_K / Q4_K for ffn_down, Q4_K attn_output, Q8_0 tied token_embd (output rule)."""
    file_types = _file_types_libgguf(gemma_gguf)
    assert len(file_types) == 236
    _assert_types_match(gemma, file_types, "Q4_K_M")


@pytest.mark.slow
def test_q4_k_m_rules_match_gemma_types_read_by_gguf_py(gemma, gemma_gguf):
    """The same against gguf-py's GGUFReader (about 20 s: it parses the 262k-token vocabulary),
    which also confirms the libgguf header reader the fast test uses."""
    reader = gguf.GGUFReader(str(gemma_gguf))
    file_types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert file_types == _file_types_libgguf(gemma_gguf)
    _assert_types_match(gemma, file_types, "Q4_K_M")


def test_q4_1_rules_choose_the_shipped_smollm2_types(tmp_path):
    """SmolLM2-135M ships as Q4_1: every matrix Q4_1 and the tied token_embd Q8_0 (output rule: Q6_K,
    whose blocks of 256 do not fit rows of 576 -> Q8_0). Shapes from the file's own metadata."""
    from transformers import LlamaConfig

    try:
        path = models.embedded_gguf_path("smollm2-135m", tmp_path)
    except models.ModelLoadError as exc:
        pytest.skip(f"the shipped GGUF is not here: {exc}")
    header = libgguf.inspect_gguf(str(path), max_array_values=0)
    meta = {k: v.value for k, v in header.metadata.items()}
    file_types = {t.name: t.qtype for t in header.tensors}
    assert "output.weight" not in file_types  # tied embeddings
    model = _meta_model(LlamaConfig(
        hidden_size=meta["llama.embedding_length"], intermediate_size=meta["llama.feed_forward_length"],
        num_hidden_layers=meta["llama.block_count"], num_attention_heads=meta["llama.attention.head_count"],
        num_key_value_heads=meta["llama.attention.head_count_kv"], vocab_size=meta["llama.vocab_size"],
        tie_word_embeddings=True))
    lm = types.SimpleNamespace(model=model)
    _assert_types_match(lm, file_types, "Q4_1")


def test_requantizing_gemma_gives_back_the_shipped_bytes(gemma, gemma_gguf):
    """Gemma's weights are the file's blocks dequantized; quantizing them again through the method
    (preset types, row orientation) writes the file's bytes. Q5_0 and Q8_0 do for every tensor; llama.cpp's
    Q4_K search is not a fixed point in every block (5 of the 27 Q4_K tensors come back byte for byte,
    the others in 98.6-99.8 % of rows; libgguf's own Q4_K round trip behaves alike), so the Q4_K
    tensor checked is one that does."""
    header = libgguf.inspect_gguf(str(gemma_gguf), max_array_values=0)
    roles = tensor_roles(gemma.model)
    by_gguf = {G.llama_name(r): n for n, r in roles.items()}
    method = G.GGUFPreset("Q4_K_M")
    prepared = method.prepare(gemma.model, roles)
    checked = collections.Counter()
    for gguf_name in ("blk.3.attn_output.weight", "blk.3.attn_q.weight", "blk.9.ffn_gate.weight",
                      "blk.0.attn_v.weight", "blk.2.attn_v.weight", "token_embd.weight"):
        info = header.get_tensor(gguf_name)
        name = by_gguf[gguf_name]
        encoded = method.encode(gemma.model.get_parameter(name).detach(), roles[name], None, prepared)
        assert encoded.qtype == info.qtype
        assert encoded.codes.tobytes() == header.read_tensor_bytes(info), gguf_name
        assert encoded.storage_bits == 8 * info.nbytes
        checked[info.qtype] += 1
    assert checked == {"Q4_K": 1, "Q5_0": 3, "Q8_0": 2}


# ----------------------------------------------------------------------------- llama.cpp's type rules


def test_preset_type_counts_match_llama_cpp_logs_for_a_7b_llama():
    """llama.cpp's load logs of Llama-2-7B GGUFs (posted in many GitHub issues) report
    Q4_K_M: 65 f32, 193 q4_K, 33 q6_K; Q5_K_M: 193 q5_K, 33 q6_K; Q3_K_M: 129 q3_K, 92 q4_K, 4 q5_K, 1 q6_K."""
    model = _llama_7b()
    assert _counts(model, "Q4_K_M") == {"F32": 65, "Q4_K": 193, "Q6_K": 33}
    assert _counts(model, "Q5_K_M") == {"F32": 65, "Q5_K": 193, "Q6_K": 33}
    assert _counts(model, "Q3_K_M") == {"F32": 65, "Q3_K": 129, "Q4_K": 92, "Q5_K": 4, "Q6_K": 1}


def test_rules_derived_by_hand_from_llama_quant_cpp():
    """Rules the shipped files do not exercise, read off llama_tensor_get_type (8784689f)."""
    model = _llama_7b()
    roles = tensor_roles(model)
    # Q4_0 with an importance matrix: ffn_down of the first n_layer/8 = 4 layers -> Q4_1
    plan = G.preset_tensor_types(model, roles, "Q4_0", has_imatrix=True)
    down = {roles[n].layer: t for n, t in plan.items() if roles[n].component == "mlp_out"}
    assert [down[i] for i in range(6)] == ["Q4_1"] * 4 + ["Q4_0"] * 2
    assert _counts(model, "Q4_0") == {"F32": 65, "Q4_0": 225, "Q6_K": 1}  # no imatrix: only output -> Q6_K
    # Q2_K: attn_v Q3_K (n_gqa = 1 < 4), ffn_down and attn_output Q3_K, output Q6_K
    assert _counts(model, "Q2_K") == {"F32": 65, "Q2_K": 129, "Q3_K": 96, "Q6_K": 1}
    # GPT-2 (fused c_attn = attn_qkv, Conv1D rows of 768, tied wte, learned wpe kept)
    from transformers import GPT2Config

    gpt2 = _meta_model(GPT2Config())
    roles = tensor_roles(gpt2)
    plan = G.preset_tensor_types(gpt2, roles, "Q4_K_M")
    by_role = collections.defaultdict(set)
    for name, qtype in plan.items():
        by_role[G.llama_category(roles[name]) or ("keep" if qtype == "F32" else name)].add(qtype)
    assert dict(by_role) == {"attn_qkv": {"Q5_K"}, "attn_output": {"Q4_K"}, "ffn_up": {"Q4_K"},
                             "ffn_down": {"Q4_K", "Q6_K"}, "token_embd": {"Q6_K"}, "keep": {"F32"}}
    assert plan["transformer.wpe.weight"] == "F32"
    # SmolLM2 shapes (576 = 2.25 x 256, 9 heads / 3 kv heads): Q2_K and Q3_K fall back to IQ4_NL
    from transformers import LlamaConfig

    smol = _meta_model(LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   tie_word_embeddings=True))
    roles = tensor_roles(smol)
    plan = G.preset_tensor_types(smol, roles, "Q2_K")
    layer0 = {roles[n].component: t for n, t in plan.items() if roles[n].layer == 0}
    assert layer0 == {"attn_q": "IQ4_NL", "attn_k": "IQ4_NL", "attn_v": "IQ4_NL", "attn_out": "IQ4_NL",
                      "mlp_gate": "IQ4_NL", "mlp_in": "IQ4_NL", "mlp_out": "Q3_K"}
    assert plan["model.embed_tokens.weight"] == "Q8_0"


def test_fallback_for_rows_that_do_not_fit_the_block():
    assert G.fallback_type("Q4_K", 640) == "Q5_0"
    assert G.fallback_type("Q5_K", 576) == "Q5_1"
    assert G.fallback_type("Q6_K", 576) == "Q8_0"
    assert G.fallback_type("Q2_K", 576) == G.fallback_type("Q3_K", 640) == G.fallback_type("IQ4_XS", 640) == "IQ4_NL"
    assert G.fallback_type("Q4_K", 1024) == "Q4_K"
    assert G.fallback_type("Q4_K", 48) == "F16"  # neither 256 nor Q5_0's 32 divides 48
    with pytest.raises(ConfigError, match="no fallback"):
        G.fallback_type("Q4_0", 48)


# ----------------------------------------------------------------------------- encoding


def test_storage_bits_are_llama_cpps_bits_per_weight():
    weight = torch.randn(4, 512, generator=torch.Generator().manual_seed(0))
    for qtype, bpw in LLAMA_CPP_BPW.items():
        encoded = G.encode_tensor(weight, qtype)
        assert encoded.storage_bits == bpw * weight.numel(), qtype
        assert G.bits_per_weight_of(qtype) == bpw
    assert set(LLAMA_CPP_BPW) == set(G.QTYPES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_gguf_py_bit_for_bit(dtype):
    weight = (torch.randn(8, 512, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    for qtype in G.QTYPES:
        encoded = G.encode_tensor(weight, qtype)
        reference = gguf.quants.dequantize(encoded.codes, gguf.GGMLQuantizationType[qtype])
        out = encoded.dequantize()
        assert out.dtype == dtype and out.shape == weight.shape
        assert torch.equal(out, torch.from_numpy(reference).to(dtype)), qtype
    f16 = G.encode_tensor(weight, "F16")  # the last-resort fallback
    assert torch.equal(f16.dequantize(), weight.to(torch.float16).to(dtype)) and f16.storage_bits == 16 * weight.numel()


def test_importance_matrix_changes_the_result_and_lowers_the_weighted_error():
    """Planted case: 8 of 256 input channels carry 100x the activation energy. Weighting by the
    importance matrix must trade error on the other channels for error on those."""
    rng = np.random.default_rng(0)
    weight = torch.from_numpy((rng.standard_normal((64, 256)) * 0.02).astype(np.float32))
    importance = np.ones(256, dtype=np.float32)
    importance[rng.choice(256, 8, replace=False)] = 100.0

    def weighted_error(encoded):
        return float((torch.from_numpy(importance) * (weight - encoded.dequantize()) ** 2).sum())

    for qtype in ("Q3_K", "Q4_K", "IQ4_NL", "Q4_0"):
        plain = G.encode_tensor(weight, qtype)
        weighted = G.encode_tensor(weight, qtype, imatrix=importance)
        assert not np.array_equal(plain.codes, weighted.codes), qtype
        assert weighted_error(weighted) < 0.9 * weighted_error(plain), qtype
        # the same bytes as libgguf called directly with that weighting
        direct = libgguf.quantize_rows(weight.numpy(), libgguf.GGMLQuantizationType[qtype], imatrix=importance)
        assert np.array_equal(weighted.codes, direct), qtype
    with pytest.raises(ConfigError, match="one value per input channel"):
        G.encode_tensor(weight, "Q4_K", imatrix=importance[:128])


def test_excluded_elements_are_zeroed_before_quantizing():
    weight = torch.randn(4, 256, generator=torch.Generator().manual_seed(2))
    exclude = torch.zeros_like(weight, dtype=torch.bool)
    exclude[1, 7] = True
    weight[1, 7] = 1e4  # an outlier that would set the block's scale
    zeroed = weight.masked_fill(exclude, 0)
    assert np.array_equal(G.encode_tensor(weight, "Q4_K", exclude=exclude).codes,
                          libgguf.quantize_rows(zeroed.numpy(), libgguf.GGMLQuantizationType.Q4_K))


# ----------------------------------------------------------------------------- through the engine


def test_gpt2_conv1d_rows_are_output_channels(tiny_model):
    """GPT-2's Conv1D weights are [in, out]: through the engine, each equals libgguf on the transposed
    matrix (rows of in_features). Types by hand: rows of 64 -> Q4_K's fallback Q5_0, rows of 256 -> Q4_K."""
    lm = tiny_model("gpt2")
    engine = QuantEngine(lm)
    variant = Variant("q4k", G.GGUFType("Q4_K"))
    seen = collections.Counter()
    for name, dequantized in engine.quantized_weights(variant):
        weight = lm.model.get_parameter(name).detach()
        qtype = {64: "Q5_0", 256: "Q4_K"}[weight.shape[0]]
        lib_type = libgguf.GGMLQuantizationType[qtype]
        codes = libgguf.quantize_rows(weight.T.contiguous().numpy(), lib_type)
        expected = torch.from_numpy(libgguf.dequantize_rows(codes, lib_type, n_per_row=weight.shape[0])).T
        assert torch.equal(dequantized, expected), name
        seen[qtype] += 1
    assert seen == {"Q5_0": 12, "Q4_K": 4}  # c_attn, attn.c_proj, c_fc x 4 layers; mlp.c_proj x 4


def test_engine_round_trip_restores_every_weight(tiny_model):
    lm = tiny_model("llama", fresh=True)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        base = lm.model(ids).logits
    engine = QuantEngine(lm)
    for variant in (Variant("q4km", G.GGUFPreset("Q4_K_M"), scope="all"), Variant("q2k", G.GGUFPreset("Q2_K"))):
        with engine.applied(variant), torch.no_grad():
            assert not torch.equal(lm.model(ids).logits, base)
        for name, param in lm.model.named_parameters():
            assert torch.equal(param, before[name]), name
        with torch.no_grad():
            assert torch.equal(lm.model(ids).logits, base)


def test_bits_per_weight_through_the_engine(tiny_model):
    """Every linear weight of tiny GPT-2 in Q8_0: 8.5 bits per weight. Scope 'all' adds the biases,
    norms and position embeddings at 32 bits and the tied embedding in Q8_0."""
    lm = tiny_model("gpt2")
    engine = QuantEngine(lm)
    assert engine.bits_per_weight(Variant("q8", G.GGUFType("Q8_0"))) == 8.5
    params = dict(lm.model.named_parameters())
    kept = sum(p.numel() for p in params.values() if p.ndim == 1) + params["transformer.wpe.weight"].numel()
    total = sum(p.numel() for p in params.values())
    expected = (8.5 * (total - kept) + 32 * kept) / total
    assert engine.bits_per_weight(Variant("q8all", G.GGUFType("Q8_0"), scope="all")) == pytest.approx(expected, rel=1e-12)


def test_importance_matrix_reaches_the_decoder_matrices(tiny_model, monkeypatch):
    """prepare() asks for the importance matrix of the decoder-block matrices only (llama-imatrix skips
    token_embd and output), over the named calibration set, and quantizes each matrix with its vector."""
    import qhelpers.quant.imatrix as im
    from qhelpers.text.calibration import calibration_texts

    lm = tiny_model("llama", fresh=True)  # fresh: the per-model imatrix cache starts empty
    calls = {}

    def compute_imatrix(model, tokenizer, texts, roles, names=None, **kwargs):
        calls.update(texts=list(texts), names=set(names))
        return {n: torch.linspace(1, 50, lm.model.get_parameter(n).shape[1]) for n in names}

    monkeypatch.setattr(im, "compute_imatrix", compute_imatrix)
    method = G.GGUFPreset("Q4_K_M", calibration="sw")
    assert method.needs_calibration and method.label == "gguf-Q4_K_M-imat-sw"
    roles = tensor_roles(lm.model)
    prepared = method.prepare(lm.model, roles, lm.tokenizer)
    assert calls["texts"] == calibration_texts("sw")
    assert calls["names"] == {n for n, r in roles.items() if r.layer is not None and lm.model.get_parameter(n).ndim == 2}
    name = "model.layers.1.mlp.down_proj.weight"
    weight = lm.model.get_parameter(name).detach()
    encoded = method.encode(weight, roles[name], None, prepared)
    direct = G.encode_tensor(weight, encoded.qtype, imatrix=torch.linspace(1, 50, weight.shape[1]))
    assert np.array_equal(encoded.codes, direct.codes)
    assert not np.array_equal(encoded.codes, G.encode_tensor(weight, encoded.qtype).codes)
    with pytest.raises(ConfigError, match="tokenizer"):
        method.prepare(lm.model, roles, None)


# ----------------------------------------------------------------------------- configuration


def test_bad_names_raise_config_errors_naming_the_valid_ones():
    with pytest.raises(ConfigError, match=r"Q4_K_X.*IQ4_NL.*Q8_0"):
        G.GGUFType("Q4_K_X")
    with pytest.raises(ConfigError, match=r"Q4_K_X.*Q3_K_M.*Q4_K_M"):
        G.GGUFPreset("Q4_K_X")
    with pytest.raises(ConfigError, match="calibration"):
        G.GGUFPreset("Q4_K_M", calibration=3)  # type: ignore[arg-type]
    assert G.GGUFPreset("q4_k_m", calibration="none") == G.GGUFPreset("Q4_K_M")
    assert hash(G.GGUFType("Q4_K", calibration="en")) == hash(G.GGUFType("q4_k", calibration="en"))
    assert G.GGUFType("IQ4_XS").to_dict() == {"backend": "GGUFType", "qtype": "IQ4_XS", "calibration": None}
    with pytest.raises(ConfigError, match="prepare"):
        G.GGUFType("Q4_K").encode(torch.zeros(4, 256), None, None, None)  # type: ignore[arg-type]

